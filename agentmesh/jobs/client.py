"""Python client of the job manager (synchronous; one gRPC channel).

    client = JobClient("127.0.0.1:PORT")
    job_id = client.submit({"name": "demo", "concurrency": 4, "tasks": [...]})
    status = client.wait(job_id, timeout_s=600)
    for line in client.logs(job_id, "task-0"):
        print(line, end="")

Errors come from the :mod:`agentmesh.errors` hierarchy: a spec the manager refuses raises
:class:`~agentmesh.errors.InvalidArgument` naming the field; an unknown job an
:class:`~agentmesh.errors.RpcError` with code NOT_FOUND; an unreachable manager
:class:`~agentmesh.errors.Unavailable`.
"""

from __future__ import annotations

import codecs
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc

from agentmesh.errors import ConfigError, from_grpc_error
from agentmesh.jobs.spec import JobSpec
from agentmesh.jobs.states import JobStatus
from agentmesh.v1 import jobs_pb2 as jpb
from agentmesh.v1 import jobs_pb2_grpc as jgrpc

__all__ = ["JobClient"]

_RPC_TIMEOUT_S = 30.0


class JobClient:
    """Submit jobs to a job manager and follow them."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", 64 << 20),
                ("grpc.max_receive_message_length", 64 << 20),
            ],
        )
        self._stub = jgrpc.JobServiceStub(self._channel)

    def __enter__(self) -> JobClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Callable[..., Any], request: Any) -> Any:
        try:
            return method(request, timeout=_RPC_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise from_grpc_error(exc) from None

    def submit(self, spec: Mapping[str, Any] | JobSpec) -> str:
        """Submit a job (a spec dict, or a parsed :class:`JobSpec`); returns its id.

        Tasks without a ``cwd`` get this process's working directory (commands and functions run
        where the job was submitted from, on a shared file system).
        """
        if isinstance(spec, JobSpec):
            text = spec.with_default_cwd(os.getcwd()).to_json()
        else:
            raw = dict(spec)
            raw.setdefault("cwd", os.getcwd())
            try:
                text = json.dumps(raw, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"the spec is not JSON: {exc}", key="job") from None
        reply = self._call(self._stub.Submit, jpb.SubmitJobRequest(spec_json=text))
        return str(reply.job_id)

    def status(self, job_id: str) -> JobStatus:
        """The job with every task's status."""
        return JobStatus.from_pb(self._call(self._stub.Get, jpb.GetJobRequest(job_id=job_id)))

    def list(self) -> list[JobStatus]:
        """Every job the manager knows, newest first (task counts, no task details)."""
        reply = self._call(self._stub.List, jpb.ListJobsRequest())
        return [JobStatus.from_pb(j) for j in reply.jobs]

    def cancel(self, job_id: str) -> JobStatus:
        """Cancel the job (a job that already ended stays as it was); returns its status."""
        return JobStatus.from_pb(self._call(self._stub.Cancel, jpb.CancelJobRequest(job_id=job_id)))

    def logs(
        self, job_id: str, task: str, *, attempt: int | None = None, follow: bool = False, offset: int = 0
    ) -> Iterator[str]:
        """The task's log (stdout and stderr) line by line, each with its newline; of ``attempt``
        (1-based) or the latest one. With ``follow``, lines arrive while the attempt runs and the
        iterator ends once it has ended."""
        request = jpb.ReadLogRequest(
            job_id=job_id, task=task, attempt=attempt or 0, offset=offset, follow=follow
        )
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        try:
            for chunk in self._stub.ReadLog(request, timeout=None if follow else _RPC_TIMEOUT_S):
                pending += decoder.decode(chunk.data)
                *lines, pending = pending.split("\n")
                for line in lines:
                    yield line + "\n"
        except grpc.RpcError as exc:
            raise from_grpc_error(exc) from None
        pending += decoder.decode(b"", final=True)
        if pending:
            yield pending

    def wait(
        self,
        job_id: str,
        *,
        timeout_s: float | None = None,
        on_progress: Callable[[JobStatus], None] | None = None,
        poll_s: float = 0.5,
    ) -> JobStatus:
        """Poll until the job has ended; returns its final status. ``on_progress`` is called with
        the status whenever the task counts change. TimeoutError after ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last: dict[str, int] | None = None
        while True:
            status = self.status(job_id)
            if on_progress is not None and status.task_counts != last:
                on_progress(status)
                last = dict(status.task_counts)
            if status.done:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {status.state} after {timeout_s:g}s")
            time.sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic())))
