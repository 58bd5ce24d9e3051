"""The part every host-process sandbox shares (bubblewrap, nsjail): scratch, uid, cgroup, rlimits.

A host-process sandbox is not a long-lived process: it is a scratch directory (``work/`` mounted at
``/work``, ``tmp/`` at ``/tmp``) owned by a uid of its own, and a cgroup that caps its processes
and memory. Each exec starts the backend's launcher (``bwrap``, ``nsjail``) in a fresh session,
inside the sandbox's cgroup, with rlimits set and privileges dropped to the sandbox's uid before
the launcher runs; a subclass only says how to build the launcher's command line.
"""

from __future__ import annotations

import abc
import asyncio
import os
import shutil
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path

from agentmesh.container import cgroups
from agentmesh.container.process import run_process
from agentmesh.container.sandbox import (
    KILLED_CPU,
    KILLED_MEMORY,
    ExecResult,
    Sandbox,
    SandboxBackend,
    SandboxError,
    SandboxSpec,
    ScratchSandbox,
)
from agentmesh.container.uids import UidPool

__all__ = ["BASE_ENV", "LocalBackend", "LocalSandbox"]

#: The environment every exec starts from: nothing of the host's (no keys, no tokens leak in).
BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/work",
    "LANG": "C.UTF-8",
    "TMPDIR": "/tmp",
}

# the launcher and the sandbox's init count against the process cap too
_LAUNCHER_PROCESSES = 3
SCRATCH_MOUNT = "/work"
_SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"
_PRLIMIT = shutil.which("prlimit") or "/usr/bin/prlimit"


def _default_root() -> Path:
    return Path(os.environ.get("AGENTMESH_SANDBOX_ROOT", "/tmp/agentmesh-sandboxes"))


def _check_traversable(root: Path) -> None:
    # sandboxes run as other uids: they must be able to walk down to their own scratch
    for d in [root.resolve(), *root.resolve().parents]:
        if not os.stat(d).st_mode & 0o001:
            raise SandboxError(
                f"sandbox root {root}: {d} is not traversable by other users (mode "
                f"{os.stat(d).st_mode & 0o777:o}); choose a root under a world-traversable directory"
            )


class LocalSandbox(ScratchSandbox):
    """A sandbox whose execs are host processes confined by a launcher (see the module docstring)."""

    def __init__(
        self, backend: LocalBackend, sandbox_id: str, spec: SandboxSpec, root: Path, uid: int | None
    ) -> None:
        self.id = sandbox_id
        self.spec = spec
        self.root = root
        self.uid = uid
        self._backend = backend
        self.cgroup: cgroups.Cgroup | None = None
        self._destroyed = False

    def _setup(self) -> None:
        # the launcher runs as the sandbox's uid and must walk down to its scratch: it owns root too
        self.make_scratch(self.uid, own_root=True)
        lim = self.spec.limits
        if self._backend.use_cgroups:
            self.cgroup = cgroups.create(
                f"{self._backend.name}-{self.id}",
                max_processes=lim.max_processes + _LAUNCHER_PROCESSES,
                memory_bytes=lim.memory_bytes,
            )

    def wrap(self, command: list[str]) -> list[str]:
        """``command`` prefixed with what confines it: join the cgroup, set rlimits, drop to the uid.

        This is done by small programs that exec each other (``sh`` → ``prlimit`` → ``setpriv``),
        not in a ``preexec_fn``: Python code between fork and exec in a process with gRPC's threads
        can crash the child.
        """
        lim = self.spec.limits
        cpu = max(1, int(lim.cpu_time_s + 0.999))
        limits = [f"--cpu={cpu}:{cpu + 1}", "--core=0"]
        # with a cgroup, memory is the cgroup's to enforce (the OOM killer says so clearly);
        # without one, each process's address space is the only bound there is
        if self.cgroup is None:
            limits.append(f"--as={lim.memory_bytes}")
        out = command
        if self.uid is not None:
            # a uid of its own: RLIMIT_NPROC counts exactly this sandbox's processes
            nproc = lim.max_processes + _LAUNCHER_PROCESSES
            limits.append(f"--nproc={nproc}")
            out = [_SETPRIV, f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups", "--", *out]
        out = [_PRLIMIT, *limits, "--", *out]
        if self.cgroup is not None:
            joins = "; ".join(f'echo $$ > "{f}"' for f in self.cgroup.procs_files)
            out = ["/bin/sh", "-c", f'{joins} && exec "$@"', "sandbox-launch", *out]
        return out

    async def _kill_rest(self) -> None:
        if self.cgroup is not None:
            await asyncio.to_thread(self.cgroup.kill_all)

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
        lim = self.spec.limits
        timeout = min(lim.wall_time_s, timeout_s) if timeout_s and timeout_s > 0 else lim.wall_time_s
        full_env = {**BASE_ENV, **self.spec.env, **(env or {})}
        command = self.wrap(self._backend.command(self, list(argv), full_env, cwd))
        if self.cgroup is not None:
            self.cgroup.oom_killed_since_last_check()
        result = await run_process(
            command,
            stdin=stdin,
            env=self._backend.launcher_env(),
            timeout_s=timeout,
            output_bytes=lim.output_bytes,
            kill=self._kill_rest,
        )
        # nothing of an exec outlives it: background processes it left are killed too
        await self._kill_rest()
        if not result.killed:
            if self.cgroup is not None and self.cgroup.oom_killed_since_last_check():
                result.killed = KILLED_MEMORY
            elif result.exit_code in (128 + signal.SIGXCPU, 128 + signal.SIGKILL) and self._cpu_exhausted(
                result
            ):
                result.killed = KILLED_CPU
        return result

    def _cpu_exhausted(self, result: ExecResult) -> bool:
        # SIGXCPU is only sent for RLIMIT_CPU; SIGKILL (the hard limit) is ours only if CPU ran out
        return result.exit_code == 128 + signal.SIGXCPU or result.duration_s >= self.spec.limits.cpu_time_s

    async def destroy(self) -> None:
        if self._destroyed:
            return
        self._destroyed = True
        await self._kill_rest()
        if self.cgroup is not None:
            await asyncio.to_thread(self.cgroup.remove)
        await asyncio.to_thread(shutil.rmtree, self.root, True)
        if self.uid is not None and self._backend.uids is not None:
            self._backend.uids.free(self.uid)


class LocalBackend(SandboxBackend):
    """Shared lifecycle of host-process backends; subclasses build the launcher command."""

    def __init__(self, root: str | Path | None = None, *, use_cgroups: bool = True) -> None:
        self.root = Path(root) if root is not None else _default_root()
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)
        self.is_root = os.geteuid() == 0
        # one lock directory per machine, whatever the root: holders side by side must never hand
        # the same uid to two sandboxes (they would share files and the process cap)
        self.uids = UidPool() if self.is_root else None
        if self.uids is not None:
            _check_traversable(self.root)
        self.use_cgroups = use_cgroups and self.is_root and cgroups.cgroups_unavailable_reason() is None
        # the sandbox's scratch is mounted at /work over the host's read-only root, and a mount
        # point cannot be made on a read-only tree: the host must have the (empty) directory
        if not os.path.isdir(SCRATCH_MOUNT):
            try:
                os.mkdir(SCRATCH_MOUNT, 0o755)
            except OSError as exc:
                raise SandboxError(
                    f"sandboxes mount their scratch at {SCRATCH_MOUNT}, which this host lacks and "
                    f"cannot create ({exc.strerror}): create it once as root (mkdir {SCRATCH_MOUNT})"
                ) from None
        self._sandboxes: dict[str, LocalSandbox] = {}

    @abc.abstractmethod
    def command(self, sandbox: LocalSandbox, argv: list[str], env: dict[str, str], cwd: str) -> list[str]:
        """The launcher's command line that runs ``argv`` inside ``sandbox``."""

    def launcher_env(self) -> dict[str, str]:
        """The environment of the launcher process itself (not of the sandboxed command)."""
        return {"PATH": BASE_ENV["PATH"], "LANG": "C.UTF-8"}

    async def create(self, sandbox_id: str, spec: SandboxSpec) -> Sandbox:
        if spec.image not in ("default", "host", ""):
            raise SandboxError(
                f"image: the {self.name} backend runs the host's root read-only (image 'default' or 'host'), "
                f"got {spec.image!r}; use the podman backend for OCI images"
            )
        uid = self.uids.claim() if self.uids is not None else None
        sb = LocalSandbox(self, sandbox_id, spec, self.root / sandbox_id, uid)
        try:
            await asyncio.to_thread(sb._setup)
        except OSError as exc:
            await sb.destroy()
            raise SandboxError(f"sandbox {sandbox_id}: could not set up its scratch: {exc}") from exc
        return sb
