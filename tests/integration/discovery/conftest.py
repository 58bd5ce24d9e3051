"""Fixtures for the discovery integration tests: one real etcd per session, a fake Consul per test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from fake_consul import FakeConsulAgent

from agentmesh.discovery.etcd_server import EtcdServer


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    with EtcdServer(fast=True) as server:
        yield server


@pytest.fixture
async def fake_consul() -> AsyncIterator[FakeConsulAgent]:
    # No floor on DeregisterCriticalServiceAfter, so reaping can be tested in a second.
    agent = FakeConsulAgent(min_deregister_s=0.0)
    await agent.start()
    yield agent
    await agent.stop()


@pytest.fixture
def service_name() -> str:
    """A service name of its own per test, so tests sharing one etcd do not see each other."""
    return f"test.{uuid.uuid4().hex[:12]}"
