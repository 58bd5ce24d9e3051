"""Checkpoint evaluation end to end on a local cluster, with the simulator backend.

One cluster for the module (``agentmesh cluster up`` under a private ``AGENTMESH_HOME``, 2 CPUs)
and one job manager (``python -m agentmesh.jobs.server``, unless the cluster record names one).
The task function runs in-process (deploy -> evaluate -> remove through the real CLI), once with a
failure injected after the deployment; then the whole example runs through the job manager as a
user runs it and prints its table. Every test checks that no replica is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agentmesh.pipelines.checkpoint_eval import task as task_mod
from agentmesh.pipelines.checkpoint_eval.task import evaluate

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CLUSTER = "ckeval"


@dataclass
class Env:
    home: Path
    env: dict[str, str]
    ray_address: str
    discovery_url: str
    jobs_address: str

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agentmesh.cli", *args],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def replicas(self) -> list[Any]:
        """Every LLM replica deployed on the cluster (``agentmesh llm status --json``)."""
        proc = self.cli("llm", "status", "--json", "--sample-s", "0", "--cluster", CLUSTER)
        assert proc.returncode == 0, proc.stderr
        return list(json.loads(proc.stdout))


def _wait_file(path: Path, proc: subprocess.Popen[bytes], timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file() and path.stat().st_size:
            return dict(json.loads(path.read_text()))
        if proc.poll() is not None:
            raise AssertionError(f"the job manager exited {proc.returncode} before it was ready")
        time.sleep(0.2)
    raise AssertionError(f"the job manager wrote no {path} within {timeout_s} s")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    from agentmesh.launcher import RAY_ENV

    home = tmp_path_factory.mktemp("ckeval-home")
    env = {**os.environ, **RAY_ENV, "AGENTMESH_HOME": str(home), "AGENTMESH_LLM_REPLICA_TTL_S": "2"}
    up = subprocess.run(
        [sys.executable, "-m", "agentmesh.cli", "cluster", "up", "--name", CLUSTER, "--num-cpus", "2"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert up.returncode == 0, up.stderr
    manager: subprocess.Popen[bytes] | None = None
    manager_log = open(home / "jobs.log", "wb")  # closed after the manager stops
    try:
        record = json.loads((home / "clusters" / f"{CLUSTER}.json").read_text())
        jobs_address = record.get("jobs_address")
        if not jobs_address:  # a cluster that does not start its own job manager
            ready = home / "jobs-ready.json"
            manager = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "agentmesh.jobs.server",
                    "--state-dir",
                    str(home / "jobs"),
                    "--ray-address",
                    record["ray_address"],
                    "--ready-file",
                    str(ready),
                ],
                env=env,
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=manager_log,
            )
            jobs_address = _wait_file(ready, manager, 60)["address"]
        yield Env(home, env, record["ray_address"], record["discovery_url"], str(jobs_address))
    finally:
        if manager is not None:
            manager.send_signal(signal.SIGTERM)
            try:
                manager.wait(timeout=20)
            except subprocess.TimeoutExpired:
                manager.kill()
                manager.wait()
        manager_log.close()
        subprocess.run(
            [sys.executable, "-m", "agentmesh.cli", "cluster", "down", "--name", CLUSTER],
            env=env,
            cwd=REPO,
            capture_output=True,
            timeout=120,
        )


def test_evaluate_deploys_evaluates_and_removes(cluster: Env, tmp_path: Path) -> None:
    result = evaluate(
        "ckpt-1",
        str(tmp_path),
        "choice",
        3,
        ray_address=cluster.ray_address,
        discovery_url=cluster.discovery_url,
        backend="simulator",
        max_items=8,
    )
    assert result["checkpoint"] == "ckpt-1" and result["benchmark"] == "choice" and result["seed"] == 3
    assert result["n"] == 8 and 0 <= result["correct"] <= 8
    assert result["accuracy"] == pytest.approx(result["correct"] / 8)
    assert result["serve_s"] > 0 and result["eval_s"] > 0
    assert result["model"].startswith("ckpt-1-choice-s3-")
    assert len(result["samples"]) == 3 and all(s["reply"] for s in result["samples"])
    assert cluster.replicas() == []


def test_evaluate_removes_the_deployment_when_the_evaluation_fails(
    cluster: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []

    async def broken(model: str, *args: Any) -> list[str]:
        seen.append(len(cluster.replicas()))  # the deployment is up when the evaluation starts
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(task_mod, "_ask_all", broken)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        evaluate(
            "ckpt-1",
            str(tmp_path),
            "arith",
            0,
            ray_address=cluster.ray_address,
            discovery_url=cluster.discovery_url,
            backend="simulator",
        )
    assert seen == [1]
    assert cluster.replicas() == []


def test_the_example_runs_through_the_job_manager_and_prints_its_table(cluster: Env, tmp_path: Path) -> None:
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "agentmesh.pipelines.checkpoint_eval",
            "--backend",
            "simulator",
            "--checkpoints",
            "2",
            "--benchmarks",
            "arith,choice",
            "--seeds",
            "2",
            "--concurrency",
            "2",
            "--max-items",
            "10",
            "--ray-address",
            cluster.ray_address,
            "--discovery",
            cluster.discovery_url,
            "--jobs-address",
            cluster.jobs_address,
            "--out",
            str(out),
            "--wait-timeout",
            "240",
        ],
        env=cluster.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["checkpoint", "arith", "choice"]
    for row, ckpt in zip(lines[2:4], ("ckpt-1", "ckpt-2"), strict=True):
        assert row.startswith(ckpt) and row.count("(n=2)") == 2 and row.count("±") == 2
    assert "[8/8]" in proc.stderr  # a progress line per finished task

    results = json.loads((out / "results.json").read_text())
    assert results["state"] == "SUCCEEDED"
    assert sorted(t["task"] for t in results["tasks"]) == sorted(
        f"ckpt-{c}.{b}.s{s}" for c in (1, 2) for b in ("arith", "choice") for s in (0, 1)
    )
    assert all(t["state"] == "SUCCEEDED" and t["result"]["n"] == 10 for t in results["tasks"])
    assert len(results["cells"]) == 4 and all(c["n"] == 2 for c in results["cells"])
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "table.txt").read_text().splitlines()[0] == lines[0]
    assert cluster.replicas() == []
    print(f"\n{proc.stdout}(2x2x2 simulator tasks, concurrency 2: {time.monotonic() - t0:.1f} s)")
