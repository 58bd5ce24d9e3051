"""A private single-node Slurm for the tests in this folder, and a CLI runner against it.

The session fixture starts slurmctld, slurmd and munged under a temp dir of their own (free ports,
own key and state; ``agentmesh.cluster.slurm_local``) and stops them through their pid files at the
end. Without Slurm installed the tests skip, unless ``AGENTMESH_REQUIRE_SLURM=1`` (CI), where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agentmesh.cluster.slurm_local import LocalSlurm, slurm_installed

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def local_slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurm]:
    reason = ""
    if not slurm_installed():
        reason = "Slurm is not installed (deploy/install_slurm.sh)"
    elif os.geteuid() != 0:
        reason = "the local Slurm needs root"
    if reason:
        if os.environ.get("AGENTMESH_REQUIRE_SLURM") == "1":
            pytest.fail(f"AGENTMESH_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    # Not under pytest's 0700 tmp dirs: munged runs as user munge and must reach its files.
    directory = Path(tempfile.mkdtemp(prefix="am-slurm-", dir="/tmp"))
    directory.chmod(0o755)
    slurm = LocalSlurm(directory)
    try:
        slurm.up()
        first = slurm.job_start_latency()
        print(
            f"\nlocal Slurm cold start {slurm.timings['cold_start_s']:.2f}s,"
            f" first job started in {first:.2f}s"
        )
        yield slurm
    finally:
        slurm.down()
        shutil.rmtree(directory, ignore_errors=True)


class Cli:
    """``agentmesh cluster ...`` (through agentmesh.cluster.cli) and Slurm clients, in subprocesses."""

    def __init__(self, slurm: LocalSlurm, home: Path) -> None:
        self.slurm = slurm
        self.home = home
        self.env = slurm.env({**os.environ, "AGENTMESH_HOME": str(home)})

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "agentmesh.cluster.cli", *args],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"cluster {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def status(self, name: str) -> dict[str, Any]:
        return dict(json.loads(self("status", "--name", name, "--json", check=False).stdout))

    def record(self, name: str) -> dict[str, Any]:
        return dict(json.loads((self.home / "clusters" / f"{name}.json").read_text()))

    def slurm_cmd(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(cmd), env=self.env, capture_output=True, text=True, timeout=30, check=False
        )

    def queued(self, record: dict[str, Any]) -> list[str]:
        """Job ids of the cluster still in the queue (any state), by its job names."""
        out = self.slurm_cmd("squeue", "-h", "-o", "%i", "--name", ",".join(record["job_names"])).stdout
        return out.split()


def poll(fn: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.3) -> Any:
    """``fn()``'s first truthy value; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {value!r})")
        time.sleep(interval_s)


def marked_processes(cluster_id: str) -> list[int]:
    """Processes anywhere on the machine carrying the cluster's marker."""
    from agentmesh.cluster.slurm import marked_pids

    return marked_pids(cluster_id)


@pytest.fixture(scope="module")
def cli(local_slurm: LocalSlurm, tmp_path_factory: pytest.TempPathFactory) -> Cli:
    return Cli(local_slurm, tmp_path_factory.mktemp("home"))
