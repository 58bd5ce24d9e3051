"""With ``tracing.otlp_endpoint`` set, a run's spans leave the process over OTLP/gRPC.

The receiver is a real gRPC server implementing OpenTelemetry's collector TraceService (the
protocol any OTLP collector speaks); the run happens in a child process so that its global
tracer provider is its own.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

pytestmark = pytest.mark.integration

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from opentelemetry import trace
    from agentmesh.tracing import configure_tracing
    from agentmesh.agent import Role
    from agentmesh.agent.local import LocalMesh, LocalRole
    from agentmesh.agent.routing import Sequential
    from agentmesh.discovery.memory import MemoryDiscovery
    from agentmesh.driver import RunDriver

    class Echo(Role):
        async def step(self, task):
            task.add_turn("hi")

    class Null:
        def write(self, r): return True
        def maybe_flush(self): pass
        def flush(self): pass

    async def main():
        disc = MemoryDiscovery()
        prog = Sequential("p", ["a", "b"])
        mesh = LocalMesh(run_id="otlp", roles={"a": LocalRole(Echo), "b": LocalRole(Echo)},
                         programs={"p": prog}, discovery=disc)
        await mesh.start()
        d = RunDriver(run_id="otlp", program=prog, discovery=disc, writer=Null(),
                      tasks=((f"t{i}", 0, {}) for i in range(3)), roles=prog.roles(), recovery_interval_s=0)
        await d.start()
        await d.run()
        await d.stop()
        await mesh.stop()

    assert configure_tracing("otlp-test", otlp_endpoint=sys.argv[1])
    asyncio.run(main())
    trace.get_tracer_provider().shutdown()  # flushes the batch processor
    """
)


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list = []

    async def Export(self, request, context):
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                self.spans.extend(ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_spans_are_exported_over_otlp(tmp_path: Path) -> None:
    receiver = Receiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        script = tmp_path / "child.py"
        script.write_text(CHILD)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(script), f"http://127.0.0.1:{port}", stderr=subprocess.PIPE
        )
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()[-2000:]
    finally:
        await server.stop(0)
    names = [s.name for s in receiver.spans]
    assert sorted(n for n in names if n.startswith("task ")) == ["task t0", "task t1", "task t2"]
    assert names.count("step a") == 3 and names.count("step b") == 3
    by_trace: dict[bytes, set[str]] = {}
    for s in receiver.spans:
        by_trace.setdefault(s.trace_id, set()).add(s.name)
    assert len(by_trace) == 3  # one trace per task
    assert all({"step a", "step b"} <= names_ for names_ in by_trace.values())
