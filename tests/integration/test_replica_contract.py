"""A replica refuses bad Orchestrators with a clear status and keeps serving everyone else."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from agentmesh.agent import Role, Task
from agentmesh.agent.local import LocalMesh, LocalRole
from agentmesh.agent.replica import ReplicaLimits
from agentmesh.agent.routing import Sequential
from agentmesh.discovery.memory import MemoryDiscovery
from agentmesh.sink import read_records
from agentmesh.v1 import agent_pb2, agent_pb2_grpc
from agentmesh.v1 import orchestrator_pb2 as pb
from tests.integration.mesh_run import sink_driver

pytestmark = pytest.mark.integration

DELIVER = "/agentmesh.v1.AgentService/Deliver"


class Slow(Role):
    async def step(self, task: Task) -> None:
        await asyncio.sleep(0.02)
        task.add_turn("ok")


def good_orch(task_id: str = "t") -> pb.Orchestrator:
    o = pb.Orchestrator(schema_version=pb.SCHEMA_VERSION_1, task_id=task_id, run_id="r1", input_json="{}")
    o.status = pb.TASK_STATUS_RUNNING
    o.routing.program = "p"
    o.routing.current_role = "a"
    return o


async def test_bad_messages_get_clear_statuses_and_the_replica_keeps_serving(tmp_path: Path) -> None:
    disc = MemoryDiscovery()
    prog = Sequential("p", ["a"])
    limits = ReplicaLimits(concurrency=2, inbox=64, max_message_bytes=1 << 20)
    mesh = LocalMesh(
        run_id="r1", roles={"a": LocalRole(Slow, limits=limits)}, programs={"p": prog}, discovery=disc
    )
    await mesh.start()
    async with sink_driver(
        tmp_path / "out", prog, disc, ({"i": i} for i in range(40)), max_in_flight=8
    ) as driver:
        run = asyncio.create_task(driver.run())
        address = mesh.replicas["a"][0].address
        async with grpc.aio.insecure_channel(
            address, options=[("grpc.max_send_message_length", 8 << 20)]
        ) as ch:
            raw = ch.unary_unary(DELIVER)

            async def expect(payload: bytes, code: grpc.StatusCode, fragment: str) -> None:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await raw(payload, timeout=5)
                assert info.value.code() == code, info.value
                assert fragment in (info.value.details() or ""), info.value.details()

            # malformed bytes
            await expect(
                b"\xff\xff\xff\x0f garbage", grpc.StatusCode.INVALID_ARGUMENT, "malformed Orchestrator"
            )
            # wrong wire version
            o = good_orch()
            o.schema_version = 7  # type: ignore[assignment]
            await expect(o.SerializeToString(), grpc.StatusCode.INVALID_ARGUMENT, "schema_version")
            # wrong run, wrong role, unknown program, empty task id
            o = good_orch()
            o.run_id = "other"
            await expect(o.SerializeToString(), grpc.StatusCode.INVALID_ARGUMENT, "run_id")
            o = good_orch()
            o.routing.current_role = "b"
            await expect(o.SerializeToString(), grpc.StatusCode.INVALID_ARGUMENT, "current_role")
            o = good_orch()
            o.routing.program = "nope"
            await expect(o.SerializeToString(), grpc.StatusCode.INVALID_ARGUMENT, "routing.program")
            o = good_orch("")
            await expect(o.SerializeToString(), grpc.StatusCode.INVALID_ARGUMENT, "task_id")
            # oversized (2 MiB > the replica's 1 MiB limit)
            o = good_orch()
            o.history.add(role="x", content="y" * (2 << 20))
            await expect(o.SerializeToString(), grpc.StatusCode.RESOURCE_EXHAUSTED, "")

            stub = agent_pb2_grpc.AgentServiceStub(ch)
            load = await stub.Load(agent_pb2.LoadRequest(), timeout=5)
            assert load.replica_id == "a-0" and load.concurrency == 2

        progress = await asyncio.wait_for(run, 30)
    stats = mesh.replicas["a"][0].stats
    await mesh.stop()
    assert progress.done == 40 and progress.failed == 0
    assert len({r["task_id"] for r in read_records(tmp_path / "out")}) == 40
    assert stats["rejected_malformed"] == 1 and stats["rejected_invalid"] == 5


async def test_full_inbox_answers_resource_exhausted_with_load() -> None:
    disc = MemoryDiscovery()
    prog = Sequential("p", ["a"])

    class Never(Role):
        async def step(self, task: Task) -> None:
            await asyncio.Event().wait()

    mesh = LocalMesh(
        run_id="r1",
        roles={"a": LocalRole(Never, limits=ReplicaLimits(concurrency=1, inbox=2))},
        programs={"p": prog},
        discovery=disc,
    )
    await mesh.start()
    try:
        async with grpc.aio.insecure_channel(mesh.replicas["a"][0].address) as ch:
            stub = agent_pb2_grpc.AgentServiceStub(ch)
            for i in range(3):  # one running + two queued
                await stub.Deliver(good_orch(f"t{i}"), timeout=5)
                await asyncio.sleep(0.01)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Deliver(good_orch("t9"), timeout=5)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "inbox full" in (info.value.details() or "")
            md = dict(info.value.trailing_metadata() or ())
            assert md["agentmesh-load"].startswith("2,1,2,1")
    finally:
        await mesh.stop()


async def test_health_and_reflection_are_served_and_drain_flips_health() -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    disc = MemoryDiscovery()
    mesh = LocalMesh(
        run_id="r1", roles={"a": LocalRole(Slow)}, programs={"p": Sequential("p", ["a"])}, discovery=disc
    )
    await mesh.start()
    replica = mesh.replicas["a"][0]

    def services() -> list[str]:
        with grpc.insecure_channel(replica.address) as ch:
            return sorted(ProtoReflectionDescriptorDatabase(ch).get_services())

    try:
        assert "agentmesh.v1.AgentService" in await asyncio.to_thread(services)
        async with grpc.aio.insecure_channel(replica.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            req = health_pb2.HealthCheckRequest(service="agentmesh.v1.AgentService")
            assert (await health.Check(req, timeout=5)).status == health_pb2.HealthCheckResponse.SERVING
            watch = health.Watch(req)
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            drain = asyncio.create_task(replica.drain(grace_s=5))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            await drain
    finally:
        await mesh.stop()


async def test_a_burst_of_5000_deliveries_is_accepted_not_cancelled() -> None:
    """grpc cancels calls past 3,000 pending on a server by default; replicas lift that limit and
    bound their work with the inbox instead (regression: a 10,000-task admission burst stalled)."""
    disc = MemoryDiscovery()

    class Park(Role):
        async def step(self, task: Task) -> None:
            await asyncio.Event().wait()

    limits = ReplicaLimits(concurrency=1, inbox=6000)
    mesh = LocalMesh(
        run_id="r1",
        roles={"a": LocalRole(Park, limits=limits)},
        programs={"p": Sequential("p", ["a"])},
        discovery=disc,
    )
    await mesh.start()
    try:
        async with grpc.aio.insecure_channel(mesh.replicas["a"][0].address) as ch:
            stub = agent_pb2_grpc.AgentServiceStub(ch)
            replies = await asyncio.gather(
                *(stub.Deliver(good_orch(f"t{i}"), timeout=60) for i in range(5000)), return_exceptions=True
            )
        errors = [r for r in replies if isinstance(r, BaseException)]
        assert not errors, f"{len(errors)} deliveries failed, e.g. {errors[0]!r}"
        assert len(mesh.replicas["a"][0].held_task_ids()) == 5000
    finally:
        await mesh.stop()
