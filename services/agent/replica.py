"""One replica of a role: a grpc.aio server with a bounded inbox and N concurrent steps.

Deliver puts the task in the inbox and returns at once with the replica's load (a full inbox
answers RESOURCE_EXHAUSTED, a draining replica UNAVAILABLE, a malformed or wrong-version message
INVALID_ARGUMENT: the replica keeps serving everyone else). Workers take tasks from the inbox, run
the role's step with bounded retries and backoff, ask the routing program for the next role and
forward the task there directly. A task whose step fails for good goes to the sink marked failed,
with its error and history.

A replica registers in discovery when it starts and deregisters when it drains: health goes
NOT_SERVING, new deliveries are refused, the inbox and running steps finish, then the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agentmesh.agent.payload import PayloadStore
from agentmesh.agent.peers import LOAD_METADATA_KEY, PeerRouter, agent_service, encode_load, server_options
from agentmesh.agent.role import Role, RoleContext, Task
from agentmesh.agent.routing import SINK, RoutingProgram
from agentmesh.discovery import Discovery, Endpoint, EndpointCache, Registration
from agentmesh.errors import InvalidArgument, TaskFailed
from agentmesh.tracing import (
    carry_spans,
    context_from,
    hop_arrived,
    hop_failed,
    hop_span,
    tracer,
)
from agentmesh.v1 import agent_pb2 as apb
from agentmesh.v1 import orchestrator_pb2 as pb

__all__ = ["AgentReplica", "ReplicaLimits", "validate_orchestrator"]

log = logging.getLogger(__name__)

SERVICE_NAME = "agentmesh.v1.AgentService"
SCHEMA = pb.SCHEMA_VERSION_1


@dataclass(frozen=True)
class ReplicaLimits:
    concurrency: int = 8
    inbox: int = 1024
    max_attempts: int = 3
    retry_backoff_s: float = 0.2
    retry_backoff_max_s: float = 5.0
    max_hops: int = 256
    offload_threshold_bytes: int = 65536
    max_message_bytes: int = 16 * 1024 * 1024
    forward_timeout_s: float = 60.0


def validate_orchestrator(
    orch: pb.Orchestrator, *, run_id: str, role: str, programs: Mapping[str, Any]
) -> None:
    """Raise InvalidArgument (with the field named) if ``orch`` cannot be served here."""

    def bad(msg: str) -> InvalidArgument:
        return InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, msg)

    if orch.schema_version != SCHEMA:
        raise bad(f"schema_version: got {orch.schema_version}, this replica speaks {SCHEMA} (agentmesh.v1)")
    if not orch.task_id:
        raise bad("task_id: must not be empty")
    if orch.run_id != run_id:
        raise bad(f"run_id: task belongs to run {orch.run_id!r}, this replica serves run {run_id!r}")
    if orch.routing.program not in programs:
        raise bad(f"routing.program: unknown program {orch.routing.program!r} (known: {sorted(programs)})")
    if orch.routing.current_role != role:
        raise bad(
            f"routing.current_role: task is for role {orch.routing.current_role!r}, this replica is {role!r}"
        )
    if orch.status != pb.TASK_STATUS_RUNNING:
        raise bad(f"status: expected TASK_STATUS_RUNNING, got {pb.TaskStatus.Name(orch.status)}")


class AgentReplica:
    """A role replica. ``start()`` serves and registers; ``drain()`` finishes work and leaves."""

    def __init__(
        self,
        *,
        role_name: str,
        role_factory: Callable[[RoleContext], Role],
        run_id: str,
        programs: Mapping[str, RoutingProgram],
        discovery: Discovery,
        limits: ReplicaLimits | None = None,
        params: Mapping[str, Any] | None = None,
        payloads: PayloadStore | None = None,
        llm: Any | None = None,
        containers: Any | None = None,
        host: str = "127.0.0.1",
        advertise_host: str | None = None,
        replica_id: str | None = None,
        discovery_ttl_s: float = 5.0,
        endpoint_cache: EndpointCache | None = None,
        metrics_registry: Any | None = None,
    ) -> None:
        self.role_name = role_name
        self.run_id = run_id
        self.replica_id = replica_id or f"{role_name}-{uuid.uuid4().hex[:8]}"
        self.limits = limits or ReplicaLimits()
        self._programs = programs
        self._discovery = discovery
        self._payloads = payloads
        self._host = host
        self._advertise_host = advertise_host or host
        self._ttl_s = discovery_ttl_s
        self._ctx = RoleContext(role_name, self.replica_id, run_id, dict(params or {}), llm, containers)
        self._role = role_factory(self._ctx)
        self._inbox: asyncio.Queue[tuple[pb.Orchestrator, float, int]] = asyncio.Queue(self.limits.inbox)
        self._held: Counter[str] = Counter()
        self._in_progress = 0
        self._draining = False
        self._workers: list[asyncio.Task[None]] = []
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._registration: Registration | None = None
        self._own_cache = endpoint_cache is None
        self._cache = endpoint_cache or EndpointCache(discovery)
        self.router = PeerRouter(self._cache, run_id, max_message_bytes=self.limits.max_message_bytes)
        self.address = ""
        self.stats: Counter[str] = Counter()
        self.metrics: Any = None  # agentmesh.metrics.ReplicaMetrics, with a registry to report to
        if metrics_registry is not None:
            from agentmesh.metrics import ReplicaMetrics

            self.metrics = ReplicaMetrics(
                run_id,
                role_name,
                self.replica_id,
                queued=self._inbox.qsize,
                in_progress=lambda: self._in_progress,
                registry=metrics_registry,
            )

    # -- load -----------------------------------------------------------------------------
    def load(self) -> apb.LoadReport:
        return apb.LoadReport(
            replica_id=self.replica_id,
            queued=self._inbox.qsize(),
            in_progress=self._in_progress,
            capacity=self.limits.inbox,
            concurrency=self.limits.concurrency,
            draining=self._draining,
        )

    def held_task_ids(self) -> list[str]:
        return [t for t, n in self._held.items() if n > 0]

    # -- gRPC handlers ----------------------------------------------------------------------
    async def _deliver(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if self._draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"replica {self.replica_id} is draining")
        orch = pb.Orchestrator()
        try:
            orch.ParseFromString(request)
        except Exception as exc:  # DecodeError and friends
            self.stats["rejected_malformed"] += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed Orchestrator message: {exc}")
        try:
            validate_orchestrator(orch, run_id=self.run_id, role=self.role_name, programs=self._programs)
        except InvalidArgument as exc:
            self.stats["rejected_invalid"] += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc).partition(": ")[2])
        hop_arrived(orch, self.replica_id)
        try:
            self._inbox.put_nowait((orch, time.monotonic(), time.time_ns()))
        except asyncio.QueueFull:
            self.stats["rejected_full"] += 1
            context.set_trailing_metadata(((LOAD_METADATA_KEY, encode_load(self.load())),))
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"replica {self.replica_id} inbox full ({self.limits.inbox} tasks)",
            )
        self._held[orch.task_id] += 1
        self.stats["accepted"] += 1
        return apb.DeliverReply(load=self.load()).SerializeToString()

    async def _load_rpc(self, request: apb.LoadRequest, context: grpc.aio.ServicerContext) -> apb.LoadReport:
        return self.load()

    async def _held_rpc(
        self, request: apb.HeldTasksRequest, context: grpc.aio.ServicerContext
    ) -> apb.HeldTasksReply:
        return apb.HeldTasksReply(replica_id=self.replica_id, task_ids=self.held_task_ids())

    def _handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                # Deliver takes raw bytes so that a malformed message is answered INVALID_ARGUMENT by us,
                # not INTERNAL by grpc's deserializer.
                "Deliver": grpc.unary_unary_rpc_method_handler(self._deliver),
                "Load": grpc.unary_unary_rpc_method_handler(
                    self._load_rpc,
                    request_deserializer=apb.LoadRequest.FromString,
                    response_serializer=apb.LoadReport.SerializeToString,
                ),
                "HeldTasks": grpc.unary_unary_rpc_method_handler(
                    self._held_rpc,
                    request_deserializer=apb.HeldTasksRequest.FromString,
                    response_serializer=apb.HeldTasksReply.SerializeToString,
                ),
            },
        )

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> str:
        server = grpc.aio.server(options=server_options(self.limits.max_message_bytes))
        server.add_generic_rpc_handlers((self._handlers(),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        port = server.add_insecure_port(f"{self._host}:0")
        await server.start()
        self._server = server
        self.address = f"{self._advertise_host}:{port}"
        await self._role.setup()
        programs_roles: set[str] = {SINK}
        for p in self._programs.values():
            programs_roles |= p.roles()
        await self.router.subscribe(sorted(programs_roles))
        self._workers = [
            asyncio.create_task(self._worker(), name=f"{self.replica_id}-w{i}")
            for i in range(self.limits.concurrency)
        ]
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._registration = await self._discovery.register(
            Endpoint(
                agent_service(self.run_id, self.role_name),
                self.replica_id,
                self.address,
                {"role": self.role_name, "run": self.run_id, "concurrency": str(self.limits.concurrency)},
            ),
            ttl_s=self._ttl_s,
        )
        log.info("replica %s serving role %s on %s", self.replica_id, self.role_name, self.address)
        return self.address

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)

    async def drain(self, grace_s: float = 30.0) -> None:
        """Graceful drain (SIGTERM, preemption): leave discovery, finish held tasks, stop."""
        if self._draining:
            return
        self._draining = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._registration is not None:
            with contextlib.suppress(Exception):
                await self._registration.close()
        deadline = time.monotonic() + grace_s
        # every task taken from the inbox is marked done once its step ran and it was forwarded
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._inbox.join(), grace_s)
        await self.stop(grace_s=max(0.0, deadline - time.monotonic()))

    async def stop(self, grace_s: float = 0.0) -> None:
        self._draining = True
        for w in self._workers:
            w.cancel()
        for w in self._workers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await w
        self._workers = []
        if self._registration is not None:
            with contextlib.suppress(Exception):
                await self._registration.close()
            self._registration = None
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        with contextlib.suppress(Exception):
            await self._role.teardown()
        await self.router.close()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self._own_cache:
            await self._cache.close()

    # -- the work ---------------------------------------------------------------------------
    async def _worker(self) -> None:
        while True:
            orch, enqueued_at, enqueued_ns = await self._inbox.get()
            self._in_progress += 1
            try:
                await self._process(orch, enqueued_at, enqueued_ns)
            except Exception:  # never let one task kill a worker
                log.exception("replica %s: unexpected error on task %s", self.replica_id, orch.task_id)
            finally:
                self._in_progress -= 1
                self._inbox.task_done()
                self._held[orch.task_id] -= 1
                if self._held[orch.task_id] <= 0:
                    del self._held[orch.task_id]

    async def _fetch(self, ref: pb.PayloadRef) -> str:
        if self._payloads is None:
            raise RuntimeError("no payload store configured")
        return await self._payloads.get(ref)

    async def _process(self, orch: pb.Orchestrator, enqueued_at: float, enqueued_ns: int) -> None:
        parent = context_from(orch)
        queue_wait_s = time.monotonic() - enqueued_at
        if parent is not None:  # the wait in this replica's inbox, as a span of its own
            tracer().start_span(
                f"queue {self.role_name}",
                context=parent,
                start_time=enqueued_ns,
                attributes={
                    "agentmesh.task_id": orch.task_id,
                    "agentmesh.role": self.role_name,
                    "agentmesh.replica_id": self.replica_id,
                },
            ).end(enqueued_ns + int(queue_wait_s * 1e9))
        with tracer().start_as_current_span(
            f"step {self.role_name}",
            context=parent,
            attributes={
                "agentmesh.task_id": orch.task_id,
                "agentmesh.role": self.role_name,
                "agentmesh.replica_id": self.replica_id,
                "agentmesh.queue_wait_s": queue_wait_s,
                "agentmesh.turn": orch.routing.turn,
            },
        ) as span:
            started = time.monotonic()
            next_role = await self._run_step(orch)
            span.set_attribute("agentmesh.next_role", next_role)
        if self.metrics is not None:
            self.metrics.queue_wait(queue_wait_s)
            self.metrics.step_done(time.monotonic() - started, ok=orch.status != pb.TASK_STATUS_FAILED)
        await self._forward(orch, next_role, parent)

    async def _run_step(self, orch: pb.Orchestrator) -> str:
        """Run the step with retries; return the next role (the sink if the task failed)."""
        n_before = len(orch.history)
        results_before = dict(orch.results)
        task = Task(orch, role=self.role_name, replica_id=self.replica_id, fetch=self._fetch)
        limits = self.limits
        while True:
            try:
                if orch.deadline_unix_ms and time.time() * 1000 > orch.deadline_unix_ms:
                    raise TaskFailed("deadline", f"task deadline passed before step {self.role_name!r}")
                timeout = None
                if orch.deadline_unix_ms:
                    timeout = max(0.001, orch.deadline_unix_ms / 1000 - time.time())
                try:
                    await asyncio.wait_for(self._role.step(task), timeout)
                except TimeoutError:
                    raise TaskFailed(
                        "deadline", f"step {self.role_name!r} ran past the task deadline"
                    ) from None
                orch.attempt = 0
                break
            except TaskFailed as exc:
                return self._fail(orch, exc.code, str(exc), orch.attempt + 1)
            except Exception as exc:
                orch.attempt += 1
                # a failed attempt leaves no trace in the task but its count
                del orch.history[n_before:]
                orch.results.clear()
                orch.results.update(results_before)
                self.stats["step_errors"] += 1
                if self.metrics is not None:
                    self.metrics.step_retried()
                if orch.attempt >= limits.max_attempts:
                    return self._fail(orch, "step_exception", f"{type(exc).__name__}: {exc}", orch.attempt)
                delay = min(limits.retry_backoff_max_s, limits.retry_backoff_s * 2 ** (orch.attempt - 1))
                log.warning(
                    "%s: task %s attempt %d failed (%s); retrying in %.2fs",
                    self.replica_id,
                    orch.task_id,
                    orch.attempt,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
        self.stats["steps"] += 1
        if self.metrics is not None:
            new = orch.history[n_before:]
            self.metrics.tokens(
                sum(t.usage.prompt_tokens for t in new), sum(t.usage.completion_tokens for t in new)
            )
        if self._payloads is not None and limits.offload_threshold_bytes > 0:
            await self._offload(orch, n_before)
        try:
            program = self._programs[orch.routing.program]
            next_role = program.advance(orch)
        except TaskFailed as exc:
            return self._fail(orch, exc.code, str(exc), 1)
        orch.routing.hops += 1
        max_hops = orch.routing.max_hops or limits.max_hops
        if next_role != SINK and orch.routing.hops >= max_hops:
            return self._fail(orch, "max_hops", f"task took {orch.routing.hops} hops (limit {max_hops})", 1)
        return next_role

    async def _offload(self, orch: pb.Orchestrator, start: int) -> None:
        assert self._payloads is not None
        threshold = self.limits.offload_threshold_bytes
        for i in range(start, len(orch.history)):
            turn = orch.history[i]
            if turn.WhichOneof("body") == "content" and len(turn.content) > threshold // 4:
                data = turn.content
                if len(data.encode()) > threshold:
                    ref = await self._payloads.put(orch.task_id, data)
                    turn.payload.CopyFrom(ref)  # clears `content` (oneof)
                    self.stats["offloaded"] += 1

    def _fail(self, orch: pb.Orchestrator, code: str, message: str, attempts: int) -> str:
        orch.status = pb.TASK_STATUS_FAILED
        orch.error.code = code
        orch.error.message = message[:4000]
        orch.error.role = self.role_name
        orch.error.replica_id = self.replica_id
        orch.error.attempts = attempts
        self.stats["failed"] += 1
        return SINK

    async def _forward(self, orch: pb.Orchestrator, next_role: str, parent: Any) -> None:
        orch.routing.current_role = next_role
        with hop_span(orch, self.role_name, next_role, parent) as span:
            deadline = time.monotonic() + self.limits.forward_timeout_s
            sent = time.monotonic()
            try:
                to = await self.router.deliver(next_role, orch, deadline=deadline)
                span.set_attribute("agentmesh.to_replica", to)
                self.stats["forwarded"] += 1
                if self.metrics is not None:
                    self.metrics.hop(next_role, time.monotonic() - sent, ok=True)
                return
            except InvalidArgument as exc:
                err = f"forward to {next_role!r} refused: {exc}"
            except Exception as exc:
                err = f"forward to {next_role!r} failed: {exc}"
            hop_failed(orch, span, err)
            if self.metrics is not None:
                self.metrics.hop(next_role, time.monotonic() - sent, ok=False)
        log.warning("%s: task %s: %s", self.replica_id, orch.task_id, err)
        if next_role == SINK:
            return  # the sink is unreachable: the source's recovery re-admits the task
        self._fail(orch, "forward", err, 1)
        orch.routing.current_role = SINK
        carry_spans(orch)  # the failed hop's span among them
        with contextlib.suppress(Exception):
            await self.router.deliver(SINK, orch, deadline=time.monotonic() + self.limits.forward_timeout_s)
