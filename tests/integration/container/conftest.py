"""Fixtures of the sandbox tests: one backend per parameter; CI requires every backend to run."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agentmesh.container.backends import BACKENDS, get_backend, unavailable_reason
from agentmesh.container.sandbox import SandboxBackend
from agentmesh.discovery.etcd_server import EtcdServer

ALL_BACKENDS = sorted(BACKENDS)


def backend_or_skip(name: str) -> None:
    """Skip where a backend cannot run, except under AGENTMESH_REQUIRE_SANDBOXES=1 (CI): then fail."""
    reason = unavailable_reason(name)
    if reason:
        if os.environ.get("AGENTMESH_REQUIRE_SANDBOXES") == "1":
            pytest.fail(f"sandbox backend {name} is required here but unavailable: {reason}")
        pytest.skip(reason)


def sandbox_root(tag: str) -> Path:
    """A fresh sandbox root. Not under pytest's tmp dir: that is private to root, and sandboxes run
    as uids of their own that must walk down to their scratch."""
    root = Path(tempfile.mkdtemp(prefix=f"am-sbx-{tag}-", dir="/tmp"))
    os.chmod(root, 0o711)
    return root


@pytest.fixture(params=ALL_BACKENDS)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[SandboxBackend]:
    backend_or_skip(request.param)
    root = sandbox_root(request.param)
    b = get_backend(request.param, root=root)
    yield b
    await b.close()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer(fast=True) as server:
        yield server


@pytest.fixture
def registry_name() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def sandbox_roots() -> Iterator[Path]:
    root = sandbox_root("holders")
    yield root
    shutil.rmtree(root, ignore_errors=True)
