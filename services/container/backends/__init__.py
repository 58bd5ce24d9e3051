"""Sandbox backends by name: ``bubblewrap`` (default), ``nsjail``, ``podman``.

Modules are imported on demand, so a machine without podman can still use bubblewrap.
"""

from __future__ import annotations

import importlib
from typing import Any

from agentmesh.container.sandbox import SandboxBackend, SandboxError

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "backend_class", "get_backend", "unavailable_reason"]

DEFAULT_BACKEND = "bubblewrap"

#: name -> "module:Class"
BACKENDS = {
    "bubblewrap": "agentmesh.container.backends.bubblewrap:BubblewrapBackend",
    "nsjail": "agentmesh.container.backends.nsjail:NsjailBackend",
    "podman": "agentmesh.container.backends.podman:PodmanBackend",
}


def backend_class(name: str) -> type[SandboxBackend]:
    spec = BACKENDS.get(name)
    if spec is None:
        raise SandboxError(f"backend: unknown sandbox backend {name!r} (known: {sorted(BACKENDS)})")
    module, _, cls = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return]
    except (ImportError, AttributeError) as exc:
        raise SandboxError(f"backend {name!r} cannot be loaded: {exc}") from exc


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run on this machine, or None if it can."""
    try:
        return backend_class(name).unavailable_reason()
    except SandboxError as exc:
        return str(exc)


def get_backend(name: str = DEFAULT_BACKEND, **options: Any) -> SandboxBackend:
    """A ready backend; raises :class:`SandboxError` naming what is missing if it cannot run here."""
    cls = backend_class(name)
    reason = cls.unavailable_reason()
    if reason:
        raise SandboxError(f"sandbox backend {name!r} unavailable: {reason}")
    return cls(**options)  # type: ignore[call-arg]
