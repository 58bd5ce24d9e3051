"""Integration tests of the vLLM simulator over HTTP on loopback (aiohttp client, SSE parsed by hand)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from agentmesh.llm_gateway.simulator import SimulatedReplica, count_tokens, get_profile, run_many

pytestmark = pytest.mark.integration

MODEL = "sim/fast-test"
QUESTION = "Which is a prime number?\nA) 4\nB) 6\nC) 7\nD) 9"


@pytest.fixture
async def replica() -> AsyncIterator[SimulatedReplica]:
    r = SimulatedReplica(get_profile("fast-test", seed=11))
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        yield s


def chat_body(content: str = QUESTION, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 12, **extra}


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with http.post(url, json=body) as resp:
        return resp.status, await resp.json()


async def read_sse(resp: aiohttp.ClientResponse) -> list[str]:
    """The ``data:`` payloads of an SSE response, checking the framing on the way."""
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    text = await resp.text()
    events = text.split("\n\n")
    assert events[-1] == ""  # every event is terminated by a blank line
    payloads = []
    for event in events[:-1]:
        assert event.startswith("data: "), event
        payloads.append(event[len("data: ") :])
    assert payloads[-1] == "[DONE]"
    return payloads[:-1]


async def metrics(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def sample(m: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total, found = 0.0, False
    for key, value in m.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
            found = True
    assert found, f"no sample {name}{labels}"
    return total


async def poll_until(check: Callable[[], Awaitable[bool]], within_s: float = 5.0) -> None:
    # The state lives in another server, reachable only by asking it again: polling is the tool here.
    async with asyncio.timeout(within_s):
        while not await check():
            await asyncio.sleep(0.005)


async def test_chat_completion_shape_usage_and_determinism(
    replica: SimulatedReplica, http: aiohttp.ClientSession
) -> None:
    url = replica.base_url + "/v1/chat/completions"
    status, out = await post(http, url, chat_body())
    assert status == 200
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert out["model"] == MODEL
    assert out["system_fingerprint"] == "agentmesh-simulator/fast-test"
    (choice,) = out["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "length"
    text = choice["message"]["content"]
    assert re.search(r"Answer: [ABCD]$", text)
    usage = out["usage"]
    assert usage["completion_tokens"] == 12 == count_tokens(text)
    assert usage["prompt_tokens"] == count_tokens(QUESTION) + 4 + 3
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    _, again = await post(http, url, chat_body())
    assert again["choices"][0]["message"]["content"] == text  # same request, same replica seed


async def test_completion_endpoint(replica: SimulatedReplica, http: aiohttp.ClientSession) -> None:
    status, out = await post(
        http, replica.base_url + "/v1/completions", {"prompt": "Once upon", "max_tokens": 5}
    )
    assert status == 200
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert count_tokens(out["choices"][0]["text"]) == 5 == out["usage"]["completion_tokens"]
    assert out["usage"]["prompt_tokens"] == 2


async def test_chat_streaming_with_usage(replica: SimulatedReplica, http: aiohttp.ClientSession) -> None:
    url = replica.base_url + "/v1/chat/completions"
    _, whole = await post(http, url, chat_body())
    body = chat_body(stream=True, stream_options={"include_usage": True})
    async with http.post(url, json=body) as resp:
        assert resp.status == 200
        chunks = [json.loads(p) for p in await read_sse(resp)]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    *token_chunks, final, usage_chunk = chunks[1:]
    assert len(token_chunks) == 12  # one chunk per token, as vLLM streams
    content = "".join(c["choices"][0]["delta"]["content"] for c in token_chunks)
    assert content == whole["choices"][0]["message"]["content"]
    assert all(c["choices"][0]["finish_reason"] is None and c["usage"] is None for c in token_chunks)
    assert final["choices"][0]["finish_reason"] == "length" and final["choices"][0]["delta"] == {}
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == whole["usage"]


async def test_completion_streaming_without_usage(
    replica: SimulatedReplica, http: aiohttp.ClientSession
) -> None:
    body = {"prompt": "Once upon", "max_tokens": 4, "stream": True}
    async with http.post(replica.base_url + "/v1/completions", json=body) as resp:
        chunks = [json.loads(p) for p in await read_sse(resp)]
    assert len(chunks) == 5
    assert all("usage" not in c and c["object"] == "text_completion" for c in chunks)
    assert count_tokens("".join(c["choices"][0]["text"] for c in chunks)) == 4
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_models_health_and_metrics_names(
    replica: SimulatedReplica, http: aiohttp.ClientSession
) -> None:
    async with http.get(replica.base_url + "/health") as resp:
        assert resp.status == 200
    async with http.get(replica.base_url + "/v1/models") as resp:
        (card,) = (await resp.json())["data"]
    assert card["id"] == MODEL
    assert card["simulator"]["profile"] == "fast-test"
    assert card["simulator"]["max_num_seqs"] == 8

    bodies = [chat_body(f"question {i}", max_tokens=3 + i) for i in range(5)]
    outs = await asyncio.gather(*(post(http, replica.base_url + "/v1/chat/completions", b) for b in bodies))
    m = await metrics(http, replica.base_url)
    lb = {"model_name": MODEL}
    assert sample(m, "vllm:num_requests_running", **lb) == 0
    assert sample(m, "vllm:num_requests_waiting", **lb) == 0
    assert sample(m, "vllm:kv_cache_usage_perc", **lb) == 0
    assert sample(m, "vllm:gpu_cache_usage_perc", **lb) == 0
    assert sample(m, "vllm:prompt_tokens_total", **lb) == sum(o["usage"]["prompt_tokens"] for _, o in outs)
    assert sample(m, "vllm:generation_tokens_total", **lb) == sum(
        o["usage"]["completion_tokens"] for _, o in outs
    )
    assert sample(m, "vllm:request_success_total", finished_reason="length", **lb) == 5
    assert sample(m, "vllm:time_to_first_token_seconds_count", **lb) == 5
    assert sample(m, "vllm:e2e_request_latency_seconds_bucket", le="+Inf", **lb) == 5
    assert sample(m, "agentmesh_sim_requests_total", profile="fast-test") == 5
    assert sample(m, "agentmesh_sim_info", profile="fast-test") == 1
    busy = sample(m, "agentmesh_sim_busy_seconds_total")
    assert 0 < busy <= sample(m, "agentmesh_sim_uptime_seconds")


async def test_batch_cap_and_waiting_queue_visible_in_metrics(http: aiohttp.ClientSession) -> None:
    params = get_profile("fast-test", max_num_seqs=2, step_base_s=0.01)
    async with SimulatedReplica(params) as r:
        url = r.base_url + "/v1/chat/completions"
        tasks = [asyncio.create_task(post(http, url, chat_body(f"q{i}", max_tokens=20))) for i in range(6)]

        async def queued() -> bool:
            m = await metrics(http, r.base_url)
            return sample(m, "vllm:num_requests_waiting") == 4

        await poll_until(queued)
        m = await metrics(http, r.base_url)
        assert sample(m, "vllm:num_requests_running") == 2
        assert sample(m, "vllm:kv_cache_usage_perc") > 0
        results = await asyncio.gather(*tasks)
        assert all(status == 200 for status, _ in results)


async def test_429_when_the_waiting_queue_is_over_the_threshold(http: aiohttp.ClientSession) -> None:
    params = get_profile("fast-test", max_num_seqs=1, reject_when_waiting_over=1, step_base_s=0.01)
    async with SimulatedReplica(params) as r:
        url = r.base_url + "/v1/chat/completions"
        first = asyncio.create_task(post(http, url, chat_body("one", max_tokens=30)))
        await poll_until(lambda: _gauge(http, r.base_url, "vllm:num_requests_running", 1))
        second = asyncio.create_task(post(http, url, chat_body("two", max_tokens=5)))
        await poll_until(lambda: _gauge(http, r.base_url, "vllm:num_requests_waiting", 1))
        async with http.post(url, json=chat_body("three")) as resp:
            assert resp.status == 429
            assert resp.headers["x-sim-num-waiting"] == "1"
            err = await resp.json()
        assert err["object"] == "error" and err["code"] == 429
        assert [s for s, _ in await asyncio.gather(first, second)] == [200, 200]
        m = await metrics(http, r.base_url)
        assert sample(m, "agentmesh_sim_requests_rejected_total") == 1
        assert sample(m, "agentmesh_sim_requests_total") == 3
        # Once the queue drained, requests are accepted again.
        status, _ = await post(http, url, chat_body("four"))
        assert status == 200


async def _gauge(http: aiohttp.ClientSession, base: str, name: str, value: float) -> bool:
    return sample(await metrics(http, base), name) == value


async def test_errors_have_the_openai_shape(replica: SimulatedReplica, http: aiohttp.ClientSession) -> None:
    url = replica.base_url + "/v1/chat/completions"
    status, err = await post(http, url, {**chat_body(), "model": "gpt-4"})
    assert status == 404 and err["param"] == "model"
    status, err = await post(http, url, chat_body(max_tokens=-1))
    assert status == 400 and err["param"] == "max_tokens" and "max_tokens" in err["message"]
    async with http.post(url, data=b"{not json", headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400


async def test_client_leaving_a_stream_aborts_the_request(http: aiohttp.ClientSession) -> None:
    params = get_profile("fast-test", step_base_s=0.005)
    async with SimulatedReplica(params) as r:
        body = chat_body(max_tokens=2000, stream=True)
        async with http.post(r.base_url + "/v1/chat/completions", json=body) as resp:
            await resp.content.readuntil(b"\n\n")
            await resp.content.readuntil(b"\n\n")
            resp.close()

        async def aborted() -> bool:
            m = await metrics(http, r.base_url)
            return sample(m, "agentmesh_sim_requests_aborted_total") == 1

        await poll_until(aborted)
        assert sample(await metrics(http, r.base_url), "vllm:num_requests_running") == 0


async def test_run_many_gives_distinct_reproducible_replicas(http: aiohttp.ClientSession) -> None:
    replicas = await run_many(3, get_profile("fast-test"))
    try:
        assert len({r.base_url for r in replicas}) == 3
        texts = []
        for r in replicas:
            _, out = await post(http, r.base_url + "/v1/chat/completions", chat_body("same prompt"))
            texts.append(out["choices"][0]["message"]["content"])
        assert len(set(texts)) == 3  # seeds seed+i differ
    finally:
        for r in replicas:
            await r.stop()


async def test_slowdown_makes_a_replica_slower(http: aiohttp.ClientSession) -> None:
    async with SimulatedReplica(get_profile("fast-test", step_base_s=0.002)) as r:
        url = r.base_url + "/v1/chat/completions"
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await post(http, url, chat_body("a", max_tokens=40))
        fast = loop.time() - t0
        r.set_slowdown(5.0)
        t0 = loop.time()
        await post(http, url, chat_body("b", max_tokens=40))
        slow = loop.time() - t0
        assert slow > 3 * fast


def test_command_line_prints_ready_line_and_serves() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agentmesh.llm_gateway.simulator",
            "--port",
            "0",
            "--profile",
            "fast-test",
            "--max-num-seqs",
            "3",
            "--model",
            "sim/cli",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        match = re.fullmatch(r"SIMULATOR_READY (http://127\.0\.0\.1:(\d+))", line)
        assert match, line
        assert int(match.group(2)) > 0

        async def check() -> dict[str, Any]:
            async with aiohttp.ClientSession() as s, s.get(match.group(1) + "/v1/models") as resp:
                return dict(await resp.json())

        card = asyncio.run(check())["data"][0]
        assert card["id"] == "sim/cli" and card["simulator"]["max_num_seqs"] == 3
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
