"""Fixtures of the jobs integration tests: one local cluster (Ray head + etcd, started with
``agentmesh.cluster.cluster_up`` under a private AGENTMESH_HOME) for the session, and job managers
as real subprocesses (``python -m agentmesh.jobs.server``) that tests may SIGKILL and restart."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentmesh.cluster import ClusterRecord, cluster_down, cluster_up
from agentmesh.jobs.client import JobClient

from .helpers import ManagerProcess

CLUSTER = "jobs-it"


@contextlib.contextmanager
def _home(path: Path) -> Iterator[None]:
    # Only around cluster_up/down: the rest of the test session keeps its own AGENTMESH_HOME.
    old = os.environ.get("AGENTMESH_HOME")
    os.environ["AGENTMESH_HOME"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("AGENTMESH_HOME", None)
        else:
            os.environ["AGENTMESH_HOME"] = old


@pytest.fixture(scope="session")
def jobs_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The AGENTMESH_HOME that holds the test cluster's record."""
    return tmp_path_factory.mktemp("jobs-home")


@pytest.fixture(scope="session")
def jobs_cluster(jobs_home: Path) -> Iterator[ClusterRecord]:
    home = jobs_home
    with _home(home):
        record = cluster_up(CLUSTER, num_cpus=4)
    try:
        yield record
    finally:
        with _home(home):
            cluster_down(CLUSTER)


@pytest.fixture(scope="module")
def manager(
    jobs_cluster: ClusterRecord, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ManagerProcess]:
    """One manager shared by a module's tests (each test submits its own jobs)."""
    m = ManagerProcess(tmp_path_factory.mktemp("jobs-mgr") / "state", jobs_cluster, discovery=True)
    m.start()
    yield m
    m.stop()


@pytest.fixture
def client(manager: ManagerProcess) -> Iterator[JobClient]:
    c = JobClient(manager.address)
    yield c
    c.close()
