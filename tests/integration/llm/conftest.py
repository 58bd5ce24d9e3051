"""Fixtures shared by the LLM gateway integration tests: one real etcd per module and a
watch-fed endpoint cache on it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from agentmesh.discovery import connect
from agentmesh.discovery.base import EndpointCache
from agentmesh.discovery.etcd_server import EtcdServer


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer(fast=True) as server:
        yield server


@pytest.fixture
async def cache(etcd: EtcdServer) -> AsyncIterator[EndpointCache]:
    disc = connect(etcd.url)
    c = EndpointCache(disc)
    try:
        yield c
    finally:
        await c.close()
        await disc.close()
