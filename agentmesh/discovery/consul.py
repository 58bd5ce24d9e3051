"""Discovery backed by a Consul agent's HTTP API (through ``py-consul``'s asyncio client).

Each replica is a Consul service instance with a TTL check that a background task passes every
third of the TTL; if the process dies the check turns critical (the instance drops out of
``?passing`` answers at once) and Consul removes it after ``DeregisterCriticalServiceAfter``.
Watchers use blocking queries on ``/v1/health/service/<name>?passing`` (``index`` + ``wait``): one
long-held request per change, never a poll per message.

Naming: Consul wants DNS-friendly service names, so ``agent.run1.writer`` becomes
``agent-run1-writer``. That mapping is not one-to-one (``a.b`` and ``a-b`` meet), so the original
name travels in ``Meta["agentmesh_service"]`` and answers are filtered on it; the instance ID is
``<service>:<id>``, unique because service names cannot hold ``:``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any, TypeVar

import aiohttp

from agentmesh.discovery.base import (
    ClientDiscovery,
    Endpoint,
    KeepAliveRegistration,
    Registration,
    validate_kv_key,
    validate_service_name,
)
from agentmesh.errors import DiscoveryError

__all__ = ["ConsulDiscovery", "consul_service_name"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

TAG = "agentmesh"
STATE_PREFIX = "agentmesh/state/"
META_SERVICE = "agentmesh_service"
META_ID = "agentmesh_id"
_RESERVED_META = (META_SERVICE, META_ID)
# Consul's documented limits on service Meta.
_META_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_META_MAX_PAIRS = 64
_META_MAX_VALUE = 512


def consul_service_name(service: str) -> str:
    """The DNS-friendly Consul name of an agentmesh service name."""
    return validate_service_name(service).replace(".", "-").replace("_", "-")


def _duration(seconds: float) -> str:
    # Consul reads Go durations; milliseconds keep fractional TTLs exact.
    return f"{max(1, round(seconds * 1000))}ms"


def _split_address(address: str) -> tuple[str, int]:
    host, colon, port_s = address.rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise DiscoveryError(f"bad endpoint address {address!r}: expected host:port")
    return host, int(port_s)


def _join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_url(url: str) -> tuple[str, int]:
    scheme, sep, rest = url.partition("://")
    if scheme != "consul" or not sep:
        raise DiscoveryError(f"bad consul url {url!r}: expected consul://host:port")
    rest = rest.rstrip("/")
    if "," in rest:
        raise DiscoveryError(f"bad consul url {url!r}: give one agent (consul://host:port)")
    try:
        return _split_address(rest)
    except DiscoveryError:
        raise DiscoveryError(f"bad consul url {url!r}: expected consul://host:port") from None


class _ConsulRegistration(KeepAliveRegistration):
    """One service instance with a TTL check, passed in the background until :meth:`close`."""

    def __init__(self, discovery: ConsulDiscovery, endpoint: Endpoint, ttl_s: float) -> None:
        super().__init__(endpoint, discovery._registrations)
        self._discovery = discovery
        self._ttl_s = ttl_s
        self.service_id = f"{endpoint.service}:{endpoint.id}"
        self.check_id = f"service:{self.service_id}"

    async def _register(self) -> None:
        ep = self.endpoint
        host, port = _split_address(ep.address)
        check = {
            "CheckID": self.check_id,
            "Name": "agentmesh keep-alive",
            "TTL": _duration(self._ttl_s),
            # A new TTL check starts critical; start passing so the instance is visible at once.
            "Status": "passing",
            "DeregisterCriticalServiceAfter": _duration(self._discovery.deregister_after_s),
        }
        meta = {**ep.metadata, META_SERVICE: ep.service, META_ID: ep.id}
        await self._discovery._call(
            "service register",
            lambda c: c.agent.service.register(
                consul_service_name(ep.service),
                service_id=self.service_id,
                address=host,
                port=port,
                tags=[TAG],
                meta=meta,
                check=check,
            ),
        )

    async def _keepalive(self) -> None:
        interval = self._ttl_s / 3
        while True:
            await asyncio.sleep(interval)
            try:
                ok = await self._discovery._call(
                    "check pass", lambda c: c.agent.check.ttl_pass(self.check_id)
                )
            except DiscoveryError as exc:
                log.warning("passing the TTL check of %s failed (%s)", self.service_id, exc)
                ok = False
            if ok:
                continue
            # Unknown check: the agent restarted or reaped us after a long outage. Register again
            # (registration is idempotent, so doing it after a mere network error is harmless).
            try:
                await self._register()
            except DiscoveryError as exc:
                log.warning(
                    "registering %s again failed (%s); retrying in %.1fs", self.service_id, exc, interval
                )

    async def _withdraw(self) -> None:
        try:
            await self._discovery._call(
                "service deregister", lambda c: c.agent.service.deregister(self.service_id)
            )
        except DiscoveryError as exc:
            log.warning("could not deregister %s (%s); its TTL check expires by itself", self.service_id, exc)


class ConsulDiscovery(ClientDiscovery):
    """Discovery through one Consul agent.

    ``wait_s`` is how long a blocking query may hang before Consul answers unchanged;
    ``deregister_after_s`` how long a critical instance is kept (Consul enforces at least 60 s;
    a critical instance is already left out of every answer). The ACL token, if any, comes from
    ``CONSUL_HTTP_TOKEN``, read by ``py-consul``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        request_timeout_s: float = 5.0,
        wait_s: float = 30.0,
        deregister_after_s: float = 60.0,
    ) -> None:
        super().__init__()
        self._host = host
        self._port = port
        self.request_timeout_s = request_timeout_s
        self.wait_s = wait_s
        self.deregister_after_s = deregister_after_s

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> ConsulDiscovery:
        """``consul://host:port`` (the agent's HTTP API)."""
        host, port = _parse_url(url)
        return cls(host, port, **kwargs)

    @property
    def target(self) -> str:
        return _join_address(self._host, self._port)

    def _get_client(self) -> Any:
        if self._closed:
            raise DiscoveryError("consul discovery is closed")
        if self._client is None:
            # Made lazily: the aiohttp session inside must be created on the running loop.
            import consul.aio

            self._client = consul.aio.Consul(host=self._host, port=self._port, scheme="http")
        return self._client

    async def _call(self, what: str, call: Any, *, timeout_s: float | None = None) -> Any:
        import consul

        client = self._get_client()
        try:
            result: Awaitable[Any] = call(client)
            return await asyncio.wait_for(result, timeout_s or self.request_timeout_s)
        except TimeoutError as exc:
            raise DiscoveryError(f"consul {what} at {self.target} timed out") from exc
        except (aiohttp.ClientError, OSError, consul.ConsulException, ValueError) as exc:
            raise DiscoveryError(
                f"consul {what} at {self.target} failed: {exc or type(exc).__name__}"
            ) from exc

    # -- Discovery ----------------------------------------------------------------------------

    @staticmethod
    def _check_endpoint(endpoint: Endpoint) -> None:
        validate_service_name(endpoint.service)
        if not endpoint.id or "/" in endpoint.id:
            raise DiscoveryError(f"bad endpoint id {endpoint.id!r}: must be non-empty and without '/'")
        _split_address(endpoint.address)
        if len(endpoint.metadata) + len(_RESERVED_META) > _META_MAX_PAIRS:
            raise DiscoveryError(f"endpoint metadata: at most {_META_MAX_PAIRS - len(_RESERVED_META)} keys")
        for key, value in endpoint.metadata.items():
            if key in _RESERVED_META or not _META_KEY_RE.match(key) or key.startswith("consul-"):
                raise DiscoveryError(
                    f"endpoint metadata key {key!r} not allowed in Consul: expected [A-Za-z0-9_-]{{1,128}}, "
                    f"not starting with 'consul-', not one of {_RESERVED_META}"
                )
            if len(value) > _META_MAX_VALUE:
                raise DiscoveryError(f"endpoint metadata {key!r}: value longer than {_META_MAX_VALUE} chars")

    async def register(self, endpoint: Endpoint, *, ttl_s: float = 5.0) -> Registration:
        self._check_endpoint(endpoint)
        if not ttl_s > 0:
            raise DiscoveryError(f"ttl_s must be > 0, got {ttl_s!r}")
        reg = _ConsulRegistration(self, endpoint, ttl_s)
        await reg._register()
        reg._start(f"consul-keepalive:{reg.service_id}")
        return reg

    @staticmethod
    def _endpoints(service: str, entries: Any) -> list[Endpoint]:
        found: list[Endpoint] = []
        for entry in entries or []:
            svc = entry.get("Service") or {}
            meta: Mapping[str, str] = svc.get("Meta") or {}
            if meta.get(META_SERVICE) != service:
                continue  # another agentmesh service with the same Consul name, or not ours
            host = svc.get("Address") or (entry.get("Node") or {}).get("Address") or ""
            try:
                port = int(svc.get("Port") or 0)
            except (TypeError, ValueError):
                port = 0
            if not host or not port:
                log.warning("ignoring consul instance %s without address", svc.get("ID"))
                continue
            found.append(
                Endpoint(
                    service=service,
                    id=str(meta.get(META_ID) or svc.get("ID")),
                    address=_join_address(str(host), port),
                    metadata={str(k): str(v) for k, v in meta.items() if k not in _RESERVED_META},
                )
            )
        return sorted(found, key=lambda e: e.id)

    async def _health(self, service: str, index: int | None) -> tuple[int, list[Endpoint]]:
        name = consul_service_name(service)
        if index:
            wait = _duration(self.wait_s)
            # Consul adds up to wait/16 of jitter before answering an unchanged blocking query.
            timeout_s = self.wait_s * 1.1 + self.request_timeout_s
            new_index, entries = await self._call(
                "health query",
                lambda c: c.health.service(name, passing=True, index=str(index), wait=wait),
                timeout_s=timeout_s,
            )
        else:
            new_index, entries = await self._call(
                "health query", lambda c: c.health.service(name, passing=True)
            )
        try:
            parsed = int(new_index)
        except (TypeError, ValueError):
            raise DiscoveryError(f"consul at {self.target} sent a bad X-Consul-Index {new_index!r}") from None
        return parsed, self._endpoints(service, entries)

    # -- durable state: Consul's KV store (/v1/kv), under a prefix of our own ----------------

    async def kv_put(self, key: str, value: bytes) -> None:
        k = STATE_PREFIX + validate_kv_key(key)
        ok = await self._call("kv put", lambda c: c.kv.put(k, bytes(value)))
        if ok is not True:
            raise DiscoveryError(f"consul kv put {k!r} at {self.target} was refused")

    async def kv_get_prefix(self, prefix: str) -> dict[str, bytes]:
        p = STATE_PREFIX + prefix
        _, entries = await self._call("kv get", lambda c: c.kv.get(p, recurse=True))
        cut = len(STATE_PREFIX)
        return {str(e["Key"])[cut:]: bytes(e.get("Value") or b"") for e in entries or []}

    async def kv_delete(self, key: str) -> None:
        k = STATE_PREFIX + validate_kv_key(key)
        await self._call("kv delete", lambda c: c.kv.delete(k))

    async def snapshot(self, service: str) -> list[Endpoint]:
        _, eps = await self._health(service, None)
        return eps

    async def watch(self, service: str) -> AsyncIterator[list[Endpoint]]:
        validate_service_name(service)
        index, last = await self._health(service, None)
        yield last
        while True:
            new_index, eps = await self._health(service, max(index, 1))
            # Consul's rules for blocking queries: an index that goes backwards (agent restart,
            # snapshot restore) means start over; an index of 0 must not be sent back as is.
            index = 0 if new_index < index else new_index
            if eps != last:
                last = eps
                yield eps
