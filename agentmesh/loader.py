"""Resolve ``"package.module:Name"`` references from configs to Python objects."""

from __future__ import annotations

import importlib
from typing import Any

from agentmesh.errors import ConfigError

__all__ = ["load_object"]


def load_object(spec: str, *, key: str = "") -> Any:
    """Import ``module:attr`` (or ``module.attr``); a failure is a :class:`ConfigError` naming ``key``."""
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"expected 'package.module:Name', got {spec!r}", key=key or None)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import module {module_name!r} ({exc})", key=key or None) from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"module {module_name!r} has no attribute {attr!r}", key=key or None) from None
    return obj
