"""The registry and its holders over a real etcd, in this process: state per id, warm pools, bursts
without over-creation, per-client release, leases renewed by use and reclaimed when they run out,
and a registry restart that loses no mapping."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from agentmesh.container.client import ContainerClient, ContainerGone
from agentmesh.container.holder import SandboxHolder
from agentmesh.discovery import Discovery, EndpointCache, connect
from agentmesh.discovery.etcd_server import EtcdServer
from agentmesh.errors import RpcError
from agentmesh.registry.registry import ContainerRegistry
from agentmesh.v1 import container_pb2 as cpb
from agentmesh.v1 import container_pb2_grpc as cgrpc

pytestmark = pytest.mark.integration


@dataclass
class Mesh:
    discovery: Discovery
    cache: EndpointCache
    holders: list[SandboxHolder]
    registry: ContainerRegistry
    name: str

    def client(self, client_id: str) -> ContainerClient:
        return ContainerClient(client_id, endpoints=self.cache, registry_name=self.name)


async def _start(
    etcd: EtcdServer, name: str, root: Path, *, holders: int = 2, capacity: int = 32, target: int = 4
) -> Mesh:
    disc = connect(etcd.url)
    hs = [
        SandboxHolder(
            registry_name=name,
            discovery=disc,
            capacity=capacity,
            root=root,
            holder_id=f"h{i}",
            reap_interval_s=0.1,
        )
        for i in range(holders)
    ]
    for h in hs:
        await h.start()
    reg = ContainerRegistry(
        name=name, discovery=disc, pools={("bubblewrap", "default"): target}, inventory_interval_s=0.2
    )
    await reg.start()
    return Mesh(disc, EndpointCache(disc), hs, reg, name)


@pytest.fixture
async def mesh(etcd: EtcdServer, registry_name: str, sandbox_roots: Path) -> AsyncIterator[Mesh]:
    m = await _start(etcd, registry_name, sandbox_roots)
    yield m
    await m.registry.stop()
    for h in m.holders:
        await h.stop()
    await m.cache.close()
    await m.discovery.close()


async def _until(pred, timeout_s: float = 10.0) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


async def test_same_id_same_files_other_id_not(mesh: Mesh) -> None:
    c = mesh.client("alice")
    a, b = await asyncio.gather(c.acquire(), c.acquire())
    assert a.id != b.id
    r = await c.exec(a, ["sh", "-c", "echo kept > /work/state.txt"])
    assert r.ok, r
    r = await c.exec(a, ["cat", "/work/state.txt"])
    assert r.stdout == b"kept\n"
    r = await c.exec(b, ["cat", "/work/state.txt"])
    assert r.exit_code != 0 and b"kept" not in r.stdout
    # the registry's front door reaches the same sandbox as the holder's direct path
    ch = grpc.aio.insecure_channel(mesh.registry.address)
    reply = await cgrpc.ContainerServiceStub(ch).Exec(
        cpb.ExecRequest(container_id=a.id, argv=["cat", "state.txt"])
    )
    assert reply.stdout == b"kept\n"
    await ch.close()
    assert await c.release(a) and not await c.release(a)
    with pytest.raises(ContainerGone):
        await c.exec(a.id, ["true"])
    await c.close()


async def test_warm_pool_serves_and_refills(mesh: Mesh) -> None:
    await _until(lambda: mesh.registry.pools().pools[0].warm == 4)
    c = mesh.client("warm")
    refs = [await c.acquire() for _ in range(3)]
    assert all(r.warm for r in refs)
    await _until(lambda: mesh.registry.pools().pools[0].warm == 4)  # refilled
    assert await c.release_all() == 3
    await c.close()


async def test_burst_creates_no_more_than_asked(mesh: Mesh) -> None:
    await _until(lambda: mesh.registry.pools().pools[0].warm == 4)
    created0 = mesh.registry.stats["created"]
    c = mesh.client("burst")
    refs = await asyncio.gather(*(c.acquire() for _ in range(40)))
    assert len({r.id for r in refs}) == 40
    await _until(
        lambda: mesh.registry.pools().pools[0].warm == 4 and mesh.registry.pools().pools[0].creating == 0
    )
    created = mesh.registry.stats["created"] - created0
    # 40 handed out, 4 of them from the pool, and the pool refilled to 4: exactly 40 new sandboxes
    assert created == 40, created
    held = sum(len(h._held) for h in mesh.holders)
    assert held == 44
    await c.release_all()
    await c.close()


async def test_release_is_per_client(mesh: Mesh) -> None:
    a, b = mesh.client("a"), mesh.client("b")
    ra = [await a.acquire() for _ in range(2)]
    rb = [await b.acquire() for _ in range(3)]
    with pytest.raises(RpcError) as err:
        await a.release(rb[0])
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert await a.release_all() == 2
    for r in rb:  # b's sandboxes are untouched
        assert (await b.exec(r, ["true"])).ok
    with pytest.raises(ContainerGone):
        await a.exec(ra[0], ["true"])
    assert await b.release_all() == 3
    await a.close()
    await b.close()


async def test_lease_renewed_by_use_then_reclaimed(mesh: Mesh) -> None:
    c = mesh.client("lease")
    used = await c.acquire(lease_s=1.0)
    idle = await c.acquire(lease_s=1.0)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2.5:  # every exec renews `used`'s lease
        assert (await c.exec(used, ["true"])).ok
        await asyncio.sleep(0.3)
    with pytest.raises(ContainerGone):
        await c.exec(idle, ["true"])
    assert (await c.exec(used, ["true"])).ok
    # and the registry forgets the reclaimed one
    await _until(lambda: idle.id not in mesh.registry._leases, 3.0)
    assert used.id in mesh.registry._leases
    assert mesh.registry.stats["reclaimed"] >= 1
    await c.close()


async def test_registry_restart_keeps_mappings(mesh: Mesh) -> None:
    c = mesh.client("restart")
    refs = [await c.acquire(lease_s=60) for _ in range(3)]
    for i, r in enumerate(refs):
        assert (await c.exec(r, ["sh", "-c", f"echo {i} > /work/n"])).ok
    old = mesh.registry
    await old.stop(destroy_warm=False)
    mesh.registry = ContainerRegistry(
        name=mesh.name,
        discovery=mesh.discovery,
        pools={("bubblewrap", "default"): 4},
        inventory_interval_s=0.2,
    )
    await mesh.registry.start()
    assert mesh.registry.address != old.address or True
    fresh = mesh.client("restart")  # knows nothing: every id goes through the new registry's lookup
    for i, r in enumerate(refs):
        assert (await fresh.exec(r.id, ["cat", "/work/n"])).stdout == f"{i}\n".encode()
        lease = (await fresh.leases())[i]
        assert lease.holder_id == r.holder_id or lease.container_id != r.id
    assert {x.container_id for x in await fresh.leases()} == {r.id for r in refs}
    # the old registry's warm sandboxes were adopted, not leaked
    assert mesh.registry.stats["adopted_warm"] == 4
    await fresh.release_all()
    await fresh.close()
    await c.close()


async def test_bad_requests_are_clear(mesh: Mesh) -> None:
    ch = grpc.aio.insecure_channel(mesh.registry.address)
    stub = cgrpc.ContainerServiceStub(ch)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Acquire(cpb.AcquireRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "client_id" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Acquire(cpb.AcquireRequest(client_id="x", backend="docker"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "backend" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Exec(cpb.ExecRequest(container_id="nope", argv=["true"]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    c = mesh.client("bad")
    r = await c.acquire()
    holder = cgrpc.ContainerServiceStub(grpc.aio.insecure_channel(r.holder_address))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await holder.Exec(cpb.ExecRequest(container_id=r.id, argv=[]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "argv" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await holder.Exec(cpb.ExecRequest(container_id=r.id, argv=["true"], cwd="relative"))
    assert "cwd" in (err.value.details() or "")
    await c.release_all()
    await c.close()
    await ch.close()
