"""The Consul discovery backend against the fake Consul agent (no real Consul can be installed here)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator

import pytest
from discovery_helpers import (
    check_kv_contract,
    check_watch_follows_changes,
    measure_register_to_watch,
    next_within,
    sample_endpoint,
    start_registering_process,
)
from fake_consul import FakeConsulAgent

from agentmesh.discovery import Endpoint, EndpointCache, connect
from agentmesh.discovery.consul import ConsulDiscovery, consul_service_name
from agentmesh.errors import DiscoveryError

pytestmark = pytest.mark.integration


@pytest.fixture
async def consul(fake_consul: FakeConsulAgent) -> AsyncIterator[ConsulDiscovery]:
    discovery = ConsulDiscovery.from_url(fake_consul.url, deregister_after_s=0.5)
    yield discovery
    await discovery.close()


def _health_requests(agent: FakeConsulAgent) -> int:
    return sum(1 for kind, _ in agent.requests if kind == "health")


async def test_connect_url_gives_consul_backend(fake_consul: FakeConsulAgent) -> None:
    discovery = connect(fake_consul.url)
    assert isinstance(discovery, ConsulDiscovery)
    await discovery.close()


async def test_register_then_snapshot_with_name_mapping(
    consul: ConsulDiscovery, fake_consul: FakeConsulAgent
) -> None:
    ep = Endpoint("agent.run_1.writer", "w0", "[::1]:7000", {"scheme": "grpc"})
    reg = await consul.register(ep, ttl_s=5)
    assert consul_service_name("agent.run_1.writer") == "agent-run-1-writer"
    assert fake_consul.service_ids() == {"agent.run_1.writer:w0"}
    assert await consul.snapshot("agent.run_1.writer") == [ep]
    # "agent-run-1-writer" is the same Consul name, but a different agentmesh service.
    other = await consul.register(Endpoint("agent-run-1-writer", "w0", "127.0.0.1:7001"), ttl_s=5)
    assert await consul.snapshot("agent.run_1.writer") == [ep]
    assert [e.address for e in await consul.snapshot("agent-run-1-writer")] == ["127.0.0.1:7001"]
    await other.close()
    await reg.close()
    assert await consul.snapshot("agent.run_1.writer") == []
    assert fake_consul.service_ids() == set()


async def test_watch_yields_initial_list_then_every_change(
    consul: ConsulDiscovery, fake_consul: FakeConsulAgent
) -> None:
    await check_watch_follows_changes(consul, "svc.a")
    # Every health query after the first was a blocking one.
    queries = [q for kind, q in fake_consul.requests if kind == "health"]
    assert all("index=" in q and "wait=" in q and "passing=" in q for q in queries[1:])


async def test_killed_process_turns_critical_within_ttl_then_is_reaped(
    consul: ConsulDiscovery, fake_consul: FakeConsulAgent
) -> None:
    ttl_s = 1.0
    proc = await start_registering_process(fake_consul.url, "svc.doomed", "d0", ttl_s, deregister_after_s=0.5)
    watch = consul.watch("svc.doomed")
    try:
        assert [e.id for e in await next_within(watch, 5)] == ["d0"]
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        t0 = time.monotonic()
        assert await next_within(watch, ttl_s + 1) == []
        gone_after = time.monotonic() - t0
        print(f"\nconsul(fake): killed holder (ttl {ttl_s}s) gone from the watch after {gone_after:.2f}s")
        assert gone_after <= ttl_s + 1
        # The check is critical now; DeregisterCriticalServiceAfter (0.5 s) later it is gone.
        assert fake_consul.service_ids() == {"svc.doomed:d0"}
        await fake_consul.wait_until(lambda a: not a.service_ids(), timeout_s=2)
    finally:
        await watch.aclose()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_keepalive_passes_the_check(consul: ConsulDiscovery, fake_consul: FakeConsulAgent) -> None:
    reg = await consul.register(sample_endpoint("svc.alive", 1), ttl_s=0.6)
    watch = consul.watch("svc.alive")
    try:
        assert await next_within(watch, 5) == [reg.endpoint]
        with pytest.raises(TimeoutError):
            await next_within(watch, 2.0)  # > 3 TTLs: nothing changes while the check is passed
        passes = [q for kind, q in fake_consul.requests if kind == "pass"]
        assert len(passes) >= 3
        assert set(passes) == {"service:svc.alive:r1"}
    finally:
        await watch.aclose()
        await reg.close()


async def test_registers_again_after_agent_forgot(
    consul: ConsulDiscovery, fake_consul: FakeConsulAgent
) -> None:
    reg = await consul.register(sample_endpoint("svc.back", 1), ttl_s=0.9)
    watch = consul.watch("svc.back")
    try:
        assert await next_within(watch, 5) == [reg.endpoint]
        fake_consul.forget_all()  # an agent restarted without its state
        assert await next_within(watch, 2) == []
        # The next check pass gets 404, and the registration puts itself back.
        assert await next_within(watch, 2) == [reg.endpoint]
    finally:
        await watch.aclose()
        await reg.close()


async def test_endpoint_cache_is_pushed_updates(
    consul: ConsulDiscovery, fake_consul: FakeConsulAgent
) -> None:
    cache = EndpointCache(consul)
    heard: list[tuple[str, ...]] = []
    cache.add_listener(lambda svc, eps: heard.append(tuple(e.id for e in eps)))
    try:
        assert await cache.subscribe("svc.cache") == ()
        regs = [await consul.register(sample_endpoint("svc.cache", i), ttl_s=5) for i in range(3)]
        await cache.wait_for("svc.cache", lambda eps: len(eps) == 3, timeout_s=5)
        await regs[0].close()
        await cache.wait_for("svc.cache", lambda eps: [e.id for e in eps] == ["r1", "r2"], timeout_s=5)
        assert heard[0] == () and heard[-1] == ("r1", "r2")
        # One blocking query per change (4 changes) plus the first read: no polling.
        assert _health_requests(fake_consul) <= 1 + 4 + 1
    finally:
        await cache.close()
        for reg in regs[1:]:
            await reg.close()


async def test_bad_endpoints_are_refused(consul: ConsulDiscovery) -> None:
    with pytest.raises(DiscoveryError, match="address"):
        await consul.register(Endpoint("svc.x", "a", "no-port"))
    with pytest.raises(DiscoveryError, match=r"metadata key 'a\.b'"):
        await consul.register(Endpoint("svc.x", "a", "127.0.0.1:1", {"a.b": "c"}))
    with pytest.raises(DiscoveryError, match="agentmesh_service"):
        await consul.register(Endpoint("svc.x", "a", "127.0.0.1:1", {"agentmesh_service": "c"}))
    with pytest.raises(DiscoveryError, match="bad service name"):
        await consul.register(Endpoint("Svc", "a", "127.0.0.1:1"))


async def test_unreachable_agent_is_a_clear_error() -> None:
    discovery = connect("consul://127.0.0.1:1")
    t0 = time.monotonic()
    with pytest.raises(DiscoveryError, match="consul"):
        await discovery.snapshot("svc")
    assert time.monotonic() - t0 < 5
    await discovery.close()


async def test_cancelled_watch_is_clean(consul: ConsulDiscovery) -> None:
    watch = consul.watch("svc.c")
    assert await next_within(watch, 5) == []
    waiter = asyncio.create_task(anext(watch))
    await asyncio.sleep(0.05)  # let the blocking query reach the agent
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.wait_for(watch.aclose(), 2)
    assert await consul.snapshot("svc.c") == []


async def test_register_and_watch_latency(consul: ConsulDiscovery) -> None:
    assert await measure_register_to_watch(consul, "svc.lat", "consul(fake)") < 0.5


async def test_durable_state_kv(service_name: str, consul: ConsulDiscovery) -> None:
    await check_kv_contract(consul, f"test/{service_name}/")
