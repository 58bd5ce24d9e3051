"""The run driver: the source that admits tasks and the sink that takes them back.

The source reads the dataset lazily and admits at most ``max_in_flight`` tasks at once; each
task's credit comes back when the task reaches the sink (back-pressure: memory stays flat however
large the dataset). The sink is an ``AgentService`` registered as the role ``sink``: replicas
forward finished or failed tasks to it like to any role. It writes each task exactly once (the
:class:`~agentmesh.sink.SinkWriter` refuses duplicates and resumes from what is on disk).

Tasks lost with a replica (SIGKILL, node loss) are found by a periodic sweep: every replica is
asked which tasks it holds (one call per replica per sweep, never per task); a task in flight that
no replica has held for two sweeps in a row is re-admitted from its input row. A task can never
be written twice, so a wrong guess costs work, not correctness.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.trace import Span, Status, StatusCode

from agentmesh.agent.payload import PayloadStore
from agentmesh.agent.peers import PeerRouter, agent_service, server_options
from agentmesh.agent.role import CONTAINER_RESOURCE
from agentmesh.agent.routing import SINK, RoutingProgram
from agentmesh.discovery import Discovery, Endpoint, EndpointCache, Registration
from agentmesh.errors import RpcError
from agentmesh.sink import record_from_orchestrator
from agentmesh.tracing import (
    finish_task,
    hop_arrived,
    hop_failed,
    hop_span,
    inject_into,
    tracer,
)
from agentmesh.v1 import agent_pb2 as apb
from agentmesh.v1 import orchestrator_pb2 as pb

__all__ = ["RunDriver", "RunProgress"]

log = logging.getLogger(__name__)

SERVICE_NAME = "agentmesh.v1.AgentService"


@dataclass
class RunProgress:
    """Live counters of a run (read by the CLI's progress line and summary)."""

    total: int | None = None  # tasks this invocation will run (None: unknown until the source ends)
    resumed: int = 0  # tasks already in the output when the run started
    admitted: int = 0
    done: int = 0
    failed: int = 0
    duplicates: int = 0  # deliveries to the sink of a task already written
    recovered: int = 0  # tasks re-admitted after being lost with a replica
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started_at: float = field(default_factory=time.monotonic)
    finished_at: float | None = None
    failures_by_code: dict[str, int] = field(default_factory=dict)
    llm: list[dict[str, Any]] = field(default_factory=list)
    """Per model and replica: LLM requests, errors, tokens, latency and TTFT (filled at the end)."""
    sandboxes_released: int = 0  # sandboxes the sink gave back for finished or failed tasks
    sandboxes: dict[str, Any] = field(default_factory=dict)
    """The run's sandbox registry at the end: created, reclaimed, released (filled at the end)."""

    @property
    def finished(self) -> int:
        return self.done + self.failed

    @property
    def in_flight(self) -> int:
        return self.admitted - self.finished

    @property
    def elapsed_s(self) -> float:
        return (self.finished_at or time.monotonic()) - self.started_at

    @property
    def tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.completion_tokens) / max(self.elapsed_s, 1e-9)

    @property
    def completion_tokens_per_s(self) -> float:
        return self.completion_tokens / max(self.elapsed_s, 1e-9)

    def eta_s(self) -> float | None:
        if self.total is None or self.finished == 0:
            return None
        rate = self.finished / max(self.elapsed_s, 1e-9)
        return max(0.0, (self.total - self.finished) / rate)


@dataclass
class _InFlight:
    task_id: str
    trial: int
    row_json: str
    span: Span
    admitted_at: float
    recoveries: int = 0
    misses: int = 0


class RunDriver:
    """Source + sink of one run. ``await start()``, then ``await run()`` returns the progress."""

    def __init__(
        self,
        *,
        run_id: str,
        program: RoutingProgram,
        discovery: Discovery,
        writer: Any,  # agentmesh.sink.SinkWriter
        tasks: Iterable[tuple[str, int, dict[str, Any]]],
        roles: Iterable[str],
        max_in_flight: int = 256,
        task_timeout_s: float = 900.0,
        seed: int = 0,
        payloads: PayloadStore | None = None,
        total: int | None = None,
        recovery_interval_s: float = 5.0,
        host: str = "127.0.0.1",
        max_message_bytes: int = 16 * 1024 * 1024,
        discovery_ttl_s: float = 5.0,
        admission_concurrency: int = 256,
        containers: Any | None = None,  # agentmesh.container.client.ContainerClient
        metrics: Any | None = None,  # agentmesh.metrics.RunMetrics
    ) -> None:
        self.run_id = run_id
        self.program = program
        self.progress = RunProgress(total=total)
        self._metrics = metrics
        self._discovery = discovery
        self._writer = writer
        self._tasks = tasks
        self._roles = sorted(set(roles))
        self._max_in_flight = max_in_flight
        self._task_timeout_s = task_timeout_s
        self._seed = seed
        self._payloads = payloads
        self._recovery_interval_s = recovery_interval_s
        self._host = host
        self._max_message_bytes = max_message_bytes
        self._ttl_s = discovery_ttl_s
        self._cache = EndpointCache(discovery)
        self._router = PeerRouter(self._cache, run_id, max_message_bytes=max_message_bytes)
        self._in_flight: dict[str, _InFlight] = {}
        self._admitting: set[str] = set()
        self._known: dict[str, Endpoint] = {}  # replicas the recovery sweep asks, by address
        self._cache.add_listener(self._remember)
        self._credits = asyncio.Semaphore(max_in_flight)
        # Admissions in progress at once: a burst of thousands of first deliveries would only queue
        # inside gRPC; tasks wait for a slot here, in order.
        self._admission_slots = asyncio.Semaphore(admission_concurrency)
        self._all_done = asyncio.Event()
        self._source_done = False
        self._server: grpc.aio.Server | None = None
        self._registration: Registration | None = None
        self._health = health.aio.HealthServicer()
        self._background: set[asyncio.Task[Any]] = set()
        self._containers = containers
        self._releases: set[asyncio.Task[Any]] = set()
        self.address = ""

    # -- sink service -------------------------------------------------------------------------
    async def _deliver(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        orch = pb.Orchestrator()
        try:
            orch.ParseFromString(request)
        except Exception as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed Orchestrator message: {exc}")
        if orch.run_id != self.run_id:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"run_id: task of run {orch.run_id!r} sent to run {self.run_id!r}",
            )
        hop_arrived(orch, "sink")
        await self._finish(orch)
        return apb.DeliverReply(load=apb.LoadReport(replica_id="sink")).SerializeToString()

    async def _finish(self, orch: pb.Orchestrator) -> None:
        info = self._in_flight.get(orch.task_id)
        if info is None or orch.recoveries != info.recoveries:
            # already written, or a stale copy of a task that was re-admitted since
            if info is None:
                self.progress.duplicates += 1
            return
        contents: dict[int, str] = {}
        if self._payloads is not None:
            for i, turn in enumerate(orch.history):
                if turn.WhichOneof("body") == "payload":
                    try:
                        contents[i] = await self._payloads.get(turn.payload)
                    except Exception as exc:
                        log.warning(
                            "task %s: payload %s not fetched: %s", orch.task_id, turn.payload.key, exc
                        )
        if self._in_flight.pop(orch.task_id, None) is None:  # finished while we fetched
            return
        if orch.status == pb.TASK_STATUS_RUNNING:
            orch.status = pb.TASK_STATUS_DONE
        record = record_from_orchestrator(orch, contents=contents, finished_unix_ns=time.time_ns())
        self._writer.write(record)
        p = self.progress
        for turn in orch.history:
            p.prompt_tokens += turn.usage.prompt_tokens
            p.completion_tokens += turn.usage.completion_tokens
        failed = orch.status != pb.TASK_STATUS_DONE
        if self._metrics is not None:
            self._metrics.finished(ok=not failed, code="" if not failed else (orch.error.code or "unknown"))
        if not failed:
            p.done += 1
            info.span.set_status(Status(StatusCode.OK))
        else:
            p.failed += 1
            code = orch.error.code or "unknown"
            p.failures_by_code[code] = p.failures_by_code.get(code, 0) + 1
            info.span.set_status(Status(StatusCode.ERROR, f"{code}: {orch.error.message[:200]}"))
        info.span.set_attribute("agentmesh.status", pb.TaskStatus.Name(orch.status))
        info.span.set_attribute("agentmesh.hops", orch.routing.hops)
        duration_s = (time.time_ns() - orch.admitted_unix_ns) / 1e9 if orch.admitted_unix_ns else 0.0
        finish_task(orch, info.span, failed=failed, duration_s=duration_s)
        self._credits.release()
        if self._payloads is not None and contents:
            self._spawn(self._payloads.release(orch.task_id))
        if self._containers is not None:
            for res in orch.resources:
                if res.kind == CONTAINER_RESOURCE:  # what a finished or failed task still holds
                    t = self._spawn(self._release_container(orch.task_id, res.id))
                    self._releases.add(t)
                    t.add_done_callback(self._releases.discard)
        self._check_done()

    async def _release_container(self, task_id: str, container_id: str) -> None:
        assert self._containers is not None
        try:
            if await self._containers.release(container_id):
                self.progress.sandboxes_released += 1
        except Exception as exc:  # its lease reclaims it anyway
            log.warning("task %s: releasing sandbox %s failed: %s", task_id, container_id, exc)

    def _check_done(self) -> None:
        if self._source_done and not self._in_flight and not self._admitting:
            self._all_done.set()

    def _handlers(self) -> grpc.GenericRpcHandler:
        async def load(request: apb.LoadRequest, context: grpc.aio.ServicerContext) -> apb.LoadReport:
            return apb.LoadReport(replica_id="sink")

        async def held(
            request: apb.HeldTasksRequest, context: grpc.aio.ServicerContext
        ) -> apb.HeldTasksReply:
            return apb.HeldTasksReply(replica_id="sink")

        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Deliver": grpc.unary_unary_rpc_method_handler(self._deliver),
                "Load": grpc.unary_unary_rpc_method_handler(
                    load, apb.LoadRequest.FromString, apb.LoadReport.SerializeToString
                ),
                "HeldTasks": grpc.unary_unary_rpc_method_handler(
                    held, apb.HeldTasksRequest.FromString, apb.HeldTasksReply.SerializeToString
                ),
            },
        )

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> str:
        server = grpc.aio.server(options=server_options(self._max_message_bytes))
        server.add_generic_rpc_handlers((self._handlers(),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        port = server.add_insecure_port(f"{self._host}:0")
        await server.start()
        self._server = server
        self.address = f"{self._host}:{port}"
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._registration = await self._discovery.register(
            Endpoint(agent_service(self.run_id, SINK), f"sink-{self.run_id}", self.address, {"role": SINK}),
            ttl_s=self._ttl_s,
        )
        await self._router.subscribe(self._roles)
        return self.address

    async def stop(self) -> None:
        # sandboxes of the last tasks are being given back: let that finish (bounded) first
        if self._releases:
            await asyncio.wait(set(self._releases), timeout=30.0)
        for t in list(self._background):
            t.cancel()
        if self._registration is not None:
            with contextlib.suppress(Exception):
                await self._registration.close()
        if self._server is not None:
            await self._server.stop(1.0)
        await self._router.close()
        await self._cache.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        t = asyncio.get_running_loop().create_task(coro)
        self._background.add(t)
        t.add_done_callback(self._background.discard)
        return t

    # -- the run ------------------------------------------------------------------------------
    def _new_orchestrator(self, info: _InFlight) -> pb.Orchestrator:
        orch = pb.Orchestrator(
            schema_version=pb.SCHEMA_VERSION_1,
            task_id=info.task_id,
            run_id=self.run_id,
            trial=info.trial,
            seed=(self._seed * 1_000_003 + zlib.crc32(info.task_id.encode())) & 0x7FFFFFFF,
            input_json=info.row_json,
            status=pb.TASK_STATUS_RUNNING,
            recoveries=info.recoveries,
            admitted_unix_ns=time.time_ns(),
        )
        if self._task_timeout_s > 0:
            orch.deadline_unix_ms = int(time.time() * 1000 + self._task_timeout_s * 1000)
        orch.routing.current_role = self.program.start(orch)
        inject_into(orch, _span_context(info.span))
        return orch

    async def _admit(self, info: _InFlight) -> None:
        self._admitting.add(info.task_id)
        try:
            async with self._admission_slots:
                await self._deliver_first(info)
        finally:
            self._admitting.discard(info.task_id)
            info.admitted_at = time.monotonic()
            self._check_done()

    async def _deliver_first(self, info: _InFlight) -> None:
        orch = self._new_orchestrator(info)
        first = orch.routing.current_role
        with hop_span(orch, "source", first, _span_context(info.span)) as span:
            try:
                to = await self._router.deliver(first, orch, deadline=time.monotonic() + 120.0)
                span.set_attribute("agentmesh.to_replica", to)
                return
            except RpcError as exc:
                hop_failed(orch, span, f"could not deliver to the first role: {exc}")
                err = exc
        orch.status = pb.TASK_STATUS_FAILED
        orch.error.code = "admission"
        orch.error.message = f"could not deliver to the first role: {err}"
        await self._finish(orch)

    async def run(self) -> RunProgress:
        flusher = self._spawn(self._flush_loop())
        sweeper = self._spawn(self._recovery_loop()) if self._recovery_interval_s > 0 else None
        try:
            for task_id, trial, row in self._tasks:
                await self._credits.acquire()
                span = tracer().start_span(
                    f"task {task_id}",
                    attributes={"agentmesh.task_id": task_id, "agentmesh.run_id": self.run_id},
                )
                info = _InFlight(
                    task_id, trial, json.dumps(row, separators=(",", ":")), span, time.monotonic()
                )
                self._in_flight[task_id] = info
                self.progress.admitted += 1
                if self._metrics is not None:
                    self._metrics.admitted()
                self._spawn(self._admit(info))
            self._source_done = True
            if self.progress.total is None:
                self.progress.total = self.progress.admitted
            self._check_done()
            await self._all_done.wait()
        finally:
            flusher.cancel()
            if sweeper is not None:
                sweeper.cancel()
            self._writer.flush()
            self.progress.finished_at = time.monotonic()
        return self.progress

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            self._writer.maybe_flush()

    async def _recovery_loop(self) -> None:
        while True:
            await asyncio.sleep(self._recovery_interval_s)
            try:
                await self._sweep()
            except Exception:
                log.exception("recovery sweep failed")

    def _remember(self, service: str, endpoints: tuple[Endpoint, ...]) -> None:
        if service.startswith(f"agent.{self.run_id}.") and not service.endswith(f".{SINK}"):
            for ep in endpoints:
                self._known[ep.address] = ep

    async def _held_everywhere(self) -> set[str] | None:
        """Task ids held by any replica, or None if one could not say (then nothing is concluded).

        Every replica ever seen in discovery is asked until it stops answering: a draining replica
        has left discovery but holds tasks until it is done.
        """
        known = list(self._known.items())
        replies = await asyncio.gather(
            *(self._router.held_tasks(ep) for _, ep in known), return_exceptions=True
        )
        held: set[str] = set()
        for (address, ep), reply in zip(known, replies, strict=True):
            if isinstance(reply, RpcError) and reply.code == grpc.StatusCode.UNAVAILABLE:
                # gone (killed or stopped): it holds nothing; forget it once discovery has too
                if ep not in self._cache.get(ep.service):
                    self._known.pop(address, None)
                    self._router.forget(address)
            elif isinstance(reply, BaseException):
                log.info("sweep: %s did not answer (%s); skipping this sweep", ep.id, reply)
                return None
            else:
                held.update(reply)
        return held

    async def _sweep(self) -> int:
        """Re-admit tasks no live replica holds (two sweeps in a row). Returns how many."""
        held = await self._held_everywhere()
        if held is None:
            return 0
        # The replicas are asked one after another, so a task handed from one not yet asked to one
        # already asked is seen by neither: ask again, a task does not hop twice in a millisecond.
        if any(t not in held and t not in self._admitting for t in self._in_flight):
            again = await self._held_everywhere()
            if again is None:
                return 0
            held |= again
        now = time.monotonic()
        lost: list[_InFlight] = []
        for info in list(self._in_flight.values()):
            if info.task_id in held or info.task_id in self._admitting:
                info.misses = 0
            elif now - info.admitted_at >= self._recovery_interval_s:
                info.misses += 1
                if info.misses >= 2:
                    lost.append(info)
        for info in lost:
            log.warning("task %s was lost with a replica; re-admitting it", info.task_id)
            info.recoveries += 1
            info.misses = 0
            self.progress.recovered += 1
            self._spawn(self._admit(info))
        return len(lost)


def _span_context(span: Span) -> Any:
    from opentelemetry import trace

    return trace.set_span_in_context(span)
