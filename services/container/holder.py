"""A sandbox holder: one process (a Ray actor in a cluster) that keeps many sandboxes of its node.

The registry asks a holder to create sandboxes (warm, not yet anyone's), to hand one to a client
with a lease (``Assign``), and to destroy them; clients then run commands in their sandbox on the
holder directly (``ContainerService.Exec``), without a hop through the registry. Every exec renews
the lease; a sandbox left unused for its whole lease is destroyed here, by the holder, and reported
to the registry on its next ``Inventory`` call. The holder registers in discovery
(``container.holder.<registry name>``); if it dies, the registry drops what it held.

Why many sandboxes per holder rather than one Ray actor per sandbox: a sandbox is a few kernel
objects and a directory (see :mod:`agentmesh.container.backends.local`). A held sandbox costs its
holder ~2 KB (and the kernel ~40 KB), where a Ray actor is a Python process of ~124 MB that takes
~0.66 s from creation to a sandbox's first exec on a 2-core machine (``bench/sandbox.py``); a
hundred sandboxes as a hundred actors cost 6.7 GB and half a minute to start here. The holder is
still a Ray actor, so Ray places it, restarts it, and accounts for it.

Metrics (:mod:`agentmesh.metrics`): ``agentmesh_sandbox_exec_seconds{backend}``, the duration of
every exec that ran (a refused or failed-to-start one is not timed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import grpc
from grpc_health.v1 import health
from prometheus_client import CollectorRegistry

from agentmesh.container.backends import get_backend
from agentmesh.container.sandbox import Limits, Sandbox, SandboxBackend, SandboxError, SandboxSpec
from agentmesh.container.wire import (
    exec_reply,
    holder_service,
    limits_from_pb,
    limits_to_pb,
    set_serving,
    start_server,
    validate_exec,
)
from agentmesh.discovery import Discovery, Endpoint, Registration
from agentmesh.metrics import REGISTRY, SandboxMetrics
from agentmesh.v1 import container_pb2 as cpb
from agentmesh.v1 import container_pb2_grpc as cgrpc

__all__ = ["SandboxHolder"]

log = logging.getLogger(__name__)

Ctx: TypeAlias = grpc.aio.ServicerContext  # type: ignore[type-arg]


@dataclass
class _Held:
    sandbox: Sandbox
    backend: str
    image: str
    limits: Limits
    client_id: str = ""  # "": warm, not handed out
    lease_s: float = 0.0
    acquired_unix_ms: int = 0
    last_used: float = field(default_factory=time.monotonic)
    last_used_unix_ms: int = 0
    execs: int = 0
    busy: int = 0  # execs running now: a sandbox in use is never reclaimed

    def touch(self) -> None:
        self.last_used = time.monotonic()
        self.last_used_unix_ms = int(time.time() * 1000)

    def remaining_s(self, now: float) -> float:
        if not self.client_id:
            return 0.0
        return max(0.0, self.lease_s - (now - self.last_used))


class SandboxHolder(cgrpc.ContainerServiceServicer, cgrpc.SandboxHostServicer):
    """Holds up to ``capacity`` sandboxes; serves ContainerService (Exec, Status) and SandboxHost."""

    def __init__(
        self,
        *,
        registry_name: str,
        discovery: Discovery,
        capacity: int = 128,
        root: str | Path | None = None,
        host: str = "127.0.0.1",
        holder_id: str | None = None,
        reap_interval_s: float = 0.25,
        discovery_ttl_s: float = 5.0,
        backend_options: dict[str, dict[str, Any]] | None = None,
        metrics_registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.registry_name = registry_name
        self.holder_id = holder_id or f"holder-{uuid.uuid4().hex[:8]}"
        self.capacity = capacity
        base = Path(root or os.environ.get("AGENTMESH_SANDBOX_ROOT", "/tmp/agentmesh-sandboxes"))
        self.root = base / self.holder_id
        self._discovery = discovery
        self._host = host
        self._reap_interval_s = reap_interval_s
        self._ttl_s = discovery_ttl_s
        self._backend_options = backend_options or {}
        self._backends: dict[str, SandboxBackend] = {}
        self._held: dict[str, _Held] = {}
        self._creating: set[str] = set()
        self._reclaimed: list[str] = []
        self._server: grpc.aio.Server | None = None
        self._registration: Registration | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._health = health.aio.HealthServicer()
        self.address = ""
        self.stats: dict[str, int] = {"created": 0, "destroyed": 0, "reclaimed": 0, "execs": 0}
        self._metrics = SandboxMetrics(registry=metrics_registry)

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)
        self._server, self.address, names = await start_server(
            self,
            {
                "ContainerService": cgrpc.add_ContainerServiceServicer_to_server,
                "SandboxHost": cgrpc.add_SandboxHostServicer_to_server,
            },
            self._health,
            self._host,
        )
        await set_serving(self._health, names)
        self._reaper = asyncio.create_task(self._reap_loop(), name=f"{self.holder_id}-reaper")
        self._registration = await self._discovery.register(
            Endpoint(
                holder_service(self.registry_name),
                self.holder_id,
                self.address,
                {"capacity": str(self.capacity), "node": os.uname().nodename, "pid": str(os.getpid())},
            ),
            ttl_s=self._ttl_s,
        )
        log.info("sandbox holder %s on %s (capacity %d)", self.holder_id, self.address, self.capacity)
        return self.address

    async def stop(self) -> None:
        if self._registration is not None:
            with contextlib.suppress(Exception):
                await self._registration.close()
            self._registration = None
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        if self._server is not None:
            await self._server.stop(1.0)
            self._server = None
        held, self._held = self._held, {}
        await asyncio.gather(*(h.sandbox.destroy() for h in held.values()), return_exceptions=True)
        for b in self._backends.values():
            with contextlib.suppress(Exception):
                await b.close()

    def _backend(self, name: str) -> SandboxBackend:
        b = self._backends.get(name)
        if b is None:
            opts = {"root": self.root / name, **self._backend_options.get(name, {})}
            b = self._backends[name] = get_backend(name, **opts)
        return b

    # -- leases ---------------------------------------------------------------------------------
    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self._reap_interval_s)
            try:
                await self.reap()
            except Exception:
                log.exception("%s: reaping failed", self.holder_id)

    async def reap(self) -> list[str]:
        """Destroy every handed-out sandbox whose lease ran out; return their ids."""
        now = time.monotonic()
        expired = [
            cid
            for cid, h in self._held.items()
            if h.client_id and h.busy == 0 and now - h.last_used >= h.lease_s
        ]
        gone: list[_Held] = []
        for cid in expired:
            h = self._held.pop(cid)
            log.info("%s: lease of %s (client %s) ran out: reclaimed", self.holder_id, cid, h.client_id)
            self._reclaimed.append(cid)
            self.stats["reclaimed"] += 1
            gone.append(h)
        await asyncio.gather(*(self._destroy_sandbox(h) for h in gone), return_exceptions=True)
        return expired

    async def _destroy_sandbox(self, held: _Held) -> None:
        try:
            await held.sandbox.destroy()
        finally:
            self.stats["destroyed"] += 1

    # -- SandboxHost (the registry's calls) -----------------------------------------------------
    async def Create(self, request: cpb.CreateRequest, context: Ctx) -> cpb.CreateReply:
        cid = request.container_id
        if not cid or "/" in cid or cid.startswith("."):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"container_id: bad id {cid!r}")
        if cid in self._held or cid in self._creating:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"container {cid} already exists here")
        if len(self._held) + len(self._creating) >= self.capacity:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"holder {self.holder_id} is full ({self.capacity})"
            )
        t0 = time.monotonic()
        self._creating.add(cid)
        try:
            try:
                limits = limits_from_pb(request.limits, Limits())
                backend = self._backend(request.backend or "bubblewrap")
            except SandboxError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            image = request.image or "default"
            try:
                sb = await backend.create(cid, SandboxSpec(image=image, limits=limits))
            except SandboxError as exc:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        finally:
            self._creating.discard(cid)
        self._held[cid] = _Held(sb, backend.name, image, limits)
        self.stats["created"] += 1
        return cpb.CreateReply(create_s=time.monotonic() - t0)

    async def Assign(self, request: cpb.AssignRequest, context: Ctx) -> cpb.AssignReply:
        h = self._held.get(request.container_id)
        if h is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"container {request.container_id} is not here")
        assert h is not None
        if not request.client_id or request.lease_s <= 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "client_id and a positive lease_s are needed"
            )
        if h.client_id and h.client_id != request.client_id:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"container {request.container_id} is another client's"
            )
        h.client_id = request.client_id
        h.lease_s = request.lease_s
        h.acquired_unix_ms = request.acquired_unix_ms or int(time.time() * 1000)
        h.touch()
        return cpb.AssignReply()

    async def Destroy(self, request: cpb.DestroyRequest, context: Ctx) -> cpb.DestroyReply:
        h = self._held.pop(request.container_id, None)
        if h is None:
            return cpb.DestroyReply(destroyed=False)
        await self._destroy_sandbox(h)
        return cpb.DestroyReply(destroyed=True)

    async def Inventory(self, request: cpb.InventoryRequest, context: Ctx) -> cpb.InventoryReply:
        now = time.monotonic()
        reply = cpb.InventoryReply(holder_id=self.holder_id, capacity=self.capacity)
        for cid, h in self._held.items():
            reply.sandboxes.append(
                cpb.HeldSandbox(
                    container_id=cid,
                    backend=h.backend,
                    image=h.image,
                    client_id=h.client_id,
                    lease_remaining_s=h.remaining_s(now),
                    limits=limits_to_pb(h.limits),
                )
            )
        reply.reclaimed.extend(self._reclaimed)
        self._reclaimed.clear()
        return reply

    # -- ContainerService (clients' direct calls) -----------------------------------------------
    async def _assigned(self, cid: str, context: Ctx) -> _Held:
        h = self._held.get(cid)
        if h is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"container {cid!r} is not held by {self.holder_id} (released, reclaimed after its "
                "lease ran out, or lost with a restarted holder)",
            )
        assert h is not None
        if not h.client_id:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"container {cid} was not acquired")
        return h

    async def Exec(self, request: cpb.ExecRequest, context: Ctx) -> cpb.ExecReply:
        problem = validate_exec(request)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        h = await self._assigned(request.container_id, context)
        h.busy += 1
        h.touch()
        t0 = time.monotonic()
        try:
            result = await h.sandbox.exec(
                list(request.argv),
                stdin=request.stdin,
                env=dict(request.env),
                cwd=request.cwd or "/work",
                timeout_s=request.timeout_s or None,
            )
        except SandboxError as exc:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"container {request.container_id}: {exc}"
            )
        finally:
            h.busy -= 1
            h.touch()
        h.execs += 1
        self.stats["execs"] += 1
        self._metrics.exec_done(h.backend, time.monotonic() - t0)
        return exec_reply(result)

    async def Status(self, request: cpb.StatusRequest, context: Ctx) -> cpb.StatusReply:
        h = await self._assigned(request.container_id, context)
        h.touch()  # asking after a sandbox is using it
        return cpb.StatusReply(
            lease=cpb.Lease(
                container_id=request.container_id,
                client_id=h.client_id,
                holder_id=self.holder_id,
                holder_address=self.address,
                image=h.image,
                backend=h.backend,
                lease_s=h.lease_s,
                acquired_unix_ms=h.acquired_unix_ms,
                limits=limits_to_pb(h.limits),
            ),
            lease_remaining_s=h.remaining_s(time.monotonic()),
            execs=h.execs,
            last_used_unix_ms=h.last_used_unix_ms,
        )

    async def Acquire(self, request: cpb.AcquireRequest, context: Ctx) -> cpb.AcquireReply:
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"holder {self.holder_id} does not hand out sandboxes: acquire through the registry",
        )
        raise AssertionError("unreachable")

    async def Release(self, request: cpb.ReleaseRequest, context: Ctx) -> cpb.ReleaseReply:
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"holder {self.holder_id}: release through the registry, which keeps the leases",
        )
        raise AssertionError("unreachable")
