"""The P2P core on loopback: replicas in one process, real gRPC between them, memory discovery."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agentmesh.agent import Role, Task
from agentmesh.agent.local import LocalMesh, LocalRole
from agentmesh.agent.payload import MemoryPayloadStore
from agentmesh.agent.replica import ReplicaLimits
from agentmesh.agent.routing import LoopUntil, Sequential
from agentmesh.discovery.memory import MemoryDiscovery
from agentmesh.sink import read_records
from tests.integration.mesh_run import sink_driver

pytestmark = pytest.mark.integration


class Append(Role):
    async def step(self, task: Task) -> None:
        task.add_turn(f"{self.ctx.name} saw {task.input['x']}", completion_tokens=1)
        task.results[self.ctx.name] = self.ctx.replica_id


class Flaky(Role):
    """Fails its first attempt on every task; fails for good on rows marked `doom`."""

    async def step(self, task: Task) -> None:
        if task.input.get("doom") or task.orchestrator.attempt == 0:
            raise RuntimeError("flaky step")
        task.add_turn("ok")


class Counter(Role):
    async def step(self, task: Task) -> None:
        n = int(task.results.get("n", "0")) + 1
        task.results["n"] = str(n)
        task.add_turn(f"n={n}")


def stop_at_two(results) -> bool:
    return results.get("n") == "2"


async def run_mesh(tmp_path: Path, roles, program, rows, *, payloads=None, max_in_flight=8):
    disc = MemoryDiscovery()
    mesh = LocalMesh(
        run_id="r1", roles=roles, programs={program.name: program}, discovery=disc, payloads=payloads
    )
    await mesh.start()
    try:
        async with sink_driver(
            tmp_path / "out", program, disc, rows, max_in_flight=max_in_flight, payloads=payloads
        ) as driver:
            progress = await asyncio.wait_for(driver.run(), 60)
    finally:
        await mesh.stop()
    return progress, list(read_records(tmp_path / "out"))


async def test_sequential_chain_every_task_once(tmp_path: Path) -> None:
    roles = {n: LocalRole(Append, replicas=2) for n in ("a", "b", "c")}
    progress, records = await run_mesh(
        tmp_path, roles, Sequential("chain", ["a", "b", "c"]), [{"x": i} for i in range(50)]
    )
    assert progress.done == 50 and progress.failed == 0
    ids = [r["task_id"] for r in records]
    assert sorted(ids) == sorted(f"t{i}" for i in range(50))
    for r in records:
        assert [h["role"] for h in r["history"]] == ["a", "b", "c"]
        assert r["status"] == "done"
    # both replicas of each role got work (power of two choices spreads it)
    used = {r["results"]["a"] for r in records}
    assert used == {"a-0", "a-1"}


async def test_failures_are_isolated_and_retried(tmp_path: Path) -> None:
    roles = {
        "a": LocalRole(Append),
        "f": LocalRole(Flaky, limits=ReplicaLimits(max_attempts=3, retry_backoff_s=0.01)),
    }
    rows = [{"x": i, "doom": i % 5 == 0} for i in range(20)]
    progress, records = await run_mesh(tmp_path, roles, Sequential("p", ["a", "f"]), rows)
    assert progress.done == 16 and progress.failed == 4
    by_id = {r["task_id"]: r for r in records}
    for i in range(20):
        r = by_id[f"t{i}"]
        if i % 5 == 0:
            assert r["status"] == "failed"
            assert r["error"]["code"] == "step_exception" and r["error"]["attempts"] == 3
            assert r["error"]["role"] == "f"
            assert [h["role"] for h in r["history"]] == ["a"]  # history kept, failed attempts left no turn
        else:
            assert r["status"] == "done"
            assert [h["role"] for h in r["history"]] == ["a", "f"]


async def test_loop_until_stops_on_predicate_or_turn_limit(tmp_path: Path) -> None:
    prog = LoopUntil("loop", ["c"], until=stop_at_two, max_turns=5)
    _progress, records = await run_mesh(tmp_path, {"c": LocalRole(Counter)}, prog, [{"x": 1}] * 3)
    assert all(r["results"]["n"] == "2" and len(r["history"]) == 2 for r in records)
    prog2 = LoopUntil("loop", ["c"], until=None, max_turns=4)
    _, records2 = await run_mesh(tmp_path / "b", {"c": LocalRole(Counter)}, prog2, [{"x": 1}] * 3)
    assert all(r["results"]["n"] == "4" for r in records2)


class Big(Role):
    async def step(self, task: Task) -> None:
        task.add_turn("x" * 200_000)


class Reader(Role):
    async def step(self, task: Task) -> None:
        ((_, content),) = await task.transcript(roles={"big"})
        task.results["len"] = str(len(content))


async def test_offloaded_payloads_travel_as_references(tmp_path: Path) -> None:
    store = MemoryPayloadStore()
    roles = {
        "big": LocalRole(Big, limits=ReplicaLimits(offload_threshold_bytes=65536)),
        "reader": LocalRole(Reader),
    }
    progress, records = await run_mesh(
        tmp_path, roles, Sequential("p", ["big", "reader"]), [{"x": 1}] * 5, payloads=store
    )
    assert progress.done == 5
    for r in records:
        assert r["results"]["len"] == "200000"
        assert r["history"][0]["content"] == "x" * 200_000  # the sink fetched it back
    assert len(store) == 0  # released once written


async def test_resume_skips_written_tasks(tmp_path: Path) -> None:
    roles = {"a": LocalRole(Append)}
    rows = [{"x": i} for i in range(10)]
    await run_mesh(tmp_path, roles, Sequential("p", ["a"]), rows[:6])
    progress, records = await run_mesh(tmp_path, roles, Sequential("p", ["a"]), rows)
    assert progress.admitted == 4
    assert sorted(r["task_id"] for r in records) == sorted(f"t{i}" for i in range(10))
