"""Session-wide test setup: quiet gRPC, Ray's required settings, one shared local Ray."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
for _k, _v in {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}.items():
    os.environ.setdefault(_k, _v)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for the whole test session (~8 s, ~0.5 GB); stopped at the end."""
    from agentmesh.launcher import init_ray

    shutdown = init_ray(None, num_cpus=2)
    yield
    shutdown()
