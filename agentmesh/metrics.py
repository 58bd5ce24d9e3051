"""Prometheus metrics of a run: the driver's task counters, each replica's queue and steps, the LLM
calls, the sandboxes; and the one ``/metrics`` endpoint each process serves.

Everything goes into one process-wide :class:`~prometheus_client.CollectorRegistry`,
:data:`REGISTRY` (tests pass their own). The metric names and labels below are a contract: the
Grafana dashboard (``deploy/grafana/``), ``agentmesh status`` and the Prometheus test depend on
them exactly.

======================================================  =========  ==================================
name                                                    type       labels
======================================================  =========  ==================================
``agentmesh_tasks_admitted_total``                      counter    run
``agentmesh_tasks_in_flight``                           gauge      run
``agentmesh_tasks_done_total``                          counter    run (finished ok)
``agentmesh_tasks_failed_total``                        counter    run, code
``agentmesh_inbox_tasks``                               gauge      run, role, replica
``agentmesh_steps_in_progress``                         gauge      run, role, replica
``agentmesh_steps_total``                               counter    run, role, replica, outcome
``agentmesh_step_retries_total``                        counter    run, role, replica
``agentmesh_step_duration_seconds``                     histogram  run, role, replica
``agentmesh_queue_wait_seconds``                        histogram  run, role, replica
``agentmesh_hop_duration_seconds``                      histogram  run, from_role, to_role
``agentmesh_hop_errors_total``                          counter    run, from_role, to_role
``agentmesh_role_tokens_total``                         counter    run, role, replica, kind
``agentmesh_llm_requests_total``                        counter    model, replica
``agentmesh_llm_errors_total``                          counter    model, replica, kind
``agentmesh_llm_tokens_total``                          counter    model, replica, kind
``agentmesh_llm_latency_seconds``                       histogram  model, replica
``agentmesh_llm_ttft_seconds``                          histogram  model, replica
``agentmesh_llm_calls_failed_total``                    counter    model
``agentmesh_sandbox_pool``                              gauge      pool, state
``agentmesh_sandbox_acquire_seconds``                   histogram  pool
``agentmesh_sandbox_leases_expired_total``              counter    (none)
``agentmesh_sandbox_exec_seconds``                      histogram  backend
======================================================  =========  ==================================

``outcome`` is ``ok|failed``; ``kind`` is ``prompt|completion`` for tokens and one of
:data:`~agentmesh.llm_gateway.accounting.ERROR_KINDS` for LLM errors; ``state`` is
``warm|leased|creating``. The LLM families come from the process's
:class:`~agentmesh.llm_gateway.accounting.LlmAccounting` objects (:func:`register_llm_accounting`),
read at scrape time, so the accounting stays the one place LLM calls are counted.

Prometheus finds the endpoints through discovery: :func:`serve_metrics` registers each under
:data:`METRICS_SERVICE` with its ``job`` and labels as metadata, and ``agentmesh metrics sd``
(:mod:`agentmesh.metrics_cli`) turns that into a file_sd / http_sd target list. The series carry
``run``/``role``/``replica`` themselves, so the Prometheus config scrapes with ``honor_labels: true``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from agentmesh.discovery.base import Discovery, Endpoint, Registration

if TYPE_CHECKING:
    from agentmesh.llm_gateway.accounting import LlmAccounting

__all__ = [
    "DURATION_BUCKETS_S",
    "METRICS_SERVICE",
    "METRIC_NAMES",
    "REGISTRY",
    "LlmSnapshotCollector",
    "MetricsEndpoint",
    "ReplicaMetrics",
    "RunMetrics",
    "SandboxMetrics",
    "register_llm_accounting",
    "serve_metrics",
    "unregister_llm_accounting",
]

log = logging.getLogger(__name__)

METRICS_SERVICE = "agentmesh-metrics"
"""The discovery service under which every ``/metrics`` endpoint is registered."""

# Counters' and histograms' ``*_created`` series would double the series count of every scrape and
# nothing here reads them. (A process-wide switch of prometheus_client; agentmesh owns its processes.)
disable_created_metrics()

REGISTRY = CollectorRegistry(auto_describe=True)
"""The process-wide registry every agentmesh metric lives in."""

DURATION_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
"""Bucket bounds (seconds) of the step, queue-wait, hop and sandbox histograms: a local hop or a
warm acquire takes a millisecond, an LLM step on a CPU model a minute."""

METRIC_NAMES: frozenset[str] = frozenset(
    {
        "agentmesh_tasks_admitted_total",
        "agentmesh_tasks_in_flight",
        "agentmesh_tasks_done_total",
        "agentmesh_tasks_failed_total",
        "agentmesh_inbox_tasks",
        "agentmesh_steps_in_progress",
        "agentmesh_steps_total",
        "agentmesh_step_retries_total",
        "agentmesh_step_duration_seconds",
        "agentmesh_queue_wait_seconds",
        "agentmesh_hop_duration_seconds",
        "agentmesh_hop_errors_total",
        "agentmesh_role_tokens_total",
        "agentmesh_llm_requests_total",
        "agentmesh_llm_errors_total",
        "agentmesh_llm_tokens_total",
        "agentmesh_llm_latency_seconds",
        "agentmesh_llm_ttft_seconds",
        "agentmesh_llm_calls_failed_total",
        "agentmesh_sandbox_pool",
        "agentmesh_sandbox_acquire_seconds",
        "agentmesh_sandbox_leases_expired_total",
        "agentmesh_sandbox_exec_seconds",
    }
)
"""Every metric family name this module defines (histograms without their ``_bucket`` etc.)."""

_REPLICA = ("run", "role", "replica")
_HOP = ("run", "from_role", "to_role")


# -- the families of one registry -----------------------------------------------------------------


class _ReplicaGauges(Collector):
    """Inbox length and steps in progress, read from each live replica's callables at scrape."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.replicas: dict[int, ReplicaMetrics] = {}

    def add(self, rm: ReplicaMetrics) -> None:
        with self._lock:
            self.replicas[id(rm)] = rm

    def discard(self, rm: ReplicaMetrics) -> None:
        with self._lock:
            self.replicas.pop(id(rm), None)

    def collect(self) -> Iterator[Metric]:
        inbox = GaugeMetricFamily(
            "agentmesh_inbox_tasks", "Tasks waiting in a replica's inbox.", labels=list(_REPLICA)
        )
        busy = GaugeMetricFamily(
            "agentmesh_steps_in_progress", "Steps a replica is running now.", labels=list(_REPLICA)
        )
        with self._lock:
            replicas = list(self.replicas.values())
        for rm in replicas:
            labels = [rm.run_id, rm.role, rm.replica_id]
            # A callable that raises (its replica is shutting down) must not break the scrape.
            for fam, fn in ((inbox, rm._queued), (busy, rm._in_progress)):
                try:
                    fam.add_metric(labels, float(fn()))
                except Exception:  # a scrape reports what it can
                    log.debug("metrics: gauge of replica %s failed", rm.replica_id, exc_info=True)
        yield inbox
        yield busy

    def describe(self) -> Iterator[Metric]:
        # Names only, so that the registry refuses a second collector claiming them.
        yield GaugeMetricFamily("agentmesh_inbox_tasks", "", labels=list(_REPLICA))
        yield GaugeMetricFamily("agentmesh_steps_in_progress", "", labels=list(_REPLICA))


class LlmSnapshotCollector(Collector):
    """The ``agentmesh_llm_*`` families from accounting snapshots (see ``accounting.py``).

    ``snapshots`` returns the snapshots to expose; those naming the same (model, replica) are
    added up (several LLM clients in one process share the labels).
    """

    def __init__(self, snapshots: Callable[[], Iterable[Mapping[str, Any]]]) -> None:
        self._snapshots = snapshots

    def collect(self) -> Iterator[Metric]:
        from agentmesh.llm_gateway.accounting import LATENCY_BUCKETS_S, merge_snapshots

        snap = merge_snapshots(self._snapshots())
        ml = ["model", "replica"]
        requests = CounterMetricFamily(
            "agentmesh_llm_requests", "LLM request attempts per model and replica.", labels=ml
        )
        errors = CounterMetricFamily(
            "agentmesh_llm_errors", "Failed LLM attempts per model, replica and kind.", labels=[*ml, "kind"]
        )
        tokens = CounterMetricFamily(
            "agentmesh_llm_tokens",
            "LLM tokens per model, replica and kind (prompt|completion).",
            labels=[*ml, "kind"],
        )
        latency = HistogramMetricFamily(
            "agentmesh_llm_latency_seconds", "Latency of answered LLM attempts.", labels=ml
        )
        ttft = HistogramMetricFamily(
            "agentmesh_llm_ttft_seconds", "Time to first token of streamed LLM attempts.", labels=ml
        )
        failed = CounterMetricFamily(
            "agentmesh_llm_calls_failed",
            "LLM calls that gave up (every attempt failed), per model.",
            labels=["model"],
        )
        bounds = [*(_le(b) for b in LATENCY_BUCKETS_S), "+Inf"]
        for r in snap["replicas"]:
            lv = [r["model"], r["replica"]]
            requests.add_metric(lv, r["requests"])
            for kind, n in sorted(r["errors"].items()):
                errors.add_metric([*lv, kind], n)
            tokens.add_metric([*lv, "prompt"], r["prompt_tokens"])
            tokens.add_metric([*lv, "completion"], r["completion_tokens"])
            for fam, key in ((latency, "latency_s"), (ttft, "ttft_s")):
                h = r[key]
                cum = list(itertools.accumulate(h["buckets"]))
                fam.add_metric(lv, list(zip(bounds, cum, strict=True)), h["sum"])
        for model, n in sorted(snap["calls_failed"].items()):
            failed.add_metric([model], n)
        yield from (requests, errors, tokens, latency, ttft, failed)

    def describe(self) -> Iterator[Metric]:
        return iter(())


def _le(bound: float) -> str:
    return repr(float(bound))


class _LlmAccountings:
    """The accountings registered in one registry (weakly held: a dropped client drops out)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.items: weakref.WeakSet[LlmAccounting] = weakref.WeakSet()

    def snapshots(self) -> list[dict[str, Any]]:
        with self._lock:
            accs = list(self.items)
        return [a.snapshot() for a in accs]


class _Families:
    """The metric objects of one registry, made on first use."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        b = DURATION_BUCKETS_S
        self.admitted = Counter(
            "agentmesh_tasks_admitted", "Tasks admitted into the run.", ["run"], registry=r
        )
        self.in_flight = Gauge(
            "agentmesh_tasks_in_flight", "Tasks admitted and not yet at the sink.", ["run"], registry=r
        )
        self.done = Counter("agentmesh_tasks_done", "Tasks that reached the sink done.", ["run"], registry=r)
        self.failed = Counter(
            "agentmesh_tasks_failed",
            "Tasks that reached the sink failed, by error code.",
            ["run", "code"],
            registry=r,
        )
        self.replica_gauges = _ReplicaGauges()
        r.register(self.replica_gauges)
        self.steps = Counter(
            "agentmesh_steps", "Steps finished, by outcome (ok|failed).", [*_REPLICA, "outcome"], registry=r
        )
        self.retries = Counter("agentmesh_step_retries", "Steps retried.", list(_REPLICA), registry=r)
        self.step_s = Histogram(
            "agentmesh_step_duration_seconds", "Duration of a step.", list(_REPLICA), buckets=b, registry=r
        )
        self.queue_s = Histogram(
            "agentmesh_queue_wait_seconds",
            "Time a task waited in a replica's inbox before its step began.",
            list(_REPLICA),
            buckets=b,
            registry=r,
        )
        self.hop_s = Histogram(
            "agentmesh_hop_duration_seconds",
            "Time to hand a task to the next role (failed hands included).",
            list(_HOP),
            buckets=b,
            registry=r,
        )
        self.hop_errors = Counter(
            "agentmesh_hop_errors", "Hands to the next role that failed.", list(_HOP), registry=r
        )
        self.tokens = Counter(
            "agentmesh_role_tokens",
            "LLM tokens spent by a role's steps, by kind (prompt|completion).",
            [*_REPLICA, "kind"],
            registry=r,
        )
        self.llm = _LlmAccountings()
        r.register(LlmSnapshotCollector(self.llm.snapshots))
        self.sandbox_pool = _SandboxPoolGauge()
        r.register(self.sandbox_pool)
        self.acquire_s = Histogram(
            "agentmesh_sandbox_acquire_seconds",
            "Time to acquire a sandbox lease, per pool.",
            ["pool"],
            buckets=b,
            registry=r,
        )
        self.leases_expired = Counter(
            "agentmesh_sandbox_leases_expired", "Sandbox leases that ran out unreturned.", registry=r
        )
        self.exec_s = Histogram(
            "agentmesh_sandbox_exec_seconds",
            "Duration of a command run in a sandbox, per backend.",
            ["backend"],
            buckets=b,
            registry=r,
        )
        # Hop series are per (run, from_role, to_role), shared by the replicas of a role in this
        # process: the last replica to close removes them.
        self.hop_users: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()


_FAMILIES: weakref.WeakKeyDictionary[CollectorRegistry, _Families] = weakref.WeakKeyDictionary()
_FAMILIES_LOCK = threading.Lock()


def _families(registry: CollectorRegistry) -> _Families:
    with _FAMILIES_LOCK:
        fam = _FAMILIES.get(registry)
        if fam is None:
            fam = _FAMILIES[registry] = _Families(registry)
        return fam


# -- the run (driver) ------------------------------------------------------------------------------


class RunMetrics:
    """The driver's counters of one run: tasks admitted, in flight, done, failed by code."""

    def __init__(self, run_id: str, *, registry: CollectorRegistry = REGISTRY) -> None:
        if not run_id:
            raise ValueError("RunMetrics: run_id must not be empty")
        self.run_id = run_id
        self._f = _families(registry)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._admitted = self._f.admitted.labels(run_id)
        self._done = self._f.done.labels(run_id)
        # Touch the series so that a query sees 0 (not "no data") before the first task ends.
        self._f.in_flight.labels(run_id).set_function(self._in_flight_now)

    def _in_flight_now(self) -> float:
        # A resumed run finishes tasks another process admitted: never report below zero.
        return float(max(0, self._in_flight))

    def admitted(self, n: int = 1) -> None:
        """``n`` tasks entered the run."""
        if n < 0:
            raise ValueError(f"RunMetrics.admitted: n must be >= 0, got {n}")
        self._admitted.inc(n)
        with self._lock:
            self._in_flight += n

    def finished(self, *, ok: bool, code: str = "") -> None:
        """A task reached the sink: done (``ok``) or failed with error ``code`` ("unknown" if empty)."""
        if ok:
            self._done.inc()
        else:
            self._f.failed.labels(self.run_id, code or "unknown").inc()
        with self._lock:
            self._in_flight -= 1

    def close(self) -> None:
        """Remove this run's series (a process that runs many runs one after another)."""
        f = self._f
        for fam in (f.admitted, f.done, f.in_flight):
            _remove(fam, (self.run_id,))
        for labels in _label_sets(f.failed):
            if labels[0] == self.run_id:
                _remove(f.failed, labels)


# -- one replica -----------------------------------------------------------------------------------


class ReplicaMetrics:
    """One agent replica's series; the inbox and in-progress gauges call ``queued``/``in_progress``
    when scraped (from the exposition server's thread: they must only read)."""

    def __init__(
        self,
        run_id: str,
        role: str,
        replica_id: str,
        *,
        queued: Callable[[], int],
        in_progress: Callable[[], int],
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        for name, value in (("run_id", run_id), ("role", role), ("replica_id", replica_id)):
            if not value:
                raise ValueError(f"ReplicaMetrics: {name} must not be empty")
        self.run_id, self.role, self.replica_id = run_id, role, replica_id
        self._queued, self._in_progress = queued, in_progress
        self._f = f = _families(registry)
        lv = (run_id, role, replica_id)
        self._ok = f.steps.labels(*lv, "ok")
        self._failed = f.steps.labels(*lv, "failed")
        self._retries = f.retries.labels(*lv)
        self._step_s = f.step_s.labels(*lv)
        self._queue_s = f.queue_s.labels(*lv)
        self._prompt = f.tokens.labels(*lv, "prompt")
        self._completion = f.tokens.labels(*lv, "completion")
        self._hops: set[str] = set()
        self._closed = False
        with f.lock:
            key = (run_id, role)
            f.hop_users[key] = f.hop_users.get(key, 0) + 1
        f.replica_gauges.add(self)

    def step_done(self, seconds: float, *, ok: bool) -> None:
        """A step ended after ``seconds``: ok, or failed (after its retries)."""
        (self._ok if ok else self._failed).inc()
        self._step_s.observe(seconds)

    def step_retried(self) -> None:
        self._retries.inc()

    def queue_wait(self, seconds: float) -> None:
        """A task waited ``seconds`` in the inbox before its step began."""
        self._queue_s.observe(seconds)

    def hop(self, to_role: str, seconds: float, *, ok: bool) -> None:
        """Handing a task to ``to_role`` took ``seconds`` and succeeded or not."""
        self._hops.add(to_role)
        lv = (self.run_id, self.role, to_role)
        self._f.hop_s.labels(*lv).observe(seconds)
        if not ok:
            self._f.hop_errors.labels(*lv).inc()

    def tokens(self, prompt: int, completion: int) -> None:
        """Tokens one step's LLM calls spent."""
        self._prompt.inc(prompt)
        self._completion.inc(completion)

    def close(self) -> None:
        """Remove this replica's label sets (and the role's hop series if it was the last one here)."""
        if self._closed:
            return
        self._closed = True
        f = self._f
        f.replica_gauges.discard(self)
        lv = (self.run_id, self.role, self.replica_id)
        for fam in (f.retries, f.step_s, f.queue_s):
            _remove(fam, lv)
        for outcome in ("ok", "failed"):
            _remove(f.steps, (*lv, outcome))
        for kind in ("prompt", "completion"):
            _remove(f.tokens, (*lv, kind))
        with f.lock:
            key = (self.run_id, self.role)
            left = f.hop_users.get(key, 1) - 1
            if left > 0:
                f.hop_users[key] = left
                return
            f.hop_users.pop(key, None)
        for fam in (f.hop_s, f.hop_errors):
            for labels in _label_sets(fam):
                if labels[:2] == key:
                    _remove(fam, labels)


def _label_sets(fam: Counter | Gauge | Histogram) -> list[tuple[str, ...]]:
    # prometheus_client has no public listing of a family's children; its _metrics dict is stable.
    with fam._lock:
        return [tuple(k) for k in fam._metrics]


def _remove(fam: Counter | Gauge | Histogram, labels: tuple[str, ...]) -> None:
    try:
        fam.remove(*labels)
    except KeyError:
        pass


# -- LLM accounting ---------------------------------------------------------------------------------


def register_llm_accounting(acc: LlmAccounting, *, registry: CollectorRegistry = REGISTRY) -> None:
    """Expose ``acc`` as ``agentmesh_llm_*`` in ``registry`` (held weakly; idempotent)."""
    llm = _families(registry).llm
    with llm._lock:
        llm.items.add(acc)


def unregister_llm_accounting(acc: LlmAccounting, *, registry: CollectorRegistry = REGISTRY) -> None:
    llm = _families(registry).llm
    with llm._lock:
        llm.items.discard(acc)


# -- sandboxes ----------------------------------------------------------------------------------------


class _SandboxPoolGauge(Collector):
    """``agentmesh_sandbox_pool{pool,state}`` from the registered pool readers, at scrape."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.readers: dict[int, Callable[[], Mapping[tuple[str, str], int]]] = {}

    def collect(self) -> Iterator[Metric]:
        fam = GaugeMetricFamily(
            "agentmesh_sandbox_pool",
            "Sandboxes per pool and state (warm|leased|creating).",
            labels=["pool", "state"],
        )
        with self._lock:
            readers = list(self.readers.values())
        totals: dict[tuple[str, str], int] = {}
        for read in readers:
            try:
                for key, n in read().items():
                    totals[key] = totals.get(key, 0) + n
            except Exception:  # a scrape reports what it can
                log.debug("metrics: sandbox pool reader failed", exc_info=True)
        for (pool, state), n in sorted(totals.items()):
            fam.add_metric([pool, state], float(n))
        yield fam

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("agentmesh_sandbox_pool", "", labels=["pool", "state"])


class SandboxMetrics:
    """The sandbox series of one process: the registry's pools and acquires, a holder's execs.

    ``pools`` (optional) returns ``{(pool, state): count}`` when scraped (state
    ``warm|leased|creating``); it must only read.
    """

    STATES = ("warm", "leased", "creating")

    def __init__(
        self,
        *,
        pools: Callable[[], Mapping[tuple[str, str], int]] | None = None,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self._f = _families(registry)
        self._pools = pools
        if pools is not None:
            with self._f.sandbox_pool._lock:
                self._f.sandbox_pool.readers[id(self)] = pools

    def acquired(self, pool: str, seconds: float) -> None:
        """A lease on ``pool`` was granted ``seconds`` after it was asked for."""
        self._f.acquire_s.labels(pool).observe(seconds)

    def leases_expired(self, n: int = 1) -> None:
        self._f.leases_expired.inc(n)

    def exec_done(self, backend: str, seconds: float) -> None:
        """A command ran ``seconds`` in a sandbox of ``backend``."""
        self._f.exec_s.labels(backend).observe(seconds)

    def close(self) -> None:
        with self._f.sandbox_pool._lock:
            self._f.sandbox_pool.readers.pop(id(self), None)


# -- the exposition endpoint ----------------------------------------------------------------------------


@dataclass
class _Server:
    registry: CollectorRegistry
    httpd: Any
    thread: threading.Thread
    address: str
    handles: int = 0
    # (job, sorted labels) -> [registration, users]
    registrations: dict[tuple[str, tuple[tuple[str, str], ...]], list[Any]] = field(default_factory=dict)


_SERVER: _Server | None = None
_SERVER_LOCK = threading.Lock()  # held briefly, never across an await
_ENDPOINT_IDS = itertools.count(1)


class MetricsEndpoint:
    """A handle on the process's ``/metrics`` server; :meth:`close` withdraws this handle's
    discovery entry, and the last handle closed stops the server."""

    def __init__(self, server: _Server, key: tuple[str, tuple[tuple[str, str], ...]] | None) -> None:
        self._server = server
        self._key = key
        self._closed = False
        self.address: str = server.address
        self.url: str = f"http://{server.address}/metrics"

    async def close(self) -> None:
        global _SERVER
        if self._closed:
            return
        self._closed = True
        srv = self._server
        registration: Registration | None = None
        stop = False
        with _SERVER_LOCK:
            if self._key is not None:
                entry = srv.registrations.get(self._key)
                if entry is not None:
                    entry[1] -= 1
                    if entry[1] <= 0:
                        registration = entry[0]
                        del srv.registrations[self._key]
            srv.handles -= 1
            if srv.handles <= 0:
                stop = True
                if _SERVER is srv:
                    _SERVER = None
        if registration is not None:  # None: still being registered (serve_metrics closes it)
            try:
                await registration.close()
            except Exception:  # its lease runs out anyway
                log.warning("metrics: withdrawing %s failed", registration.endpoint.id, exc_info=True)
        if stop:
            await asyncio.to_thread(_stop_httpd, srv.httpd)

    def __repr__(self) -> str:
        return f"MetricsEndpoint({self.url})"


def _stop_httpd(httpd: Any) -> None:
    httpd.shutdown()
    httpd.server_close()


def _advertised(host: str, port: int) -> str:
    if host in ("", "0.0.0.0", "::"):
        # A wildcard bind is reachable at the machine's address; Prometheus needs one to dial.
        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


async def serve_metrics(
    *,
    job: str,
    labels: Mapping[str, str],
    discovery: Discovery | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    ttl_s: float = 5.0,
    registry: CollectorRegistry = REGISTRY,
) -> MetricsEndpoint:
    """Serve ``registry`` at ``http://host:port/metrics`` (a thread; port 0 picks a free one) and
    register it in ``discovery`` under :data:`METRICS_SERVICE` with metadata ``{"job": job, **labels}``.

    One server per process: a later call returns a handle on the same server (its ``host``, ``port``
    and ``registry`` are those of the first call) and registers another discovery entry only if
    ``job``/``labels`` differ from an open one's.
    """
    global _SERVER
    if not job:
        raise ValueError("serve_metrics: job must not be empty")
    meta = {str(k): str(v) for k, v in labels.items()}
    if "job" in meta:
        raise ValueError("serve_metrics: labels must not contain 'job' (pass it as job=)")
    with _SERVER_LOCK:
        srv = _SERVER
        if srv is None:
            try:
                httpd, thread = start_http_server(port, addr=host, registry=registry)
            except OSError as e:
                raise OSError(f"serve_metrics: cannot listen on {host}:{port}: {e}") from e
            srv = _SERVER = _Server(registry, httpd, thread, _advertised(host, httpd.server_port))
        srv.handles += 1
        key = (job, tuple(sorted(meta.items()))) if discovery is not None else None
        entry = srv.registrations.get(key) if key is not None else None
        if entry is not None:
            entry[1] += 1
        elif key is not None:
            # Claimed before the await below, so that a concurrent call with the same labels
            # shares this entry instead of registering a second one.
            srv.registrations[key] = [None, 1]
    handle = MetricsEndpoint(srv, key)
    if discovery is None or entry is not None:
        return handle
    assert key is not None
    ep = Endpoint(
        METRICS_SERVICE,
        f"{job}-{socket.gethostname()}-{os.getpid()}-{next(_ENDPOINT_IDS)}".lower(),
        srv.address,
        {"job": job, **meta},
    )
    try:
        registration = await discovery.register(ep, ttl_s=ttl_s)
    except BaseException:
        await handle.close()
        raise
    with _SERVER_LOCK:
        live = srv.registrations.get(key)
        if live is not None:
            live[0] = registration
            return handle
    # Every handle on this entry closed while registering: withdraw what was just made.
    await registration.close()
    return handle
