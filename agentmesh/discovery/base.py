"""Service discovery: who is where, pushed to a local cache.

Every replica of every service registers an :class:`Endpoint` with a lease (etcd) or a TTL health
check (Consul); if the process dies the entry expires. Clients never ask discovery per message:
an :class:`EndpointCache` keeps a local copy of each service's endpoints, replaced whole by a
watch (an etcd watch or a Consul blocking query) whenever membership changes.

Backends implement :class:`Discovery`; :func:`agentmesh.discovery.connect` picks one from a URL.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agentmesh.errors import DiscoveryError

__all__ = [
    "ClientDiscovery",
    "Discovery",
    "Endpoint",
    "EndpointCache",
    "KeepAliveRegistration",
    "Registration",
    "validate_kv_key",
    "validate_service_name",
]

log = logging.getLogger(__name__)

_SERVICE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,199}$")


def validate_service_name(service: str) -> str:
    """Service names are lowercase ``[a-z0-9._-]`` so that every backend can hold them."""
    if not _SERVICE_RE.match(service):
        raise DiscoveryError(f"bad service name {service!r}: expected lowercase [a-z0-9._-], 1-200 chars")
    return service


@dataclass(frozen=True)
class Endpoint:
    """One replica of one service.

    ``service`` names the group (``agent.<run>.<role>``, ``llm.<model>``), ``id`` is unique within
    it, ``address`` is ``host:port``, ``metadata`` free-form strings (e.g. ``scheme=http``).
    """

    service: str
    id: str
    address: str
    metadata: Mapping[str, str] = field(default_factory=dict)

    def to_json_dict(self) -> dict[str, object]:
        return {
            "service": self.service,
            "id": self.id,
            "address": self.address,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_json_dict(cls, d: Mapping[str, object]) -> Endpoint:
        meta = d.get("metadata") or {}
        if not isinstance(meta, dict):
            raise DiscoveryError(f"bad endpoint record: metadata is {type(meta).__name__}, expected object")
        return cls(
            service=str(d["service"]),
            id=str(d["id"]),
            address=str(d["address"]),
            metadata={str(k): str(v) for k, v in meta.items()},
        )


class Registration(abc.ABC):
    """A live registration. Kept alive in the background until :meth:`close` deregisters it."""

    endpoint: Endpoint

    @abc.abstractmethod
    async def close(self) -> None:
        """Deregister now (graceful drain). Idempotent."""


class KeepAliveRegistration(Registration):
    """A registration that a background task keeps alive until :meth:`close` withdraws it.

    Backends say how to keep it alive (:meth:`_keepalive`, a loop) and how to withdraw it
    (:meth:`_withdraw`); ``live`` is the backend's set of open registrations (closed on its close).
    """

    def __init__(self, endpoint: Endpoint, live: set[Any]) -> None:
        self.endpoint = endpoint
        self._live = live
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def _start(self, name: str) -> None:
        self._live.add(self)
        self._task = asyncio.create_task(self._keepalive(), name=name)

    @abc.abstractmethod
    async def _keepalive(self) -> None:
        """Keep the registration alive, forever (cancelled by :meth:`close`)."""

    @abc.abstractmethod
    async def _withdraw(self) -> None:
        """Remove the registration from the store now."""

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._live.discard(self)
        await self._withdraw()


class Discovery(abc.ABC):
    """One interface, several backends (etcd, Consul, in-memory for unit tests)."""

    @abc.abstractmethod
    async def register(self, endpoint: Endpoint, *, ttl_s: float = 5.0) -> Registration:
        """Register ``endpoint``; if this process dies the entry disappears within ``ttl_s``."""

    @abc.abstractmethod
    async def snapshot(self, service: str) -> list[Endpoint]:
        """The endpoints of ``service`` now, sorted by id."""

    @abc.abstractmethod
    def watch(self, service: str) -> AsyncIterator[list[Endpoint]]:
        """Yield the full endpoint list of ``service`` at once, then again after every change."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close connections. Registrations made through this object are closed too."""

    # -- durable state ------------------------------------------------------------------------
    # Services that must survive their own restart (the container registry) keep small records in
    # the same store, under keys of their own: no second database to run.

    async def kv_put(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key`` (no lease: it stays until deleted)."""
        raise DiscoveryError(f"{type(self).__name__} has no key-value store")

    async def kv_get_prefix(self, prefix: str) -> dict[str, bytes]:
        """Every key under ``prefix`` with its value."""
        raise DiscoveryError(f"{type(self).__name__} has no key-value store")

    async def kv_delete(self, key: str) -> None:
        """Delete ``key`` (no error if absent)."""
        raise DiscoveryError(f"{type(self).__name__} has no key-value store")


def validate_kv_key(key: str) -> str:
    """State keys are printable ASCII paths without ``..``, so that every backend can hold them."""
    if not key or len(key) > 512 or not key.isprintable() or not key.isascii() or ".." in key:
        raise DiscoveryError(f"bad state key {key!r}: expected printable ASCII, 1-512 chars, no '..'")
    return key


Listener = Callable[[str, tuple[Endpoint, ...]], None]


class EndpointCache:
    """A local, watch-fed cache of endpoints per service.

    ``get`` is a dict lookup: nothing goes to the discovery store on the hot path. The set for a
    service is replaced whole on every change; listeners hear about it (e.g. to prune load caches
    and close channels of vanished replicas).
    """

    def __init__(self, discovery: Discovery) -> None:
        self._discovery = discovery
        self._endpoints: dict[str, tuple[Endpoint, ...]] = {}
        self._ready: dict[str, asyncio.Event] = {}
        self._changed: dict[str, asyncio.Condition] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._listeners: list[Listener] = []

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener`` (no error if it was not there)."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    async def subscribe(self, service: str, *, timeout_s: float = 10.0) -> tuple[Endpoint, ...]:
        """Start watching ``service`` (once) and wait for its first snapshot."""
        validate_service_name(service)
        if service not in self._tasks:
            self._ready[service] = asyncio.Event()
            self._changed[service] = asyncio.Condition()
            self._tasks[service] = asyncio.create_task(self._run_watch(service), name=f"watch:{service}")
        try:
            await asyncio.wait_for(self._ready[service].wait(), timeout_s)
        except TimeoutError:
            raise DiscoveryError(f"no snapshot of {service!r} from discovery within {timeout_s}s") from None
        return self._endpoints.get(service, ())

    def get(self, service: str) -> tuple[Endpoint, ...]:
        return self._endpoints.get(service, ())

    async def wait_for(
        self, service: str, predicate: Callable[[tuple[Endpoint, ...]], bool], *, timeout_s: float = 30.0
    ) -> tuple[Endpoint, ...]:
        """Wait until ``predicate(endpoints)`` holds for ``service``."""
        await self.subscribe(service)
        cond = self._changed[service]

        async def _wait() -> tuple[Endpoint, ...]:
            async with cond:
                await cond.wait_for(lambda: predicate(self.get(service)))
            return self.get(service)

        try:
            return await asyncio.wait_for(_wait(), timeout_s)
        except TimeoutError:
            raise DiscoveryError(
                f"{service!r}: condition not met within {timeout_s}s "
                f"(have {len(self.get(service))} endpoints)"
            ) from None

    async def _run_watch(self, service: str) -> None:
        backoff = 0.1
        while True:
            try:
                async for eps in self._discovery.watch(service):
                    backoff = 0.1
                    await self._update(service, tuple(sorted(eps, key=lambda e: e.id)))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store went away: keep the last snapshot, retry
                log.warning("discovery watch of %s failed (%s); retrying in %.1fs", service, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _update(self, service: str, eps: tuple[Endpoint, ...]) -> None:
        if self._endpoints.get(service) != eps or not self._ready[service].is_set():
            self._endpoints[service] = eps
            for listener in self._listeners:
                try:
                    listener(service, eps)
                except Exception:
                    log.exception("endpoint listener failed")
        self._ready[service].set()
        cond = self._changed[service]
        async with cond:
            cond.notify_all()

    async def close(self) -> None:
        for t in self._tasks.values():
            t.cancel()
        for t in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()


class ClientDiscovery(Discovery):
    """A backend that talks to its store through one client object and keeps registrations alive.

    Subclasses set ``_client`` (anything with an async ``close()``) when they connect and add their
    registrations to ``_registrations``; :meth:`close` withdraws those, then closes the client.
    """

    def __init__(self) -> None:
        self._client: Any = None
        self._registrations: set[KeepAliveRegistration] = set()
        self._closed = False

    async def close(self) -> None:
        for reg in list(self._registrations):
            await reg.close()
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
