"""Tunables of the LLM gateway client, replicas and the vLLM CPU backend, in one place.

Every value can be overridden by an environment variable of the same name (``AGENTMESH_`` prefix;
durations in seconds carry an ``_s`` suffix). They are read once, at import; a bad value raises a
:class:`~agentmesh.errors.ConfigError` naming the variable.
"""

from __future__ import annotations

import os
from pathlib import Path

from agentmesh.errors import ConfigError

__all__ = [
    "LLM_BACKOFF_INITIAL_S",
    "LLM_BACKOFF_MAX_S",
    "LLM_CONNECTOR_LIMIT",
    "LLM_CONNECT_TIMEOUT_S",
    "LLM_DEAD_REPROBE_S",
    "LLM_ENDPOINT_WAIT_S",
    "LLM_KEEPALIVE_S",
    "LLM_LOAD_STALENESS_S",
    "LLM_MAX_ATTEMPTS",
    "LLM_MAX_IN_FLIGHT_PER_REPLICA",
    "LLM_MEASURE_TTFT",
    "LLM_PROBE_TIMEOUT_MAX_S",
    "LLM_PROBE_TIMEOUT_S",
    "LLM_REPLICA_TTL_S",
    "LLM_SERVICE_PREFIX",
    "LLM_TIMEOUT_S",
    "VLLM_STARTUP_TIMEOUT_S",
    "agentmesh_home",
    "vllm_python",
]


def _env_float(name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"expected a number, got {raw!r}", key=name) from None
    if not value >= minimum:  # also rejects NaN
        raise ConfigError(f"expected a number >= {minimum}, got {raw!r}", key=name)
    return value


def _env_int(name: str, default: int, *, minimum: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"expected an integer, got {raw!r}", key=name) from None
    if value < minimum:
        raise ConfigError(f"expected an integer >= {minimum}, got {raw!r}", key=name)
    return value


LLM_SERVICE_PREFIX = "llm."
"""Discovery service of a model's replicas: ``llm.<sanitized model name>``."""

LLM_TIMEOUT_S = _env_float("AGENTMESH_LLM_TIMEOUT_S", 120.0, minimum=0.001)
"""Deadline of one ``chat``/``complete`` call, all attempts included."""

LLM_MAX_ATTEMPTS = _env_int("AGENTMESH_LLM_MAX_ATTEMPTS", 3)
"""Attempts per call; each retry goes to another replica when there is one."""

LLM_BACKOFF_INITIAL_S = _env_float("AGENTMESH_LLM_BACKOFF_INITIAL_S", 0.05)
"""Wait before the first retry; doubles per retry (with jitter) up to ``LLM_BACKOFF_MAX_S``."""

LLM_BACKOFF_MAX_S = _env_float("AGENTMESH_LLM_BACKOFF_MAX_S", 2.0)

LLM_CONNECT_TIMEOUT_S = _env_float("AGENTMESH_LLM_CONNECT_TIMEOUT_S", 5.0, minimum=0.001)
"""TCP connect timeout: a dead replica must fail fast so the retry can go elsewhere."""

LLM_CONNECTOR_LIMIT = _env_int("AGENTMESH_LLM_CONNECTOR_LIMIT", 4096)
"""Pooled HTTP connections per client; aiohttp's default of 100 would queue hundreds of calls."""

LLM_KEEPALIVE_S = _env_float("AGENTMESH_LLM_KEEPALIVE_S", 4.0, minimum=0.001)
"""How long an idle pooled connection is kept. Below the 5 s after which vLLM's server (uvicorn)
closes an idle one, so we drop it first instead of racing the server's close (aiohttp's default is
15 s). A close that races a request anyway is resent once (see ``AiohttpTransport``)."""

LLM_ENDPOINT_WAIT_S = _env_float("AGENTMESH_LLM_ENDPOINT_WAIT_S", 10.0)
"""How long a call waits for a first replica of its model to appear in discovery."""

LLM_LOAD_STALENESS_S = _env_float("AGENTMESH_LLM_LOAD_STALENESS_S", 1.0, minimum=0.001)
"""How long a replica's probed queue length counts in the choice; older, the replica is re-probed
(in the background) and until then only this client's own in-flight count is used."""

LLM_PROBE_TIMEOUT_S = _env_float("AGENTMESH_LLM_PROBE_TIMEOUT_S", 0.05, minimum=0.001)
"""First deadline of a load probe; it doubles after each probe that timed out, up to the max."""

LLM_PROBE_TIMEOUT_MAX_S = _env_float("AGENTMESH_LLM_PROBE_TIMEOUT_MAX_S", 1.0, minimum=0.001)

LLM_DEAD_REPROBE_S = _env_float("AGENTMESH_LLM_DEAD_REPROBE_S", 1.0, minimum=0.01)
"""A replica that refused connections is left out of the choice and re-probed this often (doubling,
up to 8x); it comes back when a probe reaches it or discovery gives it a new address."""

LLM_MAX_IN_FLIGHT_PER_REPLICA = _env_int("AGENTMESH_LLM_MAX_IN_FLIGHT_PER_REPLICA", 0, minimum=0)
"""Requests one client keeps outstanding on one replica at most (0: no limit, the replica queues).
With a limit, calls beyond it wait in the client, in arrival order, retries first."""

LLM_MEASURE_TTFT = _env_int("AGENTMESH_LLM_MEASURE_TTFT", 1, minimum=0) > 0
"""Pipelines' LLM calls stream internally so that time to first token is measured (1) or not (0)."""

LLM_REPLICA_TTL_S = _env_float("AGENTMESH_LLM_REPLICA_TTL_S", 5.0, minimum=0.5)
"""Lease of a replica's discovery entry: a dead replica disappears within this time."""

VLLM_STARTUP_TIMEOUT_S = _env_float("AGENTMESH_VLLM_STARTUP_TIMEOUT_S", 300.0, minimum=1.0)
"""How long a vLLM CPU server may take to answer ``/health`` (~40 s here with ``--enforce-eager``)."""


def agentmesh_home() -> Path:
    """``$AGENTMESH_HOME``, else ``~/.cache/agentmesh``: the vLLM venv and converted models live here."""
    raw = os.environ.get("AGENTMESH_HOME")
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "agentmesh"


def vllm_python() -> Path:
    """The interpreter of the vLLM CPU venv (``$AGENTMESH_VLLM_PYTHON`` overrides)."""
    raw = os.environ.get("AGENTMESH_VLLM_PYTHON")
    return Path(raw).expanduser() if raw else agentmesh_home() / "vllm-venv" / "bin" / "python"
