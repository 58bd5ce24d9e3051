"""The client side of sandboxes: acquire through the registry, run commands on the holder directly.

:class:`ContainerClient` finds the registry of a cluster in discovery (or takes its address),
acquires sandboxes for one ``client_id``, and sends each exec straight to the holder that keeps
the sandbox (the address comes back with the acquire, and travels in an Orchestrator's
``HeldResource.holder``), so the registry is never on the exec path. An id with no known holder
is looked up once in the registry.

Errors: a sandbox that is gone (released, reclaimed, lost with its holder) raises
:class:`ContainerGone`; a registry that is full raises :class:`agentmesh.errors.Overloaded`;
other gRPC failures map through :func:`agentmesh.errors.from_grpc_error`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from agentmesh.container.sandbox import ExecResult, Limits, SandboxError
from agentmesh.container.wire import exec_result, limits_to_pb, registry_service
from agentmesh.discovery import EndpointCache
from agentmesh.errors import from_grpc_error
from agentmesh.tracing import client_interceptors, tracer
from agentmesh.v1 import container_pb2 as cpb
from agentmesh.v1 import container_pb2_grpc as cgrpc

__all__ = ["ContainerClient", "ContainerGone", "SandboxRef"]


class ContainerGone(SandboxError):
    """The sandbox no longer exists: released, reclaimed after its lease, or lost with its holder."""


@dataclass(frozen=True)
class SandboxRef:
    id: str
    holder_address: str
    holder_id: str = ""
    lease_s: float = 0.0
    warm: bool = False


class ContainerClient:
    """Sandboxes for one client (``client_id``: a run, a tool-executor replica, a benchmark)."""

    def __init__(
        self,
        client_id: str,
        *,
        registry_address: str | None = None,
        endpoints: EndpointCache | None = None,
        registry_name: str = "default",
        timeout_s: float = 30.0,
    ) -> None:
        if not client_id:
            raise SandboxError("client_id: must not be empty")
        if registry_address is None and endpoints is None:
            raise SandboxError("a container client needs registry_address or an endpoint cache")
        self.client_id = client_id
        self._registry_address = registry_address
        self._endpoints = endpoints
        self._registry_name = registry_name
        self._timeout_s = timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._holders: dict[str, str] = {}  # container id -> holder address (from acquire/lookup)

    # -- plumbing -------------------------------------------------------------------------------
    def _channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = grpc.aio.insecure_channel(
                address, interceptors=client_interceptors() or None
            )
        return ch

    async def registry_address(self) -> str:
        if self._registry_address is not None:
            return self._registry_address
        assert self._endpoints is not None
        service = registry_service(self._registry_name)
        eps = await self._endpoints.wait_for(service, bool, timeout_s=self._timeout_s)
        return eps[0].address

    async def _registry(self) -> tuple[cgrpc.ContainerServiceStub, cgrpc.RegistryStub]:
        ch = self._channel(await self.registry_address())
        return cgrpc.ContainerServiceStub(ch), cgrpc.RegistryStub(ch)

    @staticmethod
    def _gone_or_raise(exc: grpc.aio.AioRpcError, cid: str) -> Exception:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return ContainerGone(exc.details() or f"container {cid} is gone")
        return from_grpc_error(exc)

    # -- API ------------------------------------------------------------------------------------
    async def acquire(
        self,
        image: str = "default",
        *,
        backend: str = "",
        limits: Limits | Mapping[str, Any] | None = None,
        lease_s: float = 0.0,
        timeout_s: float | None = None,
    ) -> SandboxRef:
        """A sandbox of ``image`` for this client (from the warm pool when one is ready)."""
        req = cpb.AcquireRequest(
            client_id=self.client_id,
            image=image,
            backend=backend,
            lease_s=lease_s,
            timeout_s=timeout_s or 0.0,
        )
        if limits is not None:
            lim = limits if isinstance(limits, Limits) else Limits.from_mapping(limits)
            req.limits.CopyFrom(limits_to_pb(lim))
        service, _ = await self._registry()
        budget = (timeout_s or self._timeout_s) + 5.0
        try:
            reply = await service.Acquire(req, timeout=budget)
        except grpc.aio.AioRpcError as exc:
            raise from_grpc_error(exc) from None
        self._holders[reply.container_id] = reply.holder_address
        return SandboxRef(
            reply.container_id, reply.holder_address, reply.holder_id, reply.lease_s, reply.warm
        )

    async def holder_of(self, container_id: str) -> str:
        address = self._holders.get(container_id)
        if address is None:
            _, registry = await self._registry()
            try:
                reply = await registry.Lookup(cpb.LookupRequest(container_id=container_id), timeout=10.0)
            except grpc.aio.AioRpcError as exc:
                raise self._gone_or_raise(exc, container_id) from None
            address = self._holders[container_id] = reply.lease.holder_address
        return address

    def remember(self, container_id: str, holder_address: str) -> None:
        """Record where a sandbox is (e.g. from an Orchestrator's HeldResource), saving a lookup."""
        if holder_address:
            self._holders[container_id] = holder_address

    async def exec(
        self,
        sandbox: SandboxRef | str,
        argv: Sequence[str],
        *,
        stdin: bytes = b"",
        env: Mapping[str, str] | None = None,
        cwd: str = "",
        timeout_s: float = 0.0,
    ) -> ExecResult:
        """Run ``argv`` in the sandbox, on its holder. A failed command is a result, not an error."""
        if isinstance(sandbox, SandboxRef):
            cid = sandbox.id
            self.remember(cid, sandbox.holder_address)
        else:
            cid = sandbox
        address = await self.holder_of(cid)
        req = cpb.ExecRequest(
            container_id=cid, argv=list(argv), stdin=stdin, env=dict(env or {}), cwd=cwd, timeout_s=timeout_s
        )
        with tracer().start_as_current_span(
            "container exec",
            attributes={"agentmesh.container_id": cid, "agentmesh.argv0": str(argv[0]) if argv else ""},
        ) as span:
            try:
                reply = await cgrpc.ContainerServiceStub(self._channel(address)).Exec(
                    req, timeout=(timeout_s or 600.0) + 10.0
                )
            except grpc.aio.AioRpcError as exc:
                raise self._gone_or_raise(exc, cid) from None
            result = exec_result(reply)
            span.set_attribute("agentmesh.exit_code", result.exit_code)
            if result.killed:
                span.set_attribute("agentmesh.killed", result.killed)
        return result

    async def status(self, sandbox: SandboxRef | str) -> cpb.StatusReply:
        cid = sandbox.id if isinstance(sandbox, SandboxRef) else sandbox
        address = await self.holder_of(cid)
        try:
            reply: cpb.StatusReply = await cgrpc.ContainerServiceStub(self._channel(address)).Status(
                cpb.StatusRequest(container_id=cid), timeout=10.0
            )
        except grpc.aio.AioRpcError as exc:
            raise self._gone_or_raise(exc, cid) from None
        return reply

    async def release(self, sandbox: SandboxRef | str) -> bool:
        """Give the sandbox back (it is destroyed). False if it was already gone."""
        cid = sandbox.id if isinstance(sandbox, SandboxRef) else sandbox
        service, _ = await self._registry()
        try:
            reply = await service.Release(
                cpb.ReleaseRequest(container_id=cid, client_id=self.client_id), timeout=30.0
            )
        except grpc.aio.AioRpcError as exc:
            raise from_grpc_error(exc) from None
        self._holders.pop(cid, None)
        return bool(reply.released)

    async def release_all(self) -> int:
        """Release every sandbox this client holds (and no one else's)."""
        _, registry = await self._registry()
        try:
            reply = await registry.ReleaseClient(
                cpb.ReleaseClientRequest(client_id=self.client_id), timeout=60.0
            )
        except grpc.aio.AioRpcError as exc:
            raise from_grpc_error(exc) from None
        self._holders.clear()
        return int(reply.released)

    async def leases(self, *, everyone: bool = False) -> list[cpb.Lease]:
        _, registry = await self._registry()
        reply = await registry.ListLeases(
            cpb.ListLeasesRequest(client_id="" if everyone else self.client_id), timeout=10.0
        )
        return list(reply.leases)

    async def pools(self) -> cpb.PoolsReply:
        _, registry = await self._registry()
        reply: cpb.PoolsReply = await registry.Pools(cpb.PoolsRequest(), timeout=10.0)
        return reply

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for ch in channels.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ch.close(), 2.0)
