"""Clusters that outlive one command: start, find (through a rendezvous record), stop.

Only the local kind exists so far (:mod:`agentmesh.cluster.local`): a Ray head and an etcd on this
machine. Commands that need a cluster call :func:`resolve_cluster`.
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
