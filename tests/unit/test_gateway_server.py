"""The gateway server's shared logic without sockets: body checks, error mapping, gRPC request
translation, the per-model clients, streaming errors and the drain (fake clients, memory discovery)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from agentmesh.discovery.base import Endpoint, EndpointCache
from agentmesh.discovery.memory import MemoryDiscovery
from agentmesh.errors import LlmError, LlmRequestError
from agentmesh.llm_gateway.accounting import LlmAccounting
from agentmesh.llm_gateway.client import llm_service_name
from agentmesh.llm_gateway.server import GatewayError, GatewayServer, grpc_request_body, validate_body
from agentmesh.v1 import llm_gateway_pb2 as pb

MODEL = "Org/Tiny-Model"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


# -- body checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "body", "param"),
    [
        ("chat", [], None),
        ("chat", {"messages": CHAT["messages"]}, "model"),
        ("chat", {**CHAT, "model": "  "}, "model"),
        ("chat", {**CHAT, "model": "///"}, "model"),
        ("chat", {"model": MODEL}, "messages"),
        ("chat", {**CHAT, "messages": []}, "messages"),
        ("chat", {**CHAT, "messages": ["hi"]}, "messages[0]"),
        ("chat", {**CHAT, "messages": [{"content": "hi"}]}, "messages[0].role"),
        ("chat", {**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ("chat", {**CHAT, "max_tokens": 0}, "max_tokens"),
        ("chat", {**CHAT, "max_tokens": "5"}, "max_tokens"),
        ("chat", {**CHAT, "max_tokens": True}, "max_tokens"),
        ("chat", {**CHAT, "n": 0}, "n"),
        ("chat", {**CHAT, "temperature": -0.1}, "temperature"),
        ("chat", {**CHAT, "temperature": "hot"}, "temperature"),
        ("chat", {**CHAT, "top_p": 0}, "top_p"),
        ("chat", {**CHAT, "top_p": 1.5}, "top_p"),
        ("chat", {**CHAT, "seed": 1.5}, "seed"),
        ("chat", {**CHAT, "stop": [1]}, "stop"),
        ("chat", {**CHAT, "stream": "yes"}, "stream"),
        ("chat", {**CHAT, "stream_options": []}, "stream_options"),
        ("chat", {**CHAT, "session_id": 7}, "session_id"),
        ("completion", {"model": MODEL}, "prompt"),
        ("completion", {"model": MODEL, "prompt": 5}, "prompt"),
        ("completion", {"model": MODEL, "prompt": []}, "prompt"),
    ],
)
def test_bad_bodies_are_400_naming_the_field(kind: Any, body: Any, param: str | None) -> None:
    with pytest.raises(GatewayError) as info:
        validate_body(kind, body)
    err = info.value
    assert err.status == 400 and err.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.error["param"] == param
    if param is not None:
        assert err.message.startswith(f"{param}: ")


def test_good_body_is_forwarded_without_the_gateways_fields() -> None:
    body = {**CHAT, "session_id": "conv-1", "temperature": 0, "seed": 3, "stop": "\n", "logprobs": True}
    model, forward, session = validate_body("chat", body)
    assert model == MODEL and session == "conv-1"
    assert forward == {
        "messages": CHAT["messages"],
        "max_tokens": 4,
        "temperature": 0,
        "seed": 3,
        "stop": "\n",
        "logprobs": True,  # any other OpenAI field passes through untouched
    }
    assert "model" in body  # the caller's dict is not modified
    _, forward, session = validate_body("completion", {"model": MODEL, "prompt": ["a", "b"]})
    assert forward == {"prompt": ["a", "b"]} and session is None


# -- gRPC requests -------------------------------------------------------------------------------


def test_grpc_request_body_maps_typed_fields_and_extra_json() -> None:
    req = pb.ChatRequest(
        model=MODEL,
        messages=[
            pb.ChatMessage(role="system", content="be brief"),
            pb.ChatMessage(role="user", content="hi"),
        ],
        options=pb.SamplingOptions(
            max_tokens=8, temperature=0.0, seed=42, stop=["\n"], session_id="s1", extra_json='{"top_k": 5}'
        ),
    )
    body = grpc_request_body("chat", req)
    assert body == {
        "top_k": 5,
        "model": MODEL,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "max_tokens": 8,
        "temperature": 0.0,  # set explicitly: present even though it is the proto default
        "seed": 42,
        "stop": ["\n"],
        "session_id": "s1",
    }
    plain = grpc_request_body("completion", pb.CompleteRequest(model=MODEL, prompt="x"))
    assert plain == {"model": MODEL, "prompt": "x"}  # unset optional fields are not sent


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ("{not json", "options.extra_json"),
        ("[1]", "options.extra_json"),
        ('{"model": "other"}', "options.extra_json.model"),
        ('{"stream": true}', "options.extra_json.stream"),
    ],
)
def test_grpc_bad_extra_json(extra: str, param: str) -> None:
    req = pb.CompleteRequest(model=MODEL, prompt="x", options=pb.SamplingOptions(extra_json=extra))
    with pytest.raises(GatewayError) as info:
        grpc_request_body("completion", req)
    assert info.value.status == 400 and info.value.error["param"] == param


# -- error mapping -------------------------------------------------------------------------------


def test_replica_refusal_is_relayed_with_its_own_error() -> None:
    vllm_flat = json.dumps(
        {
            "object": "error",
            "message": "max_tokens is too large",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
    ).encode()
    err = GatewayError.from_exception(LlmRequestError("refused", status=400, body=vllm_flat), MODEL)
    assert err.status == 400 and err.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.to_json() == {
        "error": {"message": "max_tokens is too large", "type": "BadRequestError", "param": None, "code": 400}
    }
    assert "max_tokens is too large" in err.message

    nested = json.dumps({"error": {"message": "no such model", "type": "not_found", "code": "x"}}).encode()
    err = GatewayError.from_exception(LlmRequestError("refused", status=404, body=nested), MODEL)
    assert err.status == 404 and err.grpc_code == grpc.StatusCode.NOT_FOUND
    assert err.error == {"message": "no such model", "type": "not_found", "code": "x"}

    err = GatewayError.from_exception(
        LlmRequestError("refused", status=422, body=b"<html>nope</html>"), MODEL
    )
    assert err.status == 422 and err.error["message"] == "<html>nope</html>"


def test_gave_up_is_503_and_deadline_is_504() -> None:
    err = GatewayError.from_exception(LlmError("failed after 3 attempts"), MODEL)
    assert err.status == 503 and err.grpc_code == grpc.StatusCode.UNAVAILABLE
    assert "failed after 3 attempts" in err.message
    late = LlmError("timed out after 1s")
    late.timed_out = True
    err = GatewayError.from_exception(late, MODEL)
    assert err.status == 504 and err.grpc_code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert GatewayError.from_exception(TimeoutError(), MODEL).status == 504


# -- the server's shared logic with fake clients ---------------------------------------------------


@dataclass
class _Reply:
    data: dict[str, Any]
    replica_id: str = "r1"
    latency_s: float = 0.01
    attempts: int = 1


@dataclass
class FakeClient:
    """Records calls; answers with ``reply`` or raises ``error``; streams ``events``."""

    model: str
    reply: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None
    events: list[Any] = field(default_factory=list)
    gate: asyncio.Event | None = None
    calls: list[tuple[str, dict[str, Any], str | None, float | None]] = field(default_factory=list)
    closed: bool = False

    async def send(
        self,
        path: str,
        body: Mapping[str, Any],
        *,
        session_id: str | None = None,
        timeout_s: float | None = None,
    ) -> _Reply:
        self.calls.append((path, dict(body), session_id, timeout_s))
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return _Reply(self.reply)

    def stream(
        self,
        path: str,
        body: Mapping[str, Any],
        *,
        session_id: str | None = None,
        timeout_s: float | None = None,
        info: dict[str, Any] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        self.calls.append((path, dict(body), session_id, timeout_s))
        if info is not None:
            info["replica_id"] = "fake-0"

        async def gen() -> AsyncIterator[dict[str, Any]]:
            for ev in self.events:
                if isinstance(ev, BaseException):
                    raise ev
                yield ev

        return gen()

    async def close(self) -> None:
        self.closed = True


class Gateway:
    def __init__(self, models: list[str] | None = None, **client: Any) -> None:
        self.discovery = MemoryDiscovery()
        self.clients: dict[str, FakeClient] = {}

        def factory(model: str, cache: EndpointCache, accounting: LlmAccounting) -> Any:
            self.clients[model] = FakeClient(model, **client)
            return self.clients[model]

        self.server = GatewayServer(self.discovery, models=models, timeout_s=30, client_factory=factory)

    async def register(self, model: str = MODEL) -> None:
        await self.discovery.register(Endpoint(llm_service_name(model), "r1", "127.0.0.1:1"))


async def test_unknown_model_is_404_and_no_client_is_made() -> None:
    gw = Gateway(reply={"choices": []})
    with pytest.raises(GatewayError) as info:
        await gw.server.call("chat", CHAT)
    assert info.value.status == 404 and info.value.error["param"] == "model"
    assert info.value.grpc_code == grpc.StatusCode.NOT_FOUND
    assert gw.clients == {}
    await gw.register()
    _, replica = await gw.server.call("chat", CHAT)
    assert replica == "r1" and list(gw.clients) == [MODEL]


async def test_configured_models_only() -> None:
    gw = Gateway(models=[MODEL], reply={"ok": 1})
    await gw.register("other")
    with pytest.raises(GatewayError) as info:
        await gw.server.call("chat", {**CHAT, "model": "other"})
    assert info.value.status == 404 and "not served here" in info.value.message
    # A configured model is served even before a replica shows up (the client waits for one).
    data, _ = await gw.server.call("chat", CHAT)
    assert data == {"ok": 1}
    assert [m["id"] for m in gw.server.models_payload()["data"]] == [MODEL]


async def test_call_forwards_body_session_and_deadline() -> None:
    gw = Gateway(reply={"id": "x"})
    await gw.register()
    body = {**CHAT, "stream": False, "session_id": "in-body"}
    data, _ = await gw.server.call("chat", body, timeout_s=2.5)
    assert data == {"id": "x"}
    path, sent, session, timeout = gw.clients[MODEL].calls[-1]
    assert path == "/v1/chat/completions"
    assert sent == {"messages": CHAT["messages"], "max_tokens": 4}
    assert session == "in-body" and timeout == 2.5
    await gw.server.call("completion", {"model": MODEL, "prompt": "p"}, session_id="header", timeout_s=99)
    path, sent, session, timeout = gw.clients[MODEL].calls[-1]
    assert path == "/v1/completions" and session == "header" and timeout == 30  # the default is the cap
    with pytest.raises(GatewayError) as info:
        await gw.server.call("chat", CHAT, timeout_s=-1)
    assert info.value.status == 504


async def test_client_errors_map_to_statuses() -> None:
    gw = Gateway(error=LlmRequestError("refused", status=400, body=b'{"message": "bad", "type": "x"}'))
    await gw.register()
    with pytest.raises(GatewayError) as info:
        await gw.server.call("chat", CHAT)
    assert info.value.status == 400 and info.value.error["message"] == "bad"
    gw.clients[MODEL].error = LlmError("no replica answered")
    with pytest.raises(GatewayError) as info:
        await gw.server.call("chat", CHAT)
    assert info.value.status == 503


async def test_stream_failure_before_first_event_raises_from_call_stream() -> None:
    gw = Gateway(events=[LlmError("all replicas failed")])
    await gw.register()
    with pytest.raises(GatewayError) as info:
        await gw.server.call_stream("chat", {**CHAT, "stream": True})
    assert info.value.status == 503
    assert gw.clients[MODEL].calls[-1][1]["stream"] is True


async def test_stream_failure_after_first_event_raises_from_the_iterator() -> None:
    gw = Gateway(events=[{"n": 1}, {"n": 2}, LlmError("replica died")])
    await gw.register()
    events = await gw.server.call_stream("completion", {"model": MODEL, "prompt": "p", "stream": True})
    got = []
    with pytest.raises(GatewayError) as info:
        async for ev in events:
            got.append(ev)
    assert got == [{"n": 1}, {"n": 2}] and info.value.status == 503


class FakeContext:
    """The part of grpc.aio.ServicerContext the gateway uses."""

    def __init__(self, remaining: float | None = None) -> None:
        self.remaining = remaining
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def time_remaining(self) -> float | None:
        return self.remaining

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise RuntimeError("aborted")


async def test_grpc_unary_reply_and_abort() -> None:
    reply = {
        "model": MODEL,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Paris"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2},
    }
    gw = Gateway(reply=reply)
    await gw.register()
    req = pb.ChatRequest(model=MODEL, messages=[pb.ChatMessage(role="user", content="capital?")])
    out = await gw.server.grpc_unary("chat", req, FakeContext(remaining=5.0))
    assert (out.text, out.finish_reason, out.replica_id) == ("Paris", "stop", "r1")
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (9, 2)
    assert json.loads(out.raw_json) == reply
    assert gw.clients[MODEL].calls[-1][3] == 5.0  # the gRPC deadline bounds the call

    ctx = FakeContext()
    with pytest.raises(RuntimeError, match="aborted"):
        await gw.server.grpc_unary("chat", pb.ChatRequest(model=MODEL), ctx)
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT and ctx.details.startswith("messages: ")
    assert gw.server.counts[("grpc", "chat", "INVALID_ARGUMENT")] == 1


async def test_grpc_stream_chunks() -> None:
    events = [
        {"choices": [{"index": 0, "text": "Hel", "finish_reason": None}]},
        {"choices": [{"index": 0, "text": "lo", "finish_reason": "length"}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
    ]
    gw = Gateway(events=events)
    await gw.register()
    req = pb.CompleteRequest(model=MODEL, prompt="x", options=pb.SamplingOptions(max_tokens=2))
    chunks = [c async for c in gw.server.grpc_stream("completion", req, FakeContext())]
    assert [c.text for c in chunks] == ["Hel", "lo", ""]
    assert chunks[1].finish_reason == "length"
    assert not chunks[0].HasField("usage") and chunks[2].usage.completion_tokens == 2
    assert [json.loads(c.raw_json) for c in chunks] == events


async def test_drain_refuses_new_requests_and_waits_for_in_flight() -> None:
    gate = asyncio.Event()
    gw = Gateway(reply={"done": True}, gate=gate)
    await gw.register()
    first = asyncio.create_task(
        gw.server.grpc_unary(
            "chat",
            pb.ChatRequest(model=MODEL, messages=[pb.ChatMessage(role="user", content="hi")]),
            FakeContext(),
        )
    )
    while gw.server.in_flight == 0:
        await asyncio.sleep(0)
    drain = asyncio.create_task(gw.server.drain(grace_s=10))
    while not gw.server.draining:
        await asyncio.sleep(0)
    ctx = FakeContext()
    with pytest.raises(RuntimeError, match="aborted"):
        await gw.server.grpc_unary("chat", pb.ChatRequest(model=MODEL), ctx)
    assert ctx.code == grpc.StatusCode.UNAVAILABLE and "draining" in ctx.details
    assert not drain.done()  # the request in flight holds the drain
    gate.set()
    out = await first
    assert json.loads(out.raw_json) == {"done": True}
    await asyncio.wait_for(drain, 5)
    assert gw.clients[MODEL].closed
