"""Functions that the integration tests run as function tasks (imported by the task's process)."""

from __future__ import annotations

import os
from typing import Any


def add(a: float, b: float) -> dict[str, Any]:
    print(f"adding {a} and {b}")
    env = os.environ
    return {"sum": a + b, "job": env["AGENTMESH_JOB_ID"], "attempt": env["AGENTMESH_TASK_ATTEMPT"]}


def fail(message: str) -> None:
    raise RuntimeError(message)
