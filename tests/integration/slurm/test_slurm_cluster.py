"""`agentmesh cluster` on a real single-node Slurm: up, a pipeline on it, workers cancelled and
requeued mid-run, clusters side by side, a dead head, and `down` leaving no job and no process.

One Slurm for the session (conftest.py); the tests of a cluster run in file order and share it.
Sized for 2 cores: workers offer 1 Ray CPU each (pipeline actors take fractions), the object store
is 128 MB a node, the LLM is the simulator.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from agentmesh.sink import read_records

from .conftest import REPO, Cli, marked_processes, poll

pytestmark = [pytest.mark.integration]

AGENTMESH = str(Path(sys.executable).parent / "agentmesh")
UP = ("--workers", "2", "--num-cpus", "1", "--object-store-mb", "128")


def _up(cli: Cli, name: str, *extra: str) -> tuple[dict[str, Any], float]:
    t0 = time.monotonic()
    cli("up", "--name", name, *extra)
    return cli.record(name), time.monotonic() - t0


def _nodes(cli: Cli, name: str, want: int) -> bool:
    st = cli.status(name)
    return bool(st.get("healthy")) and st.get("ray_nodes") == want


def _run_pipeline(record: dict[str, Any], out: Path, limit: int, *extra: str) -> subprocess.Popen[str]:
    log = open(out.with_suffix(".log"), "w")
    return subprocess.Popen(
        [
            AGENTMESH, "run", "examples/collab_reasoning/sim.yaml",
            f"output.dir={out}",
            f"ray.address={record['ray_address']}",
            f"discovery.url={record['discovery_url']}",
            f"dataset.limit={limit}",
            "metrics.enabled=false",
            *extra,
        ],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _check_records(out: Path, limit: int) -> None:
    records = list(read_records(out))
    ids = [r["task_id"] for r in records]
    assert len(ids) == len(set(ids)), f"a task was recorded twice: {sorted(ids)}"
    assert len(ids) == limit, f"expected {limit} tasks, got {sorted(ids)}"
    assert {r["status"] for r in records} == {"done"}, [
        (r["task_id"], r["status"], r["error"]) for r in records
    ]


def _assert_gone(cli: Cli, record: dict[str, Any]) -> None:
    assert not cli.queued(record), f"jobs of {record['name']} still queued"
    assert not marked_processes(record["cluster_id"]), f"processes of {record['name']} left"
    assert not (cli.home / "clusters" / f"{record['name']}.json").exists()
    assert not Path(record["state_dir"]).exists()
    assert not list(Path("/tmp").glob(f"am-{record['cluster_id'][:8]}-*")), "temp dirs left"


# -- one cluster: up, a pipeline, workers lost mid-run, down ---------------------------------------


@pytest.fixture(scope="module")
def main_cluster(cli: Cli) -> Any:
    record, took = _up(cli, "main", *UP)
    print(f"\ncluster up (head + 2 workers, 3 Ray nodes) in {took:.1f}s")
    yield record
    if (cli.home / "clusters" / "main.json").exists():
        cli("down", "--name", "main", check=False)


def test_up_brings_a_head_and_two_workers(cli: Cli, main_cluster: dict[str, Any]) -> None:
    st = poll(lambda: (s := cli.status("main")).get("ray_nodes") == 3 and s, 60, "3 Ray nodes")
    assert st["healthy"] and st["head_state"] == "RUNNING"
    assert set(st["workers"].values()) == {"RUNNING"} and len(st["workers"]) == 2
    assert st["kind"] == "slurm" and st["node"]
    with urllib.request.urlopen(
        f"http://{st['discovery_url'].removeprefix('etcd://')}/health", timeout=5
    ) as r:
        assert json.loads(r.read())["health"] == "true"
    text = cli("status", "--name", "main")
    assert "healthy" in text.stdout and "3 nodes" in text.stdout
    # The head runs the cluster's job manager beside Ray.
    from agentmesh.jobs.client import JobClient

    assert st["jobs_address"]
    with JobClient(st["jobs_address"]) as client:
        job = client.submit({"name": "hello", "tasks": [{"name": "a", "command": ["sh", "-c", "true"]}]})
        assert client.wait(job, timeout_s=60).state == "SUCCEEDED"
    # Every process of the cluster carries its marker (what `down` relies on).
    assert len(marked_processes(main_cluster["cluster_id"])) >= 6


def test_a_pipeline_runs_on_the_cluster(cli: Cli, main_cluster: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = _run_pipeline(main_cluster, out, 4, "llms.smollm2.simulator_profile=fast-test")
    assert run.wait(timeout=150) == 0, out.with_suffix(".log").read_text()[-3000:]
    _check_records(out, 4)


def test_workers_cancelled_and_requeued_mid_run_rejoin(
    cli: Cli, main_cluster: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    limit = 8
    run = _run_pipeline(main_cluster, out, limit)  # the slow (CPU-calibrated) profile: ~40 s of work
    log = out.with_suffix(".log")
    poll(lambda: "in flight" in log.read_text() or run.poll() is not None, 90, "the run to be under way", 0.2)
    assert run.poll() is None, "the run finished before the workers could be disturbed"
    cancelled, requeued = main_cluster["worker_job_ids"]
    t0 = time.monotonic()
    assert cli.slurm_cmd("scancel", cancelled).returncode == 0
    assert cli.slurm_cmd("scontrol", "requeue", requeued).returncode == 0
    # The head resubmits the cancelled job under a new id; Slurm keeps the requeued one's id.
    record = poll(
        lambda: (r := cli.record("main"))["worker_job_ids"][0] != cancelled and r, 30, "a resubmitted worker"
    )
    assert record["worker_job_ids"][1] == requeued and record["resubmitted"] == 1
    poll(lambda: _nodes(cli, "main", 3), 90, "both workers' Ray nodes back")
    print(f"\nworkers cancelled + requeued: 3 Ray nodes again after {time.monotonic() - t0:.1f}s")
    restarts = cli.slurm_cmd("scontrol", "show", "job", requeued).stdout
    assert "Restarts=1" in restarts
    assert run.wait(timeout=180) == 0, log.read_text()[-3000:]
    _check_records(out, limit)


def test_down_leaves_no_job_and_no_process(cli: Cli, main_cluster: dict[str, Any]) -> None:
    record = cli.record("main")
    t0 = time.monotonic()
    cli("down", "--name", "main")
    print(f"\ncluster down in {time.monotonic() - t0:.1f}s")
    _assert_gone(cli, record)
    gone = cli("status", "--name", "main", check=False)
    assert gone.returncode == 2 and "no cluster 'main'" in gone.stderr


# -- two clusters side by side; a dead head --------------------------------------------------------

_RAY_WORK = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
@ray.remote(num_cpus=0.1)
def node():
    import ray
    return ray.get_runtime_context().get_node_id()
print(len(set(ray.get([node.remote() for _ in range(8)]))))
"""


def _ray_work(cli: Cli, record: dict[str, Any]) -> int:
    from agentmesh.launcher import RAY_ENV

    done = subprocess.run(
        [sys.executable, "-c", _RAY_WORK, record["ray_address"]],
        env={**cli.env, **RAY_ENV},
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.strip().splitlines()[-1])


def test_two_clusters_side_by_side_and_a_dead_head(cli: Cli) -> None:
    one, _ = _up(cli, "one", "--workers", "1", "--num-cpus", "1", "--object-store-mb", "128")
    two, _ = _up(cli, "two", "--workers", "1", "--num-cpus", "1", "--object-store-mb", "128")
    try:
        ports_one, ports_two = set(one["ports"].values()), set(two["ports"].values())
        assert not ports_one & ports_two, "clusters share a port"
        assert one["temp_dir"] != two["temp_dir"] and one["state_dir"] != two["state_dir"]
        assert one["discovery_url"] != two["discovery_url"]
        assert not set(one["job_names"]) & set(two["job_names"])
        poll(lambda: _nodes(cli, "one", 2) and _nodes(cli, "two", 2), 60, "2 Ray nodes in each")
        assert _ray_work(cli, one) >= 1 and _ray_work(cli, two) >= 1

        # Downing one leaves the other healthy and working.
        cli("down", "--name", "one")
        _assert_gone(cli, one)
        assert _nodes(cli, "two", 2)
        assert _ray_work(cli, two) >= 1

        # A dead head: status says so (exit 1), and the workers leave by themselves.
        assert cli.slurm_cmd("scancel", two["head_job_id"]).returncode == 0
        st = poll(lambda: (r := cli("status", "--name", "two", check=False)).returncode == 1 and
                  "is not running" in r.stderr and r, 30, "status to see the dead head")  # fmt: skip
        assert f"head job {two['head_job_id']} of cluster 'two' is not running" in st.stderr
        t0 = time.monotonic()
        poll(lambda: not cli.queued(two), 45, "the workers to leave after their head")
        print(f"\nworkers left {time.monotonic() - t0:.1f}s after their head was cancelled")
        # Commands that resolve the cluster say the same.
        from agentmesh.cluster.local import ClusterRecord
        from agentmesh.cluster.slurm import HeadNotRunningError, check_head_running

        with pytest.raises(HeadNotRunningError, match="is not running"):
            check_head_running(ClusterRecord.from_json(json.dumps(two)), _slurm_of(cli))
    finally:
        for name in ("one", "two"):
            if (cli.home / "clusters" / f"{name}.json").exists():
                cli("down", "--name", name, check=False)
    _assert_gone(cli, two)


def _slurm_of(cli: Cli) -> Any:
    from agentmesh.cluster.slurm import Slurm

    return Slurm(cli.env)
