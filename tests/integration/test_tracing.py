"""One task, one trace: the spans of every replica the task visited join under the task's root."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agentmesh.agent import Role, Task
from agentmesh.agent.local import LocalMesh, LocalRole
from agentmesh.agent.routing import LoopUntil
from agentmesh.discovery.memory import MemoryDiscovery
from agentmesh.tracing import configure_tracing
from tests.integration.mesh_run import sink_driver

pytestmark = pytest.mark.integration

EXPORTER = InMemorySpanExporter()


class Speak(Role):
    async def step(self, task: Task) -> None:
        with trace.get_tracer("test").start_as_current_span("inner work"):
            task.add_turn(self.ctx.replica_id)


@pytest.fixture(autouse=True)
def _tracing() -> None:
    configure_tracing("agentmesh-test", exporter=EXPORTER)
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        EXPORTER.clear()


async def test_each_task_is_one_trace_across_replicas(tmp_path: Path) -> None:
    disc = MemoryDiscovery()
    prog = LoopUntil("debate", ["teacher", "student", "judge"], until=None, max_turns=2)
    roles = {n: LocalRole(Speak, replicas=2) for n in ("teacher", "student", "judge")}
    mesh = LocalMesh(run_id="r1", roles=roles, programs={"debate": prog}, discovery=disc)
    await mesh.start()
    async with sink_driver(tmp_path / "out", prog, disc, [{}] * 6) as driver:
        await asyncio.wait_for(driver.run(), 30)
    await mesh.stop()

    spans = EXPORTER.get_finished_spans()
    by_task: dict[str, list] = defaultdict(list)
    for s in spans:
        tid = (s.attributes or {}).get("agentmesh.task_id")
        if tid:
            by_task[str(tid)].append(s)
    assert sorted(by_task) == [f"t{i}" for i in range(6)]
    for tid, task_spans in by_task.items():
        roots = [s for s in task_spans if s.name == f"task {tid}"]
        assert len(roots) == 1, tid
        root = roots[0]
        assert root.parent is None
        trace_id = root.context.trace_id
        assert {s.context.trace_id for s in task_spans} == {trace_id}
        steps = [s for s in task_spans if s.name.startswith("step ")]
        hops = [s for s in task_spans if s.name.startswith("hop ")]
        assert len(steps) == 6  # 3 roles x 2 turns
        assert len(hops) == 6  # each step forwards once (the last one to the sink)
        assert all(s.parent is not None and s.parent.span_id == root.context.span_id for s in steps + hops)
        replicas = {s.attributes["agentmesh.replica_id"] for s in steps}
        assert {r.split("-")[0] for r in replicas} == {"teacher", "student", "judge"}
        # work done inside a step is a child of that step, in the same trace
        inner = [s for s in spans if s.name == "inner work" and s.context.trace_id == trace_id]
        assert len(inner) == 6
        assert {s.parent.span_id for s in inner} == {s.context.span_id for s in steps}
