"""Helpers of the jobs integration tests: a job manager subprocess, polling."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from agentmesh.cluster import ClusterRecord
from agentmesh.cluster.local import process_alive

REPO = Path(__file__).resolve().parents[3]
T = TypeVar("T")


class ManagerProcess:
    """A job manager subprocess on a state directory; start, SIGKILL, SIGTERM and start again."""

    def __init__(self, state_dir: Path, record: ClusterRecord, *, discovery: bool = False) -> None:
        self.state_dir = state_dir
        self.record = record
        self.discovery = discovery
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.starts = 0

    def start(self, timeout_s: float = 60.0) -> str:
        self.starts += 1
        ready = self.state_dir.parent / f"{self.state_dir.name}.ready.{self.starts}"
        cmd = [
            sys.executable, "-m", "agentmesh.jobs.server",
            "--state-dir", str(self.state_dir),
            "--ray-address", self.record.ray_address,
            "--ready-file", str(ready),
        ]  # fmt: skip
        if self.discovery:
            cmd += ["--discovery", self.record.discovery_url]
        log = open(self.state_dir.parent / f"{self.state_dir.name}.manager.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO))
        log.close()
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"job manager exited with {self.proc.returncode}; see {log.name}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"job manager not ready after {timeout_s}s; see {log.name}")
            time.sleep(0.05)
        self.address = json.loads(ready.read_text())["address"]
        return self.address

    def kill(self, sig: int = signal.SIGKILL, timeout_s: float = 20.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout_s)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


alive = process_alive  # a zombie waiting for its parent counts as gone


def wait_until(cond: Callable[[], T], timeout_s: float = 30.0, what: str = "condition") -> T:
    """Poll ``cond()`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached in {timeout_s}s")
        time.sleep(0.05)
