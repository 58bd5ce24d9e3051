"""ReplicaBalancer with a fake clock and fake probes: membership, staleness, probing, failures, waiting."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import pytest

from agentmesh.discovery.base import Endpoint
from agentmesh.errors import LlmError
from agentmesh.llm_gateway.balancer import (
    ProbeFailed,
    ProbeResult,
    ReplicaBalancer,
    ReplicaGone,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _ep(n: int, address: str | None = None) -> Endpoint:
    return Endpoint("llm.m", f"r{n}", address or f"10.0.0.{n}:8000", {})


class Probes:
    """Scripted probe answers per replica id; records every probe with its deadline."""

    def __init__(self) -> None:
        self.answers: dict[str, Any] = {}
        self.calls: list[tuple[str, float]] = []

    async def __call__(self, ep: Endpoint, timeout_s: float) -> ProbeResult:
        self.calls.append((ep.id, timeout_s))
        ans = self.answers.get(ep.id, ProbeResult(0, 0))
        if isinstance(ans, BaseException):
            raise ans
        assert isinstance(ans, ProbeResult)
        return ans


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def _balancer(clock: Clock, probes: Probes | None = None, **kw: Any) -> ReplicaBalancer:
    kw.setdefault("rng", random.Random(3))
    return ReplicaBalancer(probe=probes, clock=clock, **kw)


async def test_new_replicas_are_probed_in_the_background() -> None:
    clock, probes = Clock(), Probes()
    bal = _balancer(clock, probes)
    bal.set_endpoints([_ep(1), _ep(2)])
    await _settle()
    assert sorted(c[0] for c in probes.calls) == ["r1", "r2"]
    assert all(st.reported == ProbeResult(0, 0) for st in bal.states().values())


async def test_membership_is_replaced_whole_and_vanished_replicas_pruned() -> None:
    clock = Clock()
    bal = _balancer(clock)
    bal.set_endpoints([_ep(1), _ep(2), _ep(3)])
    bal.states()["r2"].in_flight = 4
    bal.set_endpoints([_ep(2), _ep(4)])
    assert sorted(bal.states()) == ["r2", "r4"]
    assert bal.states()["r2"].in_flight == 4  # same replica, same address: state kept
    bal.set_endpoints([_ep(2, "10.9.9.9:1"), _ep(4)])
    assert bal.states()["r2"].in_flight == 0  # a new address is a new replica (restarted)


async def test_fresh_report_counts_other_clients_and_expires_with_staleness() -> None:
    clock, probes = Clock(), Probes()
    probes.answers["r1"] = ProbeResult(running=8, waiting=4)  # busy with other clients' requests
    bal = _balancer(clock, probes, staleness_s=1.0)
    bal.set_endpoints([_ep(1), _ep(2)])
    await _settle()
    picks = Counter(bal.pick().id for _ in range(50))  # type: ignore[union-attr]
    assert picks == {"r2": 50}  # r1 looks 12 deep
    clock.now += 1.5  # the report is stale now: only this client's in-flight count (0 and 0)
    probes.answers["r1"] = ProbeFailed("slow", timed_out=True)  # and the re-probe does not answer
    picks = Counter(bal.pick().id for _ in range(200))  # type: ignore[union-attr]
    assert picks["r1"] > 50 and picks["r2"] > 50


async def test_stale_candidates_are_reprobed_at_most_once_at_a_time() -> None:
    clock, probes = Clock(), Probes()
    bal = _balancer(clock, probes, staleness_s=1.0)
    bal.set_endpoints([_ep(1), _ep(2)])
    await _settle()
    probes.calls.clear()
    for _ in range(20):
        bal.pick()
    await _settle()
    assert probes.calls == []  # fresh reports: no probe on the hot path
    clock.now += 2
    for _ in range(20):
        bal.pick()
    await _settle()
    assert sorted(c[0] for c in probes.calls) == ["r1", "r2"]


async def test_probe_deadline_doubles_on_timeouts_and_resets_on_success() -> None:
    clock, probes = Clock(), Probes()
    bal = _balancer(clock, probes, probe_timeout_s=0.05, probe_timeout_max_s=0.3, staleness_s=1.0)
    probes.answers["r1"] = ProbeFailed("no answer", timed_out=True)
    bal.set_endpoints([_ep(1)])
    await _settle()
    for _ in range(4):
        clock.now += 2
        bal.pick()
        await _settle()
    assert [round(t, 3) for _, t in probes.calls] == [0.05, 0.1, 0.2, 0.3, 0.3]
    probes.answers["r1"] = ProbeResult(1, 0)
    clock.now += 2
    bal.pick()
    await _settle()
    clock.now += 2
    bal.pick()
    await _settle()
    assert probes.calls[-1][1] == pytest.approx(0.05)


async def test_dead_replica_leaves_the_choice_until_a_probe_reaches_it() -> None:
    clock, probes = Clock(), Probes()
    bal = _balancer(clock, probes, dead_reprobe_s=1.0)
    bal.set_endpoints([_ep(1), _ep(2)])
    await _settle()
    r1 = bal.states()["r1"]
    probes.answers["r1"] = ReplicaGone("connection refused")
    bal.mark_dead(r1)
    assert {bal.pick().id for _ in range(50)} == {"r2"}  # type: ignore[union-attr]
    clock.now += 1.1  # re-probe due: still refused -> the next re-probe waits twice as long
    bal.pick()
    await _settle()
    assert r1.dead and r1.dead_reprobe_s == 2.0
    probes.answers["r1"] = ProbeResult(0, 0)  # it answers again
    clock.now += 2.1
    bal.pick()
    await _settle()
    assert not r1.dead
    assert "r1" in {bal.pick().id for _ in range(50)}  # type: ignore[union-attr]


async def test_unavailable_replica_only_loses_its_report() -> None:
    clock, probes = Clock(), Probes()
    probes.answers["r1"] = ProbeResult(3, 0)
    bal = _balancer(clock, probes)
    bal.set_endpoints([_ep(1), _ep(2)])
    await _settle()
    r1 = bal.states()["r1"]
    probes.answers["r1"] = ProbeFailed("reset", timed_out=False)
    bal.mark_unavailable(r1)
    await _settle()
    assert r1.reported is None and not r1.dead
    assert "r1" in {bal.pick().id for _ in range(50)}  # type: ignore[union-attr]


async def test_held_replica_comes_back_when_its_hold_ends() -> None:
    clock = Clock()
    bal = _balancer(clock)
    bal.set_endpoints([_ep(1), _ep(2)])
    bal.hold(bal.states()["r1"], 2.0)
    assert {bal.pick().id for _ in range(30)} == {"r2"}  # type: ignore[union-attr]
    clock.now += 2.01
    assert "r1" in {bal.pick().id for _ in range(30)}  # type: ignore[union-attr]


async def test_p2c_prefers_the_less_loaded_and_random_ignores_load() -> None:
    clock = Clock()
    for policy, expect_busy_share in (("p2c", (0.0, 0.05)), ("random", (0.4, 0.6))):
        bal = _balancer(clock, policy=policy)
        bal.set_endpoints([_ep(1), _ep(2)])
        bal.states()["r1"].in_flight = 10
        share = sum(bal.pick().id == "r1" for _ in range(1000)) / 1000  # type: ignore[union-attr]
        assert expect_busy_share[0] <= share <= expect_busy_share[1], (policy, share)


async def test_affinity_sticks_and_moves_only_the_sessions_of_a_gone_replica() -> None:
    clock = Clock()
    bal = _balancer(clock)
    bal.set_endpoints([_ep(n) for n in range(1, 6)])
    before = {f"s{i}": bal.pick(session_id=f"s{i}").id for i in range(200)}  # type: ignore[union-attr]
    assert all(bal.pick(session_id=s).id == r for s, r in before.items())  # type: ignore[union-attr]
    bal.set_endpoints([_ep(n) for n in range(1, 6) if n != 3])
    after = {s: bal.pick(session_id=s).id for s in before}  # type: ignore[union-attr]
    moved = {s for s in before if before[s] != after[s]}
    assert moved == {s for s, r in before.items() if r == "r3"} and moved
    # A held (full) replica's sessions fall back for now, and return when it is usable again.
    victim = next(s for s, r in after.items() if r == "r1")
    bal.hold(bal.states()["r1"], 1.0)
    assert bal.pick(session_id=victim).id != "r1"  # type: ignore[union-attr]
    clock.now += 1.01
    assert bal.pick(session_id=victim).id == "r1"  # type: ignore[union-attr]


async def test_waiters_are_served_in_arrival_order_retries_first() -> None:
    clock = Clock()
    bal = _balancer(clock, max_in_flight_per_replica=1)
    bal.set_endpoints([_ep(1)])
    order: list[str] = []

    def no_replica() -> LlmError:
        return LlmError("none")

    first = await bal.acquire(arrival=clock.now, deadline=clock.now + 10, tried=set(), no_replica=no_replica)

    async def call(name: str, arrival: float) -> None:
        st = await bal.acquire(arrival=arrival, deadline=clock.now + 10, tried=set(), no_replica=no_replica)
        order.append(name)
        await asyncio.sleep(0)
        bal.release(st)

    newer = asyncio.create_task(call("new", clock.now + 1))
    await _settle()
    retry = asyncio.create_task(call("retry", clock.now - 5))  # first arrived earlier: goes first
    await _settle()
    assert order == []
    bal.release(first)
    await asyncio.wait_for(asyncio.gather(newer, retry), 2)
    assert order == ["retry", "new"]


async def test_waiting_times_out_at_the_deadline() -> None:
    bal = ReplicaBalancer(max_in_flight_per_replica=1, clock=lambda: asyncio.get_running_loop().time())
    bal.set_endpoints([_ep(1)])
    loop = asyncio.get_running_loop()
    await bal.acquire(
        arrival=loop.time(), deadline=loop.time() + 5, tried=set(), no_replica=lambda: LlmError("x")
    )
    with pytest.raises(LlmError, match="deadline") as info:
        await bal.acquire(
            arrival=loop.time(), deadline=loop.time() + 0.05, tried=set(), no_replica=lambda: LlmError("x")
        )
    assert info.value.timed_out


async def test_a_broken_probe_does_not_wedge_the_replica() -> None:
    clock, probes = Clock(), Probes()
    probes.answers["r1"] = RuntimeError("bug")
    bal = _balancer(clock, probes)
    bal.set_endpoints([_ep(1)])
    await _settle()
    assert not bal.states()["r1"].probing


def test_bad_options_are_named() -> None:
    with pytest.raises(ValueError, match="policy"):
        ReplicaBalancer(policy="roundrobin", clock=Clock())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_in_flight_per_replica"):
        ReplicaBalancer(max_in_flight_per_replica=0, clock=Clock())


async def test_all_replicas_dead_fails_after_a_short_wait_not_the_deadline() -> None:
    loop = asyncio.get_running_loop()
    bal = ReplicaBalancer(all_dead_wait_s=0.1, dead_reprobe_s=0.02, clock=loop.time)
    bal.set_endpoints([_ep(1), _ep(2)])
    for st in bal.states().values():
        bal.mark_dead(st)
    t0 = loop.time()
    with pytest.raises(LlmError, match="refused connections") as info:
        await bal.acquire(arrival=t0, deadline=t0 + 30, tried=set(), no_replica=lambda: LlmError("x"))
    assert not info.value.timed_out and loop.time() - t0 < 1.0
