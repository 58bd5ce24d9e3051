"""One task, one trace: a three-role pipeline over the vLLM simulator, checked span by span.

Real gRPC between replicas (so the interceptors carry the context in metadata), a real etcd, a
simulated LLM replica over HTTP, the SDK's in-memory exporter. Each sampling mode is checked:
``always`` (every task a complete trace), ``ratio`` (whole traces or nothing), ``tail`` (only
the failed and the slow tasks, each complete: its spans travelled inside the Orchestrator).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from agentmesh.agent import Role, Task
from agentmesh.agent.local import LocalMesh, LocalRole
from agentmesh.agent.routing import Sequential
from agentmesh.discovery import EndpointCache, connect
from agentmesh.discovery.etcd_server import EtcdServer
from agentmesh.errors import TaskFailed
from agentmesh.llm_gateway.client import LlmClient
from agentmesh.llm_gateway.replica import LlmReplica
from agentmesh.tracing import configure_tracing
from tests.integration.mesh_run import sink_driver

pytestmark = pytest.mark.integration

MODEL = "sim/tracing"
ROLES = ("writer", "critic", "judge")
EXPORTER = InMemorySpanExporter()


class Writer(Role):
    async def step(self, task: Task) -> None:
        r = await self.llm.chat([{"role": "user", "content": f"write {task.id}"}], max_tokens=6)
        task.add_turn(r.text, prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens)


class Critic(Role):
    async def step(self, task: Task) -> None:
        with trace.get_tracer("test").start_as_current_span("inner work"):
            r = await self.llm.chat([{"role": "user", "content": f"critique {task.id}"}], max_tokens=4)
        task.add_turn(r.text, prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens)


class Judge(Role):
    """Fails the tasks whose input says so; dawdles on the ones marked slow."""

    async def step(self, task: Task) -> None:
        if task.input.get("fail"):
            raise TaskFailed("judged_bad", "the judge rejects this one")
        if task.input.get("slow"):
            await asyncio.sleep(0.6)
        task.add_turn("ok")


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer(fast=True) as server:
        yield server


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    EXPORTER.clear()
    yield
    configure_tracing("agentmesh-test", sampling="off")


async def _run(etcd: EtcdServer, tmp_path: Path, rows: list[dict[str, Any]]) -> Any:
    """Run the pipeline over ``rows``; return the driver's progress."""
    llm_replica = LlmReplica(
        MODEL,
        discovery=etcd.url,
        backend="simulator",
        replica_id="sim-0",
        simulator_profile="fast-test",
        simulator_overrides={"step_base_s": 0.002, "max_num_seqs": 16, "default_max_tokens": 6},
    )
    await llm_replica.start()
    disc = connect(etcd.url)
    cache = EndpointCache(disc)
    llm = LlmClient(MODEL, cache, timeout_s=20, measure_ttft=True)
    prog = Sequential("p", list(ROLES))
    roles = {
        "writer": LocalRole(Writer, replicas=2, llm=llm),
        "critic": LocalRole(Critic, replicas=2, llm=llm),
        "judge": LocalRole(Judge, replicas=1),
    }
    run_id = f"r1-{tmp_path.name[-6:]}".lower().replace("_", "-")
    mesh = LocalMesh(run_id="r1", roles=roles, programs={"p": prog}, discovery=disc)
    await mesh.start()
    try:
        async with sink_driver(tmp_path / f"out-{run_id}", prog, disc, rows) as driver:
            progress = await asyncio.wait_for(driver.run(), 60)
    finally:
        await mesh.stop()
        await llm.close()
        await cache.close()
        await disc.close()
        await llm_replica.stop()
    return progress


def _by_trace() -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = defaultdict(list)
    for s in EXPORTER.get_finished_spans():
        out[s.context.trace_id].append(s)
    return out


def _check_complete_trace(spans: list[Any], *, roles: tuple[str, ...] = ROLES) -> str:
    """Assert that ``spans`` are one task's whole trace; return the task id."""
    roots = [s for s in spans if s.parent is None]
    assert len(roots) == 1, [s.name for s in roots]
    root = roots[0]
    tid = str(root.attributes["agentmesh.task_id"])
    assert root.name == f"task {tid}"
    by_id = {s.context.span_id: s for s in spans}
    names = [s.name for s in spans]
    for role in roles:
        assert names.count(f"step {role}") == 1, (tid, role, names)
        assert names.count(f"queue {role}") == 1, (tid, role, names)
    path = ["source", *roles, "sink"]
    hops = [f"hop {a} -> {b}" for a, b in itertools.pairwise(path)]
    assert sorted(n for n in names if n.startswith("hop ")) == sorted(hops), names
    for s in spans:
        if s.name.startswith(("step ", "queue ", "hop ")):
            assert s.parent.span_id == root.context.span_id, s.name  # children of the task
            assert s.end_time >= s.start_time
        if s.name.startswith("hop "):
            assert s.kind == SpanKind.CLIENT and s.attributes.get("agentmesh.to_replica"), s.name
    # the mesh's own Deliver has no server span: the hop times the send, the queue span starts at
    # arrival (a grpc.aio server interceptor on the busiest RPC cost ~7% of throughput in
    # bench/tracing.py); other services' calls get one, see test_interceptors_*
    assert not [s for s in spans if s.kind == SpanKind.SERVER]
    # every LLM call: inside its step, with model, replica, tokens and time to first token
    llm_spans = [s for s in spans if s.name.startswith("llm.")]
    llm_roles = [r for r in roles if r in ("writer", "critic")]
    assert len(llm_spans) == len(llm_roles), names
    for s in llm_spans:
        a = s.attributes
        assert a["llm.model"] == MODEL and a["llm.replica"] == "sim-0"
        assert a["llm.prompt_tokens"] > 0 and a["llm.completion_tokens"] > 0
        assert 0 < a["llm.ttft_s"] <= (s.end_time - s.start_time) / 1e9
        parent = by_id[s.parent.span_id]
        if parent.name == "inner work":
            parent = by_id[parent.parent.span_id]
        assert parent.name in {f"step {r}" for r in llm_roles}
    return tid


async def test_always_every_task_is_one_complete_trace(etcd: EtcdServer, tmp_path: Path) -> None:
    configure_tracing("agentmesh-test", sampling="always", exporter=EXPORTER)
    progress = await _run(etcd, tmp_path, [{}] * 8)
    assert progress.done == 8
    traces = _by_trace()
    assert len(traces) == 8
    assert sorted(_check_complete_trace(spans) for spans in traces.values()) == [f"t{i}" for i in range(8)]
    # different replicas of a role served different tasks, and their spans still joined
    steps = [s for spans in traces.values() for s in spans if s.name == "step writer"]
    assert len({s.attributes["agentmesh.replica_id"] for s in steps}) == 2


async def test_ratio_keeps_whole_traces_or_nothing(etcd: EtcdServer, tmp_path: Path) -> None:
    configure_tracing("agentmesh-test", sampling="ratio", sample_ratio=0.5, exporter=EXPORTER)
    progress = await _run(etcd, tmp_path, [{}] * 24)
    assert progress.done == 24
    traces = _by_trace()
    assert 1 <= len(traces) <= 23  # P(all or none of 24 at 0.5) ~ 1e-7
    for spans in traces.values():
        _check_complete_trace(spans)


async def test_tail_keeps_the_failed_and_the_slow_with_their_whole_trace(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    configure_tracing("agentmesh-test", sampling="tail", sample_ratio=0.0, slow_s=0.5, exporter=EXPORTER)
    rows: list[dict[str, Any]] = [{}] * 10
    rows = [*rows[:3], {"fail": True}, *rows[3:6], {"slow": True}, *rows[6:]]
    progress = await _run(etcd, tmp_path, rows)
    assert progress.done == 11 and progress.failed == 1
    traces = _by_trace()
    kept = {}
    for spans in traces.values():
        root = next(s for s in spans if s.parent is None)
        kept[str(root.attributes["agentmesh.task_id"])] = (root, spans)
    assert sorted(kept) == ["t3", "t7"]  # the failed one and the slow one, nothing else
    root, spans = kept["t7"]
    assert root.attributes["agentmesh.trace_kept"] == "slow"
    _check_complete_trace(spans)
    # the replicas' spans reached the sink inside the task (rebuilt there, so even the test's own
    # "inner work" span now has the runtime's scope), each naming the process that recorded it
    inner = next(s for s in spans if s.name == "inner work")
    assert inner.instrumentation_scope.name == "agentmesh"
    carried = [s for s in spans if s.name.startswith(("queue ", "step ", "llm."))]
    assert {s.resource.attributes["service.name"] for s in carried} == {"agentmesh-test"}
    root, spans = kept["t3"]
    assert root.attributes["agentmesh.trace_kept"] == "failed"
    assert root.status.status_code == trace.StatusCode.ERROR
    judge = next(s for s in spans if s.name == "step judge")
    assert judge.attributes.get("agentmesh.next_role") == "sink"
    assert {s.name for s in spans} >= {"step writer", "step critic", "hop judge -> sink"}


async def test_tail_ratio_also_keeps_a_share_of_the_rest(etcd: EtcdServer, tmp_path: Path) -> None:
    configure_tracing("agentmesh-test", sampling="tail", sample_ratio=1.0, exporter=EXPORTER)
    progress = await _run(etcd, tmp_path, [{}] * 6)
    assert progress.done == 6
    traces = _by_trace()
    assert len(traces) == 6
    for spans in traces.values():
        _check_complete_trace(spans)
        root = next(s for s in spans if s.parent is None)
        assert root.attributes["agentmesh.trace_kept"] == "sampled"


async def test_interceptors_carry_the_context_in_metadata_and_open_a_server_span() -> None:
    """Any other gRPC service of the mesh (registry, holders, gateway): a server span per traced
    call, a child of the caller's span, with no code in the servicer."""
    import grpc

    from agentmesh.tracing import client_interceptors, server_interceptors, tracer

    configure_tracing("agentmesh-test", sampling="always", exporter=EXPORTER)
    seen: list[str | None] = []

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        seen.append(dict(context.invocation_metadata()).get("traceparent"))
        if request == b"bad":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request: bad")
        return request

    server = grpc.aio.server(interceptors=server_interceptors())
    handler = grpc.unary_unary_rpc_method_handler(echo)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", {"Say": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=client_interceptors()) as ch:
            say = ch.unary_unary("/test.Echo/Say")
            assert await say(b"untraced") == b"untraced"  # no current span: no metadata, no span
            with tracer().start_as_current_span("caller") as caller:
                assert await say(b"hi") == b"hi"
                with pytest.raises(grpc.aio.AioRpcError):
                    await say(b"bad")
    finally:
        await server.stop(0)
    assert seen[0] is None and seen[1] is not None and f"{caller.get_span_context().trace_id:032x}" in seen[1]
    servers = [s for s in EXPORTER.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert [s.name for s in servers] == ["rpc Echo/Say", "rpc Echo/Say"]
    for s in servers:
        assert s.parent.span_id == caller.get_span_context().span_id
        assert s.attributes["rpc.service"] == "test.Echo" and s.attributes["rpc.method"] == "Say"
    assert servers[0].status.status_code == trace.StatusCode.UNSET
    assert servers[1].status.status_code == trace.StatusCode.ERROR
    assert servers[1].attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
