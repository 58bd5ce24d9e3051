"""Discovery backed by etcd v3 (through ``aetcd``, which speaks etcd's gRPC API on ``grpc.aio``).

Layout: one key per replica, ``/agentmesh/services/<service>/<id>``, whose value is the JSON of
:meth:`Endpoint.to_json_dict`. Each key is attached to a lease of its own; a background task keeps
the lease alive, so if the process dies etcd deletes the key when the lease runs out. Watchers read
the prefix once (remembering its revision) and then watch the prefix from the next revision, so no
change between the read and the watch is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aetcd
import grpc

from agentmesh.discovery.base import (
    ClientDiscovery,
    Endpoint,
    KeepAliveRegistration,
    Registration,
    validate_kv_key,
    validate_service_name,
)
from agentmesh.errors import DiscoveryError

__all__ = ["EtcdDiscovery"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

KEY_PREFIX = "/agentmesh/services/"
STATE_PREFIX = "/agentmesh/state/"

# Reconnect quickly after an etcd restart (gRPC's default backoff grows to 2 minutes), and ping an
# idle connection so a vanished server is noticed by open watches. etcd refuses pings more often
# than every 5 s (--grpc-keepalive-min-time), hence 10 s.
_CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.min_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 2000,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
}


def _parse_url(url: str) -> list[tuple[str, int]]:
    scheme, sep, rest = url.partition("://")
    if scheme != "etcd" or not sep:
        raise DiscoveryError(f"bad etcd url {url!r}: expected etcd://host:port[,host:port...]")
    rest = rest.rstrip("/")
    endpoints: list[tuple[str, int]] = []
    for part in rest.split(","):
        host, colon, port_s = part.strip().rpartition(":")
        host = host.strip("[]")
        if not colon or not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
            raise DiscoveryError(f"bad etcd url {url!r}: endpoint {part!r} is not host:port")
        endpoints.append((host, int(port_s)))
    return endpoints


class _EtcdRegistration(KeepAliveRegistration):
    """One key under one lease, kept alive by a background task until :meth:`close`."""

    def __init__(self, discovery: EtcdDiscovery, endpoint: Endpoint, ttl: int) -> None:
        super().__init__(endpoint, discovery._registrations)
        self._discovery = discovery
        self._key = discovery._key(endpoint.service, endpoint.id)
        self._value = json.dumps(endpoint.to_json_dict(), sort_keys=True).encode()
        self._ttl = ttl
        self.lease_id: int | None = None

    async def _grant_and_put(self) -> None:
        lease = await self._discovery._rpc("lease grant", lambda c: c.lease(self._ttl))
        # Remember the lease before the put: if we are cancelled mid-put, close() still revokes it.
        self.lease_id = lease.id
        await self._discovery._rpc("put", lambda c: c.put(self._key, self._value, lease=lease.id))

    @staticmethod
    def _refresh_call(lease_id: int) -> Callable[[aetcd.Client], Awaitable[Any]]:
        return lambda c: c.refresh_lease(lease_id)

    async def _keepalive(self) -> None:
        interval = self._ttl / 3
        while True:
            await asyncio.sleep(interval)
            try:
                if self.lease_id is None:
                    await self._grant_and_put()
                    continue
                reply = await self._discovery._rpc("lease keep-alive", self._refresh_call(self.lease_id))
                if reply is None or reply.TTL <= 0:
                    # The lease is gone (expired while we could not reach etcd, or etcd lost its
                    # state): the key went with it. Take a new lease and write the key again.
                    log.warning("etcd lease of %s was lost; registering again", self._key.decode())
                    self.lease_id = None
                    await self._grant_and_put()
            except DiscoveryError as exc:
                log.warning(
                    "keeping %s registered failed (%s); retrying in %.1fs", self._key.decode(), exc, interval
                )

    async def _withdraw(self) -> None:
        if self.lease_id is not None:
            lease_id, self.lease_id = self.lease_id, None
            try:
                # Revoking the lease deletes the key now, instead of when the TTL runs out.
                await self._discovery._rpc("lease revoke", lambda c: c.revoke_lease(lease_id))
            except DiscoveryError as exc:
                log.warning(
                    "could not revoke the lease of %s (%s); it expires by itself", self._key.decode(), exc
                )


class EtcdDiscovery(ClientDiscovery):
    """Discovery on an etcd v3 cluster.

    ``endpoints`` are tried in order on first use and after a connection failure; the first that
    answers is used. ``request_timeout_s`` bounds every unary call, so an unreachable etcd gives a
    :class:`DiscoveryError` instead of a hang.
    """

    def __init__(self, endpoints: Sequence[tuple[str, int]], *, request_timeout_s: float = 5.0) -> None:
        if not endpoints:
            raise DiscoveryError("etcd discovery needs at least one host:port endpoint")
        super().__init__()
        self._endpoints = list(endpoints)
        self._request_timeout_s = request_timeout_s
        self._next_endpoint = 0
        self._connect_lock = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str, *, request_timeout_s: float = 5.0) -> EtcdDiscovery:
        """``etcd://host:port[,host:port...]``."""
        return cls(_parse_url(url), request_timeout_s=request_timeout_s)

    @property
    def target(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self._endpoints)

    @staticmethod
    def _prefix(service: str) -> bytes:
        # The trailing slash keeps service "a" from matching the keys of service "ab".
        return f"{KEY_PREFIX}{service}/".encode()

    @classmethod
    def _key(cls, service: str, endpoint_id: str) -> bytes:
        return cls._prefix(service) + endpoint_id.encode()

    # -- connection ---------------------------------------------------------------------------

    async def _get_client(self) -> aetcd.Client:
        if self._closed:
            raise DiscoveryError("etcd discovery is closed")
        if self._client is not None:
            return self._client
        async with self._connect_lock:
            if self._client is not None:
                return self._client
            errors: list[str] = []
            for i in range(len(self._endpoints)):
                idx = (self._next_endpoint + i) % len(self._endpoints)
                host, port = self._endpoints[idx]
                client = aetcd.Client(
                    host=host, port=port, timeout=self._request_timeout_s, options=dict(_CHANNEL_OPTIONS)
                )
                try:
                    # aetcd opens the channel lazily; one cheap call proves the member answers.
                    await asyncio.wait_for(client.status(), self._request_timeout_s)
                except (aetcd.ClientError, grpc.RpcError, TimeoutError, OSError) as exc:
                    errors.append(f"{host}:{port}: {exc or type(exc).__name__}")
                    with contextlib.suppress(Exception):
                        await client.close()
                    continue
                self._client = client
                self._next_endpoint = idx
                return client
            raise DiscoveryError(f"cannot reach etcd at {self.target}: " + "; ".join(errors))

    def _connection_failed(self, client: aetcd.Client) -> None:
        # With one endpoint the gRPC channel reconnects by itself; with several, fail over to the
        # next member on the next call. Watches on the old client end and are re-opened by callers.
        stale: Any = client
        if len(self._endpoints) == 1 or self._client is not client:
            return
        self._client = None
        self._next_endpoint = (self._next_endpoint + 1) % len(self._endpoints)
        asyncio.get_running_loop().create_task(stale.close())

    async def _rpc(self, what: str, call: Callable[[aetcd.Client], Awaitable[_T]]) -> _T:
        client = await self._get_client()
        try:
            return await asyncio.wait_for(call(client), self._request_timeout_s)
        except (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError, TimeoutError) as exc:
            self._connection_failed(client)
            raise DiscoveryError(f"etcd {what} at {self.target} failed: {exc or type(exc).__name__}") from exc
        except (aetcd.ClientError, grpc.RpcError) as exc:
            raise DiscoveryError(f"etcd {what} at {self.target} failed: {exc or type(exc).__name__}") from exc

    # -- Discovery ----------------------------------------------------------------------------

    async def register(self, endpoint: Endpoint, *, ttl_s: float = 5.0) -> Registration:
        validate_service_name(endpoint.service)
        if not endpoint.id:
            raise DiscoveryError(f"endpoint of {endpoint.service!r} has an empty id")
        if not ttl_s > 0:
            raise DiscoveryError(f"ttl_s must be > 0, got {ttl_s!r}")
        # etcd leases are whole seconds; round up so the entry never expires earlier than asked.
        ttl = max(1, math.ceil(ttl_s))
        reg = _EtcdRegistration(self, endpoint, ttl)
        try:
            await reg._grant_and_put()
        except BaseException:
            await reg.close()
            raise
        reg._start(f"etcd-keepalive:{reg._key.decode()}")
        return reg

    # -- durable state (under their own prefix, apart from service registrations) ------------

    async def kv_put(self, key: str, value: bytes) -> None:
        k = (STATE_PREFIX + validate_kv_key(key)).encode()
        await self._rpc("put", lambda c: c.put(k, bytes(value)))

    async def kv_get_prefix(self, prefix: str) -> dict[str, bytes]:
        p = (STATE_PREFIX + prefix).encode()
        rng = await self._rpc("get", lambda c: c.get_prefix(p))
        cut = len(STATE_PREFIX)
        return {kv.key.decode()[cut:]: bytes(kv.value) for kv in rng}

    async def kv_delete(self, key: str) -> None:
        k = (STATE_PREFIX + validate_kv_key(key)).encode()
        await self._rpc("delete", lambda c: c.delete(k))

    @staticmethod
    def _decode(key: bytes, value: bytes) -> Endpoint | None:
        try:
            return Endpoint.from_json_dict(json.loads(value))
        except (ValueError, KeyError, TypeError, DiscoveryError) as exc:
            log.warning("ignoring malformed discovery record %s: %s", key.decode(errors="replace"), exc)
            return None

    async def _read(self, service: str) -> tuple[dict[bytes, Endpoint], int]:
        prefix = self._prefix(validate_service_name(service))
        rng = await self._rpc("get", lambda c: c.get_prefix(prefix))
        found: dict[bytes, Endpoint] = {}
        for kv in rng:
            ep = self._decode(kv.key, kv.value)
            if ep is not None:
                found[kv.key] = ep
        return found, rng.header.revision

    async def snapshot(self, service: str) -> list[Endpoint]:
        found, _ = await self._read(service)
        return sorted(found.values(), key=lambda e: e.id)

    async def watch(self, service: str) -> AsyncIterator[list[Endpoint]]:
        found, revision = await self._read(service)
        last = sorted(found.values(), key=lambda e: e.id)
        yield last

        prefix = self._prefix(service)
        client = await self._get_client()
        try:
            watch = await asyncio.wait_for(
                client.watch_prefix(prefix, start_revision=revision + 1), self._request_timeout_s
            )
        except (aetcd.ClientError, grpc.RpcError, TimeoutError) as exc:
            self._connection_failed(client)
            raise DiscoveryError(f"etcd watch of {service!r} at {self.target} failed: {exc}") from exc

        # aetcd hands out events one at a time. A pump task moves them into a queue of our own so
        # that every event already received (one watch response) is applied before we yield once.
        events: asyncio.Queue[aetcd.Event | BaseException | None] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for event in watch:
                    events.put_nowait(event)
                events.put_nowait(None)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                events.put_nowait(exc)

        pump_task = asyncio.create_task(pump(), name=f"etcd-watch:{service}")
        try:
            while True:
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                for item in batch:
                    if item is None:
                        raise DiscoveryError(f"etcd watch of {service!r} ended (connection closed)")
                    if isinstance(item, BaseException):
                        self._connection_failed(client)
                        raise DiscoveryError(f"etcd watch of {service!r} failed: {item}") from item
                    key = item.kv.key
                    if item.kind == aetcd.EventKind.PUT:
                        ep = self._decode(key, item.kv.value)
                        if ep is not None:
                            found[key] = ep
                        else:
                            found.pop(key, None)
                    else:
                        found.pop(key, None)
                now = sorted(found.values(), key=lambda e: e.id)
                if now != last:
                    last = now
                    yield now
        finally:
            pump_task.cancel()
            with contextlib.suppress(BaseException):
                await pump_task
            # Tell etcd to drop the watch; bounded, since the connection may already be gone.
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(watch.cancel(), 1.0)
