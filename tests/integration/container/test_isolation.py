"""Isolation, on every backend that runs here: each limit ends the offending exec with a clear result,
and the same sandbox keeps serving the next exec.

Each backend is one parameter of the ``backend`` fixture (bubblewrap, nsjail, podman); CI sets
AGENTMESH_REQUIRE_SANDBOXES=1 so that a backend missing from the machine fails instead of skipping.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid

import pytest

from agentmesh.container.sandbox import (
    KILLED_CPU,
    KILLED_MEMORY,
    KILLED_WALL,
    Limits,
    Sandbox,
    SandboxBackend,
    SandboxSpec,
)

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
LIMITS = Limits(cpu_time_s=2, memory_bytes=128 * MIB, max_processes=32, wall_time_s=4, output_bytes=4096)


async def _sandbox(backend: SandboxBackend, limits: Limits = LIMITS) -> Sandbox:
    return await backend.create(f"t{uuid.uuid4().hex[:10]}", SandboxSpec(limits=limits))


async def _still_serves(sb: Sandbox) -> None:
    r = await sb.exec(["sh", "-c", "echo alive"])
    assert r.ok and r.stdout == b"alive\n", r


async def test_no_network(backend: SandboxBackend) -> None:
    # a server on the host's loopback, listening: the sandbox must not reach it
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    sb = await _sandbox(backend)
    try:
        probe = (
            "import socket\n"
            "for host in ('127.0.0.1', '1.1.1.1'):\n"
            "    s = socket.socket(); s.settimeout(2)\n"
            f"    print(host, s.connect_ex((host, {port} if host == '127.0.0.1' else 80)))\n"
        )
        r = await sb.exec(["python3", "-c", probe])
        assert r.exit_code == 0, r
        lines = dict(line.split() for line in r.stdout.decode().splitlines())
        assert lines["127.0.0.1"] != "0", "the host's loopback server was reachable"
        assert lines["1.1.1.1"] != "0", "an outside address was reachable"
        await _still_serves(sb)
    finally:
        srv.close()
        await sb.destroy()


async def test_host_files_not_writable(backend: SandboxBackend) -> None:
    sb = await _sandbox(backend)
    try:
        for path in ("/etc/agentmesh-escape", "/usr/agentmesh-escape", "/agentmesh-escape"):
            r = await sb.exec(["sh", "-c", f"echo x > {path}"])
            assert r.exit_code != 0, f"{path} was writable: {r}"
        r = await sb.exec(["sh", "-c", "echo ok > /work/f && echo ok > /tmp/g && cat /work/f /tmp/g"])
        assert r.ok and r.stdout == b"ok\nok\n", r
    finally:
        await sb.destroy()


async def test_fork_bomb_contained(backend: SandboxBackend) -> None:
    sb = await _sandbox(backend)
    try:
        bomb = (
            "import os, time\nn = 0\n"
            "try:\n    while True:\n        if os.fork() == 0:\n"
            "            time.sleep(60)\n            os._exit(0)\n"
            "        n += 1\nexcept OSError as e:\n    print(n, e.errno)\n"
        )
        r = await sb.exec(["python3", "-c", bomb])
        assert r.exit_code == 0, r
        forked, errno = r.stdout.split()
        assert int(forked) <= LIMITS.max_processes, r.stdout
        assert int(errno) == 11  # EAGAIN: the process cap, not the host's, stopped it
        # and a shell fork bomb ends with its exec, leaving nothing behind
        r = await sb.exec(["bash", "-c", ":(){ :|:& };:; sleep 1"])
        assert r.exit_code in (0, 137) or r.killed, r
        await _still_serves(sb)
    finally:
        await sb.destroy()


async def test_memory_hog_killed(backend: SandboxBackend) -> None:
    sb = await _sandbox(backend)
    cwd_before = set(os.listdir("."))
    try:
        hog = "b = []\nwhile True:\n    b.append(bytearray(8 * 1024 * 1024))\n"
        r = await sb.exec(["python3", "-c", hog])
        assert r.exit_code != 0, r
        # killed by the OOM killer in the sandbox's cgroup, or refused memory (RLIMIT_AS)
        assert r.killed == KILLED_MEMORY or b"MemoryError" in r.stderr, r
        # nothing of the kill lands in the caller's directory (runc writes an `oom` marker to its cwd)
        assert set(os.listdir(".")) <= cwd_before
        await _still_serves(sb)
    finally:
        await sb.destroy()


async def test_time_limits(backend: SandboxBackend) -> None:
    sb = await _sandbox(backend)
    try:
        r = await sb.exec(["sleep", "30"])  # wall time: the exec's limit is 4 s
        assert r.killed == KILLED_WALL and r.duration_s < 8, r
        r = await sb.exec(["sleep", "30"], timeout_s=1)  # a shorter timeout of the caller
        assert r.killed == KILLED_WALL and r.duration_s < 4, r
        r = await sb.exec(["python3", "-c", "while True: pass"])  # CPU time: 2 s
        assert r.killed in (KILLED_CPU, KILLED_WALL) and r.exit_code != 0, r
        await _still_serves(sb)
    finally:
        await sb.destroy()


async def test_output_truncated(backend: SandboxBackend) -> None:
    sb = await _sandbox(backend)
    try:
        r = await sb.exec(
            ["python3", "-c", "import sys; sys.stdout.write('x' * 100000); print('done', file=sys.stderr)"]
        )
        assert r.exit_code == 0 and r.stdout_truncated and not r.stderr_truncated, r
        assert r.stdout == b"x" * LIMITS.output_bytes
        assert r.stderr == b"done\n"
        await _still_serves(sb)
    finally:
        await sb.destroy()


async def test_state_kept_per_sandbox(backend: SandboxBackend) -> None:
    a, b = await asyncio.gather(_sandbox(backend), _sandbox(backend))
    try:
        r = await a.exec(["sh", "-c", "echo secret-a > /work/note && echo t > /tmp/t"])
        assert r.ok, r
        r = await a.exec(["cat", "/work/note", "/tmp/t"])
        assert r.ok and r.stdout == b"secret-a\nt\n", r
        r = await b.exec(["sh", "-c", "cat /work/note; cat /tmp/t"])
        assert r.exit_code != 0 and b"secret-a" not in r.stdout, r
    finally:
        await asyncio.gather(a.destroy(), b.destroy())


async def test_stdin_env_cwd(backend: SandboxBackend) -> None:
    sb = await _sandbox(backend)
    try:
        await sb.exec(["mkdir", "-p", "/work/sub"])
        r = await sb.exec(
            ["sh", "-c", 'cat; echo "$GREETING"; pwd; echo "${AGENTMESH_SECRET_PROBE:-unset}"'],
            stdin=b"from stdin\n",
            env={"GREETING": "hello"},
            cwd="/work/sub",
        )
        assert r.ok and r.stdout == b"from stdin\nhello\n/work/sub\nunset\n", r
    finally:
        await sb.destroy()


async def test_destroyed_sandbox_refuses(backend: SandboxBackend) -> None:
    from agentmesh.container.sandbox import SandboxError

    sb = await _sandbox(backend)
    await sb.destroy()
    await sb.destroy()  # idempotent
    with pytest.raises(SandboxError):
        await sb.exec(["true"])
