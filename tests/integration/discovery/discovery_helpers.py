"""Helpers shared by the discovery integration tests."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TypeVar

__all__ = ["next_within", "start_registering_process"]

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
