"""The container registry: which holder keeps which sandbox, for whom, and for how long.

Clients acquire sandboxes here and get the id and the holder's address; they then run commands on
the holder directly (or through this service's ``Exec``, for clients that only know the registry).
Leases are what make abandoned sandboxes go away: a holder destroys a sandbox unused for its whole
lease, and the registry drops the mapping on its next inventory of that holder.

* **State survives a restart.** Every lease is written to the discovery store
  (``Discovery.kv_put``) before the client hears of it, and deleted when the sandbox goes. A new
  registry process reloads the leases, re-reads every holder's inventory, and serves the same ids
  from the same holders; warm sandboxes it finds are adopted back into their pools.
* **Warm pools, no over-creation.** Each (backend, image, limits) has a pool of ready sandboxes;
  ``target`` of them are kept warm. An acquire that finds the pool empty waits for a creation that
  no one else has claimed, and starts one only when every creation in flight is already claimed:
  a burst of N acquires never starts more than N creations beyond the pool's target. Capacity on
  holders is reserved synchronously, on the registry's one event loop, before any call goes out,
  so two acquires can never both take a holder's last slot.
* **Releasing is per client.** ``Release`` checks the caller's ``client_id``; ``ReleaseClient``
  releases that client's sandboxes and nobody else's.

Metrics (:mod:`agentmesh.metrics`, in the process's registry): ``agentmesh_sandbox_pool{pool,state}``
(pool ``backend/image``; state warm, leased, creating; read at scrape),
``agentmesh_sandbox_acquire_seconds{pool}`` and ``agentmesh_sandbox_leases_expired_total``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import grpc
from grpc_health.v1 import health
from prometheus_client import CollectorRegistry

from agentmesh.container.backends import BACKENDS, DEFAULT_BACKEND
from agentmesh.container.sandbox import Limits, SandboxError
from agentmesh.container.wire import (
    holder_service,
    limits_from_pb,
    limits_to_pb,
    registry_service,
    set_serving,
    start_server,
)
from agentmesh.discovery import Discovery, Endpoint, EndpointCache, Registration
from agentmesh.errors import DiscoveryError
from agentmesh.metrics import REGISTRY, SandboxMetrics
from agentmesh.v1 import container_pb2 as cpb
from agentmesh.v1 import container_pb2_grpc as cgrpc

__all__ = ["ContainerRegistry", "PoolKey"]

log = logging.getLogger(__name__)

Ctx: TypeAlias = grpc.aio.ServicerContext  # type: ignore[type-arg]

#: (backend, image, serialized limits): sandboxes of one key are interchangeable
PoolKey = tuple[str, str, bytes]


class _NoCapacity(Exception):
    pass


@dataclass
class _Holder:
    endpoint: Endpoint
    channel: grpc.aio.Channel
    host: cgrpc.SandboxHostStub
    service: cgrpc.ContainerServiceStub
    capacity: int
    used: int = 0  # sandboxes it keeps or is creating for us (reserved before the call goes out)

    @property
    def free(self) -> int:
        return self.capacity - self.used


@dataclass
class _Pool:
    key: PoolKey
    limits: Limits
    target: int = 0
    warm: collections.deque[tuple[str, str]] = field(default_factory=collections.deque)  # (id, holder)
    waiters: collections.deque[asyncio.Future[tuple[str, str]]] = field(default_factory=collections.deque)
    inflight: int = 0  # creations started and not finished

    def claimable(self) -> int:
        """Creations in flight that no waiter has claimed yet."""
        return self.inflight - sum(1 for w in self.waiters if not w.done())


class ContainerRegistry(cgrpc.ContainerServiceServicer, cgrpc.RegistryServicer):
    """One registry per cluster (``name``); its holders register under ``container.holder.<name>``."""

    def __init__(
        self,
        *,
        name: str,
        discovery: Discovery,
        pools: Mapping[tuple[str, str], int] | None = None,
        default_backend: str = DEFAULT_BACKEND,
        default_limits: Limits | None = None,
        default_lease_s: float = 60.0,
        acquire_timeout_s: float = 30.0,
        inventory_interval_s: float = 0.5,
        host: str = "127.0.0.1",
        port: int = 0,
        discovery_ttl_s: float = 5.0,
        metrics_registry: CollectorRegistry = REGISTRY,
    ) -> None:
        if default_backend not in BACKENDS:
            raise SandboxError(f"default_backend: unknown backend {default_backend!r}")
        self.name = name
        self._discovery = discovery
        self._cache = EndpointCache(discovery)
        self._default_backend = default_backend
        self._default_limits = default_limits or Limits()
        self._default_lease_s = default_lease_s
        self._acquire_timeout_s = acquire_timeout_s
        self._interval_s = inventory_interval_s
        self._host = host
        self._port = port
        self._ttl_s = discovery_ttl_s
        self._holders: dict[str, _Holder] = {}
        self._leases: dict[str, cpb.Lease] = {}
        self._where: dict[str, str] = {}  # container id -> holder id, for every sandbox we know
        self._pool_of: dict[str, PoolKey] = {}  # warm container id -> its pool
        self._pools: dict[PoolKey, _Pool] = {}
        for (backend, image), target in (pools or {}).items():
            self._pool(backend, image or "default", self._default_limits).target = int(target)
        self._server: grpc.aio.Server | None = None
        self._registration: Registration | None = None
        self._health = health.aio.HealthServicer()
        self._background: set[asyncio.Task[Any]] = set()
        self._inventory_task: asyncio.Task[None] | None = None
        self._holders_ready = asyncio.Event()
        self.address = ""
        self.stats: collections.Counter[str] = collections.Counter()
        self._metrics = SandboxMetrics(pools=self._pool_counts, registry=metrics_registry)

    # -- keys and pools -------------------------------------------------------------------------
    def _kv_prefix(self) -> str:
        return f"container-registry/{self.name}/leases/"

    def _pool(self, backend: str, image: str, limits: Limits) -> _Pool:
        key: PoolKey = (backend, image, limits_to_pb(limits).SerializeToString(deterministic=True))
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(key, limits)
        return pool

    @staticmethod
    def _pool_label(backend: str, image: str) -> str:
        return f"{backend}/{image}"

    def _pool_counts(self) -> dict[tuple[str, str], int]:
        """``{(pool, state): n}`` for the pool gauge; called from the metrics server's thread, so it
        copies each container with one C-level call before iterating (never a live dict)."""
        counts: dict[tuple[str, str], int] = {}
        for (backend, image, _), pool in list(self._pools.items()):
            label = self._pool_label(backend, image)
            for state, n in (("warm", len(pool.warm)), ("creating", pool.inflight)):
                counts[(label, state)] = counts.get((label, state), 0) + n
        for lease in list(self._leases.values()):
            key = (self._pool_label(lease.backend, lease.image), "leased")
            counts[key] = counts.get(key, 0) + 1
        return counts

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> str:
        for key, raw in (await self._discovery.kv_get_prefix(self._kv_prefix())).items():
            lease = cpb.Lease()
            try:
                lease.ParseFromString(raw)
            except Exception:
                log.warning("registry %s: dropping unreadable lease record %s", self.name, key)
                continue
            self._leases[lease.container_id] = lease
            self._where[lease.container_id] = lease.holder_id
        self._cache.add_listener(self._on_holders)
        await self._cache.subscribe(holder_service(self.name))
        self._server, self.address, names = await start_server(
            self,
            {
                "ContainerService": cgrpc.add_ContainerServiceServicer_to_server,
                "Registry": cgrpc.add_RegistryServicer_to_server,
            },
            self._health,
            self._host,
            self._port,
        )
        # what the holders have now is the truth: reconcile before serving anyone
        await self._inventory_all()
        await set_serving(self._health, names)
        self._inventory_task = asyncio.create_task(self._inventory_loop(), name=f"registry-{self.name}")
        self._registration = await self._discovery.register(
            Endpoint(registry_service(self.name), f"registry-{self.name}", self.address, {"name": self.name}),
            ttl_s=self._ttl_s,
        )
        self._refill_all()
        log.info(
            "container registry %s on %s: %d lease(s) restored, %d holder(s)",
            self.name,
            self.address,
            len(self._leases),
            len(self._holders),
        )
        return self.address

    async def stop(self, *, destroy_warm: bool = True) -> None:
        """Stop serving. Leases stay in the store (a new registry takes them over); warm sandboxes
        are destroyed unless ``destroy_warm`` is False."""
        if self._registration is not None:
            with contextlib.suppress(Exception):
                await self._registration.close()
        if self._inventory_task is not None:
            self._inventory_task.cancel()
        for t in list(self._background):
            t.cancel()
        if destroy_warm:
            for pool in self._pools.values():
                while pool.warm:
                    cid, hid = pool.warm.popleft()
                    await self._destroy(cid, hid)
        if self._server is not None:
            await self._server.stop(1.0)
        self._cache.remove_listener(self._on_holders)
        await self._cache.close()
        for h in self._holders.values():
            await h.channel.close()
        self._metrics.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        t = asyncio.get_running_loop().create_task(coro)
        self._background.add(t)
        t.add_done_callback(self._background.discard)
        return t

    # -- holders --------------------------------------------------------------------------------
    def _on_holders(self, service: str, endpoints: tuple[Endpoint, ...]) -> None:
        if service != holder_service(self.name):
            return
        now = {ep.id: ep for ep in endpoints}
        for hid in list(self._holders):
            h = self._holders[hid]
            ep = now.get(hid)
            if ep is None or ep.address != h.endpoint.address:
                self._holder_gone(hid)
        for hid, ep in now.items():
            if hid not in self._holders:
                channel = grpc.aio.insecure_channel(ep.address)
                self._holders[hid] = _Holder(
                    ep,
                    channel,
                    cgrpc.SandboxHostStub(channel),
                    cgrpc.ContainerServiceStub(channel),
                    capacity=int(ep.metadata.get("capacity", "0") or 0),
                )
                self._spawn(self._inventory_one(hid))
        self._holders_ready.set()
        self._refill_all()

    def _holder_gone(self, hid: str) -> None:
        h = self._holders.pop(hid)
        self._spawn(h.channel.close())
        lost = [cid for cid, where in self._where.items() if where == hid]
        for cid in lost:
            self._forget(cid, reason="holder gone")
        if lost:
            log.warning("registry %s: holder %s is gone with %d sandbox(es)", self.name, hid, len(lost))

    def _forget(self, cid: str, *, reason: str) -> None:
        """Drop every trace of sandbox ``cid`` (it is gone from its holder)."""
        hid = self._where.pop(cid, None)
        if hid is not None and hid in self._holders:
            self._holders[hid].used -= 1
        key = self._pool_of.pop(cid, None)
        if key is not None:
            pool = self._pools[key]
            with contextlib.suppress(ValueError):
                pool.warm.remove((cid, hid or ""))
        if self._leases.pop(cid, None) is not None:
            self.stats["leases_dropped_" + reason.replace(" ", "_")] += 1
            if reason == "lease expired":
                self._metrics.leases_expired()
            self._spawn(self._kv_delete(cid))

    async def _kv_delete(self, cid: str) -> None:
        try:
            await self._discovery.kv_delete(self._kv_prefix() + cid)
        except DiscoveryError as exc:
            log.warning("registry %s: could not delete the lease of %s: %s", self.name, cid, exc)

    async def _inventory_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self._inventory_all()

    async def _inventory_all(self) -> None:
        await asyncio.gather(*(self._inventory_one(hid) for hid in list(self._holders)))

    async def _inventory_one(self, hid: str) -> None:
        h = self._holders.get(hid)
        if h is None:
            return
        try:
            inv = await h.host.Inventory(cpb.InventoryRequest(), timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            log.debug("registry %s: inventory of %s failed: %s", self.name, hid, exc.code())
            return
        if self._holders.get(hid) is not h:
            return
        self.stats["reclaimed"] += len(inv.reclaimed)
        present = {s.container_id: s for s in inv.sandboxes}
        missing = [cid for cid, where in self._where.items() if where == hid and cid not in present]
        for cid in missing:  # sandboxes still being created are neither leased nor pooled yet
            if cid in self._leases or cid in self._pool_of:  # it was there and is gone now
                self._forget(cid, reason="lease expired" if cid in inv.reclaimed else "gone")
        for cid, s in present.items():
            if cid in self._where:
                lease = self._leases.get(cid)
                if lease is not None and not s.client_id:
                    # the lease was written but the holder never heard of it (a registry crash
                    # between the two): hand it over now
                    self._spawn(self._assign(h, lease))
                continue
            if s.client_id:
                # handed out by a registry that did not live to record it: nobody can use it
                self._spawn(self._destroy(cid, hid))
                continue
            limits = limits_from_pb(s.limits, self._default_limits)
            pool = self._pool(s.backend, s.image, limits)
            self._where[cid] = hid
            self._pool_of[cid] = pool.key
            pool.warm.append((cid, hid))
            self.stats["adopted_warm"] += 1
        # capacity is what the holder says it keeps, plus what we are creating there now
        h.used = sum(1 for where in self._where.values() if where == hid)

    async def _assign(self, h: _Holder, lease: cpb.Lease) -> None:
        await h.host.Assign(
            cpb.AssignRequest(
                container_id=lease.container_id,
                client_id=lease.client_id,
                lease_s=lease.lease_s,
                acquired_unix_ms=lease.acquired_unix_ms,
            ),
            timeout=5.0,
        )

    # -- creation -------------------------------------------------------------------------------
    def _reserve(self, pool: _Pool) -> _Holder:
        """Take one slot on the holder with the most room (synchronously: no await in here)."""
        candidates = [h for h in self._holders.values() if h.free > 0]
        if not candidates:
            # make room: a warm sandbox of another pool is worth less than this request
            for other in self._pools.values():
                if other is not pool and other.warm:
                    cid, hid = other.warm.pop()
                    self._forget(cid, reason="evicted")
                    self._spawn(self._destroy(cid, hid))
                    self.stats["evicted"] += 1
                    candidates = [h for h in self._holders.values() if h.free > 0]
                    break
        if not candidates:
            total = sum(h.capacity for h in self._holders.values())
            raise _NoCapacity(
                f"every holder is full ({len(self._holders)} holder(s), {total} sandboxes)"
                if self._holders
                else f"no sandbox holder is registered for registry {self.name!r}"
            )
        best = max(h.free for h in candidates)
        h = random.choice([h for h in candidates if h.free == best])
        h.used += 1
        return h

    def _start_creation(self, pool: _Pool) -> bool:
        try:
            holder = self._reserve(pool)
        except _NoCapacity as exc:
            self._fail_unserved(pool, exc)
            return False
        pool.inflight += 1
        self._spawn(self._create(pool, holder))
        return True

    def _fail_unserved(self, pool: _Pool, exc: Exception) -> None:
        # waiters beyond what the creations in flight will serve get the error now
        pending = [w for w in pool.waiters if not w.done()]
        for w in pending[pool.inflight :]:
            w.set_exception(exc)

    async def _create(self, pool: _Pool, holder: _Holder) -> None:
        backend, image, _ = pool.key
        cid = f"c-{uuid.uuid4().hex[:16]}"
        hid = holder.endpoint.id
        self._where[cid] = hid
        try:
            await holder.host.Create(
                cpb.CreateRequest(
                    container_id=cid, backend=backend, image=image, limits=limits_to_pb(pool.limits)
                ),
                timeout=60.0,
            )
        except grpc.aio.AioRpcError as exc:
            pool.inflight -= 1
            if self._where.pop(cid, None) is not None and hid in self._holders:
                self._holders[hid].used -= 1
            self.stats["create_failed"] += 1
            log.warning("registry %s: creating a %s sandbox on %s failed: %s", self.name, backend, hid, exc)
            err = SandboxError(f"creating a {backend} sandbox failed: {exc.details()}")
            self._fail_unserved(pool, err)
            return
        pool.inflight -= 1
        self.stats["created"] += 1
        if self._where.get(cid) != hid:  # its holder vanished while we waited
            return
        self._hand_over(pool, cid, hid)
        self._refill(pool)

    def _hand_over(self, pool: _Pool, cid: str, hid: str) -> None:
        while pool.waiters:
            w = pool.waiters.popleft()
            if not w.done():
                w.set_result((cid, hid))
                return
        pool.warm.append((cid, hid))
        self._pool_of[cid] = pool.key

    def _refill(self, pool: _Pool) -> None:
        while len(pool.warm) + pool.claimable() < pool.target:
            if not self._start_creation(pool):
                return

    def _refill_all(self) -> None:
        for pool in self._pools.values():
            self._refill(pool)

    async def _take(self, pool: _Pool, timeout_s: float) -> tuple[str, str, bool]:
        while pool.warm:
            cid, hid = pool.warm.popleft()
            self._pool_of.pop(cid, None)
            if hid in self._holders and self._where.get(cid) == hid:
                self._refill(pool)
                return cid, hid, True
        fut: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()
        pool.waiters.append(fut)
        if pool.claimable() < 0:  # every creation in flight is claimed: this request needs its own
            self._start_creation(pool)
        self._refill(pool)
        try:
            cid, hid = await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ValueError):
                pool.waiters.remove(fut)
            raise
        return cid, hid, False

    # -- ContainerService -----------------------------------------------------------------------
    async def Acquire(self, request: cpb.AcquireRequest, context: Ctx) -> cpb.AcquireReply:
        t0 = time.monotonic()
        if not request.client_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "client_id: must not be empty")
        backend = request.backend or self._default_backend
        if backend not in BACKENDS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"backend: unknown {backend!r} (known: {sorted(BACKENDS)})"
            )
        if request.lease_s < 0 or request.timeout_s < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "lease_s and timeout_s must be >= 0")
        try:
            limits = limits_from_pb(request.limits, self._default_limits)
        except SandboxError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        pool = self._pool(backend, request.image or "default", limits)
        lease_s = request.lease_s or self._default_lease_s
        timeout_s = request.timeout_s or self._acquire_timeout_s
        deadline = time.monotonic() + timeout_s
        for _ in range(3):  # a holder may vanish between creation and hand-over
            try:
                cid, hid, warm = await self._take(pool, max(0.001, deadline - time.monotonic()))
            except TimeoutError:
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"no {backend} sandbox within {timeout_s:.1f}s"
                )
            except _NoCapacity as exc:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            except SandboxError as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            holder = self._holders.get(hid)
            if holder is None:
                continue
            lease = cpb.Lease(
                container_id=cid,
                client_id=request.client_id,
                holder_id=hid,
                holder_address=holder.endpoint.address,
                image=pool.key[1],
                backend=backend,
                lease_s=lease_s,
                acquired_unix_ms=int(time.time() * 1000),
                limits=limits_to_pb(limits),
            )
            self._leases[cid] = lease
            try:
                # durable before anyone hears of it: a restarted registry must know this lease
                await self._discovery.kv_put(self._kv_prefix() + cid, lease.SerializeToString())
                await self._assign(holder, lease)
            except (DiscoveryError, grpc.aio.AioRpcError) as exc:
                log.warning("registry %s: handing %s over failed: %s", self.name, cid, exc)
                self._forget(cid, reason="hand-over failed")
                self._spawn(self._destroy(cid, hid))
                if isinstance(exc, DiscoveryError):
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"discovery store: {exc}")
                continue
            self.stats["acquired"] += 1
            self.stats["acquired_warm" if warm else "acquired_cold"] += 1
            self._metrics.acquired(self._pool_label(backend, pool.key[1]), time.monotonic() - t0)
            log.debug("acquired %s for %s in %.1f ms", cid, request.client_id, (time.monotonic() - t0) * 1e3)
            return cpb.AcquireReply(
                container_id=cid,
                holder_id=hid,
                holder_address=holder.endpoint.address,
                lease_s=lease_s,
                warm=warm,
            )
        await context.abort(grpc.StatusCode.UNAVAILABLE, "holders kept vanishing during the hand-over")
        raise AssertionError("unreachable")

    async def _lease_or_abort(self, cid: str, context: Ctx) -> tuple[cpb.Lease, _Holder]:
        lease = self._leases.get(cid)
        if lease is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"container {cid!r} is not known (never acquired, released, or reclaimed after its lease)",
            )
        assert lease is not None
        holder = self._holders.get(lease.holder_id)
        if holder is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"container {cid}: its holder {lease.holder_id} is not reachable"
            )
        assert holder is not None
        return lease, holder

    async def Exec(self, request: cpb.ExecRequest, context: Ctx) -> cpb.ExecReply:
        lease, holder = await self._lease_or_abort(request.container_id, context)
        budget = request.timeout_s or lease.limits.wall_time_s or self._default_limits.wall_time_s
        try:
            reply: cpb.ExecReply = await holder.service.Exec(request, timeout=budget + 10.0)
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
        return reply

    async def Status(self, request: cpb.StatusRequest, context: Ctx) -> cpb.StatusReply:
        _, holder = await self._lease_or_abort(request.container_id, context)
        try:
            reply: cpb.StatusReply = await holder.service.Status(request, timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
        return reply

    async def _destroy(self, cid: str, hid: str) -> None:
        h = self._holders.get(hid)
        if h is None:
            return
        with contextlib.suppress(grpc.aio.AioRpcError):
            await h.host.Destroy(cpb.DestroyRequest(container_id=cid), timeout=10.0)

    async def _release(self, lease: cpb.Lease) -> None:
        cid = lease.container_id
        self._forget(cid, reason="released")
        self.stats["released"] += 1
        await self._destroy(cid, lease.holder_id)

    async def Release(self, request: cpb.ReleaseRequest, context: Ctx) -> cpb.ReleaseReply:
        lease = self._leases.get(request.container_id)
        if lease is None:
            return cpb.ReleaseReply(released=False)
        if lease.client_id != request.client_id:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"container {request.container_id} is held by another client, not {request.client_id!r}",
            )
        await self._release(lease)
        return cpb.ReleaseReply(released=True)

    # -- Registry -------------------------------------------------------------------------------
    async def Lookup(self, request: cpb.LookupRequest, context: Ctx) -> cpb.LookupReply:
        lease = self._leases.get(request.container_id)
        if lease is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"container {request.container_id!r} is not known")
        return cpb.LookupReply(lease=lease)

    async def ListLeases(self, request: cpb.ListLeasesRequest, context: Ctx) -> cpb.ListLeasesReply:
        leases: list[cpb.Lease] = sorted(
            (x for x in self._leases.values() if not request.client_id or x.client_id == request.client_id),
            key=lambda x: x.container_id,
        )
        return cpb.ListLeasesReply(leases=leases)

    async def ReleaseClient(self, request: cpb.ReleaseClientRequest, context: Ctx) -> cpb.ReleaseClientReply:
        if not request.client_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "client_id: must not be empty")
        mine = [lease for lease in self._leases.values() if lease.client_id == request.client_id]
        await asyncio.gather(*(self._release(lease) for lease in mine))
        return cpb.ReleaseClientReply(released=len(mine))

    async def Pools(self, request: cpb.PoolsRequest, context: Ctx) -> cpb.PoolsReply:
        return self.pools()

    def pools(self) -> cpb.PoolsReply:
        reply = cpb.PoolsReply(
            holders=len(self._holders),
            capacity=sum(h.capacity for h in self._holders.values()),
            acquired=len(self._leases),
            created_total=self.stats["created"],
            reclaimed_total=self.stats["reclaimed"],
            released_total=self.stats["released"],
        )
        for (backend, image, _), pool in sorted(self._pools.items()):
            reply.pools.append(
                cpb.PoolStats(
                    backend=backend,
                    image=image,
                    warm=len(pool.warm),
                    creating=pool.inflight,
                    target=pool.target,
                )
            )
        return reply
