"""The one error hierarchy of agentmesh.

Transport errors are mapped once, at the gRPC boundary, into these classes::

    AgentMeshError
    ├── ConfigError            a config file or override is wrong (names file, key, expected)
    ├── DiscoveryError         the discovery store cannot be reached or answered badly
    ├── RpcError               a gRPC call failed; .code is the grpc.StatusCode
    │   ├── InvalidArgument    the peer refused the message as malformed (INVALID_ARGUMENT)
    │   ├── Overloaded         the peer is full, try another or later (RESOURCE_EXHAUSTED)
    │   └── Unavailable        the peer is gone or draining (UNAVAILABLE)
    ├── LlmError               an LLM call failed after its retries, or timed out
    │   └── LlmRequestError    a replica refused the request itself (4xx; .status, .body)
    └── TaskFailed             a task's step failed for good (carries the cause)
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AgentMeshError",
    "ConfigError",
    "DiscoveryError",
    "InvalidArgument",
    "LlmError",
    "LlmRequestError",
    "Overloaded",
    "RpcError",
    "TaskFailed",
    "Unavailable",
    "from_grpc_error",
]


class AgentMeshError(Exception):
    """Base of every error agentmesh raises on purpose."""


class ConfigError(AgentMeshError):
    """A config is wrong. The message names the file, the key and what was expected."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        self.file = file
        self.key = key
        where = ": ".join(p for p in (file, key) if p)
        super().__init__(f"{where}: {message}" if where else message)


class DiscoveryError(AgentMeshError):
    """The discovery store (etcd or Consul) failed."""


class RpcError(AgentMeshError):
    """A gRPC call failed. ``code`` is the ``grpc.StatusCode``."""

    def __init__(self, code: Any, message: str) -> None:
        self.code = code
        super().__init__(f"{getattr(code, 'name', code)}: {message}")


class InvalidArgument(RpcError):
    pass


class Overloaded(RpcError):
    pass


class Unavailable(RpcError):
    pass


class LlmError(AgentMeshError):
    """An LLM call failed after its retries (or no replica could take it before its deadline)."""

    timed_out: bool = False


class LlmRequestError(LlmError):
    """A replica refused the request itself (HTTP 4xx other than 408/429): it would fail the same
    way on every replica, so it is not retried. ``status`` and ``body`` are the replica's answer
    (a gateway server relays them to its caller)."""

    def __init__(self, message: str, *, status: int, body: bytes = b"") -> None:
        self.status = status
        self.body = body
        super().__init__(message)


class TaskFailed(AgentMeshError):
    """A task's step failed for good; ``code`` is a short machine-readable cause."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


def from_grpc_error(err: Any) -> RpcError:
    """Map a ``grpc.aio.AioRpcError`` (or ``grpc.RpcError``) to the project hierarchy."""
    import grpc

    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    cls: type[RpcError] = {
        grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
        grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
        grpc.StatusCode.UNAVAILABLE: Unavailable,
    }.get(code, RpcError)
    return cls(code, details or "")
