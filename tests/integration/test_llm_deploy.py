"""`agentmesh cluster` and `agentmesh llm` end to end, as a user runs them: CLI subprocesses.

One local cluster for the module (its own Ray head with 2 logical GPUs beside the shared test Ray,
its own etcd), under a private ``AGENTMESH_HOME``. The GPU backend runs the test stand-in for
``vllm`` (``tests/integration/vllm_standin.py``: NOT vLLM; it records what it was started with and
serves the vLLM-compatible simulator). The tests run in file order and share the cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agentmesh.discovery import connect
from agentmesh.discovery.base import Endpoint

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SIM_MODEL = "Test/Sim-7B"
GPU_MODEL = "test/gpu-model"


class Cli:
    def __init__(self, home: Path, vllm_bin: Path) -> None:
        self.home = home
        self.env = {
            **os.environ,
            "AGENTMESH_HOME": str(home),
            "AGENTMESH_VLLM_BIN": str(vllm_bin),
            "AGENTMESH_LLM_REPLICA_TTL_S": "2",
        }

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "agentmesh.cli", *args],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"agentmesh {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--json").stdout)

    def record(self) -> dict[str, Any]:
        return dict(json.loads((self.home / "clusters" / "default.json").read_text()))


def _poll(fn: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.2)


def _snapshot(discovery_url: str, service: str) -> list[Endpoint]:
    import asyncio

    async def go() -> list[Endpoint]:
        d = connect(discovery_url)
        try:
            return await d.snapshot(service)
        finally:
            await d.close()

    return asyncio.run(go())


def _alive(pid: int) -> bool:
    from agentmesh.cluster.local import process_alive

    return process_alive(pid)


@pytest.fixture(scope="module")
def standin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm-standin")


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory, standin_dir: Path) -> Iterator[Cli]:
    home = tmp_path_factory.mktemp("am-home")
    wrapper = standin_dir / "vllm"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"VLLM_STANDIN_RECORD_DIR={standin_dir} exec {sys.executable} "
        f'{REPO / "tests" / "integration" / "vllm_standin.py"} "$@"\n'
    )
    wrapper.chmod(0o755)
    runner = Cli(home, wrapper)
    assert runner("llm", "status", check=False).returncode == 2
    up = runner("cluster", "up", "--num-cpus", "2", "--num-gpus", "2")
    assert "cluster 'default' up" in up.stderr
    try:
        yield runner
    finally:
        if (home / "clusters" / "default.json").exists():  # a test failed before `cluster down`
            runner("cluster", "down", check=False)


def test_cluster_status_and_a_second_up_refused(cli: Cli) -> None:
    st = cli.json("cluster", "status")
    assert st["healthy"] and st["ray_up"] and st["etcd_up"]
    assert st["num_gpus"] == 2
    assert set(st["ray_pids"]) <= set(st["live_pids"])
    again = cli("cluster", "up", check=False)
    assert again.returncode == 3 and "already up" in again.stderr


def test_simulator_replicas_deploy_register_and_come_back_after_sigkill(cli: Cli) -> None:
    dep = cli("llm", "deploy", "--model", SIM_MODEL, "--replicas", "2", "--backend", "simulator")
    assert "2 replica(s) healthy and registered as llm.test-sim-7b" in dep.stderr
    rows = cli.json("llm", "status", "--model", SIM_MODEL)
    assert [(r["index"], r["state"], r["registered"], r["health"]) for r in rows] == [
        (0, "ALIVE", True, "ok"),
        (1, "ALIVE", True, "ok"),
    ]
    assert all(r["running"] == 0 and r["tokens_per_s"] == 0 for r in rows)
    discovery_url = cli.record()["discovery_url"]
    eps = {ep.id: ep for ep in _snapshot(discovery_url, "llm.test-sim-7b")}
    assert set(eps) == {"test-sim-7b-0", "test-sim-7b-1"}
    assert {ep.address for ep in eps.values()} == {r["address"] for r in rows}
    # The table form shows the same replicas.
    table = cli("llm", "status", "--sample-s", "0").stdout.splitlines()
    assert table[0].split()[:4] == ["MODEL", "REPLICA", "BACKEND", "STATE"] and len(table) == 3

    victim = rows[0]
    os.kill(victim["pid"], signal.SIGKILL)

    def back() -> list[Endpoint] | None:
        now = [ep for ep in _snapshot(discovery_url, "llm.test-sim-7b") if ep.id == "test-sim-7b-0"]
        return now if now and now[0].address != victim["address"] else None

    back_eps = _poll(back, 30, "the killed replica to re-register at a new address")
    after = cli.json("llm", "status", "--model", SIM_MODEL, "--sample-s", "0")
    assert after[0]["state"] == "ALIVE" and after[0]["restarts"] == 1 and after[0]["pid"] != victim["pid"]
    assert after[0]["address"] == back_eps[0].address and after[0]["health"] == "ok"
    assert after[1]["restarts"] == 0 and after[1]["pid"] == rows[1]["pid"]


def test_vllm_gpu_replica_gets_its_placement_group_and_gpus(cli: Cli, standin_dir: Path) -> None:
    too_many = cli(
        "llm", "deploy", "--model", GPU_MODEL, "--replicas", "2", "--gpus-per-replica", "2", check=False
    )
    assert too_many.returncode == 2 and "need 4 GPUs; the cluster has 2" in too_many.stderr
    cli(
        "llm",
        "deploy",
        "--model",
        GPU_MODEL,
        "--replicas",
        "1",
        "--gpus-per-replica",
        "2",
        "--num-cpus",
        "0.1",
    )
    [row] = cli.json("llm", "status", "--model", GPU_MODEL, "--sample-s", "0")
    assert (row["backend"], row["gpus"], row["health"], row["registered"]) == ("vllm", 2, "ok", True)
    [record] = [json.loads(p.read_text()) for p in standin_dir.glob("*.json")]
    assert record["argv"][:2] == ["serve", GPU_MODEL]
    assert record["tensor_parallel_size"] == 2
    assert sorted(record["cuda_visible_devices"].split(",")) == ["0", "1"]
    assert _alive(record["pid"])
    [ep] = _snapshot(cli.record()["discovery_url"], "llm.test-gpu-model")
    assert ep.metadata["tensor_parallel_size"] == "2" and ep.address == row["address"]

    cli("llm", "remove", "--model", GPU_MODEL)
    _poll(lambda: not _alive(record["pid"]), 15, "the vllm stand-in to stop")
    assert cli.json("llm", "status", "--model", GPU_MODEL) == []
    assert _snapshot(cli.record()["discovery_url"], "llm.test-gpu-model") == []
    # its GPUs are free again: the same deployment fits
    cli(
        "llm",
        "deploy",
        "--model",
        GPU_MODEL,
        "--replicas",
        "1",
        "--gpus-per-replica",
        "2",
        "--num-cpus",
        "0.1",
    )


def test_remove_all_leaves_no_replica(cli: Cli) -> None:
    before = cli.json("llm", "status", "--sample-s", "0")
    assert {r["model"] for r in before} == {SIM_MODEL, GPU_MODEL}
    pids = [r["pid"] for r in before]
    out = cli("llm", "remove", "--all")
    assert "removed 2 replica(s) of llm.test-sim-7b" in out.stderr
    assert cli.json("llm", "status") == []
    _poll(lambda: not any(_alive(p) for p in pids), 15, "the replica processes to exit")
    assert _snapshot(cli.record()["discovery_url"], "llm.test-sim-7b") == []
    assert "nothing to remove" in cli("llm", "remove", "--model", SIM_MODEL).stderr


def test_cluster_down_leaves_no_process(cli: Cli) -> None:
    record = cli.record()
    pids = sorted({*record["ray_pids"], record["etcd_pid"], record["etcd_keeper_pid"]})
    assert all(_alive(p) for p in pids)
    cli("cluster", "down")
    assert [p for p in pids if _alive(p)] == []
    assert not (cli.home / "clusters" / "default.json").exists()
    assert not Path(record["temp_dir"]).exists()
    gone = cli("cluster", "status", check=False)
    assert gone.returncode == 2 and "no cluster 'default'" in gone.stderr
