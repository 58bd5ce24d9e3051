"""The ``agentmesh cluster`` command group, for local and Slurm clusters.

    agentmesh cluster up [--name NAME] [--num-cpus C] [--num-gpus G] [--slurm K=V ...] [--workers N]
    agentmesh cluster add-workers N [--name NAME]
    agentmesh cluster status [--name NAME] [--json]
    agentmesh cluster down [--name NAME]

``up`` without ``--slurm``/``--workers`` starts a local cluster (:mod:`agentmesh.cluster.local`);
with either, a Slurm one (:mod:`agentmesh.cluster.slurm`; ``--slurm partition=gpu,time=2:00:00``
pairs become sbatch options). Exit codes: 0 done; 1 (``status``) the cluster is not healthy; 2 bad
command line, bad option or no such cluster; 3 the work failed; 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from agentmesh.cli_common import guarded, print_json, say
from agentmesh.cluster.local import name_flag
from agentmesh.errors import ConfigError

__all__ = ["add_cluster_commands", "main"]


def _up(ns: argparse.Namespace) -> int:
    if ns.slurm or ns.workers is not None:
        from agentmesh.cluster.slurm import parse_slurm_options, slurm_up

        options = parse_slurm_options(ns.slurm)  # a typo is reported before anything is submitted
        record = slurm_up(
            ns.name,
            workers=1 if ns.workers is None else ns.workers,
            options=options,
            num_cpus=float(ns.num_cpus) if ns.num_cpus is not None else 1.0,
            num_gpus=ns.num_gpus,
            object_store_mb=ns.object_store_mb,
            wait_workers_s=ns.wait_workers,
            say=say,
        )
    else:
        from agentmesh.cluster.local import cluster_up

        if ns.num_cpus is not None and not float(ns.num_cpus).is_integer():
            raise ConfigError(f"a local cluster takes whole CPUs, got {ns.num_cpus}", key="--num-cpus")
        record = cluster_up(
            ns.name,
            num_cpus=None if ns.num_cpus is None else int(ns.num_cpus),
            num_gpus=ns.num_gpus,
            say=say,
        )
    say(f"cluster {record.name!r} up: ray {record.ray_address}, discovery {record.discovery_url}")
    if record.jobs_address:
        say(f"job manager {record.jobs_address}")
    say(f"record {record.path}; stop it with `agentmesh cluster down{name_flag(ns.name)}`")
    return 0


def _add_workers(ns: argparse.Namespace) -> int:
    from agentmesh.cluster.slurm import slurm_add_workers

    slurm_add_workers(ns.name, ns.count, say=say)
    return 0


def _status(ns: argparse.Namespace) -> int:
    from agentmesh.cluster.local import cluster_status, load_record

    if load_record(ns.name).kind == "slurm":
        return _slurm_status(ns)
    st = cluster_status(ns.name)
    if ns.json:
        print_json({**st.to_dict(), "healthy": st.healthy})
    else:
        r = st.record
        print(f"cluster {r.name!r} ({r.kind}): {'healthy' if st.healthy else 'NOT healthy'}")
        ray_state = "up" if st.ray_up else "DOWN"
        print(f"  ray head   {r.ray_address}  {ray_state}  ({r.num_cpus} CPUs, {r.num_gpus} GPUs)")
        print(f"  discovery  {r.discovery_url}  {'up' if st.etcd_up else 'DOWN'}")
        if r.jobs_address:
            print(f"  jobs       {r.jobs_address}")
        print(f"  processes  {len(st.live_pids)} live; temp dir {r.temp_dir}")
    return 0 if st.healthy else 1


def _slurm_status(ns: argparse.Namespace) -> int:
    from agentmesh.cluster.slurm import slurm_status

    st = slurm_status(ns.name)
    if ns.json:
        print_json(st.to_dict())
    else:
        r = st.record
        print(f"cluster {r.name!r} (slurm): {'healthy' if st.healthy else 'NOT healthy'}")
        print(f"  head job   {r.head_job_id}  {st.head_state}  on {r.node or '?'}")
        print(
            f"  ray head   {r.ray_address}  {'up' if st.ray_up else 'UNREACHABLE'}"
            f"  ({st.ray_nodes or 0} nodes)"
        )
        print(f"  discovery  {r.discovery_url}  {'up' if st.etcd_up else 'DOWN'}")
        if r.jobs_address:
            print(f"  jobs       {r.jobs_address}")
        workers = "  ".join(f"{j} {s}" for j, s in st.workers.items()) or "none"
        print(f"  workers    {workers}  ({r.resubmitted} resubmitted)")
        print(f"  state dir  {r.state_dir}")
    if st.problem:
        print(f"agentmesh: {st.problem}", file=sys.stderr)
    return 0 if st.healthy else 1


def _down(ns: argparse.Namespace) -> int:
    from agentmesh.cluster.local import cluster_down, load_record

    if load_record(ns.name).kind == "slurm":
        from agentmesh.cluster.slurm import slurm_down

        slurm_down(ns.name, say=say)
    else:
        cluster_down(ns.name, say=say)
    return 0


def add_cluster_commands(subparsers: Any) -> None:
    """Add ``agentmesh cluster up|add-workers|status|down`` to the top-level subparsers."""
    from agentmesh.cluster.local import DEFAULT_CLUSTER

    cluster = subparsers.add_parser(
        "cluster",
        help="start, grow, inspect and stop a cluster (Ray + etcd), locally or on Slurm",
        description="A cluster that outlives one command: a Ray head and an etcd (locally, or as Slurm "
        "jobs with worker jobs), found by later commands through $AGENTMESH_HOME/clusters/NAME.json.",
    )
    sub = cluster.add_subparsers(dest="cluster_command", metavar="COMMAND", required=True)

    def named(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--name", default=DEFAULT_CLUSTER, help=f"cluster name (default {DEFAULT_CLUSTER!r})")
        return p

    up = named(sub.add_parser("up", help="start a cluster: locally, or on Slurm with --slurm/--workers"))
    up.add_argument(
        "--num-cpus",
        type=float,
        default=None,
        help="local: CPUs Ray may schedule (default all cores); Slurm: Ray CPUs per worker (default 1)",
    )
    up.add_argument("--num-gpus", type=int, default=0, help="GPUs per node Ray may schedule")
    up.add_argument(
        "--slurm",
        action="append",
        default=[],
        metavar="K=V[,K=V]",
        help="run on Slurm; sbatch options such as partition=gpu,time=2:00:00,account=x",
    )
    up.add_argument("--workers", type=int, default=None, help="Slurm: worker jobs to start (default 1)")
    up.add_argument("--object-store-mb", type=int, default=256, help="Slurm: Ray object store per node (MB)")
    up.add_argument(
        "--wait-workers", type=float, default=120.0, help="Slurm: seconds to wait for the workers to join"
    )
    up.set_defaults(func=guarded(_up))

    add = named(sub.add_parser("add-workers", help="Slurm: submit N more worker jobs"))
    add.add_argument("count", type=int, metavar="N", help="how many")
    add.set_defaults(func=guarded(_add_workers))

    status = named(sub.add_parser("status", help="is the cluster up; where are its Ray and etcd"))
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=guarded(_status))

    down = named(sub.add_parser("down", help="stop every process and job of the cluster, remove its record"))
    down.set_defaults(func=guarded(_down))


def main(argv: list[str] | None = None) -> int:
    """``agentmesh cluster ...`` on its own: ``python -m agentmesh.cluster.cli up ...``."""
    parser = argparse.ArgumentParser(prog="agentmesh")
    add_cluster_commands(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["cluster", *(sys.argv[1:] if argv is None else argv)])
    return int(ns.func(ns))


if __name__ == "__main__":
    sys.exit(main())
