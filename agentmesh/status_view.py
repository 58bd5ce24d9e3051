"""The live view of a running run: ``agentmesh status`` scrapes the run's ``/metrics`` endpoints.

Every process of a run (the driver, each agent replica's host) serves Prometheus exposition text
and registers it in the run's discovery store under ``agentmesh-metrics`` with ``run=<run id>`` in
its metadata (:mod:`agentmesh.metrics`). This module finds those endpoints, scrapes them all at
once, adds the series up and renders one terminal table per refresh:

* the run: tasks admitted, in flight, done, failed (by code), tasks/s;
* per role: replicas, steps in progress, tasks queued in inboxes, steps done / failed, retries,
  step p50 (from the step-duration histogram, over the whole run), tokens/s;
* per LLM model: requests/s, tokens/s, errors, latency p50.

Rates are the change between two refreshes; the first snapshot (and ``--once``) shows averages
since the run started (``run.json``'s ``started_unix``), marked as such. It reads only the metric
*names and labels* of the contract in :mod:`agentmesh.metrics`, never that module's objects, so it
works against any process that speaks the contract.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from agentmesh.discovery.base import Discovery, Endpoint
from agentmesh.errors import AgentMeshError

__all__ = [
    "METRICS_SERVICE",
    "LlmStatus",
    "RoleStatus",
    "RunInfo",
    "Snapshot",
    "StatusError",
    "find_endpoints",
    "histogram_quantile",
    "parse_exposition",
    "read_run_dir",
    "render",
    "scrape",
    "watch",
]

try:
    from agentmesh.metrics import METRICS_SERVICE
except ImportError:  # pragma: no cover - only before agentmesh.metrics existed
    METRICS_SERVICE = "agentmesh-metrics"  # the discovery service of every /metrics endpoint

_SCRAPE_TIMEOUT_S = 3.0


class StatusError(AgentMeshError):
    """The run cannot be looked at (no run.json, discovery unreachable, …); the message says why."""


# --------------------------------------------------------------------------------------------
# The run directory


@dataclass(frozen=True)
class RunInfo:
    """What ``RUN_DIR/run.json`` says about a run (or the command line, without a run directory)."""

    run_id: str
    discovery_url: str
    name: str = ""
    started_unix: float | None = None
    pid: int | None = None
    roles: tuple[str, ...] = ()  # in the config's order
    run_dir: Path | None = None

    def summary(self) -> dict[str, Any] | None:
        """``summary.json`` when the run wrote it *after* this run.json (i.e. this run finished)."""
        if self.run_dir is None:
            return None
        path, run_json = self.run_dir / "summary.json", self.run_dir / "run.json"
        try:
            if run_json.exists() and path.stat().st_mtime < run_json.stat().st_mtime:
                return None  # an earlier run's summary; this run (a resume) is still going
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def process_alive(self) -> bool | None:
        """Whether the launcher's pid runs (None when unknown; only meaningful on the same host)."""
        if self.pid is None:
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True  # exists, not ours
        return True


def read_run_dir(run_dir: str | Path) -> RunInfo:
    """Read ``RUN_DIR/run.json``; :class:`StatusError` names the file when it is missing or bad."""
    run_dir = Path(run_dir)
    path = run_dir / "run.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StatusError(
            f"{path}: not found; is {run_dir} a run's output directory (of a run started with metrics)?"
        ) from None
    except (OSError, ValueError) as exc:
        raise StatusError(f"{path}: not readable JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise StatusError(f"{path}: expected a JSON object")
    for key in ("run_id", "discovery_url"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise StatusError(f"{path}: field {key!r} is missing or not a string")
    roles = (raw.get("config") or {}).get("roles") if isinstance(raw.get("config"), dict) else None
    started, pid = raw.get("started_unix"), raw.get("pid")
    return RunInfo(
        run_id=raw["run_id"],
        discovery_url=raw["discovery_url"],
        name=str(raw.get("name") or ""),
        started_unix=float(started) if isinstance(started, int | float) else None,
        pid=pid if isinstance(pid, int) else None,
        roles=tuple(roles) if isinstance(roles, dict) else (),
        run_dir=run_dir,
    )


# --------------------------------------------------------------------------------------------
# Finding and scraping the endpoints


async def find_endpoints(discovery: Discovery, run_id: str) -> list[Endpoint]:
    """The run's ``/metrics`` endpoints, one per address (a process may register several entries)."""
    seen: dict[str, Endpoint] = {}
    for ep in await discovery.snapshot(METRICS_SERVICE):
        if ep.metadata.get("run") == run_id and ep.address not in seen:
            seen[ep.address] = ep
    return sorted(seen.values(), key=lambda e: (e.metadata.get("job", ""), e.address))


def metrics_url(address: str) -> str:
    """``host:port`` (or a full URL) → the exposition URL."""
    if address.startswith(("http://", "https://")):
        return address if address.rstrip("/").endswith("/metrics") else address.rstrip("/") + "/metrics"
    return f"http://{address}/metrics"


async def scrape(
    addresses: Sequence[str], *, timeout_s: float = _SCRAPE_TIMEOUT_S
) -> dict[str, str | Exception]:
    """GET every address's ``/metrics`` concurrently: address → exposition text, or the error."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def one(session: aiohttp.ClientSession, address: str) -> str | Exception:
        try:
            async with session.get(metrics_url(address)) as resp:
                if resp.status != 200:
                    return RuntimeError(f"HTTP {resp.status}")
                return await resp.text()
        except Exception as exc:  # one dead replica must not hide the others
            return exc

    async with aiohttp.ClientSession(timeout=timeout) as session:
        results = await asyncio.gather(*(one(session, a) for a in addresses))
    return dict(zip(addresses, results, strict=True))


# --------------------------------------------------------------------------------------------
# Adding up the series


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float:
    """Prometheus-style quantile of cumulative ``{le: count}`` buckets (linear inside a bucket).

    NaN without observations; the largest finite bound when the quantile falls in ``+Inf``.
    """
    items = sorted(buckets.items())
    if not items or items[-1][1] <= 0:
        return math.nan
    rank = q * items[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in items:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


@dataclass
class RoleStatus:
    """One role, added up over its replicas."""

    role: str
    replicas: set[str] = field(default_factory=set)
    in_progress: float = 0.0
    queued: float = 0.0
    steps_ok: float = 0.0
    steps_failed: float = 0.0
    retries: float = 0.0
    tokens: float = 0.0
    step_buckets: dict[float, float] = field(default_factory=lambda: defaultdict(float))

    @property
    def step_p50_s(self) -> float:
        return histogram_quantile(0.5, self.step_buckets)


@dataclass
class LlmStatus:
    """One model, added up over its replicas and over every process that calls it."""

    model: str
    replicas: set[str] = field(default_factory=set)
    requests: float = 0.0
    errors: float = 0.0
    tokens: float = 0.0
    latency_buckets: dict[float, float] = field(default_factory=lambda: defaultdict(float))

    @property
    def latency_p50_s(self) -> float:
        return histogram_quantile(0.5, self.latency_buckets)


@dataclass
class Snapshot:
    """One scrape of a run, added up; ``taken_unix`` is when."""

    run_id: str
    taken_unix: float
    endpoints: int = 0
    scraped: int = 0
    errors: dict[str, str] = field(default_factory=dict)  # address -> why it could not be scraped
    admitted: float = 0.0
    in_flight: float = 0.0
    done: float = 0.0
    failed_by_code: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    roles: dict[str, RoleStatus] = field(default_factory=dict)
    llms: dict[str, LlmStatus] = field(default_factory=dict)
    has_driver: bool = False

    @property
    def failed(self) -> float:
        return sum(self.failed_by_code.values())

    def role(self, name: str) -> RoleStatus:
        r = self.roles.get(name)
        if r is None:
            r = self.roles[name] = RoleStatus(name)
        return r

    def llm(self, model: str) -> LlmStatus:
        m = self.llms.get(model)
        if m is None:
            m = self.llms[model] = LlmStatus(model)
        return m


def _le(labels: Mapping[str, str]) -> float:
    return float(labels.get("le", "inf").replace("+Inf", "inf"))


def parse_exposition(texts: Iterable[str], run_id: str, *, taken_unix: float | None = None) -> Snapshot:
    """Add up the exposition texts of a run's endpoints into one :class:`Snapshot`.

    Series with a ``run`` label of another run are ignored (a shared process may serve several);
    the LLM series carry no ``run`` label and count whole (each endpoint is one of this run's).
    """
    from prometheus_client.parser import text_string_to_metric_families

    snap = Snapshot(run_id=run_id, taken_unix=time.time() if taken_unix is None else taken_unix)
    for text in texts:
        snap.scraped += 1
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                name, labels, value = s.name, s.labels, float(s.value)
                if "run" in labels and labels["run"] != run_id:
                    continue
                if name == "agentmesh_tasks_admitted_total":
                    snap.admitted += value
                    snap.has_driver = True
                elif name == "agentmesh_tasks_in_flight":
                    snap.in_flight += value
                    snap.has_driver = True
                elif name == "agentmesh_tasks_done_total":
                    snap.done += value
                elif name == "agentmesh_tasks_failed_total":
                    snap.failed_by_code[labels.get("code") or "unknown"] += value
                elif name.startswith("agentmesh_llm_"):
                    _add_llm(snap, name, labels, value)
                elif "role" in labels:
                    _add_role(snap, name, labels, value)
    return snap


def _add_role(snap: Snapshot, name: str, labels: Mapping[str, str], value: float) -> None:
    r = snap.role(labels["role"])
    if "replica" in labels and name in ("agentmesh_inbox_tasks", "agentmesh_steps_in_progress"):
        r.replicas.add(labels["replica"])
    if name == "agentmesh_inbox_tasks":
        r.queued += value
    elif name == "agentmesh_steps_in_progress":
        r.in_progress += value
    elif name == "agentmesh_steps_total":
        if labels.get("outcome") == "failed":
            r.steps_failed += value
        else:
            r.steps_ok += value
    elif name == "agentmesh_step_retries_total":
        r.retries += value
    elif name == "agentmesh_role_tokens_total":
        r.tokens += value
    elif name == "agentmesh_step_duration_seconds_bucket":
        r.step_buckets[_le(labels)] += value


def _add_llm(snap: Snapshot, name: str, labels: Mapping[str, str], value: float) -> None:
    m = snap.llm(labels.get("model") or "?")
    if labels.get("replica"):
        m.replicas.add(labels["replica"])
    if name == "agentmesh_llm_requests_total":
        m.requests += value
    elif name == "agentmesh_llm_errors_total":
        m.errors += value
    elif name == "agentmesh_llm_tokens_total":
        m.tokens += value
    elif name == "agentmesh_llm_latency_seconds_bucket":
        m.latency_buckets[_le(labels)] += value


# --------------------------------------------------------------------------------------------
# Rendering


def _fmt_s(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}us"
    if seconds < 1:
        return f"{seconds * 1e3:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


def _fmt_n(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def _fmt_rate(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "-"
    return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(  # noqa: E731 - a one-line formatter used three times below
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    ).rstrip()
    return [fmt(header), *(fmt(r) for r in rows)]


def _rate(now: float, before: float | None, dt: float | None) -> float | None:
    if before is None or not dt or dt <= 0:
        return None
    return max(now - before, 0.0) / dt  # a counter that went down is a restarted replica


def render(
    snap: Snapshot,
    prev: Snapshot | None = None,
    *,
    info: RunInfo | None = None,
    role_order: Sequence[str] = (),
) -> str:
    """The terminal text of one snapshot; rates against ``prev``, else since the run started."""
    if prev is not None:
        dt: float | None = snap.taken_unix - prev.taken_unix
        rate_note = f"rates over the last {dt:.1f}s"
    elif info is not None and info.started_unix is not None:
        dt = snap.taken_unix - info.started_unix
        prev = Snapshot(run_id=snap.run_id, taken_unix=info.started_unix)  # everything at zero
        rate_note = "rates: average since the run started"
    else:
        dt = None
        rate_note = "rates: after the next refresh"
    stamp = time.strftime("%H:%M:%S", time.localtime(snap.taken_unix))
    name = f"{info.name} " if info is not None and info.name and info.name != snap.run_id else ""
    lines = [
        f"agentmesh status: {name}run {snap.run_id} | {stamp} | "
        f"{snap.scraped}/{snap.endpoints or snap.scraped} endpoints | {rate_note}"
    ]
    failed = snap.failed
    codes = ", ".join(f"{c} {_fmt_n(n)}" for c, n in sorted(snap.failed_by_code.items()) if n)
    finished_rate = _rate(snap.done + failed, None if prev is None else prev.done + prev.failed, dt)
    if snap.has_driver:
        lines.append(
            f"tasks: admitted {_fmt_n(snap.admitted)}  in flight {_fmt_n(snap.in_flight)}  "
            f"done {_fmt_n(snap.done)}  failed {_fmt_n(failed)}"
            + (f" ({codes})" if codes else "")
            + f"  tasks/s {_fmt_rate(finished_rate)}"
        )
    else:
        lines.append("tasks: the driver's endpoint was not scraped (no run totals)")
    order = [r for r in role_order if r in snap.roles] + sorted(r for r in snap.roles if r not in role_order)
    if order:
        rows = []
        for role in order:
            r = snap.roles[role]
            p = prev.roles.get(role) if prev is not None else None
            tok = _rate(r.tokens, p.tokens if p is not None else (0.0 if prev is not None else None), dt)
            rows.append(
                [
                    role,
                    str(len(r.replicas)),
                    _fmt_n(r.in_progress),
                    _fmt_n(r.queued),
                    _fmt_n(r.steps_ok),
                    _fmt_n(r.steps_failed),
                    _fmt_n(r.retries),
                    _fmt_s(r.step_p50_s),
                    _fmt_rate(tok),
                ]
            )
        lines.append("")
        lines += _table(
            [
                "ROLE",
                "REPLICAS",
                "IN PROGRESS",
                "QUEUED",
                "STEPS DONE",
                "FAILED",
                "RETRIES",
                "STEP p50",
                "TOK/S",
            ],
            rows,
        )
    if snap.llms:
        rows = []
        for model in sorted(snap.llms):
            m = snap.llms[model]
            p2 = prev.llms.get(model) if prev is not None else None
            base_req = p2.requests if p2 is not None else (0.0 if prev is not None else None)
            base_tok = p2.tokens if p2 is not None else (0.0 if prev is not None else None)
            rows.append(
                [
                    model,
                    str(len(m.replicas)),
                    _fmt_n(m.requests),
                    _fmt_rate(_rate(m.requests, base_req, dt)),
                    _fmt_rate(_rate(m.tokens, base_tok, dt)),
                    _fmt_n(m.errors),
                    _fmt_s(m.latency_p50_s),
                ]
            )
        lines.append("")
        lines += _table(
            ["LLM MODEL", "REPLICAS", "REQUESTS", "REQ/S", "TOK/S", "ERRORS", "LATENCY p50"], rows
        )
    for address, why in sorted(snap.errors.items()):
        lines.append(f"unreachable: {address} ({why})")
    return "\n".join(lines) + "\n"


def render_summary(info: RunInfo, summary: Mapping[str, Any]) -> str:
    """The finished run's ``summary.json``, in a few lines."""
    get = summary.get
    codes = get("failures_by_code") or {}
    by_code = ", ".join(f"{k} {v}" for k, v in sorted(codes.items())) if isinstance(codes, dict) else ""
    elapsed = get("elapsed_s")
    lines = [
        f"agentmesh status: run {info.run_id} has finished (no /metrics endpoints left); its summary:",
        f"tasks {get('tasks', '?')}: done {get('done', '?')}, failed {get('failed', '?')}"
        + (f" ({by_code})" if by_code else "")
        + (f" in {_fmt_s(float(elapsed))}" if isinstance(elapsed, int | float) else ""),
        f"tokens: {get('prompt_tokens', '?')} prompt + {get('completion_tokens', '?')} completion"
        f" ({get('tokens_per_s', '?')} tok/s)",
    ]
    for row in get("llm") or []:
        if isinstance(row, Mapping):
            lines.append(
                f"llm {row.get('model', '?')} @ {row.get('replica', '?')}: "
                f"{row.get('requests', '?')} requests, {row.get('errors', '?')} errors"
            )
    if info.run_dir is not None:
        lines.append(f"records in {info.run_dir}; `agentmesh report {info.run_dir}` writes the report")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# The loop


_CLEAR = "\x1b[H\x1b[2J"


async def take_snapshot(discovery: Discovery, run_id: str) -> Snapshot:
    """Find the run's endpoints, scrape them, add them up (``endpoints == 0`` when none)."""
    endpoints = await find_endpoints(discovery, run_id)
    results = await scrape([e.address for e in endpoints]) if endpoints else {}
    texts = [v for v in results.values() if isinstance(v, str)]
    snap = parse_exposition(texts, run_id)
    snap.endpoints = len(endpoints)
    snap.errors = {a: (str(v) or type(v).__name__) for a, v in results.items() if isinstance(v, Exception)}
    return snap


async def _await_summary(info: RunInfo, *, grace_s: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + grace_s
    while True:
        summary = info.summary()
        if summary is not None or time.monotonic() >= deadline:
            return summary
        await asyncio.sleep(0.5)


async def watch(
    info: RunInfo,
    *,
    interval_s: float = 2.0,
    once: bool = False,
    out: TextIO | None = None,
    discovery: Discovery | None = None,
    startup_wait_s: float = 60.0,
) -> int:
    """Print snapshots of ``info``'s run every ``interval_s`` (once with ``once``); the exit code.

    0: printed (or the run finished and its summary was printed); 1: no endpoint found (or none
    could be scraped with ``once``). Without ``once``, a run still starting gets ``startup_wait_s``
    for its endpoints to appear. A terminal gets each refresh in place; a pipe gets blocks.
    """
    from agentmesh.discovery import connect

    out = out if out is not None else sys.stdout
    tty = out.isatty()
    own = discovery is None
    try:
        disc = discovery if discovery is not None else connect(info.discovery_url)
    except AgentMeshError as exc:
        raise StatusError(f"discovery {info.discovery_url}: {exc}") from exc
    prev: Snapshot | None = None
    started, waiting = time.monotonic(), False
    try:
        while True:
            try:
                snap = await asyncio.wait_for(take_snapshot(disc, info.run_id), timeout=10.0)
            except (AgentMeshError, OSError, TimeoutError) as exc:
                # Watching a run that just ended: its store goes away around when summary.json lands.
                summary = await _await_summary(info, grace_s=0.0 if prev is None else 10.0)
                if summary is not None:  # the run ended, and its embedded etcd with it
                    out.write(render_summary(info, summary))
                    return 0
                alive = info.process_alive()
                hint = f" (its launcher, pid {info.pid}, is not running)" if alive is False else ""
                raise StatusError(
                    f"cannot reach the run's discovery at {info.discovery_url}{hint}: {exc}"
                ) from exc
            if snap.endpoints == 0:
                summary = info.summary()
                if summary is not None:
                    out.write(render_summary(info, summary))
                    return 0
                starting = prev is None and time.monotonic() < started + startup_wait_s
                if once or (prev is None and (not starting or info.process_alive() is False)):
                    out.write(
                        f"agentmesh status: no /metrics endpoints of run {info.run_id!r} in "
                        f"{info.discovery_url} (service {METRICS_SERVICE!r}); "
                        "is the run up, with metrics enabled?\n"
                    )
                    return 1
                if not waiting:  # the run is starting (replicas register after discovery is up),
                    # or it is ending (its summary comes next): say so once, keep looking
                    out.write(
                        "agentmesh status: waiting for the run's /metrics endpoints\n"
                        if prev is None
                        else "agentmesh status: the run's endpoints are gone; waiting for its summary\n"
                    )
                    out.flush()
                waiting = True
                await asyncio.sleep(interval_s)
                continue
            waiting = False
            text = render(snap, prev, info=info, role_order=info.roles)
            out.write((_CLEAR + text) if tty else (text if prev is None else "\n" + text))
            out.flush()
            if once:
                return 0 if snap.scraped else 1
            prev = snap if snap.scraped else prev
            await asyncio.sleep(interval_s)
    finally:
        if own:
            try:
                await disc.close()
            except Exception:  # closing a store that already went away is not worth an error
                pass
