"""Session-wide test setup: quiet gRPC, Ray's required settings, one shared local Ray, and an
in-process discovery with its endpoint cache for tests that need no etcd."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest

from agentmesh.discovery.base import EndpointCache
from agentmesh.discovery.memory import MemoryDiscovery

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
for _k, _v in {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}.items():
    os.environ.setdefault(_k, _v)


def pytest_sessionstart(session: pytest.Session) -> None:
    # CI sets this: a missing vLLM CPU install must fail the run, not skip the tests that need it.
    if os.environ.get("AGENTMESH_REQUIRE_VLLM") == "1":
        from agentmesh.llm_gateway.constants import vllm_python

        if not vllm_python().exists():
            raise pytest.UsageError(
                f"AGENTMESH_REQUIRE_VLLM=1 but there is no vLLM CPU venv at {vllm_python()}"
            )


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for the whole test session (~8 s, ~0.5 GB); stopped at the end."""
    from agentmesh.launcher import init_ray

    shutdown = init_ray(None, num_cpus=2)
    yield
    shutdown()


@pytest.fixture
async def memory_mesh() -> AsyncIterator[tuple[MemoryDiscovery, EndpointCache]]:
    """An in-process discovery (no etcd) and a watch-fed endpoint cache on it."""
    disc = MemoryDiscovery()
    cache = EndpointCache(disc)
    yield disc, cache
    await cache.close()
