"""LlmClient against a fake transport and in-memory discovery: choice, retries, errors, tracing."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agentmesh.discovery.base import Endpoint, EndpointCache
from agentmesh.discovery.memory import MemoryDiscovery
from agentmesh.errors import LlmError
from agentmesh.llm_gateway.client import (
    LlmClient,
    TransportError,
    TransportResponse,
    llm_service_name,
)

MODEL = "Org/Tiny-Model"
SERVICE = llm_service_name(MODEL)


def _ok(text: str = "hi", prompt_tokens: int = 5, completion_tokens: int = 2) -> TransportResponse:
    body = {
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
    }
    return TransportResponse(200, json.dumps(body).encode())


Handler = Callable[[str, Mapping[str, Any]], Any]


class FakeTransport:
    """Answers by host:port; records every call. A handler may be async (to hold requests open)."""

    def __init__(self, handlers: dict[str, Handler] | None = None) -> None:
        self.handlers = handlers or {}
        self.calls: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        self.closed = False
        self._called = asyncio.Condition()

    async def post_json(
        self, url: str, payload: Mapping[str, Any], *, headers: Mapping[str, str], timeout_s: float
    ) -> TransportResponse:
        address = url.split("://", 1)[1].split("/", 1)[0]
        self.calls.append((address, dict(payload), dict(headers)))
        async with self._called:
            self._called.notify_all()
        handler = self.handlers.get(address, lambda u, p: _ok())
        result = handler(url, payload)
        if asyncio.iscoroutine(result):
            result = await result
        assert isinstance(result, TransportResponse)
        return result

    async def close(self) -> None:
        self.closed = True

    async def wait_calls(self, n: int) -> None:
        async with self._called:
            await asyncio.wait_for(self._called.wait_for(lambda: len(self.calls) >= n), 2)

    def addresses(self) -> list[str]:
        return [c[0] for c in self.calls]


def _ep(n: int) -> Endpoint:
    return Endpoint(
        SERVICE, f"r{n}", f"10.0.0.{n}:8000", {"scheme": "http", "backend": "simulator", "model": MODEL}
    )


@pytest.fixture
async def mesh() -> Any:
    disc = MemoryDiscovery()
    cache = EndpointCache(disc)
    yield disc, cache
    await cache.close()


async def _client(cache: EndpointCache, transport: FakeTransport, **kw: Any) -> LlmClient:
    kw.setdefault("backoff_initial_s", 0.001)
    kw.setdefault("backoff_max_s", 0.002)
    kw.setdefault("rng", random.Random(7))
    return LlmClient(MODEL, cache, transport=transport, **kw)


async def _register(disc: MemoryDiscovery, cache: EndpointCache, *eps: Endpoint) -> None:
    for e in eps:
        await disc.register(e)
    want = {e.id for e in eps}
    await cache.wait_for(SERVICE, lambda cur: want <= {e.id for e in cur}, timeout_s=2)


def test_service_name_sanitized() -> None:
    assert (
        llm_service_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "llm.huggingfacetb-smollm2-135m-instruct"
    )
    assert llm_service_name("smollm2-135m-instruct") == "llm.smollm2-135m-instruct"
    with pytest.raises(ValueError, match="model"):
        llm_service_name("  ")


async def test_chat_returns_text_usage_and_replica(mesh: Any) -> None:
    disc, cache = mesh
    await _register(disc, cache, _ep(1))
    transport = FakeTransport()
    client = await _client(cache, transport)
    res = await client.chat([{"role": "user", "content": "hello"}], max_tokens=8, seed=3, stop="\n")
    assert (res.text, res.prompt_tokens, res.completion_tokens, res.replica_id) == ("hi", 5, 2, "r1")
    assert res.latency_s >= 0 and res.attempts == 1
    address, payload, _ = transport.calls[0]
    assert address == "10.0.0.1:8000"
    assert payload["model"] == MODEL and payload["seed"] == 3 and payload["stop"] == ["\n"]
    assert payload["messages"] == [{"role": "user", "content": "hello"}]
    await client.close()
    assert transport.closed


async def test_complete_uses_completions_endpoint(mesh: Any) -> None:
    disc, cache = mesh
    await _register(disc, cache, _ep(1))
    urls: list[str] = []

    def handler(url: str, payload: Mapping[str, Any]) -> TransportResponse:
        urls.append(url)
        body = {"choices": [{"text": " world", "finish_reason": "length"}], "usage": {"prompt_tokens": 1}}
        return TransportResponse(200, json.dumps(body).encode())

    client = await _client(cache, FakeTransport({"10.0.0.1:8000": handler}))
    res = await client.complete("hello", max_tokens=4)
    assert urls == ["http://10.0.0.1:8000/v1/completions"]
    assert (res.text, res.finish_reason, res.prompt_tokens, res.completion_tokens) == (
        " world",
        "length",
        1,
        0,
    )


async def test_less_loaded_of_two_wins(mesh: Any) -> None:
    """Two replicas: p2c compares both, so while one holds a call the next goes to the other."""
    disc, cache = mesh
    await _register(disc, cache, _ep(1), _ep(2))
    msgs = [{"role": "user", "content": "x"}]
    for seed in range(10):
        release = asyncio.Event()

        async def slow(
            url: str, payload: Mapping[str, Any], release: asyncio.Event = release
        ) -> TransportResponse:
            await release.wait()
            return _ok()

        transport = FakeTransport({"10.0.0.1:8000": slow, "10.0.0.2:8000": slow})
        client = await _client(cache, transport, rng=random.Random(seed))
        first = asyncio.create_task(client.chat(msgs, max_tokens=1))
        await transport.wait_calls(1)
        second = asyncio.create_task(client.chat(msgs, max_tokens=1))
        await transport.wait_calls(2)
        assert transport.calls[1][0] != transport.calls[0][0]  # 1 vs 0 in flight: the idle one wins
        assert sorted(s.in_flight for s in client.stats().values()) == [1, 1]
        release.set()
        await asyncio.gather(first, second)
        assert all(s.in_flight == 0 for s in client.stats().values())


async def test_p2c_spreads_load_evenly_among_many(mesh: Any) -> None:
    disc, cache = mesh
    await _register(disc, cache, *(_ep(n) for n in range(1, 5)))
    release = asyncio.Event()

    async def slow(url: str, payload: Mapping[str, Any]) -> TransportResponse:
        await release.wait()
        return _ok()

    transport = FakeTransport({f"10.0.0.{n}:8000": slow for n in range(1, 5)})
    client = await _client(cache, transport)
    tasks = [
        asyncio.create_task(client.chat([{"role": "user", "content": "x"}], max_tokens=1)) for _ in range(40)
    ]
    await transport.wait_calls(40)
    loads = sorted(s.in_flight for s in client.stats().values())
    # p2c keeps the spread tight; random choice would often leave a replica far above 10.
    assert sum(loads) == 40 and loads[-1] - loads[0] <= 3, loads
    release.set()
    await asyncio.gather(*tasks)


async def test_retry_goes_to_another_replica(mesh: Any) -> None:
    disc, cache = mesh
    await _register(disc, cache, _ep(1), _ep(2), _ep(3))

    def refuse(url: str, payload: Mapping[str, Any]) -> TransportResponse:
        raise TransportError("connection refused")

    for bad in range(1, 4):
        transport = FakeTransport({f"10.0.0.{bad}:8000": refuse})
        client = await _client(cache, transport, rng=random.Random(bad))
        for _ in range(10):
            transport.calls.clear()
            res = await client.chat([{"role": "user", "content": "x"}], max_tokens=1)
            addrs = transport.addresses()
            assert len(addrs) == len(set(addrs)), addrs  # never the same replica twice in one call
            assert res.replica_id != f"r{bad}"


async def test_503_is_retried_elsewhere_and_counted(mesh: Any) -> None:
    disc, cache = mesh
    await _register(disc, cache, _ep(1), _ep(2))
    transport = FakeTransport({"10.0.0.1:8000": lambda u, p: TransportResponse(503, b"draining")})
    client = await _client(cache, transport)
    results = [await client.chat([{"role": "user", "content": "x"}], max_tokens=1) for _ in range(10)]
    assert {r.replica_id for r in results} == {"r2"}
    assert client.stats()["r1"].failures >= 1


async def test_429_then_success(mesh: Any) -> None:
    disc, cache = mesh
    await _register(disc, cache, _ep(1))  # one replica: the retry has to go back to it
    answers = iter([TransportResponse(429, b'{"error": "full"}'), _ok("second")])
    transport = FakeTransport({"10.0.0.1:8000": lambda u, p: next(answers)})
    client = await _client(cache, transport)
    res = await client.chat([{"role": "user", "content": "x"}], max_tokens=1)
    assert res.text == "second" and res.attempts == 2 and len(transport.calls) == 2


async def test_llm_error_after_max_attempts(mesh: Any) -> None:
    disc, cache = mesh
    await _register(disc, cache, _ep(1), _ep(2))

    def boom(url: str, payload: Mapping[str, Any]) -> TransportResponse:
        return TransportResponse(500, b"internal error")

    transport = FakeTransport({"10.0.0.1:8000": boom, "10.0.0.2:8000": boom})
    client = await _client(cache, transport, max_attempts=4)
    with pytest.raises(LlmError, match=r"failed after 4 attempts.*HTTP 500"):
        await client.chat([{"role": "user", "content": "x"}], max_tokens=1)
    assert len(transport.calls) == 4


async def test_bad_request_is_not_retried(mesh: Any) -> None:
    disc, cache = mesh
    await _register(disc, cache, _ep(1), _ep(2))
    bad = lambda u, p: TransportResponse(400, b'{"error": "max_tokens too large"}')  # noqa: E731
    transport = FakeTransport({"10.0.0.1:8000": bad, "10.0.0.2:8000": bad})
    client = await _client(cache, transport)
    with pytest.raises(LlmError, match=r"HTTP 400.*max_tokens too large"):
        await client.chat([{"role": "user", "content": "x"}], max_tokens=1)
    assert len(transport.calls) == 1


async def test_deadline_bounds_the_call(mesh: Any) -> None:
    disc, cache = mesh
    await _register(disc, cache, _ep(1))

    async def hang(url: str, payload: Mapping[str, Any]) -> TransportResponse:
        await asyncio.sleep(30)  # a transport that ignores its timeout: the client still stops
        return _ok()

    transport = FakeTransport({"10.0.0.1:8000": hang})
    client = await _client(cache, transport, timeout_s=0.05, max_attempts=1000, backoff_initial_s=0.01)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(LlmError, match=r"timed out after 0\.05s"):
        await client.chat([{"role": "user", "content": "x"}], max_tokens=1)
    assert loop.time() - t0 < 1.0


async def test_removed_replica_gets_no_new_requests(mesh: Any) -> None:
    disc, cache = mesh
    await _register(disc, cache, _ep(1), _ep(2))
    transport = FakeTransport()
    client = await _client(cache, transport)
    for _ in range(6):
        await client.chat([{"role": "user", "content": "x"}], max_tokens=1)
    assert set(transport.addresses()) == {"10.0.0.1:8000", "10.0.0.2:8000"}
    disc.kill(SERVICE, "r1")
    await cache.wait_for(SERVICE, lambda cur: [e.id for e in cur] == ["r2"], timeout_s=2)
    assert "r1" not in client.stats()  # pruned on the membership change
    transport.calls.clear()
    for _ in range(10):
        await client.chat([{"role": "user", "content": "x"}], max_tokens=1)
    assert set(transport.addresses()) == {"10.0.0.2:8000"}


async def test_no_replica_is_a_clear_error(mesh: Any) -> None:
    _, cache = mesh
    client = await _client(cache, FakeTransport(), endpoint_wait_s=0.05)
    with pytest.raises(LlmError, match=r"no replica registered.*llm\.org-tiny-model"):
        await client.chat([{"role": "user", "content": "x"}], max_tokens=1)


async def test_waits_for_a_replica_to_appear(mesh: Any) -> None:
    disc, cache = mesh
    client = await _client(cache, FakeTransport(), endpoint_wait_s=5)
    call = asyncio.create_task(client.chat([{"role": "user", "content": "x"}], max_tokens=1))
    await asyncio.sleep(0.01)
    assert not call.done()
    await disc.register(_ep(3))
    assert (await asyncio.wait_for(call, 2)).replica_id == "r3"


async def test_session_affinity_sticks(mesh: Any) -> None:
    disc, cache = mesh
    await _register(disc, cache, *(_ep(n) for n in range(1, 6)))
    client = await _client(cache, FakeTransport())
    msgs = [{"role": "user", "content": "x"}]
    for sid in ("a", "b", "c"):
        ids = {(await client.chat(msgs, max_tokens=1, session_id=sid)).replica_id for _ in range(5)}
        assert len(ids) == 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"messages": [], "max_tokens": 1}, "messages"),
        ({"messages": [{"content": "no role"}], "max_tokens": 1}, r"messages\[0\]"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "temperature": -1}, "temperature"),
    ],
)
async def test_bad_input_names_the_field(mesh: Any, kwargs: dict[str, Any], field: str) -> None:
    _, cache = mesh
    client = await _client(cache, FakeTransport())
    with pytest.raises(ValueError, match=field):
        await client.chat(**kwargs)


async def test_span_joins_the_callers_trace(mesh: Any) -> None:
    disc, cache = mesh
    await _register(disc, cache, _ep(1))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    transport = FakeTransport()
    client = await _client(cache, transport, tracer_provider=provider)
    with provider.get_tracer("test").start_as_current_span("task") as parent:
        await client.chat([{"role": "user", "content": "x"}], max_tokens=1)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    chat = spans["llm.chat"]
    assert chat.parent is not None and chat.parent.span_id == parent.get_span_context().span_id
    assert chat.context.trace_id == parent.get_span_context().trace_id
    assert chat.attributes is not None
    assert chat.attributes["llm.replica"] == "r1" and chat.attributes["llm.completion_tokens"] == 2
    assert chat.attributes["llm.model"] == MODEL and chat.attributes["llm.prompt_tokens"] == 5
    # The W3C context went to the replica too.
    assert f"{parent.get_span_context().trace_id:032x}" in transport.calls[0][2]["traceparent"]
