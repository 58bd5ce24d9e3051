"""Unit tests (no sockets) for the discovery interface: MemoryDiscovery, EndpointCache, names, URLs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from agentmesh.discovery import (
    Discovery,
    Endpoint,
    EndpointCache,
    Registration,
    connect,
    validate_service_name,
)
from agentmesh.discovery.consul import ConsulDiscovery, consul_service_name
from agentmesh.discovery.etcd import EtcdDiscovery
from agentmesh.discovery.memory import MemoryDiscovery
from agentmesh.errors import DiscoveryError


def _ep(service: str, i: int) -> Endpoint:
    return Endpoint(service, f"r{i}", f"10.0.0.{i}:5000", {"n": str(i)})


# -- names and URLs ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "agent.run1.writer", "llm.smollm2-135m", "x_y", "0abc"])
def test_valid_service_names(name: str) -> None:
    assert validate_service_name(name) == name


@pytest.mark.parametrize("name", ["", "Agent", "a/b", "-a", ".a", "a b", "a:b", "é", "a" * 201])
def test_bad_service_names_are_refused(name: str) -> None:
    with pytest.raises(DiscoveryError, match="bad service name"):
        validate_service_name(name)


@pytest.mark.parametrize("url", ["etcd", "zk://h:1", "etcd://", "etcd://h", "etcd://h:x", "etcd://h:70000"])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(DiscoveryError):
        connect(url)


def test_urls_pick_the_backend() -> None:
    assert isinstance(connect("memory://"), MemoryDiscovery)
    etcd = connect("etcd://127.0.0.1:2379,[::1]:2380/")
    assert isinstance(etcd, EtcdDiscovery)
    assert etcd.target == "127.0.0.1:2379,::1:2380"
    consul = connect("consul://consul.local:8500")
    assert isinstance(consul, ConsulDiscovery)
    assert consul.target == "consul.local:8500"
    with pytest.raises(DiscoveryError, match="one agent"):
        connect("consul://a:1,b:2")


def test_consul_names_are_dns_friendly() -> None:
    assert consul_service_name("agent.run_1.writer") == "agent-run-1-writer"
    with pytest.raises(DiscoveryError):
        consul_service_name("Bad")


def test_consul_answers_are_filtered_on_the_original_name() -> None:
    def entry(original: str, sid: str, address: str, port: int) -> dict[str, object]:
        return {
            "Node": {"Node": "n1", "Address": "192.168.1.9"},
            "Service": {
                "ID": sid,
                "Service": consul_service_name(original),
                "Address": address,
                "Port": port,
                "Meta": {"agentmesh_service": original, "agentmesh_id": sid[-2:], "k": "v"},
            },
            "Checks": [],
        }

    entries = [
        entry("a.b", "a.b:r2", "", 81),
        entry("a-b", "a-b:r1", "10.0.0.1", 80),
        entry("a.b", "a.b:r1", "::1", 82),
    ]
    eps = ConsulDiscovery._endpoints("a.b", entries)
    # Sorted by id; empty Address falls back to the node's; IPv6 gets brackets; our meta keys stripped.
    assert [(e.id, e.address, dict(e.metadata)) for e in eps] == [
        ("r1", "[::1]:82", {"k": "v"}),
        ("r2", "192.168.1.9:81", {"k": "v"}),
    ]


def test_endpoint_json_round_trip_and_bad_record() -> None:
    ep = _ep("svc", 1)
    assert Endpoint.from_json_dict(ep.to_json_dict()) == ep
    with pytest.raises(DiscoveryError, match="metadata"):
        Endpoint.from_json_dict({"service": "s", "id": "i", "address": "a:1", "metadata": [1]})


# -- MemoryDiscovery --------------------------------------------------------------------------


async def test_memory_register_snapshot_close() -> None:
    d = MemoryDiscovery()
    regs = [await d.register(_ep("svc", i)) for i in (2, 1)]
    assert [e.id for e in await d.snapshot("svc")] == ["r1", "r2"]
    await regs[0].close()
    await regs[0].close()
    assert [e.id for e in await d.snapshot("svc")] == ["r1"]
    with pytest.raises(DiscoveryError):
        await d.register(Endpoint("Bad Name", "x", "h:1"))


async def test_memory_watch_initial_then_changes() -> None:
    d = MemoryDiscovery()
    watch = d.watch("svc")
    assert await asyncio.wait_for(anext(watch), 1) == []
    reg = await d.register(_ep("svc", 1))
    assert await asyncio.wait_for(anext(watch), 1) == [reg.endpoint]
    d.kill("svc", "r1")
    assert await asyncio.wait_for(anext(watch), 1) == []
    await watch.aclose()


async def test_memory_watch_misses_no_change_made_while_consumer_was_busy() -> None:
    d = MemoryDiscovery()
    watch = d.watch("svc")
    assert await asyncio.wait_for(anext(watch), 1) == []
    reg = await d.register(_ep("svc", 1))
    # The change notification runs before the consumer asks for the next list.
    for _ in range(3):
        await asyncio.sleep(0)
    assert await asyncio.wait_for(anext(watch), 1) == [reg.endpoint]
    await watch.aclose()


# -- EndpointCache ----------------------------------------------------------------------------


async def test_cache_listener_hears_whole_sets() -> None:
    d = MemoryDiscovery()
    cache = EndpointCache(d)
    heard: list[tuple[str, tuple[str, ...]]] = []
    cache.add_listener(lambda svc, eps: heard.append((svc, tuple(e.id for e in eps))))
    first = await d.register(_ep("svc", 1))
    assert [e.id for e in await cache.subscribe("svc")] == ["r1"]
    await d.register(_ep("svc", 3))
    await d.register(_ep("svc", 2))
    await cache.wait_for("svc", lambda eps: len(eps) == 3, timeout_s=1)
    assert cache.get("svc") == tuple(sorted(cache.get("svc"), key=lambda e: e.id))
    await first.close()
    got = await cache.wait_for("svc", lambda eps: [e.id for e in eps] == ["r2", "r3"], timeout_s=1)
    assert [e.id for e in got] == ["r2", "r3"]
    assert heard[0] == ("svc", ("r1",))
    assert heard[-1] == ("svc", ("r2", "r3"))
    # Each call carries a whole set, and every set heard is one the service really had.
    assert all(ids == tuple(sorted(ids)) for _, ids in heard)
    assert cache.get("other") == ()
    await cache.close()


async def test_cache_wait_for_times_out_with_clear_error() -> None:
    cache = EndpointCache(MemoryDiscovery())
    with pytest.raises(DiscoveryError, match="condition not met"):
        await cache.wait_for("svc", lambda eps: len(eps) > 0, timeout_s=0.05)
    await cache.close()


async def test_cache_refuses_bad_service_name() -> None:
    cache = EndpointCache(MemoryDiscovery())
    with pytest.raises(DiscoveryError, match="bad service name"):
        await cache.subscribe("Not/OK")
    await cache.close()


class _FlakyDiscovery(Discovery):
    """A watch that fails once after its first list, then works: the cache must recover."""

    def __init__(self) -> None:
        self.inner = MemoryDiscovery()
        self.watch_calls = 0

    async def register(self, endpoint: Endpoint, *, ttl_s: float = 5.0) -> Registration:
        return await self.inner.register(endpoint, ttl_s=ttl_s)

    async def snapshot(self, service: str) -> list[Endpoint]:
        return await self.inner.snapshot(service)

    async def watch(self, service: str) -> AsyncIterator[list[Endpoint]]:
        self.watch_calls += 1
        if self.watch_calls == 1:
            yield await self.inner.snapshot(service)
            raise DiscoveryError("store went away")
        async for eps in self.inner.watch(service):
            yield eps

    async def close(self) -> None:
        return None


async def test_cache_rewatches_after_a_failed_watch() -> None:
    d = _FlakyDiscovery()
    cache = EndpointCache(d)
    assert await cache.subscribe("svc") == ()
    await d.register(_ep("svc", 1))
    await cache.wait_for("svc", lambda eps: len(eps) == 1, timeout_s=2)
    assert d.watch_calls == 2
    await cache.close()


async def test_cache_subscribe_times_out_when_store_never_answers() -> None:
    class _Silent(_FlakyDiscovery):
        async def watch(self, service: str) -> AsyncIterator[list[Endpoint]]:
            await asyncio.Event().wait()
            yield []

    cache = EndpointCache(_Silent())
    with pytest.raises(DiscoveryError, match="no snapshot"):
        await cache.subscribe("svc", timeout_s=0.05)
    await cache.close()


async def test_memory_kv_contract() -> None:
    from agentmesh.discovery.memory import MemoryDiscovery
    from agentmesh.errors import DiscoveryError

    d = MemoryDiscovery()
    await d.kv_put("p/a/1", b"1")
    await d.kv_put("p/ab/1", b"2")
    assert await d.kv_get_prefix("p/a/") == {"p/a/1": b"1"}
    await d.kv_delete("p/a/1")
    await d.kv_delete("p/a/1")
    assert await d.kv_get_prefix("p/") == {"p/ab/1": b"2"}
    with pytest.raises(DiscoveryError):
        await d.kv_put("../x", b"")
