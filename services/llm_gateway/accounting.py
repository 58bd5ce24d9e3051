"""Token and latency accounting of LLM calls, per model and replica.

Every attempt an :class:`~agentmesh.llm_gateway.client.LlmClient` makes is recorded here: on
success its tokens in and out, its latency and (for streamed calls) its time to first token; on
failure the kind of error. The same numbers go three ways:

* :meth:`LlmAccounting.snapshot` — a JSON-able dict, merged across processes with
  :func:`merge_snapshots` and summarised at the end of a run (:func:`summarize`);
* :meth:`LlmAccounting.prometheus_text` — Prometheus exposition, served by the gateway server; the
  same ``agentmesh_llm_*`` families :func:`agentmesh.metrics.register_llm_accounting` exposes in a
  process's ``/metrics``;
* OpenTelemetry metrics (``agentmesh.llm.*`` counters and histograms) on the global meter
  provider, a no-op until an exporter is configured.

Histograms use fixed bucket bounds (seconds) so that snapshots from many processes add up exactly.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics

__all__ = [
    "ERROR_KINDS",
    "LATENCY_BUCKETS_S",
    "LlmAccounting",
    "ReplicaAccount",
    "merge_snapshots",
    "summarize",
]

LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0,
)  # fmt: skip
"""Upper bounds of the latency and TTFT histograms; one more bucket holds everything above."""

ERROR_KINDS = ("unreachable", "transport", "timeout", "rejected", "server_error", "bad_reply", "refused")
"""``unreachable``: no connection; ``transport``: the connection broke; ``timeout``: no answer in
time; ``rejected``: HTTP 429 (or 408); ``server_error``: HTTP 5xx; ``bad_reply``: an answer that is
not an OpenAI reply; ``refused``: another HTTP 4xx (the request itself was bad)."""


class _Histogram:
    __slots__ = ("buckets", "count", "total")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS_S, value)] += 1
        self.count += 1
        self.total += value

    def to_dict(self) -> dict[str, Any]:
        return {"buckets": list(self.buckets), "count": self.count, "sum": self.total}


@dataclass(slots=True)
class ReplicaAccount:
    """The counters of one (model, replica)."""

    requests: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency: _Histogram = field(default_factory=_Histogram)
    ttft: _Histogram = field(default_factory=_Histogram)

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "ok": self.ok,
            "errors": dict(self.errors),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latency_s": self.latency.to_dict(),
            "ttft_s": self.ttft.to_dict(),
        }


class LlmAccounting:
    """Per (model, replica) counters. Thread-safe (the gateway server and Ray actors use threads)."""

    def __init__(self, *, meter_provider: metrics.MeterProvider | None = None) -> None:
        self._lock = threading.Lock()
        self._accounts: dict[tuple[str, str], ReplicaAccount] = {}
        self._calls_failed: dict[str, int] = {}
        meter = metrics.get_meter("agentmesh.llm", meter_provider=meter_provider)
        self._m_requests = meter.create_counter("agentmesh.llm.requests", description="LLM request attempts")
        self._m_errors = meter.create_counter("agentmesh.llm.errors", description="failed LLM attempts")
        self._m_tokens = meter.create_counter("agentmesh.llm.tokens", unit="{token}", description="tokens")
        self._m_latency = meter.create_histogram("agentmesh.llm.latency", unit="s", description="latency")
        self._m_ttft = meter.create_histogram("agentmesh.llm.ttft", unit="s", description="time to 1st token")

    def _account(self, model: str, replica: str) -> ReplicaAccount:
        acc = self._accounts.get((model, replica))
        if acc is None:
            acc = self._accounts[(model, replica)] = ReplicaAccount()
        return acc

    def record_ok(
        self,
        model: str,
        replica: str,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        latency_s: float,
        ttft_s: float | None = None,
    ) -> None:
        """One attempt that answered."""
        with self._lock:
            acc = self._account(model, replica)
            acc.requests += 1
            acc.ok += 1
            acc.prompt_tokens += prompt_tokens
            acc.completion_tokens += completion_tokens
            acc.latency.observe(latency_s)
            if ttft_s is not None:
                acc.ttft.observe(ttft_s)
        attrs = {"model": model, "replica": replica}
        self._m_requests.add(1, attrs)
        self._m_tokens.add(prompt_tokens, {**attrs, "direction": "in"})
        self._m_tokens.add(completion_tokens, {**attrs, "direction": "out"})
        self._m_latency.record(latency_s, attrs)
        if ttft_s is not None:
            self._m_ttft.record(ttft_s, attrs)

    def record_error(self, model: str, replica: str, kind: str) -> None:
        """One attempt that failed; ``kind`` is one of :data:`ERROR_KINDS`."""
        with self._lock:
            acc = self._account(model, replica)
            acc.requests += 1
            acc.errors[kind] = acc.errors.get(kind, 0) + 1
        attrs = {"model": model, "replica": replica, "kind": kind}
        self._m_requests.add(1, {"model": model, "replica": replica})
        self._m_errors.add(1, attrs)

    def record_call_failed(self, model: str) -> None:
        """A whole call gave up (every attempt failed, or its deadline passed)."""
        with self._lock:
            self._calls_failed[model] = self._calls_failed.get(model, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """``{"replicas": [{"model", "replica", ...counters}], "calls_failed": {model: n}}``."""
        with self._lock:
            return {
                "replicas": [
                    {"model": m, "replica": r, **acc.to_dict()}
                    for (m, r), acc in sorted(self._accounts.items())
                ],
                "calls_failed": dict(self._calls_failed),
            }

    def prometheus_text(self, prefix: str = "agentmesh_llm") -> str:
        """The counters in Prometheus text exposition format (version 0.0.4)."""
        return snapshot_prometheus_text(self.snapshot(), prefix)


def snapshot_prometheus_text(snap: Mapping[str, Any], prefix: str = "agentmesh_llm") -> str:
    """A snapshot (or a merge of several) in Prometheus text format, through the same collector that
    exposes the process's accountings in :data:`agentmesh.metrics.REGISTRY` (one set of names:
    ``agentmesh_llm_{requests,errors,tokens,calls_failed}_total``, ``..._{latency,ttft}_seconds``;
    tokens by ``kind`` ``prompt|completion``). ``prefix`` renames the families."""
    # Imported here: agentmesh.metrics imports this module for the bucket bounds.
    from prometheus_client import CollectorRegistry, generate_latest

    from agentmesh.metrics import LlmSnapshotCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(LlmSnapshotCollector(lambda: [snap]))
    text = generate_latest(registry).decode()
    if prefix != "agentmesh_llm":
        text = text.replace("agentmesh_llm_", prefix + "_")
    return text


def merge_snapshots(snaps: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Add up snapshots (from many processes) into one, by (model, replica)."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    failed: dict[str, int] = {}
    for snap in snaps:
        for r in snap.get("replicas", []):
            key = (r["model"], r["replica"])
            cur = merged.get(key)
            if cur is None:
                merged[key] = {
                    **r,
                    "errors": dict(r["errors"]),
                    "latency_s": _copy_hist(r["latency_s"]),
                    "ttft_s": _copy_hist(r["ttft_s"]),
                }
                continue
            for k in ("requests", "ok", "prompt_tokens", "completion_tokens"):
                cur[k] += r[k]
            for kind, n in r["errors"].items():
                cur["errors"][kind] = cur["errors"].get(kind, 0) + n
            for h in ("latency_s", "ttft_s"):
                _add_hist(cur[h], r[h])
        for model, n in snap.get("calls_failed", {}).items():
            failed[model] = failed.get(model, 0) + n
    return {"replicas": [merged[k] for k in sorted(merged)], "calls_failed": failed}


def _copy_hist(h: Mapping[str, Any]) -> dict[str, Any]:
    return {"buckets": list(h["buckets"]), "count": h["count"], "sum": h["sum"]}


def _add_hist(into: dict[str, Any], h: Mapping[str, Any]) -> None:
    into["buckets"] = [a + b for a, b in zip(into["buckets"], h["buckets"], strict=True)]
    into["count"] += h["count"]
    into["sum"] += h["sum"]


def _quantile(h: Mapping[str, Any], q: float) -> float | None:
    """The upper bound of the bucket holding quantile ``q`` (None without samples)."""
    count = h["count"]
    if not count:
        return None
    rank = q * count
    cum = 0
    for bound, n in zip((*LATENCY_BUCKETS_S, float("inf")), h["buckets"], strict=True):
        cum += n
        if cum >= rank:
            return bound
    return float("inf")


def summarize(snap: Mapping[str, Any], *, wall_s: float | None = None) -> list[dict[str, Any]]:
    """One row per model and replica: requests, errors, tokens, mean/p50/p99 latency and TTFT, tokens/s.

    p50/p99 are bucket upper bounds (fixed buckets, see :data:`LATENCY_BUCKETS_S`).
    """
    rows = []
    for r in snap.get("replicas", []):
        lat, ttft = r["latency_s"], r["ttft_s"]
        rows.append(
            {
                "model": r["model"],
                "replica": r["replica"],
                "requests": r["requests"],
                "ok": r["ok"],
                "errors": sum(r["errors"].values()),
                "errors_by_kind": dict(r["errors"]),
                "prompt_tokens": r["prompt_tokens"],
                "completion_tokens": r["completion_tokens"],
                "latency_mean_s": lat["sum"] / lat["count"] if lat["count"] else None,
                "latency_p50_s": _quantile(lat, 0.5),
                "latency_p99_s": _quantile(lat, 0.99),
                "ttft_mean_s": ttft["sum"] / ttft["count"] if ttft["count"] else None,
                "ttft_p50_s": _quantile(ttft, 0.5),
                "completion_tokens_per_s": (r["completion_tokens"] / wall_s) if wall_s else None,
            }
        )
    return rows
