"""Offloaded payloads in the Ray object store outlive the replica that put them."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from agentmesh.agent.payload import RayPayloadStore

pytestmark = pytest.mark.integration


class _Putter:
    def __init__(self, run_id: str) -> None:
        self.store = RayPayloadStore(run_id)

    async def put(self, task_id: str, content: str) -> bytes:
        ref = await self.store.put(task_id, content)
        return ref.SerializeToString()

    def pid(self) -> int:
        return os.getpid()


async def test_payload_survives_its_writer_and_is_freed_on_release(ray_session: None) -> None:
    import ray

    from agentmesh.v1 import orchestrator_pb2 as pb

    store = RayPayloadStore("payload-test", create=True)
    try:
        putter = ray.remote(_Putter).options(num_cpus=0.05).remote("payload-test")
        big = "x" * 300_000
        raw = await putter.put.remote("t1", big)
        ref = pb.PayloadRef.FromString(raw)
        assert ref.store == "ray" and ref.size_bytes == 300_000
        # the replica that offloaded it dies; the content is owned by the run's payload actor
        os.kill(await putter.pid.remote(), signal.SIGKILL)
        await asyncio.sleep(0.5)
        assert await store.get(ref) == big
        assert await store.count() == 1
        await store.release("t1")
        assert await store.count() == 0
        with pytest.raises(ray.exceptions.RayTaskError, match="KeyError"):
            await store.get(ref)
    finally:
        ray.kill(store._actor)
