"""The replica cache and choice of one model's client: which replica gets the next request.

This is the heart of the client-side gateway, kept free of I/O so that unit tests drive it with a
fake clock and fake probes:

* **Membership** comes from discovery and is *replaced whole* on each change (:meth:`set_endpoints`):
  replicas that vanished are pruned, ones whose address changed start afresh, new ones are probed
  in the background.
* **Load** per replica is this client's own in-flight count plus, while fresh, what the replica
  last reported about everybody else's requests (a probe of its queue: vLLM's
  ``num_requests_running + num_requests_waiting``). A report older than ``staleness_s`` is ignored
  and the replica re-probed in the background; the choice never waits for a probe.
* **Choice**: power of two random choices on that load (``policy="p2c"``), or uniform random
  (``"random"``, the baseline of the benchmark). Replicas a call already tried are avoided.
  Optional **session affinity**: rendezvous hashing of a session id over the live replicas keeps
  one conversation on one replica while it is usable, and moves only that session when it is not.
* **Failures**: a replica that refused the connection is *dead*: out of the choice at once,
  re-probed with backoff, back when a probe reaches it or discovery gives it a new address. One
  that was merely unavailable (timeout, broken connection) only loses its load report and is
  re-probed. One that rejected a request (429/503, or a 5xx) is *held* out of the choice until its
  ``Retry-After`` or a backoff passes, then re-probed.
* **Waiting**: when no replica can take a request (all held, dead, or at
  ``max_in_flight_per_replica``), the request waits in the client. Waiters are served in order of
  their *first* arrival, so a retried request goes ahead of newer ones.

A probe's deadline starts short and doubles after each probe that timed out (reset by a success).
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import itertools
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from agentmesh.discovery.base import Endpoint
from agentmesh.errors import LlmError
from agentmesh.llm_gateway.constants import (
    LLM_DEAD_REPROBE_S,
    LLM_ENDPOINT_WAIT_S,
    LLM_LOAD_STALENESS_S,
    LLM_PROBE_TIMEOUT_MAX_S,
    LLM_PROBE_TIMEOUT_S,
)

__all__ = [
    "Policy",
    "ProbeFailed",
    "ProbeResult",
    "ReplicaBalancer",
    "ReplicaGone",
    "ReplicaState",
]

log = logging.getLogger(__name__)

Policy = Literal["p2c", "random"]
_POLICIES = ("p2c", "random")
_DEAD_REPROBE_MAX_FACTOR = 8
_SAMPLE_TRIES = 4


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What a replica reports about its queue."""

    running: int
    waiting: int


class ProbeFailed(Exception):
    """A probe got no usable answer (timeout, broken connection, bad body): the replica is
    unavailable for now, not gone. ``timed_out`` doubles the next probe's deadline."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class ReplicaGone(ProbeFailed):
    """Nothing listens at the replica's address (connection refused): treat it as dead."""


ProbeFn = Callable[[Endpoint, float], Awaitable[ProbeResult]]


@dataclass(slots=True, eq=False)
class ReplicaState:
    """What one client knows about one replica."""

    endpoint: Endpoint
    in_flight: int = 0
    """Requests this client has outstanding on the replica."""
    reported: ProbeResult | None = None
    reported_at: float = 0.0
    in_flight_at_report: int = 0
    """This client's in-flight count when the report was taken (the report includes them)."""
    held_until: float = 0.0
    """Out of the choice until then (rejected or failing)."""
    dead: bool = False
    dead_reprobe_at: float = 0.0
    dead_reprobe_s: float = 0.0
    probing: bool = False
    probe_timeout_s: float = LLM_PROBE_TIMEOUT_S
    completed: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_failure_at: float | None = None

    @property
    def id(self) -> str:
        return self.endpoint.id

    def load(self, now: float, staleness_s: float) -> int:
        """This client's in-flight requests plus, while the last report is fresh, everyone else's."""
        if self.reported is not None and now - self.reported_at <= staleness_s:
            others = self.reported.running + self.reported.waiting - self.in_flight_at_report
            return self.in_flight + max(0, others)
        return self.in_flight


@dataclass(slots=True, eq=False)
class _Waiter:
    arrival: float
    seq: int
    event: asyncio.Event

    def __lt__(self, other: _Waiter) -> bool:
        return (self.arrival, self.seq) < (other.arrival, other.seq)


class ReplicaBalancer:
    """Replica states of one model and the choice among them. One event loop, no locks."""

    def __init__(
        self,
        *,
        policy: Policy = "p2c",
        max_in_flight_per_replica: int | None = None,
        staleness_s: float = LLM_LOAD_STALENESS_S,
        probe_timeout_s: float = LLM_PROBE_TIMEOUT_S,
        probe_timeout_max_s: float = LLM_PROBE_TIMEOUT_MAX_S,
        dead_reprobe_s: float = LLM_DEAD_REPROBE_S,
        all_dead_wait_s: float = LLM_ENDPOINT_WAIT_S,
        probe: ProbeFn | None = None,
        can_probe: Callable[[Endpoint], bool] = lambda ep: True,
        rng: random.Random | None = None,
        clock: Callable[[], float],
    ) -> None:
        if policy not in _POLICIES:
            raise ValueError(f"policy: expected one of {list(_POLICIES)}, got {policy!r}")
        if max_in_flight_per_replica is not None and max_in_flight_per_replica < 1:
            raise ValueError(
                f"max_in_flight_per_replica: expected >= 1 or None, got {max_in_flight_per_replica}"
            )
        self.policy: Policy = policy
        self.max_in_flight_per_replica = max_in_flight_per_replica
        self.staleness_s = staleness_s
        self.probe_timeout_s = probe_timeout_s
        self.probe_timeout_max_s = probe_timeout_max_s
        self.dead_reprobe_s = dead_reprobe_s
        self.all_dead_wait_s = all_dead_wait_s
        self._probe = probe
        self._can_probe = can_probe
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self._states: dict[str, ReplicaState] = {}
        self._order: list[ReplicaState] = []
        self._dead_count = 0
        self._waiters: list[_Waiter] = []
        self._seq = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- membership ------------------------------------------------------------------------------

    def set_endpoints(self, eps: Iterable[Endpoint]) -> None:
        """Replace the membership with ``eps``: keep the state of replicas still there at the same
        address, drop the rest, probe the new ones in the background."""
        new: dict[str, ReplicaState] = {}
        fresh: list[ReplicaState] = []
        for ep in eps:
            old = self._states.get(ep.id)
            if old is not None and old.endpoint.address == ep.address:
                old.endpoint = ep
                new[ep.id] = old
            else:
                st = ReplicaState(ep, probe_timeout_s=self.probe_timeout_s)
                new[ep.id] = st
                fresh.append(st)
        self._states = new
        self._order = list(new.values())
        self._dead_count = sum(st.dead for st in self._order)
        for st in fresh:
            self._schedule_probe(st, force=True)
        self._wake_head()

    def states(self) -> dict[str, ReplicaState]:
        return dict(self._states)

    def __len__(self) -> int:
        return len(self._states)

    # -- choice ----------------------------------------------------------------------------------

    def _usable(self, st: ReplicaState, now: float) -> bool:
        if st.dead or st.held_until > now:
            return False
        cap = self.max_in_flight_per_replica
        return cap is None or st.in_flight < cap

    def pick(
        self, tried: Sequence[str] | set[str] = (), session_id: str | None = None
    ) -> ReplicaState | None:
        """The replica for the next request, or None when none can take it now. Does not count it
        as in flight (see :meth:`acquire`)."""
        now = self._clock()
        if self._dead_count:
            self._reprobe_due(now)
        if session_id is None and not tried:
            fast = self._pick_sampled(now)
            if fast is not None:
                return fast
        usable = [st for st in self._order if self._usable(st, now)]
        if not usable:
            return None
        if session_id is not None and not tried:
            # Rendezvous over the live replicas: while the top one is usable, the session stays.
            live = [st for st in self._order if not st.dead]
            top = max(live, key=lambda st: _affinity(session_id, st.id))
            if self._usable(top, now):
                return top
        candidates = [st for st in usable if st.id not in tried] or usable
        if len(candidates) == 1:
            chosen = candidates[0]
            self._schedule_probe(chosen)
            return chosen
        if self.policy == "random":
            return self._rng.choice(candidates)
        a, b = self._rng.sample(candidates, 2)
        self._schedule_probe(a)
        self._schedule_probe(b)
        return b if b.load(now, self.staleness_s) < a.load(now, self.staleness_s) else a

    def _pick_sampled(self, now: float) -> ReplicaState | None:
        """The common case in O(1): draw two distinct replicas (one for ``random``) until the draw
        is usable; None after a few draws (then :meth:`pick` scans every replica)."""
        order = self._order
        n = len(order)
        if n < 2:
            return None
        rand = self._rng.randrange
        for _ in range(_SAMPLE_TRIES):
            i = rand(n)
            a = order[i]
            if self.policy == "random":
                if self._usable(a, now):
                    return a
                continue
            j = rand(n - 1)
            b = order[j + 1 if j >= i else j]
            ua, ub = self._usable(a, now), self._usable(b, now)
            if ua and ub:
                self._schedule_probe(a)
                self._schedule_probe(b)
                return b if b.load(now, self.staleness_s) < a.load(now, self.staleness_s) else a
            if ua or ub:  # one of the two cannot take it: the other wins the pair
                chosen = a if ua else b
                self._schedule_probe(chosen)
                return chosen
        return None

    async def acquire(
        self,
        *,
        arrival: float,
        deadline: float,
        tried: set[str],
        session_id: str | None = None,
        no_replica: Callable[[], LlmError],
    ) -> ReplicaState:
        """Choose a replica and count the request in flight on it, waiting (in order of
        ``arrival``) while none can take it. Raises ``no_replica()`` when the membership is empty,
        an :class:`LlmError` when every replica has refused connections for ``all_dead_wait_s``,
        and one with ``timed_out`` when ``deadline`` passes while waiting."""
        if not self._waiters:
            st = self.pick(tried, session_id)
            if st is not None:
                st.in_flight += 1
                return st
        waiter = _Waiter(arrival, next(self._seq), asyncio.Event())
        heapq.heappush(self._waiters, waiter)
        all_dead_since: float | None = None
        try:
            while True:
                if not self._states:
                    raise no_replica()
                if self._waiters[0] is waiter:
                    st = self.pick(tried, session_id)
                    if st is not None:
                        heapq.heappop(self._waiters)
                        st.in_flight += 1
                        self._wake_head()
                        return st
                now = self._clock()
                if all(st.dead for st in self._order):
                    # Every replica refuses connections: wait a while for one to come back (a
                    # restart re-registers within seconds), not for the whole deadline.
                    if all_dead_since is None:
                        all_dead_since = now
                    elif now - all_dead_since >= self.all_dead_wait_s:
                        raise LlmError(
                            f"all {len(self)} replicas refused connections for {self.all_dead_wait_s:g}s"
                        )
                else:
                    all_dead_since = None
                if now >= deadline:
                    err = LlmError(
                        f"no replica could take the request within its deadline ({len(self)} known)"
                    )
                    err.timed_out = True
                    raise err
                waiter.event.clear()
                wake_at = min(deadline, self._next_change(now))
                try:
                    await asyncio.wait_for(waiter.event.wait(), timeout=max(0.0, wake_at - now))
                except TimeoutError:
                    pass
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                heapq.heapify(self._waiters)
                self._wake_head()

    def release(self, st: ReplicaState) -> None:
        """The request counted by :meth:`acquire` on ``st`` is over."""
        st.in_flight = max(0, st.in_flight - 1)
        self._wake_head()

    def _wake_head(self) -> None:
        if self._waiters:
            self._waiters[0].event.set()

    def _next_change(self, now: float) -> float:
        """When a held or dead replica may become usable again (or in 1 s, for safety)."""
        t = now + 1.0
        for st in self._order:
            if st.held_until > now:
                t = min(t, st.held_until)
            if st.dead:
                t = min(t, max(now + 0.001, st.dead_reprobe_at))
        return t

    # -- outcomes --------------------------------------------------------------------------------

    def succeeded(self, st: ReplicaState) -> None:
        st.completed += 1
        st.consecutive_failures = 0

    def _failed(self, st: ReplicaState) -> None:
        st.failures += 1
        st.consecutive_failures += 1
        st.last_failure_at = self._clock()

    def mark_dead(self, st: ReplicaState) -> None:
        """Nothing listens at the replica: out of the choice until a probe reaches it again."""
        self._failed(st)
        if st.id not in self._states or st.dead:
            return
        st.dead = True
        self._dead_count += 1
        st.reported = None
        st.dead_reprobe_s = self.dead_reprobe_s
        st.dead_reprobe_at = self._clock() + st.dead_reprobe_s

    def mark_unavailable(self, st: ReplicaState, *, hold_s: float = 0.0) -> None:
        """Timed out or broke the connection: forget its load report and probe it again now;
        out of the choice for ``hold_s`` (a backoff) meanwhile."""
        self._failed(st)
        st.held_until = max(st.held_until, self._clock() + hold_s)
        st.reported = None
        self._schedule_probe(st, force=True)

    def hold(self, st: ReplicaState, seconds: float) -> None:
        """Rejected (or failing): out of the choice for ``seconds`` (its ``Retry-After``, or a backoff)."""
        self._failed(st)
        st.held_until = max(st.held_until, self._clock() + seconds)
        st.reported = None  # re-probed when the hold ends and it is a candidate again

    # -- probing ---------------------------------------------------------------------------------

    def _reprobe_due(self, now: float) -> None:
        for st in self._order:
            if st.dead and now >= st.dead_reprobe_at:
                self._schedule_probe(st, force=True)

    def _schedule_probe(self, st: ReplicaState, *, force: bool = False) -> None:
        if self._probe is None or st.probing or not self._can_probe(st.endpoint):
            return
        now = self._clock()
        if st.dead and now < st.dead_reprobe_at:
            return
        if not force and st.reported is not None and now - st.reported_at <= self.staleness_s:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        st.probing = True
        task = loop.create_task(self._run_probe(st), name=f"llm-probe:{st.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_probe(self, st: ReplicaState) -> None:
        assert self._probe is not None
        try:
            result = await self._probe(st.endpoint, st.probe_timeout_s)
        except ReplicaGone:
            st.probing = False
            if self._states.get(st.id) is st:
                if not st.dead:
                    st.dead = True
                    self._dead_count += 1
                    st.dead_reprobe_s = self.dead_reprobe_s
                else:
                    st.dead_reprobe_s = min(
                        st.dead_reprobe_s * 2, self.dead_reprobe_s * _DEAD_REPROBE_MAX_FACTOR
                    )
                st.reported = None
                st.dead_reprobe_at = self._clock() + st.dead_reprobe_s
            return
        except ProbeFailed as exc:
            st.probing = False
            st.reported = None
            if exc.timed_out:
                st.probe_timeout_s = min(st.probe_timeout_s * 2, self.probe_timeout_max_s)
            if st.dead:
                st.dead_reprobe_at = self._clock() + st.dead_reprobe_s
            return
        except asyncio.CancelledError:
            st.probing = False
            raise
        except Exception as exc:  # a bug in a probe must not leave the replica "probing" forever
            st.probing = False
            st.reported = None
            log.warning("load probe of replica %s failed: %r", st.id, exc)
            return
        st.probing = False
        st.probe_timeout_s = self.probe_timeout_s
        st.reported = result
        st.reported_at = self._clock()
        st.in_flight_at_report = st.in_flight
        if st.dead:
            st.dead = False  # it answers again (a restart at the same address)
            if self._states.get(st.id) is st:
                self._dead_count -= 1
        self._wake_head()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()


def _affinity(session_id: str, replica_id: str) -> bytes:
    return hashlib.blake2b(f"{session_id}|{replica_id}".encode(), digest_size=8).digest()
