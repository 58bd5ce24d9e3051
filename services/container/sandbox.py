"""What a sandbox is, whatever runs it: limits, an exec's request and result, and the backend contract.

A sandbox is a private writable scratch (mounted at ``/work``, with its own ``/tmp``) over a
read-only root, with no network by default. Every exec is a fresh process tree inside it; what one
exec writes under ``/work`` or ``/tmp`` the next exec of the same sandbox reads, and no other
sandbox can. Backends (``bubblewrap``, ``nsjail``, ``podman``) implement :class:`SandboxBackend`
and :class:`Sandbox`; :func:`agentmesh.container.backends.get_backend` picks one by name.

Limits are per sandbox (:class:`Limits`): CPU seconds, memory and processes bound each exec; wall
time and output size bound what an exec can cost its caller. An exec that breaks a limit does not
raise: its :class:`ExecResult` says what happened (``killed`` names the limit), and the sandbox
keeps serving.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agentmesh.errors import AgentMeshError

__all__ = [
    "KILLED_CPU",
    "KILLED_MEMORY",
    "KILLED_WALL",
    "ExecResult",
    "Limits",
    "Sandbox",
    "SandboxBackend",
    "SandboxError",
    "SandboxSpec",
    "ScratchSandbox",
]

#: ``ExecResult.killed`` values: which limit ended the exec.
KILLED_WALL = "wall_time"
KILLED_CPU = "cpu_time"
KILLED_MEMORY = "memory"

MIB = 1024 * 1024


class SandboxError(AgentMeshError):
    """A sandbox could not be created, reached or used (not: a command inside it failed)."""


@dataclass(frozen=True)
class Limits:
    """Per-sandbox resource limits. Every field has a safe default; ``0`` never means "unlimited"."""

    cpu_time_s: float = 10.0  # CPU seconds one exec may use (RLIMIT_CPU; SIGKILL past it)
    memory_bytes: int = 512 * MIB  # memory of the sandbox (cgroup) and of each process (RLIMIT_AS)
    max_processes: int = 64  # processes and threads alive at once in the sandbox
    wall_time_s: float = 30.0  # default and ceiling of one exec's timeout
    output_bytes: int = 1 * MIB  # per stream (stdout, stderr); more is dropped and flagged
    network: bool = False  # True: share the host's network (off by default)

    def __post_init__(self) -> None:
        for name in ("cpu_time_s", "memory_bytes", "max_processes", "wall_time_s", "output_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise SandboxError(f"limits.{name}: expected a positive number, got {value!r}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None, *, base: Limits | None = None) -> Limits:
        """Limits from a config mapping; unknown keys are an error that names them."""
        base = base or cls()
        if not data:
            return base
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SandboxError(f"limits: unknown key(s) {unknown} (known: {sorted(known)})")
        return replace(base, **dict(data))

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass(frozen=True)
class SandboxSpec:
    """What to create. ``image`` is backend-specific: ``default`` is the backend's own default (the
    host's root, read-only, for bubblewrap and nsjail; agentmesh's Debian image for podman);
    podman also takes any OCI image name it has."""

    image: str = "default"
    limits: Limits = field(default_factory=Limits)
    env: Mapping[str, str] = field(default_factory=dict)  # base environment of every exec


@dataclass
class ExecResult:
    """How one exec ended. ``exit_code`` is the process's, or ``128 + signal`` when a signal ended it
    (``-1`` if it never started). ``killed`` names the limit that ended it (``KILLED_*``), or ``""``."""

    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    killed: str = ""
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.killed

    @property
    def truncated(self) -> bool:
        return self.stdout_truncated or self.stderr_truncated


class Sandbox(abc.ABC):
    """One live sandbox. ``exec`` may be called concurrently; ``destroy`` is idempotent."""

    id: str
    spec: SandboxSpec

    @abc.abstractmethod
    async def exec(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes = b"",
        env: Mapping[str, str] | None = None,
        cwd: str = "/work",
        timeout_s: float | None = None,
    ) -> ExecResult:
        """Run ``argv`` inside the sandbox. ``timeout_s`` is capped by ``spec.limits.wall_time_s``.

        Raises :class:`SandboxError` only when the sandbox itself is broken or destroyed.
        """

    @abc.abstractmethod
    async def destroy(self) -> None:
        """Kill everything running in it and delete its scratch."""


class ScratchSandbox(Sandbox):
    """A sandbox whose private writable space is a directory on the host: ``root/work`` (mounted at
    ``/work``) and ``root/tmp`` (at ``/tmp``), owned by the sandbox's uid. Every backend here keeps
    its files that way, so the layout is defined once."""

    root: Path
    _destroyed: bool

    def check_exec(self, argv: Sequence[str]) -> None:
        """What every backend refuses before running anything: a destroyed sandbox, a bad argv."""
        if self._destroyed:
            raise SandboxError(f"sandbox {self.id} is destroyed")
        if isinstance(argv, str) or not argv or not all(isinstance(a, str) for a in argv):
            raise SandboxError("argv: expected a non-empty list of strings")

    @property
    def work_dir(self) -> Path:
        return self.root / "work"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    def make_scratch(self, uid: int | None, *, own_root: bool) -> None:
        """Create the directories (mode 0700); give them to ``uid``, ``root`` itself only if
        ``own_root`` (the sandbox's launcher then walks down to its scratch as that uid)."""
        for d in (self.root, self.work_dir, self.tmp_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            if uid is not None and (own_root or d != self.root):
                os.chown(d, uid, uid)


class SandboxBackend(abc.ABC):
    """Creates sandboxes of one kind on this machine."""

    name: str

    @classmethod
    @abc.abstractmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run here (a missing binary, no privileges), or None if it can."""

    @abc.abstractmethod
    async def create(self, sandbox_id: str, spec: SandboxSpec) -> Sandbox:
        """Create a sandbox ready for its first exec. Raises :class:`SandboxError`."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the backend itself holds (not its sandboxes: destroy those first)."""
