"""The jobs API: run many tasks (commands or Python functions) on the Ray cluster, and follow them.

A job is a set of tasks with resource needs, a concurrency limit, retries with backoff and a
timeout per attempt (:mod:`agentmesh.jobs.spec`). The job manager (:mod:`agentmesh.jobs.server`,
a gRPC process) keeps all state in SQLite under its state directory (:mod:`agentmesh.jobs.store`)
and runs each attempt in a detached Ray actor (:mod:`agentmesh.jobs.runner`), so a manager that is
killed and restarted loses nothing. Clients use :class:`~agentmesh.jobs.client.JobClient` or
``agentmesh job …`` (:mod:`agentmesh.jobs.cli`).
"""

from __future__ import annotations

from agentmesh.jobs.spec import JobSpec, TaskSpec, load_job_spec, parse_job_spec
from agentmesh.jobs.states import JOB_STATES, TASK_STATES, JobStatus, TaskStatus

__all__ = [
    "JOB_STATES",
    "TASK_STATES",
    "JobSpec",
    "JobStatus",
    "TaskSpec",
    "TaskStatus",
    "load_job_spec",
    "parse_job_spec",
]
