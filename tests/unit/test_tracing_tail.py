"""Tail sampling's parts without a mesh: spans carried in the Orchestrator and the per-process buffer."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from agentmesh import tracing
from agentmesh.errors import ConfigError
from agentmesh.v1 import orchestrator_pb2 as pb


def _finished_span() -> Any:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    t = provider.get_tracer("x")
    with (
        t.start_as_current_span("task t1") as root,
        t.start_as_current_span("step a", kind=SpanKind.SERVER) as s,
    ):
        s.set_attribute("agentmesh.role", "a")
        s.set_attribute("n", 3)
        s.set_attribute("ratio", 0.5)
        s.set_attribute("flags", (True, False))
        s.add_event("retry", {"attempt": 2})
        s.set_status(StatusCode.ERROR, "boom")
    spans = {sp.name: sp for sp in exporter.get_finished_spans()}
    return spans["step a"], root


def test_a_carried_span_comes_back_as_it_was() -> None:
    span, root = _finished_span()
    carried = tracing._encode(span, "agentmesh.a")
    wire = pb.Orchestrator(trace=pb.TraceContext(spans=[carried])).SerializeToString()
    back = pb.Orchestrator.FromString(wire).trace.spans[0]
    out = tracing._decode(back, span.context.trace_id)
    assert out.name == "step a" and out.kind == SpanKind.SERVER
    assert out.context.trace_id == span.context.trace_id and out.context.span_id == span.context.span_id
    assert out.parent.span_id == root.get_span_context().span_id
    assert (out.start_time, out.end_time) == (span.start_time, span.end_time)
    assert dict(out.attributes) == {"agentmesh.role": "a", "n": 3, "ratio": 0.5, "flags": (True, False)}
    assert out.status.status_code == StatusCode.ERROR and out.status.description == "boom"
    assert [(e.name, dict(e.attributes)) for e in out.events] == [("retry", {"attempt": 2})]
    assert out.resource.attributes["service.name"] == "agentmesh.a"


def test_an_open_hop_is_ended_by_its_receiver() -> None:
    orch = pb.Orchestrator()
    orch.trace.spans.add(name="hop a -> b", start_unix_ns=5, attributes_json='{"agentmesh.to_role":"b"}')
    tracing.hop_arrived(orch, "b-0-1")
    hop = orch.trace.spans[0]
    assert hop.end_unix_ns >= hop.start_unix_ns > 0
    assert json.loads(hop.attributes_json) == {"agentmesh.to_role": "b", "agentmesh.to_replica": "b-0-1"}
    end = hop.end_unix_ns
    tracing.hop_arrived(orch, "c")  # already ended: untouched
    assert orch.trace.spans[0].end_unix_ns == end


def _fake(trace_id: int, span_id: int) -> Any:
    return SimpleNamespace(
        context=SimpleNamespace(trace_id=trace_id, span_id=span_id, trace_flags=SimpleNamespace(sampled=True))
    )


def test_tail_buffer_holds_by_trace_and_is_bounded() -> None:
    buf = tracing._TailBuffer(max_spans=5)
    for i in range(3):
        assert buf.add(_fake(1, 10 + i)) is False
    for i in range(3):
        buf.add(_fake(2, 20 + i))  # 6 > 5: trace 1 (the oldest) goes
    assert buf.evicted == 3
    assert buf.take(1) == []
    assert [s.context.span_id for s in buf.take(2)] == [20, 21, 22]


def test_tail_buffer_follows_the_decision_for_stragglers_and_skips_open_hops() -> None:
    buf = tracing._TailBuffer()
    buf.add(_fake(7, 1))
    assert len(buf.take(7, kept=True)) == 1
    assert buf.add(_fake(7, 2)) is True  # kept trace: the late span is exported at once
    buf.take(8, kept=False)
    assert buf.add(_fake(8, 3)) is False and buf.take(8) == []  # dropped trace: dropped too
    buf.mark_open(99)
    assert buf.add(_fake(9, 99)) is False and buf.take(9) == []  # it travelled in the task


def test_bad_sampling_mode_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"tracing.sampling: 'sometimes'"):
        tracing.configure_tracing("x", sampling="sometimes")
    with pytest.raises(ConfigError, match=r"tracing.sample_ratio"):
        tracing.configure_tracing("x", sampling="ratio", sample_ratio=1.5)
