"""A chain of no-op roles deployed for real: the runtime's overhead on the embedded default.

    python bench/chain.py [--tasks 20000] [--in-flight 1000] [--roles 3] [--row-bytes 2048]

The workload of DESIGN.md §11: a 3-role chain whose steps do nothing, 2 KB rows, 1,000 tasks in
flight. Unlike bench/hop.py (one process), this is the real deployment: every role replica is a
Ray actor in its own process, a local etcd does discovery, the driver (source + sink, JSONL and
Parquet on disk) is this process: the path `agentmesh run` takes. Baseline in the same run: the
same chain as plain Ray actors (the driver calls a → b → c for each task with `await`, 1,000 at
once), i.e. Ray's own floor for this topology on this machine. The reference figure from DESIGN.md
(Matrix 0.2.6's P2P agents on this workload, on a machine of this kind: 57 tasks/s) is quoted, not
re-measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json

MATRIX_TASKS_PER_S = 57.0  # DESIGN.md §11, measured on a machine of this kind


def write_rows(path: Path, n: int, row_bytes: int) -> None:
    pad = "x" * max(0, row_bytes - 40)
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"r{i}", "text": pad}) + "\n")


def mesh_run(ns: argparse.Namespace, work: Path) -> dict[str, Any]:
    from agentmesh.config import load_config
    from agentmesh.launcher import run_pipeline

    rows = work / "rows.jsonl"
    write_rows(rows, ns.tasks, ns.row_bytes)
    roles = [f"r{i}" for i in range(ns.roles)]
    cfg_path = work / "chain.yaml"
    cfg_path.write_text(
        json.dumps(
            {
                "name": "chain-bench",
                "dataset": {"path": str(rows)},
                "roles": {
                    r: {
                        "class": "agentmesh.pipelines.noop:Pass",
                        "replicas": 1,
                        "concurrency": 64,
                        "inbox": 4 * ns.in_flight,
                        "num_cpus": 0.1,
                    }
                    for r in roles
                },
                "routing": {
                    "program": "chain",
                    "programs": {"chain": {"kind": "sequential", "order": roles}},
                },
                "output": {"dir": str(work / "out"), "formats": ["jsonl", "parquet"], "flush_every": 512},
                "limits": {"max_in_flight": ns.in_flight},
            }
        )
    )
    cfg = load_config(cfg_path)
    p = run_pipeline(cfg, say=lambda m: print(f"  {m}", flush=True))
    return {
        "tasks": p.done,
        "failed": p.failed,
        "elapsed_s": p.elapsed_s,
        "tasks_per_s": p.done / p.elapsed_s,
    }


def ray_actor_run(ns: argparse.Namespace) -> dict[str, Any]:
    import ray

    @ray.remote(num_cpus=0.1)
    class Stage:
        async def step(self, row: dict[str, Any]) -> dict[str, Any]:
            return row

    stages = [Stage.remote() for _ in range(ns.roles)]
    ray.get([s.step.remote({}) for s in stages])
    pad = "x" * max(0, ns.row_bytes - 40)

    async def drive() -> float:
        sem = asyncio.Semaphore(ns.in_flight)

        async def one(i: int) -> None:
            async with sem:
                row: dict[str, Any] = {"id": f"r{i}", "text": pad}
                for s in stages:
                    row = await s.step.remote(row)

        t0 = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(ns.tasks)))
        return time.monotonic() - t0

    elapsed = asyncio.run(drive())
    for s in stages:
        ray.kill(s)
    return {"tasks": ns.tasks, "elapsed_s": elapsed, "tasks_per_s": ns.tasks / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--in-flight", type=int, default=1_000)
    parser.add_argument("--roles", type=int, default=3)
    parser.add_argument("--row-bytes", type=int, default=2048)
    ns = parser.parse_args()

    from agentmesh.launcher import init_ray

    shutdown = init_ray(None)
    try:
        with tempfile.TemporaryDirectory(prefix="am-chain-") as tmp:
            print("agentmesh (Ray actors, gRPC between peers, etcd, sink on disk):", flush=True)
            mesh = mesh_run(ns, Path(tmp))
        print("baseline: the same chain as plain Ray actor calls:", flush=True)
        base = ray_actor_run(ns)
    finally:
        shutdown()
    hops = ns.roles + 1
    print_table(
        f"bench/chain.py: {ns.roles}-role no-op chain, {ns.row_bytes} B rows, "
        f"{ns.in_flight} in flight, {ns.tasks} tasks",
        ["system", "tasks/s", "hops/s", "vs Ray actors", "vs Matrix 0.2.6 (57 tasks/s, quoted)"],
        [
            [
                "agentmesh",
                mesh["tasks_per_s"],
                mesh["tasks_per_s"] * hops,
                f"{mesh['tasks_per_s'] / base['tasks_per_s']:.2f}x",
                f"{mesh['tasks_per_s'] / MATRIX_TASKS_PER_S:.1f}x",
            ],
            [
                "plain Ray actors",
                base["tasks_per_s"],
                base["tasks_per_s"] * ns.roles,
                "1.00x",
                f"{base['tasks_per_s'] / MATRIX_TASKS_PER_S:.1f}x",
            ],
        ],
    )
    write_json(
        "chain",
        {
            "params": vars(ns),
            "agentmesh": mesh,
            "ray_actors": base,
            "matrix_quoted_tasks_per_s": MATRIX_TASKS_PER_S,
        },
    )


if __name__ == "__main__":
    main()
