"""The job manager's gRPC server (``JobService`` of ``protos/agentmesh/v1/jobs.proto``).

    python -m agentmesh.jobs.server --state-dir DIR --ray-address HOST:PORT \\
        [--discovery URL] [--host 127.0.0.1] [--port 0] [--ready-file F]

Connects to Ray as a driver in namespace ``agentmesh-jobs``, serves on ``host:port`` (0: a free
port) with health and reflection, writes ``{"address": "HOST:PORT", "pid": N}`` to the ready file
once serving, and registers as service ``agentmesh-jobs`` in discovery when given one. SIGTERM or
SIGINT stop it cleanly *without* touching running attempts: the next manager on the same state
directory re-attaches to them. Bad input is answered INVALID_ARGUMENT, an unknown job NOT_FOUND,
each with a message naming the field.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agentmesh.errors import ConfigError
from agentmesh.files import write_atomic
from agentmesh.jobs.manager import JobManager, UnknownJob
from agentmesh.jobs.runner import NAMESPACE
from agentmesh.jobs.spec import parse_job_spec
from agentmesh.jobs.states import BACKOFF, PENDING, RUNNING
from agentmesh.v1 import jobs_pb2 as jpb
from agentmesh.v1 import jobs_pb2_grpc as jgrpc

__all__ = ["DISCOVERY_SERVICE", "JobServer", "main"]

log = logging.getLogger(__name__)

DISCOVERY_SERVICE = "agentmesh-jobs"
_LOG_CHUNK = 64 * 1024
_FOLLOW_POLL_S = 0.1
_MAX_SPEC_BYTES = 64 << 20


class JobServer(jgrpc.JobServiceServicer):
    """JobService over a :class:`JobManager` (which owns all state)."""

    def __init__(self, manager: JobManager) -> None:
        self.manager = manager
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self.address = ""

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        await self.manager.start()
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", _MAX_SPEC_BYTES),
                ("grpc.max_send_message_length", _MAX_SPEC_BYTES),
            ]
        )
        jgrpc.add_JobServiceServicer_to_server(self, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        name = jpb.DESCRIPTOR.services_by_name["JobService"].full_name
        reflection.enable_server_reflection((name, reflection.SERVICE_NAME), server)
        bound = server.add_insecure_port(f"{host}:{port}")
        if not bound:
            raise OSError(f"cannot listen on {host}:{port}")
        await server.start()
        self._server = server
        self.address = f"{host}:{bound}"
        for n in ("", name):
            await self._health.set(n, health_pb2.HealthCheckResponse.SERVING)
        return self.address

    async def stop(self) -> None:
        if self._server is not None:
            await self._health.enter_graceful_shutdown()
            await self._server.stop(1.0)
        await self.manager.stop()

    # -- RPCs ---------------------------------------------------------------------------------
    async def Submit(self, request: jpb.SubmitJobRequest, context: Any) -> jpb.SubmitJobReply:
        try:
            raw = json.loads(request.spec_json)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"spec_json: not valid JSON: {exc}")
        try:
            spec = parse_job_spec(raw)
            job_id = self.manager.submit(spec)
        except ConfigError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return jpb.SubmitJobReply(job_id=job_id)

    async def Get(self, request: jpb.GetJobRequest, context: Any) -> jpb.JobStatus:
        try:
            return self.manager.get(request.job_id).to_pb()
        except UnknownJob as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
            raise  # unreachable: abort raises

    async def List(self, request: jpb.ListJobsRequest, context: Any) -> jpb.ListJobsReply:
        return jpb.ListJobsReply(jobs=[j.to_pb() for j in self.manager.list()])

    async def Cancel(self, request: jpb.CancelJobRequest, context: Any) -> jpb.JobStatus:
        try:
            return (await self.manager.cancel(request.job_id)).to_pb()
        except UnknownJob as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
            raise

    async def ReadLog(self, request: jpb.ReadLogRequest, context: Any) -> AsyncIterator[jpb.LogChunk]:
        if request.attempt < 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"attempt: expected >= 0, got {request.attempt}"
            )
        if request.offset < 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"offset: expected >= 0, got {request.offset}"
            )
        try:
            rec = self.manager.attempt(request.job_id, request.task, request.attempt or None)
            while rec is None and request.follow:
                # Following a task that has not started yet: wait for its first attempt.
                if self.manager.store.task_state(request.job_id, request.task) not in (PENDING, BACKOFF):
                    break
                await asyncio.sleep(_FOLLOW_POLL_S)
                rec = self.manager.attempt(request.job_id, request.task, request.attempt or None)
        except UnknownJob as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
            return
        if rec is None:
            what = f"attempt {request.attempt}" if request.attempt else "any attempt"
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"attempt: task {request.task!r} has not started {what} yet"
            )
            return
        offset = request.offset
        path = Path(rec.log_path)
        while True:
            # Read the state before the file: whatever was written before the attempt ended is
            # then read in this pass, and the stream ends right after it.
            ended = not request.follow or self._ended(rec.job_id, rec.task, rec.attempt)
            for data in _read_from(path, offset):
                yield jpb.LogChunk(data=data, offset=offset, attempt=rec.attempt)
                offset += len(data)
            if ended:
                return
            await asyncio.sleep(_FOLLOW_POLL_S)

    def _ended(self, job_id: str, task: str, attempt: int) -> bool:
        current = self.manager.store.attempt(job_id, task, attempt)
        return current is None or current.state != RUNNING


def _read_from(path: Path, offset: int) -> list[bytes]:
    """The file's bytes from ``offset`` to its end, in chunks (nothing if it does not exist yet)."""
    chunks: list[bytes] = []
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            while data := f.read(_LOG_CHUNK):
                chunks.append(data)
    except FileNotFoundError:
        pass
    return chunks


# -- process entry point -----------------------------------------------------------------------


def _connect_ray(address: str) -> None:
    from agentmesh.launcher import RAY_ENV

    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)  # before Ray is imported: it reads some of these at import
    import ray

    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.ERROR)


async def _serve(ns: argparse.Namespace) -> int:
    manager = JobManager(ns.state_dir)
    server = JobServer(manager)
    address = await server.start(ns.host, ns.port)
    registration = None
    discovery = None
    if ns.discovery:
        from agentmesh.discovery import Endpoint, connect

        discovery = connect(ns.discovery)
        registration = await discovery.register(
            Endpoint(
                DISCOVERY_SERVICE, f"jobs-{os.getpid()}", address, {"state_dir": str(manager.state_dir)}
            ),
            ttl_s=5.0,
        )
    if ns.ready_file:
        write_atomic(ns.ready_file, json.dumps({"address": address, "pid": os.getpid()}))
    log.info("job manager serving on %s (state %s)", address, manager.state_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("job manager stopping (running attempts keep running)")
    if registration is not None:
        with contextlib.suppress(Exception):
            await registration.close()
    if discovery is not None:
        with contextlib.suppress(Exception):
            await discovery.close()
    await server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agentmesh.jobs.server", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--state-dir", required=True, help="where all of the manager's state lives")
    parser.add_argument("--ray-address", required=True, help="HOST:PORT of the Ray cluster's GCS")
    parser.add_argument("--discovery", default="", help="register as agentmesh-jobs here (etcd://...)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file", default="", help='write {"address", "pid"} here once serving')
    parser.add_argument("--log-level", default="INFO")
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=ns.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        _connect_ray(ns.ray_address)
    except (ConnectionError, RuntimeError) as exc:
        print(f"job manager: cannot reach the Ray cluster at {ns.ray_address}: {exc}", file=sys.stderr)
        return 3
    return asyncio.run(_serve(ns))


if __name__ == "__main__":
    sys.exit(main())
