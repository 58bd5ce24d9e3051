"""Conversions between the sandbox types and their protobuf messages (``agentmesh.v1.container``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agentmesh.container.sandbox import ExecResult, Limits, SandboxError
from agentmesh.tracing import server_interceptors
from agentmesh.v1 import container_pb2 as cpb

__all__ = [
    "HOLDER_SERVICE_PREFIX",
    "REGISTRY_SERVICE_PREFIX",
    "exec_reply",
    "exec_result",
    "holder_service",
    "limits_from_pb",
    "limits_to_pb",
    "registry_service",
    "set_serving",
    "start_server",
    "validate_exec",
]

HOLDER_SERVICE_PREFIX = "container.holder."
REGISTRY_SERVICE_PREFIX = "container.registry."


def holder_service(name: str) -> str:
    """Discovery service of the holders of registry ``name``."""
    return f"{HOLDER_SERVICE_PREFIX}{name}"


def registry_service(name: str) -> str:
    return f"{REGISTRY_SERVICE_PREFIX}{name}"


def limits_from_pb(msg: cpb.SandboxLimits, base: Limits) -> Limits:
    """``base`` with every non-zero field of ``msg`` applied (raises SandboxError naming a bad field)."""
    over: dict[str, object] = {}
    if msg.cpu_time_s:
        over["cpu_time_s"] = msg.cpu_time_s
    if msg.memory_bytes:
        over["memory_bytes"] = msg.memory_bytes
    if msg.max_processes:
        over["max_processes"] = msg.max_processes
    if msg.wall_time_s:
        over["wall_time_s"] = msg.wall_time_s
    if msg.output_bytes:
        over["output_bytes"] = msg.output_bytes
    if msg.network:
        over["network"] = True
    return Limits.from_mapping(over, base=base)


def limits_to_pb(limits: Limits) -> cpb.SandboxLimits:
    return cpb.SandboxLimits(
        cpu_time_s=limits.cpu_time_s,
        memory_bytes=int(limits.memory_bytes),
        max_processes=int(limits.max_processes),
        wall_time_s=limits.wall_time_s,
        output_bytes=int(limits.output_bytes),
        network=limits.network,
    )


def exec_reply(r: ExecResult) -> cpb.ExecReply:
    return cpb.ExecReply(
        exit_code=r.exit_code,
        stdout=r.stdout,
        stderr=r.stderr,
        stdout_truncated=r.stdout_truncated,
        stderr_truncated=r.stderr_truncated,
        killed=r.killed,
        duration_s=r.duration_s,
    )


def exec_result(m: cpb.ExecReply) -> ExecResult:
    return ExecResult(
        exit_code=m.exit_code,
        stdout=m.stdout,
        stderr=m.stderr,
        stdout_truncated=m.stdout_truncated,
        stderr_truncated=m.stderr_truncated,
        killed=m.killed,
        duration_s=m.duration_s,
    )


def validate_exec(req: cpb.ExecRequest) -> str | None:
    """What is wrong with an exec request (naming the field), or None."""
    if not req.container_id:
        return "container_id: must not be empty"
    if not req.argv or not req.argv[0]:
        return "argv: must hold at least the program to run"
    if any("\x00" in a for a in req.argv):
        return "argv: an argument holds a NUL byte"
    if req.cwd and not req.cwd.startswith("/"):
        return f"cwd: expected an absolute path, got {req.cwd!r}"
    if req.timeout_s < 0:
        return f"timeout_s: expected >= 0, got {req.timeout_s}"
    for k, v in req.env.items():
        if not k or "=" in k or "\x00" in k or "\x00" in v:
            return f"env: bad variable name or value {k!r}"
    return None


def status_for(exc: SandboxError) -> grpc.StatusCode:
    """The gRPC status a sandbox failure is answered with."""
    return grpc.StatusCode.FAILED_PRECONDITION if "destroyed" in str(exc) else grpc.StatusCode.INTERNAL


async def start_server(
    servicer: Any,
    services: Mapping[str, Callable[[Any, grpc.aio.Server], None]],
    health_servicer: health.aio.HealthServicer,
    host: str,
    port: int = 0,
) -> tuple[grpc.aio.Server, str, tuple[str, ...]]:
    """Start a server for ``servicer`` under each service of ``container.proto`` named in
    ``services`` (name → its generated ``add_…_to_server``), with health and reflection.

    Returns the server, its ``host:port`` and the services' full names. Health is left unset: the
    caller says SERVING (:func:`set_serving`) once it is ready to serve.
    """
    server = grpc.aio.server(interceptors=server_interceptors())
    for add in services.values():
        add(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = tuple(cpb.DESCRIPTOR.services_by_name[n].full_name for n in services)
    reflection.enable_server_reflection((*names, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, f"{host}:{bound}", names


async def set_serving(health_servicer: health.aio.HealthServicer, names: tuple[str, ...]) -> None:
    for name in ("", *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
