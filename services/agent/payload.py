"""Payload offloading: large history entries leave the message; only a reference travels.

When a step adds a turn whose content is larger than ``offload_threshold_bytes``, the replica puts
the content into a payload store and replaces it in the message with a :class:`PayloadRef`. Roles
fetch content lazily (``Task.content``); the sink fetches everything once to write the record, then
releases the task's payloads.

* :class:`RayPayloadStore` — the Ray object store. One per-run actor puts each payload there
  itself, so the actor owns the object and it outlives the replica that offloaded it (a replica may
  be killed; Ray frees an object whose owner dies). Readers get the object reference from the
  actor and read the object store directly. The sink releases a task's payloads once written.
* :class:`MemoryPayloadStore` — a dict, for replicas running in one process (tests, benchmarks).
"""

from __future__ import annotations

import abc
import itertools
import uuid
from typing import Any

from agentmesh.v1 import orchestrator_pb2 as pb

__all__ = ["MemoryPayloadStore", "PayloadStore", "RayPayloadStore", "payload_actor_name"]


class PayloadStore(abc.ABC):
    name: str

    @abc.abstractmethod
    async def put(self, task_id: str, content: str) -> pb.PayloadRef: ...

    @abc.abstractmethod
    async def get(self, ref: pb.PayloadRef) -> str: ...

    @abc.abstractmethod
    async def release(self, task_id: str) -> None:
        """Free every payload of ``task_id`` (the task reached the sink)."""


class MemoryPayloadStore(PayloadStore):
    name = "memory"

    def __init__(self) -> None:
        self._data: dict[str, dict[str, str]] = {}
        self._seq = itertools.count()

    async def put(self, task_id: str, content: str) -> pb.PayloadRef:
        key = f"{task_id}/{next(self._seq)}"
        self._data.setdefault(task_id, {})[key] = content
        return pb.PayloadRef(store=self.name, key=key, size_bytes=len(content.encode()))

    async def get(self, ref: pb.PayloadRef) -> str:
        task_id = ref.key.rpartition("/")[0]
        try:
            return self._data[task_id][ref.key]
        except KeyError:
            raise KeyError(f"payload {ref.key!r} not found in the memory store") from None

    async def release(self, task_id: str) -> None:
        self._data.pop(task_id, None)

    def __len__(self) -> int:
        return sum(len(v) for v in self._data.values())


def payload_actor_name(run_id: str) -> str:
    return f"agentmesh-payloads-{run_id}"


class _PayloadPins:
    """Ray actor body: owns and pins the run's offloaded payloads, keyed by task."""

    def __init__(self) -> None:
        self._refs: dict[str, dict[str, Any]] = {}

    def put(self, task_id: str, key: str, data: bytes) -> None:
        import ray

        self._refs.setdefault(task_id, {})[key] = ray.put(data)

    def lookup(self, task_id: str, key: str) -> list[Any]:
        return [self._refs[task_id][key]]  # a list keeps the ref unresolved on the way back

    def release(self, task_id: str) -> int:
        return len(self._refs.pop(task_id, {}))

    def count(self) -> int:
        return sum(len(v) for v in self._refs.values())


class RayPayloadStore(PayloadStore):
    name = "ray"

    def __init__(self, run_id: str, *, create: bool = False) -> None:
        import ray

        actor_name = payload_actor_name(run_id)
        if create:
            cls = ray.remote(num_cpus=0.01, max_restarts=0)(_PayloadPins)
            self._actor: Any = cls.options(name=actor_name, get_if_exists=True).remote()  # type: ignore[attr-defined]
        else:
            self._actor = ray.get_actor(actor_name)
        self._prefix = uuid.uuid4().hex[:12]  # keys from different replicas never collide
        self._seq = itertools.count()

    async def put(self, task_id: str, content: str) -> pb.PayloadRef:

        data = content.encode()
        key = f"{task_id}/{self._prefix}-{next(self._seq)}"
        await self._actor.put.remote(task_id, key, data)
        return pb.PayloadRef(store=self.name, key=key, size_bytes=len(data))

    async def get(self, ref: pb.PayloadRef) -> str:
        task_id = ref.key.rpartition("/")[0]
        (obj_ref,) = await self._actor.lookup.remote(task_id, ref.key)
        data: bytes = await obj_ref
        return data.decode()

    async def release(self, task_id: str) -> None:
        await self._actor.release.remote(task_id)

    async def count(self) -> int:
        n: int = await self._actor.count.remote()
        return n
