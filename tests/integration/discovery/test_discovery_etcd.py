"""The etcd discovery backend against a real etcd (started by EtcdServer) on loopback."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aetcd
import pytest
from discovery_helpers import (
    check_kv_contract,
    check_watch_follows_changes,
    measure_register_to_watch,
    next_within,
    sample_endpoint,
    start_registering_process,
)

from agentmesh.discovery import Discovery, Endpoint, EndpointCache, Registration, connect
from agentmesh.discovery.etcd import EtcdDiscovery
from agentmesh.discovery.etcd_server import EtcdServer
from agentmesh.errors import DiscoveryError

pytestmark = pytest.mark.integration


@pytest.fixture
async def etcd(etcd_server: EtcdServer) -> AsyncIterator[EtcdDiscovery]:
    discovery = EtcdDiscovery.from_url(etcd_server.url)
    yield discovery
    await discovery.close()


async def test_connect_url_gives_etcd_backend(etcd_server: EtcdServer) -> None:
    discovery = connect(etcd_server.url)
    assert isinstance(discovery, EtcdDiscovery)
    await discovery.close()


async def test_register_then_snapshot(etcd: EtcdDiscovery, service_name: str) -> None:
    ep = sample_endpoint(service_name, 1, scheme="grpc")
    reg = await etcd.register(ep, ttl_s=5)
    assert reg.endpoint == ep
    assert await etcd.snapshot(service_name) == [ep]
    # A service whose name extends ours must not leak into our prefix.
    other = await etcd.register(sample_endpoint(service_name + "x", 2), ttl_s=5)
    assert await etcd.snapshot(service_name) == [ep]
    await other.close()
    await reg.close()
    assert await etcd.snapshot(service_name) == []


async def test_watch_yields_initial_list_then_every_change(etcd: EtcdDiscovery, service_name: str) -> None:
    # close() revokes the lease: the watch hears of it long before the 5 s TTL could run out.
    await check_watch_follows_changes(etcd, service_name)


async def test_close_is_idempotent_and_removes_at_once(etcd: EtcdDiscovery, service_name: str) -> None:
    reg = await etcd.register(sample_endpoint(service_name, 1), ttl_s=30)
    await reg.close()
    await reg.close()
    assert await etcd.snapshot(service_name) == []


async def test_killed_process_disappears_within_ttl(
    etcd_server: EtcdServer, etcd: EtcdDiscovery, service_name: str
) -> None:
    ttl_s = 2
    proc = await start_registering_process(etcd_server.url, service_name, "doomed", ttl_s)
    watch = etcd.watch(service_name)
    try:
        assert [e.id for e in await next_within(watch, 5)] == ["doomed"]
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        t0 = time.monotonic()
        assert await next_within(watch, ttl_s + 1) == []
        gone_after = time.monotonic() - t0
        print(f"\netcd: killed holder (ttl {ttl_s}s) gone from the watch after {gone_after:.2f}s")
        assert gone_after <= ttl_s + 1
    finally:
        await watch.aclose()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_keepalive_outlives_ttl(etcd: EtcdDiscovery, service_name: str) -> None:
    reg = await etcd.register(sample_endpoint(service_name, 1), ttl_s=1)
    watch = etcd.watch(service_name)
    try:
        assert await next_within(watch, 5) == [reg.endpoint]
        # Nothing may change for three TTLs: the background keep-alive holds the lease.
        with pytest.raises(TimeoutError):
            await next_within(watch, 3.0)
        assert await etcd.snapshot(service_name) == [reg.endpoint]
    finally:
        await watch.aclose()
        await reg.close()


async def test_lost_lease_is_granted_again(
    etcd_server: EtcdServer, etcd: EtcdDiscovery, service_name: str
) -> None:
    reg = await etcd.register(sample_endpoint(service_name, 1), ttl_s=3)
    lease_id = reg.lease_id  # type: ignore[attr-defined]
    watch = etcd.watch(service_name)
    host, port = etcd_server.client_endpoint.split(":")
    try:
        assert await next_within(watch, 5) == [reg.endpoint]
        # Another client revokes the lease, as if it had expired during an outage.
        async with aetcd.Client(host=host, port=int(port)) as raw:
            await raw.revoke_lease(lease_id)
        assert await next_within(watch, 2) == []
        # The next keep-alive (every ttl/3 = 1 s) finds the lease gone and registers again.
        assert await next_within(watch, 3) == [reg.endpoint]
        assert reg.lease_id != lease_id  # type: ignore[attr-defined]
    finally:
        await watch.aclose()
        await reg.close()
    assert await etcd.snapshot(service_name) == []


async def test_malformed_records_are_skipped(
    etcd_server: EtcdServer, etcd: EtcdDiscovery, service_name: str
) -> None:
    host, port = etcd_server.client_endpoint.split(":")
    reg = await etcd.register(sample_endpoint(service_name, 1), ttl_s=5)
    async with aetcd.Client(host=host, port=int(port)) as raw:
        await raw.put(f"/agentmesh/services/{service_name}/junk".encode(), b"{not json")
        try:
            assert await etcd.snapshot(service_name) == [reg.endpoint]
        finally:
            await raw.delete(f"/agentmesh/services/{service_name}/junk".encode())
    await reg.close()


class _CountingDiscovery(Discovery):
    """Counts what the cache asks of the store, to prove it is pushed to, not polling."""

    def __init__(self, inner: Discovery) -> None:
        self.inner = inner
        self.watches = 0
        self.snapshots = 0

    async def register(self, endpoint: Endpoint, *, ttl_s: float = 5.0) -> Registration:
        return await self.inner.register(endpoint, ttl_s=ttl_s)

    async def snapshot(self, service: str) -> list[Endpoint]:
        self.snapshots += 1
        return await self.inner.snapshot(service)

    def watch(self, service: str) -> AsyncIterator[list[Endpoint]]:
        self.watches += 1
        return self.inner.watch(service)

    async def close(self) -> None:
        await self.inner.close()


async def test_endpoint_cache_is_pushed_updates(etcd: EtcdDiscovery, service_name: str) -> None:
    counting = _CountingDiscovery(etcd)
    cache = EndpointCache(counting)
    heard: list[tuple[str, ...]] = []
    cache.add_listener(lambda svc, eps: heard.append(tuple(e.id for e in eps)))
    try:
        assert await cache.subscribe(service_name) == ()
        regs = [await etcd.register(sample_endpoint(service_name, i), ttl_s=5) for i in range(3)]
        await cache.wait_for(service_name, lambda eps: len(eps) == 3, timeout_s=5)
        assert [e.id for e in cache.get(service_name)] == ["r0", "r1", "r2"]
        await regs[1].close()
        await cache.wait_for(service_name, lambda eps: [e.id for e in eps] == ["r0", "r2"], timeout_s=5)
        # Every listener call carries the whole set; the last one is the current set.
        assert heard[0] == ()
        assert heard[-1] == ("r0", "r2")
        # One watch, no per-read round trips to etcd.
        assert counting.watches == 1
        assert counting.snapshots == 0
        for reg in (regs[0], regs[2]):
            await reg.close()
        await cache.wait_for(service_name, lambda eps: not eps, timeout_s=5)
    finally:
        await cache.close()


async def test_cancelled_watch_is_clean(etcd: EtcdDiscovery, service_name: str) -> None:
    watch = etcd.watch(service_name)
    assert await next_within(watch, 5) == []
    waiter = asyncio.create_task(anext(watch))
    await asyncio.sleep(0)  # let the waiter block inside the watch
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.wait_for(watch.aclose(), 2)
    # The client is still fine for new watches and writes.
    fresh = etcd.watch(service_name)
    try:
        assert await next_within(fresh, 5) == []
        reg = await etcd.register(sample_endpoint(service_name, 1), ttl_s=5)
        assert await next_within(fresh, 5) == [reg.endpoint]
        await reg.close()
    finally:
        await fresh.aclose()


async def test_unreachable_etcd_is_a_clear_error_not_a_hang() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]  # closed again when we leave: nobody listens there
    for url in ("etcd://127.0.0.1:1", f"etcd://127.0.0.1:{dead_port}"):
        discovery = connect(url)
        t0 = time.monotonic()
        with pytest.raises(DiscoveryError, match="cannot reach etcd"):
            await discovery.snapshot("svc")
        with pytest.raises(DiscoveryError):
            await discovery.register(Endpoint("svc", "a", "127.0.0.1:1"))
        assert time.monotonic() - t0 < 5
        await discovery.close()


async def test_second_endpoint_is_used_when_first_is_down(etcd_server: EtcdServer, service_name: str) -> None:
    discovery = EtcdDiscovery.from_url(f"etcd://127.0.0.1:1,{etcd_server.client_endpoint}")
    try:
        reg = await discovery.register(sample_endpoint(service_name, 1), ttl_s=5)
        assert await discovery.snapshot(service_name) == [reg.endpoint]
    finally:
        await discovery.close()


async def test_register_and_watch_latency(etcd: EtcdDiscovery, service_name: str) -> None:
    """Measures register latency and watch propagation (register call -> watch yields)."""
    assert await measure_register_to_watch(etcd, service_name, "etcd") < 0.5


def test_etcd_server_lifecycle(tmp_path: Path) -> None:
    server = EtcdServer()
    with server:
        assert server.url == f"etcd://{server.client_endpoint}"
        data_dir = server.data_dir
        assert (data_dir / "etcd.log").exists()
    assert not data_dir.exists(), "a temp data dir is removed on stop"
    kept = tmp_path / "etcd"
    with EtcdServer(kept, fast=False) as server:
        pid = server.pid
        assert pid is not None
    assert (kept / "etcd-data").is_dir(), "a given data dir is kept"
    assert server.pid is None


async def test_durable_state_kv(service_name: str, etcd: EtcdDiscovery) -> None:
    await check_kv_contract(etcd, f"test/{service_name}/")
