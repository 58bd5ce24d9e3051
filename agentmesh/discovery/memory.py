"""In-process discovery for unit tests: no sockets, same semantics as the real backends.

Registrations live until closed; :meth:`MemoryDiscovery.kill` removes one as if its lease had
run out (its holder died), so lease behaviour can be tested without waiting on a real store.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from agentmesh.discovery.base import Discovery, Endpoint, Registration, validate_kv_key, validate_service_name

__all__ = ["MemoryDiscovery"]


class _MemoryRegistration(Registration):
    def __init__(self, store: MemoryDiscovery, endpoint: Endpoint) -> None:
        self._store = store
        self.endpoint = endpoint

    async def close(self) -> None:
        self._store._remove(self.endpoint)


class MemoryDiscovery(Discovery):
    """A dict of services, with watchers notified on every change. Shared by reference."""

    def __init__(self) -> None:
        self._services: dict[str, dict[str, Endpoint]] = {}
        self._version = 0
        self._cond = asyncio.Condition()
        self._kv: dict[str, bytes] = {}

    async def register(self, endpoint: Endpoint, *, ttl_s: float = 5.0) -> Registration:
        validate_service_name(endpoint.service)
        self._services.setdefault(endpoint.service, {})[endpoint.id] = endpoint
        self._bump()
        return _MemoryRegistration(self, endpoint)

    def _remove(self, endpoint: Endpoint) -> None:
        if self._services.get(endpoint.service, {}).pop(endpoint.id, None) is not None:
            self._bump()

    def kill(self, service: str, endpoint_id: str) -> None:
        """Simulate a lease expiring (the holder died)."""
        if self._services.get(service, {}).pop(endpoint_id, None) is not None:
            self._bump()

    def _bump(self) -> None:
        self._version += 1

        async def _notify() -> None:
            async with self._cond:
                self._cond.notify_all()

        try:
            asyncio.get_running_loop().create_task(_notify())
        except RuntimeError:
            pass

    async def snapshot(self, service: str) -> list[Endpoint]:
        return sorted(self._services.get(service, {}).values(), key=lambda e: e.id)

    async def watch(self, service: str) -> AsyncIterator[list[Endpoint]]:
        last: list[Endpoint] | None = None
        while True:
            # Remember the version before yielding: a change made while the consumer holds the
            # list (its notification already spent) must still wake this watch afterwards.
            seen = self._version
            now = await self.snapshot(service)
            if now != last:
                last = now
                yield now
            async with self._cond:
                await self._cond.wait_for(lambda seen=seen: self._version != seen)  # type: ignore[misc]

    async def kv_put(self, key: str, value: bytes) -> None:
        self._kv[validate_kv_key(key)] = bytes(value)

    async def kv_get_prefix(self, prefix: str) -> dict[str, bytes]:
        return {k: v for k, v in self._kv.items() if k.startswith(prefix)}

    async def kv_delete(self, key: str) -> None:
        self._kv.pop(key, None)

    async def close(self) -> None:
        return None
