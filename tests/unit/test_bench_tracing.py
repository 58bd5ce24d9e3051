"""Pure pieces of bench/tracing.py and bench/otlp_sink.py: the modes and their overrides, the
interleaved schedule, the summary (medians, ratios, cost, spans per task), the verdict, the
markdown block, and how the receiver counts an OTLP export request."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from agentmesh.config import load_config
from tests.bench_scripts import load_bench


@pytest.fixture(scope="module")
def tb() -> ModuleType:
    return load_bench("bench_tracing", "tracing.py")


@pytest.fixture(scope="module")
def sink() -> ModuleType:
    return load_bench("bench_otlp_sink", "otlp_sink.py")


def test_modes_offer_tail_only_where_tracing_has_it(tb: ModuleType) -> None:
    names = [m.name for m in tb.modes(["off", "always", "ratio"])]
    assert names == ["off", "ratio 10%", "always 100%"]
    assert [m.name for m in tb.modes(["off", "always", "ratio", "tail"])][-1] == "tail 10%"


def test_off_sends_nowhere_and_the_others_export(tb: ModuleType) -> None:
    off, ratio, always, tail = tb.modes(["tail"])
    assert off.overrides("http://x:1") == ["tracing.sampling=off"]  # no endpoint: nothing to export
    assert not off.exports and ratio.exports and always.exports and tail.exports
    assert ratio.overrides("http://x:1") == [
        "tracing.sampling=ratio",
        "tracing.otlp_endpoint='http://x:1'",
        "tracing.sample_ratio=0.1",
    ]
    assert "tracing.sample_ratio=1.0" in always.overrides("http://x:1")


@pytest.mark.parametrize("workload", ["mesh", "llm"])
def test_every_mode_and_workload_makes_a_valid_run_config(tb: ModuleType, workload: str) -> None:
    for mode in tb.modes(["tail"]):
        cfg = load_config(
            tb.CONFIG,
            ["output.dir=/tmp/x", *tb.workload_overrides(workload), *mode.overrides("http://h:4317")],
        )
        assert cfg.tracing.sampling == mode.sampling
        assert cfg.dataset.limit is None and cfg.dataset.trials == tb.WORKLOADS[workload]["trials"]
        assert (cfg.tracing.otlp_endpoint is not None) == mode.exports
        assert set(cfg.roles) == set(tb.ROLES)  # at least three roles, the ones the bench names
    assert "dataset.trials=7" in tb.workload_overrides("mesh", 7)


def test_schedule_runs_each_mode_once_per_round_in_rotated_order(tb: ModuleType) -> None:
    plan = tb.schedule(["off", "a", "b"], 4)
    assert plan == [["off", "a", "b"], ["a", "b", "off"], ["b", "off", "a"], ["off", "a", "b"]]
    assert all(sorted(r) == ["a", "b", "off"] for r in plan)
    firsts = [r[0] for r in plan[:3]]
    assert sorted(firsts) == ["a", "b", "off"]  # no mode always first


def _run(tps: float, tasks: int = 100, spans: int = 0, traces: int = 0) -> dict[str, Any]:
    return {"tasks": tasks, "tasks_per_s": tps, "spans": spans, "traces": traces, "roots": traces}


def test_summary_ratios_cost_and_spans_per_task(tb: ModuleType) -> None:
    runs = {
        "off": [_run(100.0), _run(110.0), _run(90.0)],
        "ratio 10%": [_run(99.0, spans=400, traces=10), _run(108.0, spans=380, traces=9), _run(89.0)],
        "always 100%": [_run(95.0, spans=4000, traces=100)] * 3,
    }
    s = tb.summarize(runs)
    assert s["off"]["tasks_per_s_median"] == 100.0 and s["off"]["cost"] == 0.0
    assert s["always 100%"]["ratio"] == pytest.approx(0.95)
    assert s["always 100%"]["cost"] == pytest.approx(0.05)
    assert s["always 100%"]["spans_per_task"] == pytest.approx(40.0)
    assert s["always 100%"]["traces_per_task"] == pytest.approx(1.0)
    assert s["ratio 10%"]["traces_per_task"] == pytest.approx(19 / 300)
    assert s["ratio 10%"]["tasks_per_s_min"] == 89.0 and s["ratio 10%"]["tasks_per_s_max"] == 108.0
    # paired: each round against the same round's off (0.99, 0.982, 0.989), then the median
    assert s["ratio 10%"]["paired_ratio_median"] == pytest.approx(89 / 90)


def test_verdict_is_pass_up_to_the_goal_and_miss_beyond(tb: ModuleType) -> None:
    assert tb.verdict(0.0) == "PASS" and tb.verdict(-0.02) == "PASS" and tb.verdict(0.03) == "PASS"
    assert tb.verdict(0.031) == "MISS"


def test_markdown_has_a_row_per_mode_and_the_verdict(tb: ModuleType) -> None:
    runs = {"off": [_run(100.0)], "always 100%": [_run(90.0, spans=3000, traces=100)]}
    md = tb.markdown(tb.summarize(runs), {"workload": "mesh", "tasks": 100, "rounds": 1})
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| mode")]
    assert [r.split("|")[1].strip() for r in rows] == ["off", "always 100%"]
    assert "+10.0%" in rows[1] and "| 30.0 |" in rows[1]
    assert "**MISS** (+10.0%)" in md


def _span(trace: int, span: int, parent: int, name: str) -> trace_pb2.Span:
    return trace_pb2.Span(
        trace_id=trace.to_bytes(16, "big"),
        span_id=span.to_bytes(8, "big"),
        parent_span_id=parent.to_bytes(8, "big") if parent else b"",
        name=name,
    )


def _request(service: str, spans: list[trace_pb2.Span]) -> trace_service_pb2.ExportTraceServiceRequest:
    attr = common_pb2.KeyValue(key="service.name", value=common_pb2.AnyValue(string_value=service))
    rs = trace_pb2.ResourceSpans(scope_spans=[trace_pb2.ScopeSpans(spans=spans)])
    rs.resource.attributes.append(attr)
    return trace_service_pb2.ExportTraceServiceRequest(resource_spans=[rs])


def test_receiver_counts_spans_traces_roots_kinds_and_services(sink: ModuleType) -> None:
    counts = sink.SpanCounts()
    counts.add(_request("agentmesh.driver", [_span(1, 1, 0, "task t1"), _span(2, 5, 0, "task t2")]))
    counts.add(
        _request(
            "agentmesh.teacher",
            [
                _span(1, 2, 1, "step teacher"),
                _span(1, 3, 2, "llm.chat"),
                _span(2, 6, 5, "hop teacher -> sink"),
            ],
        )
    )
    snap = counts.snapshot()
    assert snap["requests"] == 2 and snap["spans"] == 5 and snap["traces"] == 2 and snap["roots"] == 2
    assert snap["by_kind"] == {"task": 2, "step": 1, "llm.chat": 1, "hop": 1}
    assert snap["by_service"] == {"agentmesh.driver": 2, "agentmesh.teacher": 3}
    counts.reset()
    assert counts.snapshot() == {
        "requests": 0,
        "spans": 0,
        "roots": 0,
        "traces": 0,
        "by_kind": {},
        "by_service": {},
    }
