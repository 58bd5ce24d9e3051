"""Job and task states, the status records clients see, and the rules that connect them.

A task moves PENDING → RUNNING → SUCCEEDED, or RUNNING → BACKOFF → RUNNING … while it has retries
left, then FAILED; CANCELLED from any unfinished state. A job's state is derived from its tasks'
(:func:`derive_job_state`), never stored independently of them, so the two cannot disagree.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from agentmesh.v1 import jobs_pb2 as jpb

__all__ = [
    "BACKOFF",
    "CANCELLED",
    "FAILED",
    "JOB_STATES",
    "PENDING",
    "RUNNING",
    "SUCCEEDED",
    "TASK_STATES",
    "TERMINAL",
    "AttemptOutcome",
    "JobStatus",
    "TaskStatus",
    "backoff_delay",
    "derive_job_state",
]

PENDING, RUNNING, BACKOFF = "PENDING", "RUNNING", "BACKOFF"
SUCCEEDED, FAILED, CANCELLED = "SUCCEEDED", "FAILED", "CANCELLED"
TASK_STATES = (PENDING, RUNNING, BACKOFF, SUCCEEDED, FAILED, CANCELLED)
JOB_STATES = (PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})


def backoff_delay(retry: int, backoff_s: float, backoff_max_s: float) -> float:
    """Seconds to wait before retry number ``retry`` (1 for the first retry):
    ``backoff_s * 2**(retry-1)``, capped at ``backoff_max_s``."""
    if retry < 1:
        return 0.0
    # min() before the power would overflow on absurd retry counts
    return float(min(backoff_max_s, backoff_s * 2.0 ** min(retry - 1, 64)))


def derive_job_state(task_states: Iterable[str], *, cancelled: bool = False) -> str:
    """A job's state from its tasks': CANCELLED if cancelled, SUCCEEDED when every task did,
    FAILED when all ended and some did not succeed, PENDING while nothing started, else RUNNING."""
    if cancelled:
        return CANCELLED
    states = list(task_states)
    if states and all(s == SUCCEEDED for s in states):
        return SUCCEEDED
    if states and all(s in TERMINAL for s in states):
        return FAILED
    if all(s == PENDING for s in states):
        return PENDING
    return RUNNING


@dataclass(frozen=True)
class AttemptOutcome:
    """How one attempt ended, as its runner saw it (or as the manager decided, for a lost one)."""

    ok: bool
    exit_code: int | None = None
    """The process's exit code; 128 + signal when a signal ended it; None if it never ran."""
    error: str = ""
    result_json: str | None = None
    started_unix: float = 0.0
    ended_unix: float = 0.0
    node: str = ""


@dataclass
class TaskStatus:
    """What a client sees of one task (of its latest attempt where it says so)."""

    name: str
    state: str
    attempts: int = 0
    exit_code: int | None = None
    error: str = ""
    result: Any = None
    started_unix: float = 0.0
    ended_unix: float = 0.0
    node: str = ""
    retry_at_unix: float = 0.0

    @property
    def duration_s(self) -> float | None:
        """Seconds from the latest attempt's start to the task's end (None if not both known)."""
        if self.started_unix and self.ended_unix:
            return max(0.0, self.ended_unix - self.started_unix)
        return None

    def to_pb(self) -> jpb.JobTaskStatus:
        return jpb.JobTaskStatus(
            name=self.name,
            state=self.state,
            attempts=self.attempts,
            has_exit_code=self.exit_code is not None,
            exit_code=self.exit_code or 0,
            error=self.error,
            result_json="" if self.result is None else json.dumps(self.result),
            started_unix=self.started_unix,
            ended_unix=self.ended_unix,
            node=self.node,
            retry_at_unix=self.retry_at_unix,
        )

    @classmethod
    def from_pb(cls, m: jpb.JobTaskStatus) -> TaskStatus:
        return cls(
            name=m.name,
            state=m.state,
            attempts=m.attempts,
            exit_code=m.exit_code if m.has_exit_code else None,
            error=m.error,
            result=json.loads(m.result_json) if m.result_json else None,
            started_unix=m.started_unix,
            ended_unix=m.ended_unix,
            node=m.node,
            retry_at_unix=m.retry_at_unix,
        )


@dataclass
class JobStatus:
    """What a client sees of one job. ``tasks`` is empty in listings (``task_counts`` is not)."""

    job_id: str
    name: str
    state: str
    created_unix: float = 0.0
    started_unix: float = 0.0
    ended_unix: float = 0.0
    concurrency: int = 1
    tasks: list[TaskStatus] = field(default_factory=list)
    task_counts: dict[str, int] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        """The job has ended (succeeded, failed or cancelled)."""
        return self.state in TERMINAL

    @property
    def ok(self) -> bool:
        return self.state == SUCCEEDED

    def task(self, name: str) -> TaskStatus:
        """The task called ``name``; KeyError if the job has none (or tasks were not fetched)."""
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"job {self.job_id} has no task {name!r}")

    def to_pb(self) -> jpb.JobStatus:
        return jpb.JobStatus(
            job_id=self.job_id,
            name=self.name,
            state=self.state,
            created_unix=self.created_unix,
            started_unix=self.started_unix,
            ended_unix=self.ended_unix,
            concurrency=self.concurrency,
            tasks=[t.to_pb() for t in self.tasks],
            task_counts=self.task_counts,
        )

    @classmethod
    def from_pb(cls, m: jpb.JobStatus) -> JobStatus:
        return cls(
            job_id=m.job_id,
            name=m.name,
            state=m.state,
            created_unix=m.created_unix,
            started_unix=m.started_unix,
            ended_unix=m.ended_unix,
            concurrency=m.concurrency,
            tasks=[TaskStatus.from_pb(t) for t in m.tasks],
            task_counts=dict(m.task_counts),
        )
