"""Pure pieces of bench/sandbox.py: how over-creation is counted, which pool row is read, the
latency summary, the disk count, and the goals' verdicts."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from agentmesh.v1 import container_pb2 as cpb
from tests.bench_scripts import load_bench


@pytest.fixture(scope="module")
def sb() -> ModuleType:
    return load_bench("bench_sandbox", "sandbox.py")


def test_over_creation_is_zero_when_pool_handed_out_and_refilled(sb: ModuleType) -> None:
    # 16 warm handed out, 84 created for waiters, 16 to refill: 100 created for 100 requests
    assert sb.over_creation(100, 100, 16, 16) == 0
    # refills that landed mid-burst and were handed out warm do not change the count
    assert sb.over_creation(30, 30, 16, 16) == 0


def test_over_creation_counts_extras_and_a_pool_left_short(sb: ModuleType) -> None:
    assert sb.over_creation(100, 103, 16, 16) == 3
    # a pool that is not refilled yet needs fewer creations; the extras still show
    assert sb.over_creation(100, 90, 16, 6) == 0
    assert sb.over_creation(100, 92, 16, 6) == 2


def test_pool_row_picks_the_backend_and_target(sb: ModuleType) -> None:
    reply = cpb.PoolsReply(
        pools=[
            cpb.PoolStats(backend="bubblewrap", image="default", warm=0, target=0),
            cpb.PoolStats(backend="nsjail", image="default", warm=4, target=16),
            cpb.PoolStats(backend="bubblewrap", image="default", warm=12, creating=4, target=16),
        ]
    )
    row = sb.pool_row(reply, "bubblewrap", 16)
    assert (row.warm, row.creating) == (12, 4)
    assert sb.pool_row(reply, "podman", 16) is None


def test_summarize_ms(sb: ModuleType) -> None:
    s = sb.summarize_ms([0.001 * i for i in range(1, 101)])
    assert s["n"] == 100
    assert s["p50_ms"] == pytest.approx(50.0, abs=1.01)
    assert s["p99_ms"] == pytest.approx(99.0, abs=1.01)
    assert s["max_ms"] == pytest.approx(100.0)
    assert sb.summarize_ms([]) == {"n": 0}


def test_dir_usage_counts_files_and_directories(sb: ModuleType, tmp_path: Path) -> None:
    empty = sb.dir_usage_bytes(tmp_path)
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_bytes(b"x" * 100_000)
    grown = sb.dir_usage_bytes(tmp_path)
    assert grown - empty >= 100_000
    assert sb.dir_usage_bytes(tmp_path / "missing") == 0


def _results(**over: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "warm": {"p50_ms": 3.0, "p99_ms": 6.0},
        "cold": {"total": {"p50_ms": 25.0}},
        "burst": {"requested": 100, "succeeded": 100, "created_delta": 100, "created_needed": 100},
        "held": {"held": 1000, "exec_ok_after": 1000},
    }
    r["burst"]["over_created"] = 0
    for k, v in over.items():
        section, field = k.split("__")
        r[section][field] = v
    return r


def test_verdicts_pass_and_fail(sb: ModuleType) -> None:
    assert all(ok for _, _, ok in sb.verdicts(_results()))
    failed = {g for g, _, ok in sb.verdicts(_results(warm__p99_ms=151.0, held__exec_ok_after=999)) if not ok}
    assert failed == {"warm acquire p99 <= 150 ms", ">= 100 sandboxes held at once"}
    failed = {g for g, _, ok in sb.verdicts(_results(burst__over_created=1, burst__succeeded=99)) if not ok}
    assert failed == {"burst: 100% success", "burst: no over-creation"}
