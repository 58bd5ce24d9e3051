"""Routing of the client-side gateway against real (simulated) replicas registered in a real etcd:
an overloaded replica that rejects and a slow one are routed around; session affinity keeps a
conversation on its replica while it is healthy and moves it when it is not."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agentmesh.discovery.base import EndpointCache
from agentmesh.discovery.etcd_server import EtcdServer
from agentmesh.llm_gateway.client import LlmClient, llm_service_name
from agentmesh.llm_gateway.replica import LlmReplica

pytestmark = pytest.mark.integration

MODEL = "sim/routing"
SERVICE = llm_service_name(MODEL)
BASE = {"step_base_s": 0.004, "max_num_seqs": 8, "default_max_tokens": 8}


@pytest.fixture
async def fleet(etcd: EtcdServer) -> AsyncIterator[dict[str, LlmReplica]]:
    """Five replicas: three normal, one slow (8x), one small that rejects when its queue is full."""
    specs: dict[str, dict[str, Any]] = {
        "normal-1": {},
        "normal-2": {},
        "normal-3": {},
        "slow": {"slowdown": 8.0},
        "full": {"max_num_seqs": 1, "reject_when_waiting_over": 0},
    }
    replicas = {
        rid: LlmReplica(
            MODEL,
            discovery=etcd.url,
            backend="simulator",
            replica_id=rid,
            simulator_profile="fast-test",
            simulator_overrides={**BASE, **extra},
        )
        for rid, extra in specs.items()
    }
    try:
        for r in replicas.values():
            await r.start()
        yield replicas
    finally:
        for r in replicas.values():
            await r.stop()


def _sim(replica: LlmReplica) -> Any:
    return replica._backend.sim  # type: ignore[attr-defined]


async def test_rejecting_and_slow_replicas_are_routed_around(
    fleet: dict[str, LlmReplica], cache: EndpointCache
) -> None:
    await cache.wait_for(SERVICE, lambda eps: len(eps) == 5, timeout_s=10)
    client = LlmClient(MODEL, cache, timeout_s=30)
    failures: list[BaseException] = []

    async def caller(c: int) -> None:
        for i in range(20):
            try:
                await client.chat([{"role": "user", "content": f"caller {c} call {i}"}], max_tokens=8)
            except Exception as exc:
                failures.append(exc)

    await asyncio.gather(*(caller(c) for c in range(24)))
    await client.close()
    served = {rid: st.completed for rid, st in client.stats().items()}
    rejected = _sim(fleet["full"]).stats()["rejected_total"]
    normal_mean = sum(served[f"normal-{n}"] for n in (1, 2, 3)) / 3
    print(f"\nrouting: served per replica {served}; the full replica rejected {rejected} requests")
    assert not failures, failures[:3]
    assert sum(served.values()) == 480
    assert rejected >= 1, "the small replica should have been overloaded at least once"
    # Each rejection held the full replica out of the choice, so it served far below its share.
    assert served["full"] < normal_mean / 3, served
    assert served["slow"] < normal_mean / 2, served


async def test_session_affinity_sticks_while_healthy_and_moves_when_not(
    fleet: dict[str, LlmReplica], cache: EndpointCache
) -> None:
    await cache.wait_for(SERVICE, lambda eps: len(eps) == 5, timeout_s=10)
    # Only healthy, equal replicas: stop the slow and the full ones.
    for rid in ("slow", "full"):
        await fleet[rid].stop()
    await cache.wait_for(SERVICE, lambda eps: len(eps) == 3, timeout_s=10)
    client = LlmClient(MODEL, cache, timeout_s=30)
    msgs = [{"role": "user", "content": "turn"}]

    async def replicas_of(session: str, n: int = 6) -> Counter[str]:
        got: Counter[str] = Counter()
        for _ in range(n):
            got[(await client.chat(msgs, max_tokens=4, session_id=session)).replica_id] += 1
        return got

    homes = {}
    for s in range(12):
        got = await replicas_of(f"conv-{s}")
        assert len(got) == 1, (s, got)  # one conversation, one replica
        homes[f"conv-{s}"] = next(iter(got))
    assert len(set(homes.values())) >= 2  # sessions are spread, not all on one replica
    # The home of conv-0 goes away: conv-0 moves (no failure) and sticks to its new home;
    # sessions homed elsewhere stay where they were.
    gone = homes["conv-0"]
    await fleet[gone].stop()
    await cache.wait_for(SERVICE, lambda eps: gone not in {e.id for e in eps}, timeout_s=10)
    moved = await replicas_of("conv-0")
    assert len(moved) == 1 and gone not in moved
    for s, home in homes.items():
        if home != gone:
            assert set(await replicas_of(s, 2)) == {home}
    await client.close()
