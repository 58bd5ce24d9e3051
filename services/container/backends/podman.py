"""The OCI-image backend: each sandbox is one long-running rootful podman container.

A sandbox is a container whose pid 1 only waits: ``catatonit -P``, podman's own init, bound in
from the host (a static binary, so any image works). It must be an init that reaps: an exec's
orphans are adopted by pid 1, and under ``sleep infinity`` they would stay zombies, count against
the process limit and soon make every exec fail. Pid 1 runs as ``nobody`` and every exec as the
sandbox's own uid, so nothing in the sandbox can signal its init and stop the container.

The container runs with no network (unless ``limits.network``), a read-only root, the sandbox's own
scratch directories from the host bound read-write at ``/work`` and ``/tmp`` (what one exec writes
the next one reads; no other sandbox can), every capability dropped, ``no-new-privileges``, and
the limits of :class:`Limits`: memory (swap included) and processes as cgroup limits, CPU seconds,
processes and open files as rlimits. Its environment is only :data:`BASE_ENV` and the spec's.

An exec is ``runc exec`` straight into the container where runc's state for it is found (about
30 ms), otherwise ``podman exec`` (about 130 ms: podman's exec sessions go through conmon). Both
take everything from the container's own process spec (uid, capabilities, no-new-privileges,
seccomp, rlimits, cgroup); only argv, cwd, env and the uid are given per exec.

The container's cgroup is where the backend looks after each exec: its ``oom_kill`` counter says
whether the kernel's OOM killer ended the exec (``KILLED_MEMORY``), and its process list is how an
exec's leftovers are killed (everything but pid 1): when an exec times out (concurrent execs of the
same sandbox go with it, as in the other backends), and once no exec's command runs any more (a
background process an exec started outlives it only while another exec's command still runs).
Killing the ``runc``/``podman exec`` client alone would not stop the command inside.

The default image, ``agentmesh-sandbox:bookworm`` (Debian bookworm minbase with python3), is built
offline by ``deploy/install_sandboxes.sh``; ``SandboxSpec.image`` may name any other image podman
already has (nothing is ever pulled). On these machines podman needs ``--cgroup-manager cgroupfs
--events-backend file`` (no systemd) and the ``runc`` runtime (``crun`` fails on cgroup v1 here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from agentmesh.container import cgroups
from agentmesh.container.backends.local import BASE_ENV
from agentmesh.container.process import run_process
from agentmesh.container.sandbox import (
    KILLED_CPU,
    KILLED_MEMORY,
    ExecResult,
    Limits,
    Sandbox,
    SandboxBackend,
    SandboxError,
    SandboxSpec,
    ScratchSandbox,
)
from agentmesh.container.uids import UidPool

__all__ = [
    "CGROUP_PARENT",
    "DEFAULT_IMAGE",
    "INIT_UID",
    "INSTALL_COMMAND",
    "NAME_PREFIX",
    "PODMAN_GLOBAL_OPTIONS",
    "PodmanBackend",
    "PodmanSandbox",
    "container_name",
    "podman_exec_command",
    "run_command",
    "runc_exec_command",
]

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "agentmesh-sandbox:bookworm"
INSTALL_COMMAND = "sudo deploy/install_sandboxes.sh"
#: every container this backend makes is named with this prefix; it never touches any other
NAME_PREFIX = "agentmesh-"
CGROUP_PARENT = "agentmesh-podman"
#: no systemd on these machines: cgroups through the file system, events to a file
PODMAN_GLOBAL_OPTIONS = ("--cgroup-manager", "cgroupfs", "--events-backend", "file")
RUNTIME = "runc"
#: pid 1's uid (nobody): not the sandbox's, so the sandbox cannot signal it
INIT_UID = 65534

# the container's pid 1 and an exec's own process before it becomes the command
_PROCESS_SLACK = 2
# sandbox uids: a range of their own, claimed machine-wide, so that RLIMIT_NPROC counts exactly one
# sandbox's processes (the host-process backends claim from 200000 up)
_UID_LOCK_DIR = "/tmp/agentmesh-uids"
_UID_FIRST = 300_000
_UID_COUNT = 50_000
# the environment of the podman and runc clients themselves: nothing of the caller's
_CLIENT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
_CONTROL_TIMEOUT_S = 60.0
_CONTROL_OUTPUT_BYTES = 65536
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# podman's own init, a static binary, bound read-only into every container
_PODMAN_INIT = "/usr/libexec/podman/catatonit"
_INIT_MOUNT = "/run/agentmesh-init"
# where rootful podman keeps runc's container state (runc --root)
_RUNC_ROOT = "/run/runc"
# what an exec into a stopped container answers (podman, runc): the command never started
_NOT_RUNNING = (b"state improper", b"stopped container", b"not running")

ExecVia = Literal["auto", "runc", "podman"]


def container_name(sandbox_id: str) -> str:
    """The container's name for ``sandbox_id``; raises :class:`SandboxError` for an unusable id."""
    if not isinstance(sandbox_id, str) or not _ID_RE.fullmatch(sandbox_id):
        raise SandboxError(
            f"sandbox_id: {sandbox_id!r} is not a valid podman sandbox id "
            "(1-128 of letters, digits, '_', '.', '-', starting with a letter or digit)"
        )
    return NAME_PREFIX + sandbox_id


def _check_env(env: Mapping[str, str], field: str) -> None:
    for k, v in env.items():
        if not isinstance(k, str) or not _ENV_KEY_RE.fullmatch(k):
            raise SandboxError(f"{field}: {k!r} is not a valid environment variable name")
        if not isinstance(v, str) or "\0" in v:
            raise SandboxError(f"{field}[{k}]: expected a string without NUL bytes")


def run_command(
    podman: str,
    name: str,
    image: str,
    limits: Limits,
    *,
    init: str,
    uid: int,
    work_dir: Path,
    tmp_dir: Path,
    env: Mapping[str, str],
) -> list[str]:
    """The ``podman run`` command line that starts a sandbox's container: detached, its pid 1 the
    host's ``init`` binary (catatonit) in pause mode, running as :data:`INIT_UID`."""
    processes = limits.max_processes + _PROCESS_SLACK
    cpu = max(1, int(limits.cpu_time_s + 0.999))
    cmd = [
        podman,
        *PODMAN_GLOBAL_OPTIONS,
        "run",
        "--detach",
        "--rm=false",
        "--pull=never",  # no registry is reachable: a missing image must fail now, not time out
        "--name",
        name,
        "--label",
        "agentmesh.sandbox=1",
        "--runtime",
        RUNTIME,
        "--cgroup-parent",
        "/" + CGROUP_PARENT,
        "--network",
        "host" if limits.network else "none",
        "--hostname",
        "sandbox",
        "--read-only",
        "--read-only-tmpfs=false",  # /tmp is the sandbox's own scratch, bound below
        "--volume",
        f"{init}:{_INIT_MOUNT}:ro",
        "--entrypoint",
        _INIT_MOUNT,
        "--volume",
        f"{work_dir}:/work:rw",
        "--volume",
        f"{tmp_dir}:/tmp:rw",
        "--workdir",
        "/work",
        # gid = the sandbox's: execs inherit pid 1's groups, and must get only their own
        "--user",
        f"{INIT_UID}:{uid}",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--memory",
        str(limits.memory_bytes),
        "--memory-swap",
        str(limits.memory_bytes),  # equal: no swap beyond the memory limit
        "--pids-limit",
        str(processes),
        # the soft CPU limit sends SIGXCPU, the hard one a second later SIGKILL
        "--ulimit",
        f"cpu={cpu}:{cpu + 1}",
        # podman's defaults exceed this machine's hard limits, which runc may not raise
        "--ulimit",
        "nofile=20000:20000",
        "--ulimit",
        f"nproc={processes}:{processes}",
        "--ulimit",
        "core=0:0",
        "--log-driver",
        "none",  # pid 1 says nothing; execs' output does not go through the log
        "--http-proxy=false",
        "--unsetenv-all",  # nothing of the image's or podman's default environment
    ]
    for k, v in {**BASE_ENV, **env}.items():
        cmd += ["--env", f"{k}={v}"]
    cmd += [image, "-P"]  # catatonit's pause mode: no child of its own, reaps whatever it adopts
    return cmd


def podman_exec_command(
    podman: str, name: str, argv: Sequence[str], *, uid: int, env: Mapping[str, str], cwd: str
) -> list[str]:
    """The ``podman exec`` command line that runs ``argv`` in container ``name`` as ``uid``."""
    cmd = [
        podman,
        *PODMAN_GLOBAL_OPTIONS,
        "exec",
        "--interactive",
        "--user",
        f"{uid}:{uid}",
        "--workdir",
        cwd,
    ]
    for k, v in env.items():
        cmd += ["--env", f"{k}={v}"]
    cmd += [name, *argv]
    return cmd


def runc_exec_command(
    runc: str,
    container_id: str,
    argv: Sequence[str],
    *,
    uid: int,
    env: Mapping[str, str],
    cwd: str,
    pid_file: str | None = None,
    runc_root: str = _RUNC_ROOT,
) -> list[str]:
    """The ``runc exec`` command line that runs ``argv`` in the container as ``uid``; the rest of the
    process (capabilities, no-new-privileges, seccomp, rlimits, base environment) is the container's.
    ``pid_file``: where runc writes the host pid of the command."""
    cmd = [runc, "--root", runc_root, "exec", "--user", f"{uid}:{uid}", "--cwd", cwd]
    if pid_file is not None:
        cmd += ["--pid-file", pid_file]
    for k, v in env.items():
        cmd += ["--env", f"{k}={v}"]  # runc applies these after the container's own: later wins
    cmd += [container_id, *argv]
    return cmd


def _which(name: str) -> str | None:
    return shutil.which(name, path=_CLIENT_ENV["PATH"])


def _init_path() -> str | None:
    found = _which("catatonit")
    if found:
        return found
    return _PODMAN_INIT if os.access(_PODMAN_INIT, os.X_OK) else None


def _container_cgroup(container_id: str) -> cgroups.Cgroup | None:
    """The cgroup podman (cgroupfs manager) made for the container, or None where it is not found."""
    leaf = f"libpod-{container_id}"
    root = cgroups.ROOT
    if (root / "cgroup.controllers").exists():
        d = root / CGROUP_PARENT / leaf
        return cgroups.Cgroup(leaf, "v2", [d]) if d.is_dir() else None
    dirs = [root / "pids" / CGROUP_PARENT / leaf, root / "memory" / CGROUP_PARENT / leaf]
    return cgroups.Cgroup(leaf, "v1", dirs) if all(d.is_dir() for d in dirs) else None


def _is_container_init(pid: int) -> bool:
    # NSpid lists the pid in each pid namespace, innermost last: the container's init is 1 there
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("NSpid:"):
                    return line.split()[-1] == "1"
    except OSError:
        pass
    return False


def _find_init(cg: cgroups.Cgroup) -> int | None:
    return next((p for p in cg.pids() if _is_container_init(p)), None)


def _kill_all_but_init(cg: cgroups.Cgroup, timeout_s: float = 5.0) -> None:
    """SIGKILL every process of the container except its pid 1, until none is left."""
    deadline = time.monotonic() + timeout_s
    init: int | None = None
    while True:
        pids = cg.pids()
        if init is None:
            init = next((p for p in pids if _is_container_init(p)), None)
        if init is not None:
            pids.discard(init)
        if not pids:
            return
        for pid in pids:  # a fork bomb refills as we kill: loop until only pid 1 is left
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            log.warning("container %s: %d process(es) survived SIGKILL", cg.name, len(pids))
            return
        time.sleep(0.005)


class PodmanSandbox(ScratchSandbox):
    """One sandbox: a waiting container, its scratch on the host, its uid (see the module docstring)."""

    def __init__(
        self, backend: PodmanBackend, sandbox_id: str, spec: SandboxSpec, image: str, uid: int
    ) -> None:
        self.id = sandbox_id
        self.spec = spec
        self.image = image
        self.uid = uid
        self.name = container_name(sandbox_id)
        self.root = backend.root / sandbox_id
        self.container_id = ""
        self.cgroup: cgroups.Cgroup | None = None
        self.init_pid: int | None = None
        self.via_runc = False
        self._backend = backend
        self._in_flight = 0
        self._exec_seq = 0
        self._running = 0  # execs whose command may still run
        self._sweeps = 0
        self._sweep_idle = asyncio.Event()
        self._sweep_idle.set()
        self._destroyed = False
        self._revive_lock = asyncio.Lock()

    def _locate(self) -> None:
        """Find the container's cgroup, pid 1 and runc state (after each start)."""
        self.cgroup = _container_cgroup(self.container_id)
        self.init_pid = _find_init(self.cgroup) if self.cgroup is not None else None
        runc_state = Path(self._backend.runc_root, self.container_id, "state.json")
        self.via_runc = self._backend.exec_via == "runc" or (
            self._backend.exec_via == "auto" and runc_state.is_file()
        )
        if self.cgroup is None:
            log.warning("sandbox %s: container cgroup not found; OOM detection and sweeps are off", self.id)

    async def _start(self) -> None:
        await asyncio.to_thread(self.make_scratch, self.uid, own_root=False)
        backend = self._backend
        cmd = run_command(
            backend.podman,
            self.name,
            self.image,
            self.spec.limits,
            init=backend.init,
            uid=self.uid,
            work_dir=self.work_dir,
            tmp_dir=self.tmp_dir,
            env=self.spec.env,
        )
        r = await backend.podman_call(cmd)
        if r.exit_code != 0:
            err = r.stderr.decode(errors="replace").strip()
            if "already in use" in err:
                # another sandbox's container: never remove it
                raise SandboxError(f"sandbox {self.id}: a container named {self.name} already exists")
            await backend.podman_call(backend.podman_cmd("rm", "--force", "--time", "0", self.name))
            if "image not known" in err or "no such image" in err.lower():
                hint = f" (it is built by {INSTALL_COMMAND})" if self.image == DEFAULT_IMAGE else ""
                raise SandboxError(f"image: podman has no image {self.image!r}{hint}; nothing is pulled")
            raise SandboxError(f"sandbox {self.id}: podman run failed (exit {r.exit_code}): {err}")
        lines = r.stdout.decode(errors="replace").split()
        self.container_id = lines[-1] if lines else ""
        await asyncio.to_thread(self._locate)

    def _command(
        self, argv: Sequence[str], env: Mapping[str, str], cwd: str, pid_file: Path | None = None
    ) -> list[str]:
        if self.via_runc:
            return runc_exec_command(
                self._backend.runc,
                self.container_id,
                argv,
                uid=self.uid,
                env=env,
                cwd=cwd,
                pid_file=str(pid_file) if pid_file is not None else None,
                runc_root=self._backend.runc_root,
            )
        return podman_exec_command(self._backend.podman, self.name, argv, uid=self.uid, env=env, cwd=cwd)

    async def _sweep(self) -> None:
        """Kill every process of the sandbox but its pid 1. New execs wait until it is done."""
        self._sweeps += 1
        self._sweep_idle.clear()
        try:
            if self.cgroup is not None:
                await asyncio.to_thread(_kill_all_but_init, self.cgroup)
            else:  # no cgroup found: from inside, kill(-1) reaches every process of the uid but pid 1
                await run_process(
                    self._command(["sh", "-c", "kill -9 -1"], {}, "/"),
                    env=_CLIENT_ENV,
                    timeout_s=10.0,
                    output_bytes=_CONTROL_OUTPUT_BYTES,
                    cwd=self._backend.client_cwd,
                )
        finally:
            self._sweeps -= 1
            if self._sweeps == 0:
                self._sweep_idle.set()

    async def _end_leftovers(
        self, pid_file: Path, command_ended: Callable[[], bool], sweeping: asyncio.Event
    ) -> None:
        """Once an exec's command has exited, and no other exec's command runs, kill what is left.

        ``runc exec`` copies the command's output through pipes of its own and returns only when
        every holder of them has closed them: a background process the command started would keep
        the exec going to its deadline. (``podman exec`` returns when the command exits.)
        """
        pid: int | None = None
        while pid is None:  # runc writes the file once the command runs
            try:
                # a few bytes on a local disk, polled every 2 ms: a thread hop would cost more
                pid = int(pid_file.read_text())  # noqa: ASYNC240
            except (OSError, ValueError):
                await asyncio.sleep(0.002)
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            pidfd = -1
        if pidfd >= 0:
            loop = asyncio.get_running_loop()
            exited: asyncio.Future[None] = loop.create_future()

            def on_exit() -> None:
                if not exited.done():
                    exited.set_result(None)

            loop.add_reader(pidfd, on_exit)
            try:
                await exited
            finally:
                loop.remove_reader(pidfd)
                os.close(pidfd)
        if command_ended():  # no command of any exec runs: what is left are leftovers
            sweeping.set()  # from here on the exec waits for the sweep instead of cancelling it
            await self._sweep()

    async def _revive(self) -> None:
        """Start the container again if it stopped (its pid 1 died); its scratch is on the host and
        survives. Raises :class:`SandboxError` if the container is gone or will not start."""
        async with self._revive_lock:
            if self.init_pid is not None and _is_container_init(self.init_pid):
                return  # another exec revived it meanwhile
            r = await self._backend.podman_call(
                self._backend.podman_cmd("container", "inspect", "--format", "{{.State.Running}}", self.name)
            )
            if r.exit_code != 0:
                raise SandboxError(f"sandbox {self.id}: its container {self.name} is gone")
            if r.stdout.strip() != b"true":
                log.warning("sandbox %s: its container had stopped; starting it again", self.id)
                r = await self._backend.podman_call(self._backend.podman_cmd("start", self.name))
                if r.exit_code != 0:
                    err = r.stderr.decode(errors="replace").strip()
                    raise SandboxError(f"sandbox {self.id}: its container stopped and will not start: {err}")
            await asyncio.to_thread(self._locate)

    async def exec(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes = b"",
        env: Mapping[str, str] | None = None,
        cwd: str = "/work",
        timeout_s: float | None = None,
    ) -> ExecResult:
        self.check_exec(argv)
        if not isinstance(cwd, str) or not cwd.startswith("/"):
            raise SandboxError(f"cwd: expected an absolute path, got {cwd!r}")
        env = dict(env or {})
        _check_env(env, "env")
        lim = self.spec.limits
        timeout = min(lim.wall_time_s, timeout_s) if timeout_s and timeout_s > 0 else lim.wall_time_s
        if self.init_pid is not None and not _is_container_init(self.init_pid):
            await self._revive()
        self._in_flight += 1
        try:
            for attempt in (1, 2):
                if self.cgroup is not None and self._in_flight == 1:
                    self.cgroup.oom_killed_since_last_check()
                self._exec_seq += 1
                pid_file = self.root / f"exec-{self._exec_seq}.pid" if self.via_runc else None
                # a sweep in progress would kill this exec's command: wait, then count it as running
                # (no await between the two, so no sweep starts in between)
                await self._sweep_idle.wait()
                self._running += 1
                running = [True]

                def command_ended(running: list[bool] = running) -> bool:
                    """Count this exec's command as ended (once); True if no command runs now."""
                    if running[0]:
                        running[0] = False
                        self._running -= 1
                    return self._running == 0

                sweeping = asyncio.Event()
                watcher = (
                    asyncio.create_task(self._end_leftovers(pid_file, command_ended, sweeping))
                    if pid_file is not None
                    else None
                )
                try:
                    result = await run_process(
                        self._command(argv, env, cwd, pid_file),
                        stdin=stdin,
                        env=_CLIENT_ENV,
                        timeout_s=timeout,
                        output_bytes=lim.output_bytes,
                        kill=self._sweep,
                        cwd=self._backend.client_cwd,
                    )
                finally:
                    command_ended()
                    if watcher is not None:
                        if sweeping.is_set():  # a sweep thread must not outlive the exec into the next one
                            await asyncio.wait({watcher})
                        else:
                            watcher.cancel()
                    if pid_file is not None:
                        with contextlib.suppress(OSError):
                            pid_file.unlink()
                stopped = result.exit_code != 0 and any(s in result.stderr for s in _NOT_RUNNING)
                if not stopped or result.killed or attempt == 2 or self._destroyed:
                    break
                await self._revive()  # the command never started: start the container, run it once more
        finally:
            self._in_flight -= 1
        if self._running == 0 and not self._destroyed:
            # nothing of an exec outlives it, unless another exec's command still runs
            await self._sweep()
        if not result.killed:
            if self.cgroup is not None and self.cgroup.oom_killed_since_last_check():
                result.killed = KILLED_MEMORY
            elif result.exit_code == 128 + signal.SIGXCPU or (
                result.exit_code == 128 + signal.SIGKILL and result.duration_s >= lim.cpu_time_s
            ):
                result.killed = KILLED_CPU
        return result

    async def destroy(self) -> None:
        if self._destroyed:
            return
        self._destroyed = True
        self._backend._sandboxes.pop(self.id, None)
        r = await self._backend.podman_call(
            self._backend.podman_cmd("rm", "--force", "--time", "0", self.name)
        )
        if r.exit_code != 0 and b"no such container" not in r.stderr.lower():
            log.warning(
                "sandbox %s: podman rm failed: %s", self.id, r.stderr.decode(errors="replace").strip()
            )
        await asyncio.to_thread(shutil.rmtree, self.root, True)
        self._backend.uids.free(self.uid)


class PodmanBackend(SandboxBackend):
    """Sandboxes as rootful podman containers of an OCI image (default: :data:`DEFAULT_IMAGE`).

    ``exec_via``: ``auto`` (``runc exec`` where runc's state for the container is found, else
    ``podman exec``), or force one of ``runc``, ``podman``.
    """

    name = "podman"

    def __init__(
        self,
        root: str | Path | None = None,
        image: str = DEFAULT_IMAGE,
        *,
        exec_via: ExecVia = "auto",
        runc_root: str = _RUNC_ROOT,
        **kwargs: Any,
    ) -> None:
        if exec_via not in ("auto", "runc", "podman"):
            raise SandboxError(f"exec_via: expected 'auto', 'runc' or 'podman', got {exec_via!r}")
        if not isinstance(image, str) or not image:
            raise SandboxError(f"image: expected an image name, got {image!r}")
        reason = self._missing_binaries()
        podman, runc, init = _which("podman"), _which(RUNTIME), _init_path()
        if reason or podman is None or runc is None or init is None:
            raise SandboxError(f"podman backend: {reason}")
        self.podman, self.runc, self.init = podman, runc, init
        self.image = image
        self.exec_via: ExecVia = exec_via
        self.runc_root = runc_root
        self.root = Path(root) if root is not None else Path("/tmp/agentmesh-sandboxes")
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)
        self.uids = UidPool(_UID_LOCK_DIR, first=_UID_FIRST, count=_UID_COUNT)
        self._sandboxes: dict[str, PodmanSandbox] = {}

    @staticmethod
    def _missing_binaries() -> str | None:
        if _which("podman") is None:
            return (
                f"podman is not installed (run {INSTALL_COMMAND}, or apt-get install podman runc catatonit)"
            )
        if _which(RUNTIME) is None:
            return f"runc is not installed (run {INSTALL_COMMAND}, or apt-get install runc)"
        if _init_path() is None:
            return (
                f"catatonit (podman's init) is missing (run {INSTALL_COMMAND}, or apt-get install catatonit)"
            )
        if os.geteuid() != 0:
            return "the podman backend runs rootful podman: it needs root"
        return None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        reason = cls._missing_binaries()
        if reason:
            return reason
        try:
            r = subprocess.run(
                [_which("podman") or "podman", *PODMAN_GLOBAL_OPTIONS, "image", "exists", DEFAULT_IMAGE],
                env=_CLIENT_ENV,
                capture_output=True,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return f"podman does not answer: {exc}"
        if r.returncode == 1:
            return f"the sandbox image {DEFAULT_IMAGE} is not built (run {INSTALL_COMMAND})"
        if r.returncode != 0:
            return f"podman image exists failed: {r.stderr.decode(errors='replace').strip()}"
        return None

    def podman_cmd(self, *args: str) -> list[str]:
        return [self.podman, *PODMAN_GLOBAL_OPTIONS, *args]

    async def podman_call(self, cmd: list[str], *, timeout_s: float = _CONTROL_TIMEOUT_S) -> ExecResult:
        """Run a podman control command (run, rm, start, inspect) to its end."""
        return await run_process(
            cmd,
            env=_CLIENT_ENV,
            timeout_s=timeout_s,
            output_bytes=_CONTROL_OUTPUT_BYTES,
            cwd=self.client_cwd,
        )

    @property
    def client_cwd(self) -> str:
        """Where podman and runc run on the host: the backend's own root, because runc writes an
        ``oom`` marker file into its working directory when the OOM killer fires in a container
        (it landed in the caller's directory before)."""
        return str(self.root)

    async def create(self, sandbox_id: str, spec: SandboxSpec) -> Sandbox:
        container_name(sandbox_id)  # validates before anything is made
        if sandbox_id in self._sandboxes:
            raise SandboxError(f"sandbox_id: {sandbox_id!r} already exists")
        _check_env(spec.env, "env")
        image = self.image if spec.image in ("default", "") else spec.image
        sb = PodmanSandbox(self, sandbox_id, spec, image, self.uids.claim())
        self._sandboxes[sandbox_id] = sb
        try:
            await sb._start()
        except BaseException as exc:
            sb._destroyed = True
            self._sandboxes.pop(sandbox_id, None)
            if not (isinstance(exc, SandboxError) and "already exists" in str(exc)):
                # cancelled or failed after podman run: the container may exist, and it is ours
                with contextlib.suppress(Exception):
                    await self.podman_call(self.podman_cmd("rm", "--force", "--time", "0", sb.name))
            await asyncio.to_thread(shutil.rmtree, sb.root, True)
            self.uids.free(sb.uid)
            if isinstance(exc, OSError):
                raise SandboxError(f"sandbox {sandbox_id}: could not set up its scratch: {exc}") from exc
            raise
        return sb

    async def close(self) -> None:
        # containers outlive this process unless removed: take down any a caller left behind
        for sb in list(self._sandboxes.values()):
            with contextlib.suppress(Exception):
                await sb.destroy()
