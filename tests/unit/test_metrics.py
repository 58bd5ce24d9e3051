"""agentmesh.metrics: the series each class writes, rendered and parsed back (no sockets)."""

from __future__ import annotations

import gc

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agentmesh import metrics
from agentmesh.llm_gateway.accounting import LlmAccounting
from agentmesh.metrics import ReplicaMetrics, RunMetrics, SandboxMetrics


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of what a scrape would return."""
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def names(samples: dict) -> set[str]:
    return {n for n, _ in samples}


@pytest.fixture
def reg() -> CollectorRegistry:
    return CollectorRegistry()


def test_run_metrics_count_tasks(reg: CollectorRegistry) -> None:
    run = RunMetrics("r1", registry=reg)
    s = scrape(reg)
    assert value(s, "agentmesh_tasks_done_total", run="r1") == 0
    assert value(s, "agentmesh_tasks_in_flight", run="r1") == 0
    run.admitted(4)
    run.admitted()
    run.finished(ok=True)
    run.finished(ok=True)
    run.finished(ok=False, code="timeout")
    run.finished(ok=False)
    s = scrape(reg)
    assert value(s, "agentmesh_tasks_admitted_total", run="r1") == 5
    assert value(s, "agentmesh_tasks_done_total", run="r1") == 2
    assert value(s, "agentmesh_tasks_failed_total", run="r1", code="timeout") == 1
    assert value(s, "agentmesh_tasks_failed_total", run="r1", code="unknown") == 1
    assert value(s, "agentmesh_tasks_in_flight", run="r1") == 1
    with pytest.raises(ValueError, match="n must be"):
        run.admitted(-1)
    with pytest.raises(ValueError, match="run_id"):
        RunMetrics("", registry=reg)


def test_in_flight_never_negative_and_runs_are_apart(reg: CollectorRegistry) -> None:
    resumed, other = RunMetrics("a", registry=reg), RunMetrics("b", registry=reg)
    resumed.finished(ok=True)  # admitted by the process that died
    other.admitted(2)
    s = scrape(reg)
    assert value(s, "agentmesh_tasks_in_flight", run="a") == 0
    assert value(s, "agentmesh_tasks_in_flight", run="b") == 2
    resumed.close()
    s = scrape(reg)
    assert value(s, "agentmesh_tasks_done_total", run="a") is None
    assert value(s, "agentmesh_tasks_admitted_total", run="b") == 2


def test_replica_gauges_are_read_at_scrape(reg: CollectorRegistry) -> None:
    inbox = [3]
    rm = ReplicaMetrics(
        "r", "solver", "solver-0", queued=lambda: inbox[0], in_progress=lambda: 2, registry=reg
    )
    lv = {"run": "r", "role": "solver", "replica": "solver-0"}
    s = scrape(reg)
    assert value(s, "agentmesh_inbox_tasks", **lv) == 3
    assert value(s, "agentmesh_steps_in_progress", **lv) == 2
    inbox[0] = 7
    assert value(scrape(reg), "agentmesh_inbox_tasks", **lv) == 7
    rm.close()
    s = scrape(reg)
    assert value(s, "agentmesh_inbox_tasks", **lv) is None


def test_a_failing_gauge_does_not_break_the_scrape(reg: CollectorRegistry) -> None:
    def boom() -> int:
        raise RuntimeError("replica gone")

    ReplicaMetrics("r", "a", "a-0", queued=boom, in_progress=lambda: 1, registry=reg)
    ReplicaMetrics("r", "b", "b-0", queued=lambda: 4, in_progress=lambda: 0, registry=reg)
    s = scrape(reg)
    assert value(s, "agentmesh_inbox_tasks", run="r", role="b", replica="b-0") == 4
    assert value(s, "agentmesh_inbox_tasks", run="r", role="a", replica="a-0") is None
    assert value(s, "agentmesh_steps_in_progress", run="r", role="a", replica="a-0") == 1


def test_replica_steps_tokens_hops(reg: CollectorRegistry) -> None:
    rm = ReplicaMetrics("r", "critic", "c-1", queued=lambda: 0, in_progress=lambda: 0, registry=reg)
    lv = {"run": "r", "role": "critic", "replica": "c-1"}
    rm.step_done(0.2, ok=True)
    rm.step_done(40.0, ok=True)
    rm.step_done(1.5, ok=False)
    rm.step_retried()
    rm.queue_wait(0.003)
    rm.tokens(100, 20)
    rm.tokens(50, 5)
    rm.hop("judge", 0.002, ok=True)
    rm.hop("judge", 0.5, ok=False)
    s = scrape(reg)
    assert value(s, "agentmesh_steps_total", **lv, outcome="ok") == 2
    assert value(s, "agentmesh_steps_total", **lv, outcome="failed") == 1
    assert value(s, "agentmesh_step_retries_total", **lv) == 1
    assert value(s, "agentmesh_step_duration_seconds_count", **lv) == 3
    assert value(s, "agentmesh_step_duration_seconds_sum", **lv) == pytest.approx(41.7)
    assert value(s, "agentmesh_step_duration_seconds_bucket", **lv, le="0.25") == 1
    assert value(s, "agentmesh_step_duration_seconds_bucket", **lv, le="60.0") == 3
    assert value(s, "agentmesh_queue_wait_seconds_bucket", **lv, le="0.0025") == 0
    assert value(s, "agentmesh_queue_wait_seconds_bucket", **lv, le="0.005") == 1
    assert value(s, "agentmesh_role_tokens_total", **lv, kind="prompt") == 150
    assert value(s, "agentmesh_role_tokens_total", **lv, kind="completion") == 25
    hop = {"run": "r", "from_role": "critic", "to_role": "judge"}
    assert value(s, "agentmesh_hop_duration_seconds_count", **hop) == 2
    assert value(s, "agentmesh_hop_errors_total", **hop) == 1


def test_close_removes_the_replica_and_the_last_one_its_hops(reg: CollectorRegistry) -> None:
    a = ReplicaMetrics("r", "solver", "s-0", queued=lambda: 0, in_progress=lambda: 0, registry=reg)
    b = ReplicaMetrics("r", "solver", "s-1", queued=lambda: 0, in_progress=lambda: 0, registry=reg)
    for rm in (a, b):
        rm.step_done(0.1, ok=True)
        rm.hop("critic", 0.01, ok=True)
    hop = {"run": "r", "from_role": "solver", "to_role": "critic"}
    a.close()
    a.close()  # idempotent
    s = scrape(reg)
    assert value(s, "agentmesh_steps_total", run="r", role="solver", replica="s-0", outcome="ok") is None
    assert value(s, "agentmesh_steps_total", run="r", role="solver", replica="s-1", outcome="ok") == 1
    assert value(s, "agentmesh_hop_duration_seconds_count", **hop) == 2
    b.close()
    s = scrape(reg)
    assert value(s, "agentmesh_hop_duration_seconds_count", **hop) is None
    assert not any(dict(lbl).get("run") == "r" for _, lbl in s)


def test_replica_rejects_empty_labels(reg: CollectorRegistry) -> None:
    with pytest.raises(ValueError, match="role"):
        ReplicaMetrics("r", "", "x", queued=lambda: 0, in_progress=lambda: 0, registry=reg)


def test_llm_accounting_is_exposed(reg: CollectorRegistry) -> None:
    acc = LlmAccounting()
    metrics.register_llm_accounting(acc, registry=reg)
    metrics.register_llm_accounting(acc, registry=reg)  # idempotent: not counted twice
    acc.record_ok("m", "llm-0", prompt_tokens=10, completion_tokens=4, latency_s=0.3, ttft_s=0.02)
    acc.record_ok("m", "llm-0", prompt_tokens=5, completion_tokens=1, latency_s=3.0)
    acc.record_error("m", "llm-1", "timeout")
    acc.record_call_failed("m")
    s = scrape(reg)
    lv = {"model": "m", "replica": "llm-0"}
    assert value(s, "agentmesh_llm_requests_total", **lv) == 2
    assert value(s, "agentmesh_llm_requests_total", model="m", replica="llm-1") == 1
    assert value(s, "agentmesh_llm_errors_total", model="m", replica="llm-1", kind="timeout") == 1
    assert value(s, "agentmesh_llm_tokens_total", **lv, kind="prompt") == 15
    assert value(s, "agentmesh_llm_tokens_total", **lv, kind="completion") == 5
    assert value(s, "agentmesh_llm_latency_seconds_count", **lv) == 2
    assert value(s, "agentmesh_llm_latency_seconds_bucket", **lv, le="0.5") == 1
    assert value(s, "agentmesh_llm_latency_seconds_bucket", **lv, le="+Inf") == 2
    assert value(s, "agentmesh_llm_ttft_seconds_count", **lv) == 1
    assert value(s, "agentmesh_llm_calls_failed_total", model="m") == 1

    # A second accounting of the same (model, replica) in the process adds up.
    acc2 = LlmAccounting()
    acc2.record_ok("m", "llm-0", prompt_tokens=1, completion_tokens=1, latency_s=0.1)
    metrics.register_llm_accounting(acc2, registry=reg)
    assert value(scrape(reg), "agentmesh_llm_requests_total", **lv) == 3
    metrics.unregister_llm_accounting(acc2, registry=reg)
    assert value(scrape(reg), "agentmesh_llm_requests_total", **lv) == 2
    # Held weakly: a dropped accounting drops out.
    del acc
    gc.collect()
    assert value(scrape(reg), "agentmesh_llm_requests_total", **lv) is None


def test_accounting_text_matches_the_collector(reg: CollectorRegistry) -> None:
    acc = LlmAccounting()
    acc.record_ok("Org/M", 'r"1', prompt_tokens=7, completion_tokens=3, latency_s=0.05, ttft_s=0.01)
    acc.record_error("Org/M", 'r"1', "rejected")
    metrics.register_llm_accounting(acc, registry=reg)
    from_text = {}
    for fam in text_string_to_metric_families(acc.prometheus_text()):
        for smp in fam.samples:
            from_text[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
    from_registry = {k: v for k, v in scrape(reg).items() if k[0].startswith("agentmesh_llm_")}
    assert from_text == from_registry
    assert (
        value(from_text, "agentmesh_llm_tokens_total", model="Org/M", replica='r"1', kind="completion") == 3
    )


def test_sandbox_metrics(reg: CollectorRegistry) -> None:
    pools = {("default", "warm"): 3, ("default", "leased"): 1}
    sm = SandboxMetrics(pools=lambda: pools, registry=reg)
    holder = SandboxMetrics(registry=reg)
    sm.acquired("default", 0.004)
    sm.leases_expired()
    sm.leases_expired(2)
    holder.exec_done("bwrap", 0.03)
    s = scrape(reg)
    assert value(s, "agentmesh_sandbox_pool", pool="default", state="warm") == 3
    assert value(s, "agentmesh_sandbox_pool", pool="default", state="leased") == 1
    assert value(s, "agentmesh_sandbox_acquire_seconds_count", pool="default") == 1
    assert value(s, "agentmesh_sandbox_leases_expired_total") == 3
    assert value(s, "agentmesh_sandbox_exec_seconds_bucket", backend="bwrap", le="0.05") == 1
    pools[("default", "creating")] = 2
    assert value(scrape(reg), "agentmesh_sandbox_pool", pool="default", state="creating") == 2
    sm.close()
    assert value(scrape(reg), "agentmesh_sandbox_pool", pool="default", state="warm") is None


def test_metric_names_cover_every_family(reg: CollectorRegistry) -> None:
    run = RunMetrics("r", registry=reg)
    run.finished(ok=False, code="x")
    rm = ReplicaMetrics("r", "a", "a-0", queued=lambda: 0, in_progress=lambda: 0, registry=reg)
    rm.step_done(1, ok=True)
    rm.step_retried()
    rm.queue_wait(1)
    rm.hop("b", 1, ok=False)
    rm.tokens(1, 1)
    acc = LlmAccounting()
    acc.record_ok("m", "x", prompt_tokens=1, completion_tokens=1, latency_s=1, ttft_s=1)
    acc.record_error("m", "x", "timeout")
    acc.record_call_failed("m")
    metrics.register_llm_accounting(acc, registry=reg)
    sm = SandboxMetrics(pools=lambda: {("p", "warm"): 1}, registry=reg)
    sm.acquired("p", 1)
    sm.leases_expired()
    sm.exec_done("b", 1)
    families = {fam.name for fam in text_string_to_metric_families(generate_latest(reg).decode())}
    # The parser names counters without _total; METRIC_NAMES has the names one queries.
    queried = {n + "_total" if n + "_total" in metrics.METRIC_NAMES else n for n in families}
    assert queried == metrics.METRIC_NAMES


def test_the_process_registry_is_shared() -> None:
    assert isinstance(metrics.REGISTRY, CollectorRegistry)
    assert metrics.METRICS_SERVICE == "agentmesh-metrics"
