"""Graceful drain: a replica leaves discovery at once, refuses new work, finishes what it holds."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from agentmesh.agent import Role, Task
from agentmesh.agent.local import LocalMesh, LocalRole
from agentmesh.agent.peers import agent_service
from agentmesh.agent.replica import ReplicaLimits
from agentmesh.agent.routing import Sequential
from agentmesh.discovery.memory import MemoryDiscovery
from agentmesh.sink import read_records
from agentmesh.v1 import agent_pb2, agent_pb2_grpc
from tests.integration.mesh_run import sink_driver
from tests.integration.test_replica_contract import good_orch

pytestmark = pytest.mark.integration


class Slow(Role):
    async def step(self, task: Task) -> None:
        await asyncio.sleep(0.1)
        task.add_turn(self.ctx.replica_id)


async def test_drain_finishes_held_tasks_and_the_sweep_does_not_recover_them(tmp_path: Path) -> None:
    disc = MemoryDiscovery()
    prog = Sequential("p", ["a", "b"])
    limits = ReplicaLimits(concurrency=2, inbox=64)
    mesh = LocalMesh(
        run_id="r1",
        roles={
            "a": LocalRole(Slow, replicas=2, limits=limits),
            "b": LocalRole(Slow, replicas=1, limits=limits),
        },
        programs={"p": prog},
        discovery=disc,
    )
    await mesh.start()
    async with sink_driver(
        tmp_path / "out", prog, disc, [{}] * 30, max_in_flight=16, recovery_interval_s=0.1
    ) as driver:
        run = asyncio.create_task(driver.run())
        victim = mesh.replicas["a"][0]
        while len(victim.held_task_ids()) < 3:
            await asyncio.sleep(0.005)
        held = victim.held_task_ids()
        drain = asyncio.create_task(victim.drain(grace_s=30))
        await asyncio.sleep(0.01)
        # out of discovery at once, refusing new work while it finishes the old
        assert victim.replica_id not in {e.id for e in await disc.snapshot(agent_service("r1", "a"))}
        async with grpc.aio.insecure_channel(victim.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await agent_pb2_grpc.AgentServiceStub(ch).Deliver(
                    good_orch("x"),
                    timeout=5,
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            # it still answers the sweep with what it holds
            reply = await agent_pb2_grpc.AgentServiceStub(ch).HeldTasks(
                agent_pb2.HeldTasksRequest(), timeout=5
            )
            assert set(reply.task_ids) <= set(held)
        await drain
        progress = await asyncio.wait_for(run, 60)
    await mesh.stop()
    records = {r["task_id"]: r for r in read_records(tmp_path / "out")}
    assert len(records) == 30 and progress.done == 30
    assert progress.recovered == 0
    for task_id in held:  # the drained replica did the step of every task it held
        assert records[task_id]["history"][0]["replica_id"] == victim.replica_id
