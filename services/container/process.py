"""Run one sandboxed command to its end under a wall-time limit and capped output.

Every backend ends up starting a process (``bwrap``, ``nsjail``, ``podman exec``) and needs the same
handling around it: stdin fed and closed, stdout and stderr read concurrently and cut at their
limit (the rest is drained and dropped so the process never blocks on a full pipe), the whole
process group killed at the deadline, and a bounded wait for pipes that a stray grandchild may
still hold open. :func:`run_process` does that once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from subprocess import SubprocessError

from agentmesh.container.sandbox import KILLED_WALL, ExecResult, SandboxError

__all__ = ["run_process"]

_CHUNK = 65536
# after a kill, how long to keep waiting for pipes a stray process may still hold
_PIPE_GRACE_S = 1.0


async def _read_capped(stream: asyncio.StreamReader, limit: int) -> tuple[bytes, bool]:
    """Everything ``stream`` yields up to ``limit`` bytes; the rest is read and dropped."""
    kept = bytearray()
    truncated = False
    while True:
        chunk = await stream.read(_CHUNK)
        if not chunk:
            return bytes(kept), truncated
        room = limit - len(kept)
        if room > 0:
            kept += chunk[:room]
        if len(chunk) > room:
            truncated = True


async def _feed(proc: asyncio.subprocess.Process, data: bytes) -> None:
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        if data:
            proc.stdin.write(data)
            await proc.stdin.drain()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError, OSError):
        proc.stdin.close()


async def run_process(
    argv: Sequence[str],
    *,
    stdin: bytes = b"",
    env: Mapping[str, str] | None = None,
    timeout_s: float,
    output_bytes: int,
    kill: Callable[[], Awaitable[None]] | None = None,
    cwd: str | None = None,
) -> ExecResult:
    """Run ``argv`` (in a new session) and return how it ended.

    At ``timeout_s`` the process group is SIGKILLed and ``kill`` (a backend's own sweep, e.g. of the
    sandbox's cgroup) is awaited; the result then has ``killed == KILLED_WALL``. ``cwd`` is the
    directory the launcher runs in (on the host; not the command's directory in the sandbox). ``exit_code`` is
    ``128 + signal`` for a process ended by a signal.
    """
    t0 = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env) if env is not None else None,
            start_new_session=True,
            cwd=cwd,
            limit=_CHUNK,
        )
    except (OSError, ValueError, SubprocessError) as exc:
        raise SandboxError(f"could not start {argv[0]!r}: {exc}") from exc
    assert proc.stdout is not None and proc.stderr is not None
    feeder = asyncio.create_task(_feed(proc, stdin))
    out_task = asyncio.create_task(_read_capped(proc.stdout, output_bytes))
    err_task = asyncio.create_task(_read_capped(proc.stderr, output_bytes))
    killed = ""
    try:
        await asyncio.wait_for(proc.wait(), timeout_s)
    except TimeoutError:
        killed = KILLED_WALL
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if kill is not None:
            await kill()
        await proc.wait()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if kill is not None:
            with contextlib.suppress(Exception):
                await kill()
        raise
    finally:
        feeder.cancel()
    # pipes close when the last holder exits; a process that escaped the group may still hold them
    done, pending = await asyncio.wait({out_task, err_task}, timeout=_PIPE_GRACE_S if killed else 10.0)
    for t in pending:
        t.cancel()
    stdout, out_trunc = out_task.result() if out_task in done else (b"", True)
    stderr, err_trunc = err_task.result() if err_task in done else (b"", True)
    rc = proc.returncode if proc.returncode is not None else -1
    return ExecResult(
        exit_code=128 - rc if rc < 0 else rc,
        stdout=stdout,
        stderr=stderr,
        stdout_truncated=out_trunc,
        stderr_truncated=err_trunc,
        killed=killed,
        duration_s=time.monotonic() - t0,
    )
