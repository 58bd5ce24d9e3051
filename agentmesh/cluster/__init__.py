"""Clusters that outlive one command: start, find (through a rendezvous record), stop.

Two kinds share the record: local (:mod:`agentmesh.cluster.local`: a Ray head, an etcd and a job
manager on this machine) and Slurm (:mod:`agentmesh.cluster.slurm`: the same as Slurm jobs, with
worker jobs). Commands that need a cluster call :func:`resolve_cluster`.
"""

from __future__ import annotations

from agentmesh.cluster.local import (
    DEFAULT_CLUSTER,
    ClusterError,
    ClusterRecord,
    ClusterStatus,
    NoClusterError,
    cluster_down,
    cluster_status,
    cluster_up,
    clusters_dir,
    load_record,
    resolve_cluster,
)

__all__ = [
    "DEFAULT_CLUSTER",
    "ClusterError",
    "ClusterRecord",
    "ClusterStatus",
    "NoClusterError",
    "cluster_down",
    "cluster_status",
    "cluster_up",
    "clusters_dir",
    "load_record",
    "resolve_cluster",
]
