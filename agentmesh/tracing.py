"""OpenTelemetry tracing: one trace per task, its context carried inside the Orchestrator.

The source opens a root span per task (``task <id>``) and writes its W3C context into
``Orchestrator.trace``; every replica that touches the task opens its ``queue``/``step``/``hop``
spans as children of that root, whatever process it runs in; the sink ends the root. Between
processes the context also travels in gRPC metadata (``traceparent``), put there and read back by
the interceptors of this module, so a server's span of a call joins the caller's trace without
code in any servicer.

Sampling (``configure_tracing(sampling=...)``), decided once per task:

* ``off``: no spans (the API is a no-op; no interceptors are installed);
* ``always`` / ``ratio``: head sampling at the source (``ParentBased``), every process exports
  its own spans of sampled tasks over OTLP;
* ``tail``: every span is recorded, but nothing leaves a process on its own. A replica moves the
  task's finished spans into ``Orchestrator.trace.spans`` when it forwards the task (the hop that
  carries it travels as an *open* span, which the receiver ends on arrival); the sink then knows
  the outcome and exports the whole trace only if the task failed, was slow (``slow_s``), or falls
  in ``ratio`` of the rest. No collector has to hold every trace until the end: the task carries
  its own. Spans of processes off the task's path (a gateway or holder server) follow their own
  process's head sampling.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from agentmesh.config import SAMPLING_MODES, TracingConfig
from agentmesh.errors import ConfigError
from agentmesh.v1 import orchestrator_pb2 as pb

__all__ = [
    "SAMPLING_MODES",
    "carry_spans",
    "client_interceptors",
    "configure_tracing",
    "configure_tracing_from",
    "context_from",
    "finish_task",
    "force_flush",
    "hop_arrived",
    "hop_failed",
    "hop_span",
    "inject_into",
    "server_interceptors",
    "traced_call_metadata",
    "tracer",
    "uncarry_open",
]

log = logging.getLogger(__name__)
_PROPAGATOR = TraceContextTextMapPropagator()


_TRACER = trace.get_tracer("agentmesh")  # a proxy until a provider is set, then that provider's


def tracer() -> trace.Tracer:
    return _TRACER


def traced_call_metadata() -> tuple[tuple[str, str], ...] | None:
    """gRPC metadata carrying the current span's context, None if it is not sampled (cheap)."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.trace_flags.sampled:
        return None
    return (("traceparent", f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"),)


@dataclass
class TracingState:
    """What this process does with spans (one per process; swapped by :func:`configure_tracing`)."""

    mode: str = "off"
    ratio: float = 1.0
    slow_s: float = 0.0
    service: str = "agentmesh"

    @property
    def on(self) -> bool:
        return self.mode != "off"


_STATE = TracingState()
_LOCK = threading.Lock()
_provider: Any = None  # the SDK TracerProvider this module installed
_sampler: Any = None  # its _SwitchSampler
_router: Any = None  # its _RouterProcessor


# -- configuration ---------------------------------------------------------------------------
def configure_tracing(
    service_name: str,
    *,
    sampling: str | None = None,
    sample_ratio: float = 1.0,
    slow_s: float = 0.0,
    otlp_endpoint: str | None = None,
    console: bool = False,
    exporter: Any | None = None,
) -> bool:
    """Set what this process does with spans; returns True if tracing is on.

    ``sampling`` is one of :data:`SAMPLING_MODES`; None means ``always`` (or ``ratio`` when
    ``sample_ratio`` < 1). Spans go to ``otlp_endpoint`` (OTLP/gRPC, e.g. ``http://127.0.0.1:4317``),
    to ``exporter`` (any SpanExporter; tests pass the SDK's InMemorySpanExporter) and/or the console.
    With no destination and no explicit ``sampling`` the process is left as it is (False if it
    was never configured). The first call installs the global TracerProvider; later calls swap
    its sampler and destinations, so one process can change mode (tests, benchmarks).
    """
    global _provider, _sampler, _router
    if sampling is None:
        if otlp_endpoint is None and exporter is None and not console:
            return _STATE.on
        sampling = "always" if sample_ratio >= 1.0 else "ratio"
    if sampling not in SAMPLING_MODES:
        raise ConfigError(f"tracing.sampling: {sampling!r} is not one of {', '.join(SAMPLING_MODES)}")
    if not 0.0 <= sample_ratio <= 1.0:
        raise ConfigError(f"tracing.sample_ratio: {sample_ratio} is not in [0, 1]")
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    with _LOCK:
        if sampling == "off" or (otlp_endpoint is None and exporter is None and not console):
            sampling = "off"
        destinations: list[tuple[Any, bool]] = []  # (processor, whether we own its exporter)
        if sampling != "off":
            if exporter is not None:
                destinations.append((SimpleSpanProcessor(exporter), False))
            if otlp_endpoint is not None:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

                destinations.append(
                    (BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)), True)
                )
            if console:
                destinations.append((BatchSpanProcessor(ConsoleSpanExporter()), True))
        if _provider is None:
            if sampling == "off":
                return False  # never configured: the API stays a no-op
            _sampler = _SwitchSampler()
            _router = _RouterProcessor()
            _provider = TracerProvider(
                resource=Resource.create({"service.name": service_name}), sampler=_sampler
            )
            _provider.add_span_processor(_router)
            trace.set_tracer_provider(_provider)
        _sampler.set(sampling, sample_ratio)
        old = _router.swap(sampling, destinations)
        _STATE.mode, _STATE.ratio, _STATE.slow_s, _STATE.service = (
            sampling,
            sample_ratio,
            slow_s,
            service_name,
        )
        # the resource is fixed at provider creation; carried spans name their process themselves
    for proc, owned in old:
        if owned:
            proc.shutdown()  # flushes what it still holds and stops its thread
        else:
            proc.force_flush()  # the caller's exporter stays usable
    return _STATE.on


def configure_tracing_from(service_name: str, cfg: TracingConfig) -> bool:
    """:func:`configure_tracing` with a run config's ``tracing:`` section."""
    return configure_tracing(
        service_name,
        sampling=cfg.sampling,
        otlp_endpoint=cfg.otlp_endpoint,
        sample_ratio=cfg.sample_ratio,
        slow_s=cfg.slow_s,
        console=cfg.console,
    )


def force_flush(timeout_ms: int = 10_000) -> None:
    """Export what this process's destinations still hold (before it exits)."""
    if _router is not None:
        _router.force_flush(timeout_ms)


class _SwitchSampler:
    """ParentBased sampling whose root decision can be swapped at run time."""

    def __init__(self) -> None:
        from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

        self._inner: Any = ALWAYS_OFF

    def set(self, mode: str, ratio: float) -> None:
        from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, TraceIdRatioBased

        if mode == "off":
            self._inner = ALWAYS_OFF
        elif mode == "ratio":
            self._inner = ParentBased(TraceIdRatioBased(ratio))
        else:  # always; tail records everything and decides at the sink
            self._inner = ParentBased(ALWAYS_ON)

    def should_sample(self, *args: Any, **kwargs: Any) -> Any:
        return self._inner.should_sample(*args, **kwargs)

    def get_description(self) -> str:
        return f"agentmesh({self._inner.get_description()})"


class _RouterProcessor(SpanProcessor):
    """Sends finished spans to the destinations (head modes) or to the tail buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.destinations: list[Any] = []
        self._owned: list[tuple[Any, bool]] = []
        self.tail: _TailBuffer | None = None

    def swap(self, mode: str, destinations: list[tuple[Any, bool]]) -> list[tuple[Any, bool]]:
        old, self._owned = self._owned, destinations
        self.destinations = [d for d, _ in destinations]
        self.tail = _TailBuffer() if mode == "tail" else None
        return old

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        for d in self.destinations:
            d.on_start(span, parent_context=parent_context)

    def on_end(self, span: Any) -> None:
        if self.tail is not None:
            if self.tail.add(span):  # a straggler of a trace already kept: it goes out after it
                self.export([span])
            return
        for d in self.destinations:
            d.on_end(span)

    def export(self, spans: Sequence[Any]) -> None:
        for s in spans:
            for d in self.destinations:
                d.on_end(s)

    def shutdown(self) -> None:
        for d in self.destinations:
            d.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return all(d.force_flush(timeout_millis) for d in self.destinations)


class _TailBuffer:
    """Finished spans of this process, by trace, until their task leaves (tail sampling).

    Bounded: a span that ends after its trace was decided here (the sink's own server span of the
    last hop, say) follows the decision at once, and past ``max_spans`` the oldest trace goes
    (counted in ``evicted``), so spans that end after their task left never pile up.
    """

    def __init__(self, max_spans: int = 200_000, decided_memory: int = 100_000) -> None:
        self._lock = threading.Lock()
        self._by_trace: OrderedDict[int, list[Any]] = OrderedDict()
        self._size = 0
        self._max = max_spans
        self._open: set[int] = set()  # span ids travelling open in a task: their end is not ours
        self._decided: OrderedDict[int, bool] = OrderedDict()  # trace id -> kept
        self._decided_max = decided_memory
        self.evicted = 0

    def add(self, span: Any) -> bool:
        """Hold ``span``; True if it is to be exported right away instead (its trace was kept)."""
        ctx = span.context
        if not ctx.trace_flags.sampled:
            return False
        with self._lock:
            if ctx.span_id in self._open:
                self._open.discard(ctx.span_id)
                return False
            kept = self._decided.get(ctx.trace_id)
            if kept is not None:
                return kept
            self._by_trace.setdefault(ctx.trace_id, []).append(span)
            self._size += 1
            while self._size > self._max and self._by_trace:
                _, spans = self._by_trace.popitem(last=False)
                self._size -= len(spans)
                self.evicted += len(spans)
            return False

    def take(self, trace_id: int, *, kept: bool | None = None) -> list[Any]:
        """The spans held for ``trace_id``; ``kept`` records the sink's decision for stragglers."""
        with self._lock:
            spans = self._by_trace.pop(trace_id, [])
            self._size -= len(spans)
            if kept is not None:
                self._decided[trace_id] = kept
                if len(self._decided) > self._decided_max:
                    self._decided.popitem(last=False)
            return spans

    def mark_open(self, span_id: int) -> None:
        with self._lock:
            self._open.add(span_id)

    def unmark_open(self, span_id: int) -> None:
        with self._lock:
            self._open.discard(span_id)


# -- the task's context in the Orchestrator ----------------------------------------------------
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


# -- tail sampling: spans that travel with the task ---------------------------------------------
def _tail() -> _TailBuffer | None:
    r = _router
    return r.tail if r is not None else None


@contextlib.contextmanager
def hop_span(orch: pb.Orchestrator, from_role: str, to_role: str, parent: Any) -> Iterator[Any]:
    """The span of one hop (``hop <from> -> <to>``, CLIENT, a child of the task's root): current
    while the task is sent, and travelling open inside it under tail sampling. A send that fails
    is reported with :func:`hop_failed` inside the block."""
    with tracer().start_as_current_span(
        f"hop {from_role} -> {to_role}",
        context=parent,
        kind=SpanKind.CLIENT,
        attributes={"agentmesh.task_id": orch.task_id, "agentmesh.to_role": to_role},
    ) as span:
        carry_spans(orch, open_span=span)  # tail sampling: the task takes its spans along
        yield span


def hop_failed(orch: pb.Orchestrator, span: Any, error: str) -> None:
    """The hop did not deliver: its span ends here, with the error, and no longer travels."""
    uncarry_open(orch, span)
    span.set_attribute("agentmesh.error", error)
    span.set_status(Status(StatusCode.ERROR, error[:200]))


def carry_spans(orch: pb.Orchestrator, open_span: Any = None) -> None:
    """Before the task leaves this process: move its finished spans into ``orch`` (tail mode only).

    ``open_span`` is the hop that sends it; it travels open and the receiver ends it
    (:func:`hop_arrived`), since its end is the task's arrival there.
    """
    tail = _tail()
    if tail is None or not orch.trace.traceparent:
        return
    trace_id = _trace_id_of(orch)
    if trace_id is None:
        return
    service = _STATE.service
    for s in tail.take(trace_id):
        orch.trace.spans.append(_encode(s, service))
    if open_span is not None and open_span.is_recording():
        tail.mark_open(open_span.get_span_context().span_id)
        orch.trace.spans.append(_encode(open_span, service, open_=True))


def uncarry_open(orch: pb.Orchestrator, open_span: Any) -> None:
    """The hop carried open did not deliver: take it back (it ends here, with its error)."""
    tail = _tail()
    if tail is None:
        return
    sid = open_span.get_span_context().span_id.to_bytes(8, "big")
    for i in range(len(orch.trace.spans) - 1, -1, -1):
        if orch.trace.spans[i].span_id == sid:
            del orch.trace.spans[i]
            break
    tail.unmark_open(open_span.get_span_context().span_id)


def hop_arrived(orch: pb.Orchestrator, receiver: str) -> None:
    """The task arrived: end the hop span that brought it (tail mode; cheap otherwise)."""
    if not orch.trace.spans:
        return
    last = orch.trace.spans[-1]
    if last.end_unix_ns == 0:
        last.end_unix_ns = max(time.time_ns(), last.start_unix_ns)
        attrs = json.loads(last.attributes_json or "{}")
        attrs["agentmesh.to_replica"] = receiver
        last.attributes_json = json.dumps(attrs, separators=(",", ":"))


def finish_task(orch: pb.Orchestrator, root: Any, *, failed: bool, duration_s: float) -> str | None:
    """End the task's root span at the sink; under tail sampling decide and export the trace.

    Returns why the trace was kept (``failed``, ``slow``, ``sampled``, or ``head`` outside tail
    mode), or None if it was dropped or tracing is off.
    """
    tail = _tail()
    if tail is None:
        root.end()
        return "head" if root.get_span_context().trace_flags.sampled and _STATE.on else None
    reason: str | None = None
    trace_id = root.get_span_context().trace_id
    if failed:
        reason = "failed"
    elif _STATE.slow_s > 0 and duration_s >= _STATE.slow_s:
        reason = "slow"
    elif _STATE.ratio > 0 and (trace_id & 0xFFFFFFFFFFFFFFFF) < _STATE.ratio * 2**64:
        reason = "sampled"  # the same rule as TraceIdRatioBased: a stable choice per trace
    if reason is not None:
        root.set_attribute("agentmesh.trace_kept", reason)
    root.end()
    local = tail.take(trace_id, kept=reason is not None)
    if reason is None or _router is None:
        return None
    carried = [_decode(c, trace_id) for c in orch.trace.spans]
    _router.export([*carried, *local])
    return reason


def _trace_id_of(orch: pb.Orchestrator) -> int | None:
    parts = orch.trace.traceparent.split("-")
    if len(parts) < 3:
        return None
    try:
        return int(parts[1], 16)
    except ValueError:
        return None


def _attr_json(attrs: Any) -> str:
    if not attrs:
        return ""
    return json.dumps(
        {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()}, separators=(",", ":")
    )


def _attrs_from_json(text: str) -> dict[str, Any]:
    if not text:
        return {}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(text).items()}


def _encode(span: Any, service: str, *, open_: bool = False) -> pb.CarriedSpan:
    ctx = span.get_span_context() if open_ else span.context
    out = pb.CarriedSpan(
        span_id=ctx.span_id.to_bytes(8, "big"),
        name=span.name,
        kind=span.kind.value,
        start_unix_ns=span.start_time or 0,
        end_unix_ns=0 if open_ else (span.end_time or 0),
        service=service,
        attributes_json=_attr_json(span.attributes),
    )
    if span.parent is not None:
        out.parent_span_id = span.parent.span_id.to_bytes(8, "big")
    if not open_:
        out.status_code = span.status.status_code.value
        out.status_message = span.status.description or ""
        if span.events:
            out.events_json = json.dumps(
                [
                    {"name": e.name, "t": e.timestamp, "attributes": dict(e.attributes or {})}
                    for e in span.events
                ],
                separators=(",", ":"),
                default=str,
            )
    return out


def _decode(c: pb.CarriedSpan, trace_id: int) -> Any:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, TraceFlags

    flags = TraceFlags(TraceFlags.SAMPLED)
    ctx = SpanContext(trace_id, int.from_bytes(c.span_id, "big"), is_remote=False, trace_flags=flags)
    parent = None
    if c.parent_span_id:
        parent = SpanContext(
            trace_id, int.from_bytes(c.parent_span_id, "big"), is_remote=False, trace_flags=flags
        )
    events = [
        Event(e["name"], e.get("attributes") or {}, int(e["t"])) for e in json.loads(c.events_json or "[]")
    ]
    end = c.end_unix_ns or c.start_unix_ns  # an open hop that never arrived (the task was lost)
    return ReadableSpan(
        name=c.name,
        context=ctx,
        parent=parent,
        resource=Resource.create({"service.name": c.service or "agentmesh"}),
        attributes=_attrs_from_json(c.attributes_json),
        events=events,
        kind=SpanKind(c.kind),
        status=Status(StatusCode(c.status_code), c.status_message or None),
        start_time=c.start_unix_ns,
        end_time=end,
        instrumentation_scope=InstrumentationScope("agentmesh"),
    )


# -- gRPC interceptors: the context in metadata, a server span per traced call -------------------
def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """Interceptors for a ``grpc.aio.server`` (none while tracing is off)."""
    return [_ServerInterceptor()] if _STATE.on else []


def client_interceptors() -> list[Any]:
    """Interceptors for a ``grpc.aio`` channel (none while tracing is off)."""
    return [_ClientInterceptor()] if _STATE.on else []


def _traceparent_of(metadata: Any) -> tuple[str | None, str | None]:
    tp = ts = None
    for item in metadata or ():
        key, value = item[0], item[1]
        if key == "traceparent":
            tp = value
        elif key == "tracestate":
            ts = value
    return tp, ts


class _ServerInterceptor(grpc.aio.ServerInterceptor):
    """Opens a SERVER span for a call that arrives with a ``traceparent`` (untraced calls: none)."""

    async def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or not _STATE.on or handler.unary_unary is None:
            return handler
        tp, ts = _traceparent_of(handler_call_details.invocation_metadata)
        if tp is None:
            return handler
        carrier = {"traceparent": tp}
        if ts:
            carrier["tracestate"] = ts
        parent = _PROPAGATOR.extract(carrier)
        method = handler_call_details.method  # "/package.Service/Method"
        service, _, name = method.lstrip("/").partition("/")
        inner = handler.unary_unary

        async def traced(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with tracer().start_as_current_span(
                f"rpc {service.rpartition('.')[2]}/{name}",
                context=parent,
                kind=SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                try:
                    return await inner(request, context)
                except BaseException:
                    code = context.code() if hasattr(context, "code") else None
                    if code is not None and code != grpc.StatusCode.OK:
                        span.set_attribute("rpc.grpc.status_code", code.value[0])
                        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {context.details() or ''}"))
                    else:
                        span.set_status(Status(StatusCode.ERROR, "handler raised"))
                    raise

        return grpc.unary_unary_rpc_method_handler(
            traced,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class _ClientInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Puts the caller's trace context into the call's metadata."""

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        span = trace.get_current_span()
        if span.get_span_context().is_valid:
            carrier: dict[str, str] = {}
            _PROPAGATOR.inject(carrier)
            md = grpc.aio.Metadata(*tuple(client_call_details.metadata or ()))
            for k, v in carrier.items():
                md.add(k, v)
            client_call_details = client_call_details._replace(metadata=md)
        return await continuation(client_call_details, request)
