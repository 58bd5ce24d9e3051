"""Conversions between the sandbox types and their protobuf messages (``agentmesh.v1.container``)."""

from __future__ import annotations

import grpc

from agentmesh.container.sandbox import ExecResult, Limits, SandboxError
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
