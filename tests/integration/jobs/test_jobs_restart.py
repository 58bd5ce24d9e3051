"""A job manager killed mid-job (SIGKILL), and one stopped (SIGTERM), loses nothing when started
again on the same state directory: running attempts (detached Ray actors) outlive it and are
re-attached, and every task completes exactly once."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from agentmesh.cluster import ClusterRecord
from agentmesh.jobs.client import JobClient
from agentmesh.jobs.states import JobStatus

from .helpers import REPO, ManagerProcess, alive, wait_until

pytestmark = pytest.mark.integration


def _pid(work: Path, task: str) -> int | None:
    # The file exists (the shell's redirection) a moment before the pid is written into it.
    path = work / f"pid.{task}"
    text = path.read_text().strip() if path.exists() else ""
    return int(text) if text else None


def _running_pids(status: JobStatus, work: Path) -> list[int]:
    pids = [_pid(work, t.name) for t in status.tasks if t.state == "RUNNING"]
    return [p for p in pids if p is not None]


def test_killed_and_restarted_manager_loses_nothing_and_runs_nothing_twice(
    jobs_cluster: ClusterRecord, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    done = work / "done.txt"
    # The side effect happens once per completed run: a second completion would add a second line.
    cmd = f"echo $$ > {work}/pid.$AGENTMESH_TASK_NAME; sleep 1.2; echo $AGENTMESH_TASK_NAME >> {done}"
    names = [f"r{i}" for i in range(9)]
    spec = {
        "name": "restart",
        "concurrency": 3,
        "resources": {"cpus": 0.1},
        "cwd": str(REPO),
        "tasks": [{"name": n, "command": cmd} for n in names],
    }
    manager = ManagerProcess(tmp_path / "state", jobs_cluster)
    try:
        with JobClient(manager.start()) as client:
            job_id = client.submit(spec)

            def mid_job() -> JobStatus | None:
                st = client.status(job_id)
                counts = st.task_counts
                ready = counts.get("RUNNING", 0) == 3 and counts.get("PENDING", 0) > 0
                return st if ready and len(_running_pids(st, work)) == 3 else None

            before = wait_until(mid_job, 30, "three tasks running, some pending")
        pids = _running_pids(before, work)
        assert manager.kill(signal.SIGKILL) == -signal.SIGKILL
        # The attempts outlive the manager (detached actors) and finish while it is away.
        assert all(alive(p) for p in pids)
        wait_until(lambda: done.exists() and len(done.read_text().split()) >= 3, 15, "tasks ending meanwhile")

        with JobClient(manager.start()) as client:
            # A task the restarted manager still calls RUNNING may have ended while it was away
            # (its pid file stays): wait for one whose process is really running.
            mid = wait_until(
                lambda: (
                    (st := client.status(job_id)).task_counts.get("RUNNING", 0) > 0
                    and any(alive(p) for p in _running_pids(st, work))
                    and st
                ),
                30,
                "a task running after the restart",
            )
            pids_by_task = {t.name: _pid(work, t.name) for t in mid.tasks if t.state == "RUNNING"}
            running = {n: p for n, p in pids_by_task.items() if p is not None and alive(p)}
        # SIGTERM: a clean stop that leaves running attempts alone: each is still running or has
        # finished its work (an attempt stopped with the manager would never write its line).
        assert manager.kill(signal.SIGTERM) == 0
        time.sleep(0.5)
        assert all(alive(p) or n in done.read_text().split() for n, p in running.items()), running

        with JobClient(manager.start()) as client:
            final = client.wait(job_id, timeout_s=60)
            assert final.state == "SUCCEEDED", [(t.name, t.state, t.error) for t in final.tasks]
            assert [(t.name, t.state, t.attempts) for t in final.tasks] == [
                (n, "SUCCEEDED", 1) for n in names
            ]
            assert sorted(done.read_text().split()) == names  # each side effect exactly once
            print(f"\nmanager SIGKILLed and SIGTERMed mid-job: {len(names)} tasks, each run once")
            assert "".join(client.logs(job_id, "r0")) == ""  # logs still readable (this task prints nothing)
    finally:
        manager.stop()


def test_the_cluster_keeps_its_job_manager_at_its_address(jobs_cluster: ClusterRecord) -> None:
    """The job manager `cluster up` started, SIGKILLed, is started again by its keeper on the same
    port: the address in the cluster's record keeps working, and the jobs are all still there."""
    ready = Path(jobs_cluster.temp_dir) / "jobs" / "ready.json"
    with JobClient(jobs_cluster.jobs_address) as client:
        job_id = client.submit({"name": "kept", "tasks": [{"name": "a", "command": "true"}]})
        assert client.wait(job_id, timeout_s=60).state == "SUCCEEDED"
    old = json.loads(ready.read_text())
    assert old["address"] == jobs_cluster.jobs_address
    os.kill(old["pid"], signal.SIGKILL)
    new = wait_until(
        lambda: ready.exists() and (r := json.loads(ready.read_text()))["pid"] != old["pid"] and r,
        30,
        "the keeper to start the job manager again",
    )
    assert new["address"] == jobs_cluster.jobs_address
    with JobClient(jobs_cluster.jobs_address) as client:
        assert client.status(job_id).state == "SUCCEEDED"
        again = client.submit({"name": "after", "tasks": [{"name": "b", "command": "true"}]})
        assert client.wait(again, timeout_s=60).state == "SUCCEEDED"
