"""One cgroup per sandbox: a hard cap on its processes and memory, and a way to kill all of it.

rlimits alone do not contain a sandbox: ``RLIMIT_NPROC`` counts per user and ``RLIMIT_AS`` per
process, and a process that escapes its session survives a group kill. A cgroup bounds the whole
sandbox (``pids.max``, the memory limit), tells whether the kernel's OOM killer fired inside it,
and lists every process in it so that none outlives an exec's deadline or the sandbox.

Both hierarchies are handled: cgroup v2 (one tree, ``cgroup.controllers`` at the root) and v1
(one tree per controller, e.g. ``/sys/fs/cgroup/pids``). Where neither is writable (no root, no
delegation), :func:`create` returns ``None`` and backends fall back to rlimits alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path

__all__ = ["Cgroup", "cgroups_unavailable_reason", "create"]

log = logging.getLogger(__name__)

ROOT = Path(os.environ.get("AGENTMESH_CGROUP_ROOT", "/sys/fs/cgroup"))
PARENT = "agentmesh"


def _mode() -> str | None:
    if (ROOT / "cgroup.controllers").exists():
        return "v2"
    if (ROOT / "pids").is_dir() and (ROOT / "memory").is_dir():
        return "v1"
    return None


def cgroups_unavailable_reason() -> str | None:
    """Why per-sandbox cgroups cannot be made here, or None if they can."""
    mode = _mode()
    if mode is None:
        return f"no cgroup v2 tree or v1 pids+memory controllers under {ROOT}"
    probe = (ROOT / PARENT) if mode == "v2" else (ROOT / "pids" / PARENT)
    try:
        probe.mkdir(exist_ok=True)
    except OSError as exc:
        return f"cannot create {probe}: {exc.strerror}"
    if mode == "v2":
        try:
            _enable_v2_controllers()
        except OSError as exc:
            return f"cannot enable the pids and memory controllers under {ROOT}: {exc.strerror}"
    return None


def _enable_v2_controllers() -> None:
    # a v2 child gets controllers only if every ancestor enables them for its children
    for parent in (ROOT, ROOT / PARENT):
        parent.mkdir(exist_ok=True)
        have = (parent / "cgroup.subtree_control").read_text().split()
        for ctl in ("pids", "memory"):
            if ctl not in have:
                (parent / "cgroup.subtree_control").write_text(f"+{ctl}")


class Cgroup:
    """The cgroup(s) of one sandbox. ``procs_files`` are what a process writes its pid to, to join."""

    def __init__(self, name: str, mode: str, dirs: list[Path]) -> None:
        self.name = name
        self.mode = mode
        self.dirs = dirs
        self.procs_files = [str(d / "cgroup.procs") for d in dirs]
        self._oom_seen = self._oom_count()

    def _memory_dir(self) -> Path:
        return self.dirs[0] if self.mode == "v2" else self.dirs[1]

    def _oom_count(self) -> int:
        d = self._memory_dir()
        try:
            if self.mode == "v2":
                text = (d / "memory.events").read_text()
            else:
                text = (d / "memory.oom_control").read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def oom_killed_since_last_check(self) -> bool:
        """Whether the kernel's OOM killer killed something in this sandbox since the last call."""
        now = self._oom_count()
        fired = now > self._oom_seen
        self._oom_seen = now
        return fired

    def pids(self) -> set[int]:
        out: set[int] = set()
        for f in self.procs_files:
            with contextlib.suppress(OSError, ValueError):
                out |= {int(x) for x in Path(f).read_text().split()}
        return out

    def kill_all(self, timeout_s: float = 5.0) -> bool:
        """SIGKILL every process in the sandbox until none is left; False if some survived."""
        deadline = time.monotonic() + timeout_s
        while True:
            pids = self.pids()
            if not pids:
                return True
            for pid in pids:  # a fork bomb refills as we kill: loop until the tree is empty
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                log.warning("cgroup %s: %d process(es) survived SIGKILL", self.name, len(pids))
                return False
            time.sleep(0.005)

    def remove(self) -> None:
        self.kill_all()
        for d in self.dirs:
            for _ in range(50):  # rmdir fails while the last killed process is being reaped
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)


def create(name: str, *, max_processes: int, memory_bytes: int) -> Cgroup | None:
    """A fresh cgroup for sandbox ``name`` with its limits set, or None where cgroups are unavailable."""
    mode = _mode()
    if mode is None:
        return None
    try:
        if mode == "v2":
            _enable_v2_controllers()
            d = ROOT / PARENT / name
            d.mkdir(parents=True, exist_ok=True)
            (d / "pids.max").write_text(str(max_processes))
            (d / "memory.max").write_text(str(memory_bytes))
            with contextlib.suppress(OSError):  # no swap escape where swap accounting exists
                (d / "memory.swap.max").write_text("0")
            return Cgroup(name, mode, [d])
        pids = ROOT / "pids" / PARENT / name
        mem = ROOT / "memory" / PARENT / name
        pids.mkdir(parents=True, exist_ok=True)
        mem.mkdir(parents=True, exist_ok=True)
        (pids / "pids.max").write_text(str(max_processes))
        (mem / "memory.limit_in_bytes").write_text(str(memory_bytes))
        with contextlib.suppress(OSError):
            (mem / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
        return Cgroup(name, mode, [pids, mem])
    except OSError as exc:
        log.warning("no cgroup for sandbox %s (%s): rlimits only", name, exc)
        return None
