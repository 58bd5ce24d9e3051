"""Helpers shared by the discovery integration tests."""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TypeVar

from agentmesh.discovery import Discovery, Endpoint

__all__ = [
    "check_kv_contract",
    "check_watch_follows_changes",
    "measure_register_to_watch",
    "next_within",
    "sample_endpoint",
    "start_registering_process",
]

_T = TypeVar("_T")

REGISTER_SCRIPT = Path(__file__).with_name("register_and_wait.py")


async def next_within(gen: AsyncIterator[_T], timeout_s: float) -> _T:
    return await asyncio.wait_for(anext(gen), timeout_s)


async def start_registering_process(
    url: str, service: str, endpoint_id: str, ttl_s: float, deregister_after_s: float | None = None
) -> asyncio.subprocess.Process:
    """A separate Python process that registers one endpoint, says so, and then waits forever."""
    args = [str(REGISTER_SCRIPT), url, service, endpoint_id, str(ttl_s)]
    if deregister_after_s is not None:
        args.append(str(deregister_after_s))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    if line.strip() != b"registered":
        proc.kill()
        await proc.wait()
        raise AssertionError(f"registering process said {line!r}")
    return proc


def sample_endpoint(service: str, i: int, **meta: str) -> Endpoint:
    return Endpoint(service, f"r{i}", f"127.0.0.1:{50000 + i}", meta)


async def check_watch_follows_changes(discovery: Discovery, service: str) -> None:
    """The watch contract every backend keeps: the current list at once, then the whole new list
    after every register and close; a close is heard within a second, long before a 5 s TTL."""
    first = await discovery.register(sample_endpoint(service, 1), ttl_s=5)
    watch = discovery.watch(service)
    try:
        assert await next_within(watch, 5) == [first.endpoint]
        second = await discovery.register(sample_endpoint(service, 2), ttl_s=5)
        assert await next_within(watch, 5) == [first.endpoint, second.endpoint]
        t0 = time.monotonic()
        await first.close()
        assert await next_within(watch, 2) == [second.endpoint]
        assert time.monotonic() - t0 < 1.0
        await second.close()
        assert await next_within(watch, 2) == []
    finally:
        await watch.aclose()


async def measure_register_to_watch(discovery: Discovery, service: str, label: str) -> float:
    """Register 20 times; print p50 of the register call and of register -> watch update; return
    the latter."""
    watch = discovery.watch(service)
    register_s: list[float] = []
    propagate_s: list[float] = []
    try:
        assert await next_within(watch, 5) == []
        for i in range(20):
            t0 = time.perf_counter()
            reg = await discovery.register(sample_endpoint(service, i), ttl_s=5)
            register_s.append(time.perf_counter() - t0)
            assert await next_within(watch, 2) == [reg.endpoint]
            propagate_s.append(time.perf_counter() - t0)
            await reg.close()
            assert await next_within(watch, 2) == []
    finally:
        await watch.aclose()
    reg_p50, prop_p50 = statistics.median(register_s), statistics.median(propagate_s)
    print(f"\n{label}: register p50 {reg_p50 * 1e3:.1f} ms, register->watch p50 {prop_p50 * 1e3:.1f} ms")
    return prop_p50


async def check_kv_contract(d: Discovery, prefix: str) -> None:
    """The durable-state contract every backend keeps: put, read back by prefix, overwrite, delete."""
    from agentmesh.errors import DiscoveryError

    assert await d.kv_get_prefix(prefix) == {}
    await d.kv_put(f"{prefix}a/1", b'{"x": 1}')
    await d.kv_put(f"{prefix}a/2", b"\x00binary\xff")
    await d.kv_put(f"{prefix}ab/1", b"other")
    assert await d.kv_get_prefix(f"{prefix}a/") == {
        f"{prefix}a/1": b'{"x": 1}',
        f"{prefix}a/2": b"\x00binary\xff",
    }
    await d.kv_put(f"{prefix}a/1", b"new")
    await d.kv_delete(f"{prefix}a/2")
    await d.kv_delete(f"{prefix}a/never")  # absent: no error
    assert await d.kv_get_prefix(f"{prefix}a/") == {f"{prefix}a/1": b"new"}
    assert await d.kv_get_prefix(prefix) == {f"{prefix}a/1": b"new", f"{prefix}ab/1": b"other"}
    for bad in ("", "../x", "a\nb"):
        try:
            await d.kv_put(bad, b"v")
        except DiscoveryError:
            continue
        raise AssertionError(f"key {bad!r} was accepted")
