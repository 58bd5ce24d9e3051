"""The simulator's accounting for benchmarks: per-request service time header, /sim/stats, slot seconds."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from agentmesh.llm_gateway.simulator import SERVICE_TIME_HEADER, SimulatedReplica, get_profile

pytestmark = pytest.mark.integration


async def test_service_time_header_and_stats_account_for_the_batch() -> None:
    # 10 ms steps, batch cap 4, 5 tokens each: 6 requests -> 4 run together, 2 wait one round.
    params = get_profile("fast-test", step_base_s=0.01, step_per_seq_s=0.0, max_num_seqs=4)
    replica = SimulatedReplica(params)
    url = await replica.start()
    body = {"model": params.model, "prompt": "hello", "max_tokens": 5}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:

            async def one() -> tuple[float, float]:
                t0 = time.perf_counter()
                async with http.post(f"{url}/v1/completions", json=body) as resp:
                    assert resp.status == 200
                    await resp.read()
                    return time.perf_counter() - t0, float(resp.headers[SERVICE_TIME_HEADER])

            results = await asyncio.gather(*(one() for _ in range(6)))
            async with http.get(f"{url}/sim/stats") as resp:
                stats = await resp.json()
    finally:
        await replica.stop()
    for client_s, service_s in results:
        assert 0.045 <= service_s <= client_s  # at least 5 steps of 10 ms, never more than the client saw
    # The two that waited spent a whole first round in the queue.
    assert sorted(s for _, s in results)[-1] >= 0.095
    assert stats["max_num_seqs"] == 4 and stats["success"] == 6
    # Slot seconds: 4 sequences x 5 steps + 2 x 5 steps, 10 ms each = 0.3 sequence-seconds.
    assert stats["slot_busy_s"] == pytest.approx(0.3, rel=0.02)
    assert stats["busy_s"] == pytest.approx(0.1, rel=0.02)
