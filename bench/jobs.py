"""The jobs API's cost per task, against plain Ray tasks on the same cluster in the same run.

    .venv/bin/python bench/jobs.py [--tasks 40] [--concurrency 4] [--sleep 0.5] [--noop 60]

Setup: a local cluster (``agentmesh.cluster.cluster_up``: a Ray head on loopback, an etcd and the
cluster's job manager, ``python -m agentmesh.jobs.server``, under a private ``AGENTMESH_HOME``), as
``agentmesh cluster up`` deploys them; the client runs here.

Two workloads, each run through the jobs API and, as the baseline, as plain Ray tasks from this
process (``@ray.remote`` functions that run the same command with ``subprocess``, at most C in
flight through ``ray.wait``; no persistence, no logs, no retries):

1. ``sleep``: ``--tasks`` commands ``sleep --sleep`` with concurrency C. Ideal wall time is
   ``ceil(N/C) * sleep``; the overhead per task slot is ``(wall - ideal) / ceil(N/C)``.
2. ``noop``: ``--noop`` commands ``true`` with concurrency C: pure dispatch cost, tasks/s (and the
   overhead per slot with an ideal of 0).

The jobs API pays for what the baseline does not do: a persisted state machine (SQLite), a detached
named actor per attempt (what lets a restarted manager re-attach instead of re-running), a log file
per attempt. Reported: wall time, tasks/s, overhead per slot, and the ratio jobs/Ray.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json


def run_jobs(address: str, name: str, argv: list[str], n: int, concurrency: int) -> dict[str, Any]:
    from agentmesh.jobs.client import JobClient

    spec = {
        "name": name,
        "concurrency": concurrency,
        "resources": {"cpus": 0.01},
        "tasks": [{"name": f"t{i}", "command": argv} for i in range(n)],
    }
    with JobClient(address) as client:
        t0 = time.monotonic()
        job_id = client.submit(spec)
        status = client.wait(job_id, timeout_s=600, poll_s=0.05)
        wall = time.monotonic() - t0
    ok = sum(1 for t in status.tasks if t.state == "SUCCEEDED")
    return {"wall_s": wall, "ok": ok, "n": n, "state": status.state}


def run_ray(argv: list[str], n: int, concurrency: int) -> dict[str, Any]:
    import ray

    @ray.remote(num_cpus=0.01)
    def one(cmd: list[str]) -> int:
        return subprocess.run(cmd, check=False).returncode

    # Warm one worker first, as the jobs side's actor pool is warm after its first task.
    ray.get(one.remote(["true"]))
    t0 = time.monotonic()
    pending: list[Any] = []
    codes: list[int] = []
    for _ in range(n):
        if len(pending) >= concurrency:
            done, pending = ray.wait(pending, num_returns=1)
            codes += ray.get(done)
        pending.append(one.remote(argv))
    codes += ray.get(pending)
    wall = time.monotonic() - t0
    return {"wall_s": wall, "ok": sum(1 for c in codes if c == 0), "n": n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=40, help="sleep tasks")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--sleep", type=float, default=0.5, help="seconds each sleep task sleeps")
    p.add_argument("--noop", type=int, default=60, help="`true` tasks")
    ns = p.parse_args()

    from agentmesh.launcher import RAY_ENV

    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    base = Path(tempfile.mkdtemp(prefix="am-bench-jobs-"))
    os.environ["AGENTMESH_HOME"] = str(base / "home")
    from agentmesh.cluster import cluster_down, cluster_up

    name = f"benchjobs{os.getpid()}"
    record = cluster_up(name, num_cpus=ns.concurrency + 2)
    address = record.jobs_address
    try:
        import ray

        ray.init(address=record.ray_address, logging_level="ERROR", log_to_driver=False)
        slots = math.ceil(ns.tasks / ns.concurrency)
        ideal = slots * ns.sleep
        results: dict[str, Any] = {
            "command": "python bench/jobs.py " + " ".join(sys.argv[1:]),
            "params": vars(ns),
            "ideal_sleep_wall_s": ideal,
        }
        # One warm-up job so the first measured attempt does not pay for the manager's first actor.
        run_jobs(address, "warmup", ["true"], 2, 2)
        workloads = {"sleep": (["sleep", str(ns.sleep)], ns.tasks), "noop": (["true"], ns.noop)}
        for workload, (argv, n) in workloads.items():
            for label in ("jobs", "ray"):
                if label == "jobs":
                    r = run_jobs(address, f"bench-{workload}", argv, n, ns.concurrency)
                else:
                    r = run_ray(argv, n, ns.concurrency)
                r["tasks_per_s"] = r["n"] / r["wall_s"]
                # noop: the ideal is 0, so its overhead per slot is wall / ceil(N/C).
                n_slots = math.ceil(n / ns.concurrency)
                work = ideal if workload == "sleep" else 0.0
                r["overhead_per_slot_s"] = (r["wall_s"] - work) / n_slots
                results[f"{label}_{workload}"] = r
                print(f"{label} {workload}: {r}", flush=True)
        rows = []
        for workload in ("sleep", "noop"):
            j, b = results[f"jobs_{workload}"], results[f"ray_{workload}"]
            rows.append(
                [
                    workload,
                    j["n"],
                    f"{j['wall_s']:.2f}",
                    f"{b['wall_s']:.2f}",
                    f"{j['tasks_per_s']:.1f}",
                    f"{b['tasks_per_s']:.1f}",
                    f"{j['wall_s'] / b['wall_s']:.2f}x",
                    f"{j['overhead_per_slot_s']:.3f} / {b['overhead_per_slot_s']:.3f}",
                    f"{j['ok']}/{j['n']}",
                ]
            )
        print_table(
            f"jobs API vs plain Ray tasks (concurrency {ns.concurrency}; sleep ideal {ideal:.1f}s)",
            [
                "workload",
                "tasks",
                "jobs wall s",
                "ray wall s",
                "jobs tasks/s",
                "ray tasks/s",
                "jobs/ray",
                "overhead/slot s (jobs / ray)",
                "jobs ok",
            ],
            rows,
        )
        write_json("jobs", results)
    finally:
        try:
            import ray

            ray.shutdown()
        finally:
            cluster_down(name)


if __name__ == "__main__":
    main()
