"""Acceptance over real processes: the registry and a holder each run as ``agentmesh container``
processes on a real etcd. A client SIGKILLed while holding sandboxes leaks nothing (all reclaimed
within lease + 5 s); a SIGKILLed registry, restarted, keeps every mapping."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agentmesh.container.client import ContainerClient
from agentmesh.discovery import EndpointCache, connect
from agentmesh.discovery.etcd_server import EtcdServer

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent


async def _spawn(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    """Start a process that prints one JSON line when it serves; return it and that line."""
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    assert line, f"{args} exited before serving"
    return proc, line.decode()


def _container_cmd(*args: str) -> tuple[str, ...]:
    return (sys.executable, "-m", "agentmesh.cli", "container", *args)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@pytest.fixture
async def services(
    etcd: EtcdServer, registry_name: str, sandbox_roots: Path
) -> AsyncIterator[dict[str, asyncio.subprocess.Process]]:
    common = ("--name", registry_name, "--discovery", etcd.url)
    holder, _ = await _spawn(*_container_cmd("holder", *common, "--root", str(sandbox_roots), "--id", "h0"))
    registry, _ = await _spawn(*_container_cmd("registry", *common, "--pool", "bubblewrap=2"))
    procs = {"holder": holder, "registry": registry}
    yield procs
    for p in procs.values():
        await _stop(p)


async def _client(etcd: EtcdServer, name: str, client_id: str) -> tuple[ContainerClient, object]:
    disc = connect(etcd.url)
    cache = EndpointCache(disc)
    client = ContainerClient(client_id, endpoints=cache, registry_name=name)

    async def close() -> None:
        await client.close()
        await cache.close()
        await disc.close()

    return client, close


async def test_sigkilled_client_leaks_nothing(
    etcd: EtcdServer, registry_name: str, services: dict[str, asyncio.subprocess.Process], sandbox_roots: Path
) -> None:
    lease_s = 3.0
    proc, line = await _spawn(
        sys.executable, str(HERE / "lease_client.py"), etcd.url, registry_name, "6", str(lease_s)
    )
    ids = set(json.loads(line))
    assert len(ids) == 6
    observer, close = await _client(etcd, registry_name, "observer")
    assert {x.container_id for x in await observer.leases(everyone=True)} >= ids
    killed_at = time.monotonic()
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    while {x.container_id for x in await observer.leases(everyone=True)} & ids:
        assert time.monotonic() - killed_at < lease_s + 5.0, "sandboxes of the dead client still leased"
        await asyncio.sleep(0.1)
    reclaimed_after = time.monotonic() - killed_at
    # gone from the holder too: no scratch dir of theirs is left
    left = {p.name for p in (sandbox_roots / "h0" / "bubblewrap").iterdir() if p.name in ids}
    assert not left, left
    print(
        f"\n6 sandboxes of a SIGKILLed client reclaimed {reclaimed_after:.2f}s after the kill "
        f"(lease {lease_s}s)"
    )
    await close()  # type: ignore[operator]


async def test_sigkilled_registry_restarts_with_every_mapping(
    etcd: EtcdServer, registry_name: str, services: dict[str, asyncio.subprocess.Process]
) -> None:
    client, close = await _client(etcd, registry_name, "survivor")
    refs = [await client.acquire(lease_s=120) for _ in range(4)]
    for i, r in enumerate(refs):
        assert (await client.exec(r, ["sh", "-c", f"echo {i} > /work/n"])).ok
    services["registry"].send_signal(signal.SIGKILL)
    await services["registry"].wait()
    t0 = time.monotonic()
    services["registry"], _ = await _spawn(
        *_container_cmd(
            "registry", "--name", registry_name, "--discovery", etcd.url, "--pool", "bubblewrap=2"
        )
    )
    restart_s = time.monotonic() - t0
    fresh, close2 = await _client(etcd, registry_name, "survivor")  # knows no holder: asks the registry
    leases = {x.container_id: x for x in await fresh.leases()}
    assert set(leases) == {r.id for r in refs}
    for i, r in enumerate(refs):
        assert leases[r.id].holder_id == r.holder_id
        res = await fresh.exec(r.id, ["cat", "/work/n"])
        assert res.stdout == f"{i}\n".encode(), res
    assert await fresh.release_all() == 4
    print(
        f"\nregistry SIGKILLed and restarted in {restart_s:.2f}s; "
        "4/4 mappings kept, execs reach the same files"
    )
    await close()  # type: ignore[operator]
    await close2()  # type: ignore[operator]


async def test_cli_run_and_status(
    etcd: EtcdServer, registry_name: str, services: dict[str, asyncio.subprocess.Process]
) -> None:
    common = ("--name", registry_name, "--discovery", etcd.url)
    run = await asyncio.create_subprocess_exec(
        *_container_cmd("run", *common, "--", "sh", "-c", "echo hi; echo oops >&2; exit 3"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(run.communicate(), 60)
    assert (run.returncode, out, err) == (3, b"hi\n", b"oops\n")
    status = await asyncio.create_subprocess_exec(
        *_container_cmd("status", *common), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(status.communicate(), 60)
    data = json.loads(out)
    assert data["pools"]["holders"] == 1 and data["leases"] == []  # `run` gave its sandbox back
    bad = await asyncio.create_subprocess_exec(
        *_container_cmd("registry", *common, "--pool", "bubblewrap"), stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(bad.communicate(), 60)
    assert bad.returncode == 2 and b"--pool" in err and len(err.strip().splitlines()) == 1
