"""A minimal OTLP/gRPC trace receiver that counts what it gets: the benchmarks' collector.

    python bench/otlp_sink.py [--host 127.0.0.1] [--port 0]

Implements OpenTelemetry's collector ``TraceService/Export`` (the protocol every OTLP exporter
speaks) and keeps only counts: spans, distinct traces, root spans, spans per name kind (the word
before the first space: ``task``, ``step``, ``hop``, ``queue``, ``llm.chat``, ``rpc``) and per
exporting service (``service.name``). It runs as a process of its own so that receiving costs
the measured run nothing but the CPU the machine shares.

Control is a line protocol on stdin/stdout, so no second port is needed: the first stdout line is
``{"port": N}``; each ``snapshot`` line in is answered with one JSON line of the counts so far;
``reset`` zeroes them (answered ``{"reset": true}``); EOF or ``quit`` stops the server.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections import Counter
from concurrent import futures
from typing import Any

__all__ = ["SpanCounts", "main"]


class SpanCounts:
    """What the receiver has seen; thread-safe (gRPC calls arrive on a pool of threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.spans = 0
        self.roots = 0
        self.requests = 0
        self.traces: set[bytes] = set()
        self.by_kind: Counter[str] = Counter()
        self.by_service: Counter[str] = Counter()

    def add(self, request: Any) -> None:
        """Count the spans of one ``ExportTraceServiceRequest``."""
        n = roots = 0
        traces: set[bytes] = set()
        kinds: Counter[str] = Counter()
        services: Counter[str] = Counter()
        for rs in request.resource_spans:
            service = next(
                (a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), ""
            )
            for ss in rs.scope_spans:
                for span in ss.spans:
                    n += 1
                    traces.add(span.trace_id)
                    kinds[span.name.split(" ", 1)[0]] += 1
                    services[service] += 1
                    if not span.parent_span_id:
                        roots += 1
        with self._lock:
            self.requests += 1
            self.spans += n
            self.roots += roots
            self.traces |= traces
            self.by_kind += kinds
            self.by_service += services

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self.requests,
                "spans": self.spans,
                "roots": self.roots,
                "traces": len(self.traces),
                "by_kind": dict(self.by_kind),
                "by_service": dict(self.by_service),
            }

    def reset(self) -> None:
        with self._lock:
            self.spans = self.roots = self.requests = 0
            self.traces = set()
            self.by_kind = Counter()
            self.by_service = Counter()


def _serve(host: str, port: int, counts: SpanCounts) -> tuple[Any, int]:
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:
            counts.add(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
    )
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(), server)  # type: ignore[no-untyped-call]
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    return server, bound


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port (printed first)")
    ns = parser.parse_args(argv)
    counts = SpanCounts()
    server, port = _serve(ns.host, ns.port, counts)
    print(json.dumps({"port": port}), flush=True)
    try:
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "snapshot":
                print(json.dumps(counts.snapshot()), flush=True)
            elif cmd == "reset":
                counts.reset()
                print(json.dumps({"reset": True}), flush=True)
            elif cmd == "quit":
                break
            elif cmd:
                print(json.dumps({"error": f"unknown command {cmd!r}"}), flush=True)
    finally:
        server.stop(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
