"""OpenTelemetry tracing: one trace per task, its context carried inside the Orchestrator.

The source opens a root span per task (``task <id>``) and writes its W3C context into
``Orchestrator.trace``; every replica that touches the task opens its ``step``/``hop`` spans as
children of that root, whatever process it runs in; the sink ends the root. Without a configured
provider the API is a no-op, so the hot path pays (almost) nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from agentmesh.v1 import orchestrator_pb2 as pb

__all__ = ["configure_tracing", "context_from", "inject_into", "tracer"]

log = logging.getLogger(__name__)
_PROPAGATOR = TraceContextTextMapPropagator()
_configured = False


def tracer() -> trace.Tracer:
    return trace.get_tracer("agentmesh")


def configure_tracing(
    service_name: str,
    *,
    otlp_endpoint: str | None = None,
    sample_ratio: float = 1.0,
    console: bool = False,
    exporter: Any | None = None,
) -> bool:
    """Install a TracerProvider for this process if something is to be exported. Idempotent.

    ``otlp_endpoint`` (gRPC, e.g. ``http://127.0.0.1:4317``) exports over OTLP; ``exporter`` is any
    SpanExporter (tests pass the SDK's InMemorySpanExporter). Returns True if tracing is on.
    """
    global _configured
    if _configured:
        return True
    if otlp_endpoint is None and exporter is None and not console:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name}),
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
    )
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    if otlp_endpoint is not None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True))
        )
    if console:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    _configured = True
    return True


def inject_into(orch: pb.Orchestrator, ctx: otel_context.Context | None = None) -> None:
    """Write the W3C context of ``ctx`` (default: the current one) into ``orch.trace``."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=ctx)
    if "traceparent" in carrier:
        orch.trace.traceparent = carrier["traceparent"]
        if "tracestate" in carrier:
            orch.trace.tracestate = carrier["tracestate"]


def context_from(orch: pb.Orchestrator) -> otel_context.Context | None:
    """The task's trace context carried in ``orch`` (None if it carries none)."""
    if not orch.trace.traceparent:
        return None
    carrier = {"traceparent": orch.trace.traceparent}
    if orch.trace.tracestate:
        carrier["tracestate"] = orch.trace.tracestate
    return _PROPAGATOR.extract(carrier)
