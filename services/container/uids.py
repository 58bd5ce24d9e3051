"""A user id of its own for every sandbox on a machine.

Running each sandbox as a distinct unprivileged uid is what makes its files its own (another
sandbox's scratch is unreadable, the host's files are not writable even where a path is bound
read-write by mistake) and what makes ``RLIMIT_NPROC`` count only that sandbox's processes.
Several holder processes share a machine, so a uid is claimed with an exclusively created lock
file naming the claimer's pid; a claim whose process is gone is taken over.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from agentmesh.container.sandbox import SandboxError

__all__ = ["UidPool"]

DEFAULT_FIRST = 200_000
DEFAULT_COUNT = 60_000


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class UidPool:
    """Claims and frees sandbox uids in ``[first, first + count)`` through lock files in ``lock_dir``."""

    def __init__(
        self,
        lock_dir: str | Path | None = None,
        *,
        first: int = DEFAULT_FIRST,
        count: int = DEFAULT_COUNT,
    ) -> None:
        self.lock_dir = Path(lock_dir or os.environ.get("AGENTMESH_UID_LOCK_DIR", "/tmp/agentmesh-uids"))
        self.first = first
        self.count = count
        self._next = 0
        self._mine: set[int] = set()
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.lock_dir, 0o700)

    def claim(self) -> int:
        for _ in range(self.count):
            uid = self.first + self._next
            self._next = (self._next + 1) % self.count
            if uid in self._mine:
                continue
            if self._try(uid):
                return uid
        raise SandboxError(f"no free sandbox uid in [{self.first}, {self.first + self.count})")

    def _try(self, uid: int) -> bool:
        path = self.lock_dir / str(uid)
        for _ in range(2):  # a stale claim is removed, then the uid tried once more
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except FileExistsError:
                if not self._stale(path):
                    return False
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            self._mine.add(uid)
            return True
        return False

    def _stale(self, path: Path) -> bool:
        try:
            pid = int(path.read_text() or "0")
        except (OSError, ValueError):
            return False
        return pid > 0 and pid != os.getpid() and not _alive(pid)

    def free(self, uid: int) -> None:
        if uid in self._mine:
            self._mine.discard(uid)
            with contextlib.suppress(FileNotFoundError):
                (self.lock_dir / str(uid)).unlink()
