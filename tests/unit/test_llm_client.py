"""LlmClient against a fake transport and in-memory discovery: choice, retries, errors, tracing."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from agentmesh.discovery.base import Endpoint, EndpointCache
from agentmesh.discovery.memory import MemoryDiscovery
from agentmesh.errors import LlmError, LlmRequestError
from agentmesh.llm_gateway.client import (
    LlmClient,
    ReplicaUnreachable,
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


def _metrics(running: int, waiting: int) -> TransportResponse:
    text = (
        "# TYPE vllm:num_requests_running gauge\n"
        f'vllm:num_requests_running{{model_name="{MODEL}"}} {running}.0\n'
        f'vllm:num_requests_waiting{{model_name="{MODEL}"}} {waiting}.0\n'
    )
    return TransportResponse(200, text.encode())


class FakeStream:
    """A streamed answer: status, then ``lines`` one by one (an exception in the list is raised)."""

    def __init__(
        self, status: int, lines: list[Any], body: bytes = b"", headers: dict[str, str] | None = None
    ) -> None:
        self.status = status
        self.headers = headers or {}
        self._lines = lines
        self._body = body
        self.closed = False

    async def read(self) -> bytes:
        return self._body

    async def lines(self) -> AsyncIterator[bytes]:
        for item in self._lines:
            await asyncio.sleep(0)
            if isinstance(item, BaseException):
                raise item
            yield item

    async def close(self) -> None:
        self.closed = True


def _sse_chat(
    pieces: list[str], *, usage: tuple[int, int] = (5, 2), extra: list[Any] | None = None
) -> FakeStream:
    lines: list[Any] = []
    for i, piece in enumerate(pieces):
        finish = "stop" if i == len(pieces) - 1 else None
        event = {
            "model": MODEL,
            "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": finish}],
        }
        lines += [b"data: " + json.dumps(event).encode() + b"\n", b"\n"]
    lines += list(extra or [])
    usage_event = {
        "model": MODEL,
        "choices": [],
        "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]},
    }
    lines += [b"data: " + json.dumps(usage_event).encode() + b"\n", b"\n", b"data: [DONE]\n"]
    return FakeStream(200, lines)


class FakeTransport:
    """Answers by host:port; records every call. A handler may be async (to hold requests open)."""

    def __init__(self, handlers: dict[str, Handler] | None = None) -> None:
        self.handlers = handlers or {}
        self.stream_handlers: dict[str, Handler] = {}
        self.probe_handlers: dict[str, Callable[[str], Any]] = {}
        self.probes: list[str] = []
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

    async def get(self, url: str, *, timeout_s: float) -> TransportResponse:
        address = url.split("://", 1)[1].split("/", 1)[0]
        self.probes.append(address)
        probe = self.probe_handlers.get(address)
        if probe is not None:
            result = probe(url)
            if asyncio.iscoroutine(result):
                result = await result
            assert isinstance(result, TransportResponse)
            return result
        return _metrics(0, 0)

    async def open_stream(
        self, url: str, payload: Mapping[str, Any], *, headers: Mapping[str, str], timeout_s: float
    ) -> FakeStream:
        address = url.split("://", 1)[1].split("/", 1)[0]
        self.calls.append((address, dict(payload), dict(headers)))
        async with self._called:
            self._called.notify_all()
        handler = self.stream_handlers.get(address, lambda u, p: _sse_chat(["hi", " there"]))
        result = handler(url, payload)
        if asyncio.iscoroutine(result):
            result = await result
        if isinstance(result, TransportResponse):
            return FakeStream(result.status, [], result.body, dict(result.headers))
        assert isinstance(result, FakeStream)
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


async def test_chat_returns_text_usage_and_replica(memory_mesh: Any) -> None:
    disc, cache = memory_mesh
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


async def test_complete_uses_completions_endpoint(memory_mesh: Any) -> None:
    disc, cache = memory_mesh
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


async def test_less_loaded_of_two_wins(memory_mesh: Any) -> None:
    """Two replicas: p2c compares both, so while one holds a call the next goes to the other."""
    disc, cache = memory_mesh
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


async def test_p2c_spreads_load_evenly_among_many(memory_mesh: Any) -> None:
    disc, cache = memory_mesh
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


async def test_retry_goes_to_another_replica(memory_mesh: Any) -> None:
    disc, cache = memory_mesh
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


async def test_503_is_retried_elsewhere_and_counted(memory_mesh: Any) -> None:
    disc, cache = memory_mesh
    await _register(disc, cache, _ep(1), _ep(2))
    transport = FakeTransport({"10.0.0.1:8000": lambda u, p: TransportResponse(503, b"draining")})
    client = await _client(cache, transport)
    results = [await client.chat([{"role": "user", "content": "x"}], max_tokens=1) for _ in range(10)]
    assert {r.replica_id for r in results} == {"r2"}
    assert client.stats()["r1"].failures >= 1


async def test_429_then_success(memory_mesh: Any) -> None:
    disc, cache = memory_mesh
    await _register(disc, cache, _ep(1))  # one replica: the retry has to go back to it
    answers = iter([TransportResponse(429, b'{"error": "full"}'), _ok("second")])
    transport = FakeTransport({"10.0.0.1:8000": lambda u, p: next(answers)})
    client = await _client(cache, transport)
    res = await client.chat([{"role": "user", "content": "x"}], max_tokens=1)
    assert res.text == "second" and res.attempts == 2 and len(transport.calls) == 2


async def test_llm_error_after_max_attempts(memory_mesh: Any) -> None:
    disc, cache = memory_mesh
    await _register(disc, cache, _ep(1), _ep(2))

    def boom(url: str, payload: Mapping[str, Any]) -> TransportResponse:
        return TransportResponse(500, b"internal error")

    transport = FakeTransport({"10.0.0.1:8000": boom, "10.0.0.2:8000": boom})
    client = await _client(cache, transport, max_attempts=4)
    with pytest.raises(LlmError, match=r"failed after 4 attempts.*HTTP 500"):
        await client.chat([{"role": "user", "content": "x"}], max_tokens=1)
    assert len(transport.calls) == 4


async def test_bad_request_is_not_retried(memory_mesh: Any) -> None:
    disc, cache = memory_mesh
    await _register(disc, cache, _ep(1), _ep(2))
    bad = lambda u, p: TransportResponse(400, b'{"error": "max_tokens too large"}')  # noqa: E731
    transport = FakeTransport({"10.0.0.1:8000": bad, "10.0.0.2:8000": bad})
    client = await _client(cache, transport)
    with pytest.raises(LlmError, match=r"HTTP 400.*max_tokens too large"):
        await client.chat([{"role": "user", "content": "x"}], max_tokens=1)
    assert len(transport.calls) == 1


async def test_deadline_bounds_the_call(memory_mesh: Any) -> None:
    disc, cache = memory_mesh
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


async def test_removed_replica_gets_no_new_requests(memory_mesh: Any) -> None:
    disc, cache = memory_mesh
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


async def test_no_replica_is_a_clear_error(memory_mesh: Any) -> None:
    _, cache = memory_mesh
    client = await _client(cache, FakeTransport(), endpoint_wait_s=0.05)
    with pytest.raises(LlmError, match=r"no replica registered.*llm\.org-tiny-model"):
        await client.chat([{"role": "user", "content": "x"}], max_tokens=1)


async def test_waits_for_a_replica_to_appear(memory_mesh: Any) -> None:
    disc, cache = memory_mesh
    client = await _client(cache, FakeTransport(), endpoint_wait_s=5)
    call = asyncio.create_task(client.chat([{"role": "user", "content": "x"}], max_tokens=1))
    await asyncio.sleep(0.01)
    assert not call.done()
    await disc.register(_ep(3))
    assert (await asyncio.wait_for(call, 2)).replica_id == "r3"


async def test_session_affinity_sticks(memory_mesh: Any) -> None:
    disc, cache = memory_mesh
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
async def test_bad_input_names_the_field(memory_mesh: Any, kwargs: dict[str, Any], field: str) -> None:
    _, cache = memory_mesh
    client = await _client(cache, FakeTransport())
    with pytest.raises(ValueError, match=field):
        await client.chat(**kwargs)


async def test_span_joins_the_callers_trace(memory_mesh: Any) -> None:
    disc, cache = memory_mesh
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


# -- failover, rejection, slowness, streaming, accounting ---------------------------------------


async def test_unreachable_replica_is_dropped_at_once_and_no_call_fails(memory_mesh: Any) -> None:
    disc, cache = memory_mesh
    await _register(disc, cache, *(_ep(n) for n in range(1, 5)))
    killed = False

    def maybe_refuse(url: str, payload: Mapping[str, Any]) -> TransportResponse:
        if killed:
            raise ReplicaUnreachable("connection refused")
        return _ok()

    transport = FakeTransport({"10.0.0.2:8000": maybe_refuse})
    transport.probe_handlers["10.0.0.2:8000"] = lambda url: maybe_refuse(url, {})
    client = await _client(cache, transport)
    msgs = [{"role": "user", "content": "x"}]
    for _ in range(20):
        await client.chat(msgs, max_tokens=1)
    killed = True
    transport.calls.clear()
    results = [await client.chat(msgs, max_tokens=1) for _ in range(200)]
    assert all(r.replica_id != "r2" for r in results)
    # At most the one call that discovered the death touched r2 (and was retried elsewhere).
    assert transport.addresses().count("10.0.0.2:8000") <= 1
    assert client.stats()["r2"].dead
    snap = client.accounting.snapshot()
    assert snap["calls_failed"] == {}


async def test_retry_after_holds_a_rejecting_replica_out(memory_mesh: Any) -> None:
    disc, cache = memory_mesh
    await _register(disc, cache, _ep(1), _ep(2))
    full = lambda u, p: TransportResponse(429, b'{"error": "full"}', {"retry-after": "30"})  # noqa: E731
    transport = FakeTransport({"10.0.0.1:8000": full})
    client = await _client(cache, transport)
    msgs = [{"role": "user", "content": "x"}]
    results = [await client.chat(msgs, max_tokens=1) for _ in range(30)]
    assert {r.replica_id for r in results} == {"r2"}
    assert transport.addresses().count("10.0.0.1:8000") == 1  # rejected once, then held for 30 s
    assert client.stats()["r1"].held_until > 0


async def test_single_replica_retry_waits_its_retry_after(memory_mesh: Any) -> None:
    disc, cache = memory_mesh
    await _register(disc, cache, _ep(1))
    answers = iter([TransportResponse(429, b"slow down", {"retry-after": "0.2"}), _ok("after")])
    transport = FakeTransport({"10.0.0.1:8000": lambda u, p: next(answers)})
    client = await _client(cache, transport)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    res = await client.chat([{"role": "user", "content": "x"}], max_tokens=1)
    assert res.text == "after" and res.attempts == 2
    assert loop.time() - t0 >= 0.19


async def test_slow_replica_is_routed_around(memory_mesh: Any) -> None:
    disc, cache = memory_mesh
    await _register(disc, cache, *(_ep(n) for n in range(1, 5)))

    async def slow(url: str, payload: Mapping[str, Any]) -> TransportResponse:
        await asyncio.sleep(0.05)
        return _ok()

    async def fast(url: str, payload: Mapping[str, Any]) -> TransportResponse:
        await asyncio.sleep(0.002)
        return _ok()

    transport = FakeTransport({"10.0.0.1:8000": slow, **{f"10.0.0.{n}:8000": fast for n in (2, 3, 4)}})
    client = await _client(cache, transport)
    msgs = [{"role": "user", "content": "x"}]

    async def worker() -> None:
        for _ in range(15):
            await client.chat(msgs, max_tokens=1)

    await asyncio.gather(*(worker() for _ in range(8)))
    counts = {rid: s.completed for rid, s in client.stats().items()}
    assert sum(counts.values()) == 120
    assert counts["r1"] < min(counts[r] for r in ("r2", "r3", "r4")) / 3, counts


async def test_other_clients_load_seen_through_the_probe(memory_mesh: Any) -> None:
    disc, cache = memory_mesh
    transport = FakeTransport()
    transport.probe_handlers["10.0.0.1:8000"] = lambda url: _metrics(30, 10)  # busy with others
    client = await _client(cache, transport)
    await _register(disc, cache, _ep(1), _ep(2))
    for _ in range(20):
        await asyncio.sleep(0)
    results = [await client.chat([{"role": "user", "content": "x"}], max_tokens=1) for _ in range(20)]
    assert {r.replica_id for r in results} == {"r2"}
    assert client.stats()["r1"].reported_waiting == 10


async def test_stream_yields_events_measures_ttft_and_hides_usage_unless_asked(memory_mesh: Any) -> None:
    disc, cache = memory_mesh
    await _register(disc, cache, _ep(1))
    transport = FakeTransport()
    client = await _client(cache, transport)
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
    events = [e async for e in client.stream("/v1/chat/completions", body)]
    assert [e["choices"][0]["delta"]["content"] for e in events] == ["hi", " there"]
    sent = transport.calls[0][1]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    body["stream_options"] = {"include_usage": True}
    events = [e async for e in client.stream("/v1/chat/completions", body)]
    assert events[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 2}
    acc = client.accounting.snapshot()["replicas"][0]
    assert acc["ok"] == 2 and acc["completion_tokens"] == 4 and acc["ttft_s"]["count"] == 2


async def test_chat_with_measure_ttft_streams_internally(memory_mesh: Any) -> None:
    disc, cache = memory_mesh
    await _register(disc, cache, _ep(1))
    client = await _client(cache, FakeTransport(), measure_ttft=True)
    res = await client.chat([{"role": "user", "content": "x"}], max_tokens=4)
    assert (res.text, res.finish_reason, res.prompt_tokens, res.completion_tokens) == (
        "hi there",
        "stop",
        5,
        2,
    )
    assert res.ttft_s is not None and 0 <= res.ttft_s <= res.latency_s
    assert res.replica_id == "r1"


async def test_stream_retries_before_the_first_event_only(memory_mesh: Any) -> None:
    disc, cache = memory_mesh
    await _register(disc, cache, _ep(1), _ep(2))
    transport = FakeTransport()
    transport.stream_handlers["10.0.0.1:8000"] = lambda u, p: TransportResponse(503, b"busy")
    client = await _client(cache, transport, rng=random.Random(1))
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
    for _ in range(5):
        events = [e async for e in client.stream("/v1/chat/completions", body)]
        assert len(events) == 2  # went to r2 (possibly after r1 answered 503)
    broken = _sse_chat(["a", "b"])
    broken._lines.insert(2, TransportError("connection reset"))
    transport.stream_handlers["10.0.0.2:8000"] = lambda u, p: broken
    transport.stream_handlers["10.0.0.1:8000"] = lambda u, p: broken
    got: list[dict[str, Any]] = []
    with pytest.raises(LlmError, match="broke after it started"):
        async for e in client.stream("/v1/chat/completions", body):
            got.append(e)
    assert len(got) == 1  # what arrived before the break was passed on; no silent retry


async def test_request_error_carries_status_and_body(memory_mesh: Any) -> None:
    disc, cache = memory_mesh
    await _register(disc, cache, _ep(1))
    transport = FakeTransport({"10.0.0.1:8000": lambda u, p: TransportResponse(422, b'{"error": "bad"}')})
    client = await _client(cache, transport)
    with pytest.raises(LlmRequestError) as info:
        await client.send("/v1/chat/completions", {"messages": []})
    assert info.value.status == 422 and info.value.body == b'{"error": "bad"}'
    assert client.accounting.snapshot()["replicas"][0]["errors"] == {"refused": 1}


async def test_accounting_counts_tokens_latency_and_errors_per_replica(memory_mesh: Any) -> None:
    disc, cache = memory_mesh
    await _register(disc, cache, _ep(1), _ep(2))
    transport = FakeTransport({"10.0.0.1:8000": lambda u, p: TransportResponse(500, b"oops")})
    client = await _client(cache, transport)
    for _ in range(6):
        await client.chat([{"role": "user", "content": "x"}], max_tokens=1)
    rows = {r["replica"]: r for r in client.accounting.snapshot()["replicas"]}
    assert (
        rows["r2"]["ok"] == 6 and rows["r2"]["prompt_tokens"] == 30 and rows["r2"]["completion_tokens"] == 12
    )
    assert rows["r2"]["latency_s"]["count"] == 6
    assert rows["r1"]["ok"] == 0 and rows["r1"]["errors"].get("server_error", 0) >= 1
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(client.accounting.prometheus_text())
        for s in fam.samples
    }
    tokens = ("agentmesh_llm_tokens_total", (("kind", "completion"), ("model", MODEL), ("replica", "r2")))
    assert samples[tokens] == 12
    errors = ("agentmesh_llm_errors_total", (("kind", "server_error"), ("model", MODEL), ("replica", "r1")))
    assert samples[errors] >= 1


async def test_random_policy_is_available_for_baselines(memory_mesh: Any) -> None:
    disc, cache = memory_mesh
    await _register(disc, cache, _ep(1), _ep(2))
    client = await _client(cache, FakeTransport(), policy="random")
    assert client.policy == "random"
    ids = [
        (await client.chat([{"role": "user", "content": "x"}], max_tokens=1)).replica_id for _ in range(40)
    ]
    assert set(ids) == {"r1", "r2"}


async def test_close_removes_the_listener(memory_mesh: Any) -> None:
    disc, cache = memory_mesh
    client = await _client(cache, FakeTransport())
    await client.close()
    await _register(disc, cache, _ep(1))
    assert client.stats() == {}
