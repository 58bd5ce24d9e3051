"""Host a role replica in a Ray actor.

Ray places the actor (fractional CPUs), restarts it if its process dies, and gives it the object
store for offloaded payloads; the replica itself runs in an event loop of its own, on a thread
the actor starts, so it owns its gRPC server whatever Ray does with the actor's methods. On SIGTERM
(Slurm preemption, ``ray stop``) the replica drains: it leaves discovery, finishes what it holds,
then the process exits.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import signal
import threading
from typing import Any

__all__ = ["ReplicaHost", "replica_actor_class"]

log = logging.getLogger(__name__)


class ReplicaHost:
    """Body of the Ray actor: builds the role replica from the run config and serves it."""

    def __init__(self, run: dict[str, Any], role_name: str, index: int) -> None:
        self._run = run
        self._role_name = role_name
        self._index = index
        self._llm: Any = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="agentmesh-replica", daemon=True)
        self._thread.start()
        self.replica: Any = None
        self._metrics_ep: Any = None  # this process's /metrics (agentmesh.metrics.MetricsEndpoint)
        self._address = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=120)
        # Ray's worker answers SIGTERM with sys.exit() in its main thread, and only a handler set from
        # the main thread could replace that; the interpreter's exit runs atexit hooks either way,
        # so the drain hangs there (it blocks the exit until the replica is done).
        atexit.register(self._drain_at_exit)
        with contextlib.suppress(ValueError):  # not the main thread: Ray's handler stays
            signal.signal(signal.SIGTERM, self._on_sigterm)

    async def _start(self) -> str:
        from agentmesh.agent.payload import RayPayloadStore
        from agentmesh.agent.replica import AgentReplica, ReplicaLimits
        from agentmesh.agent.routing import build_programs
        from agentmesh.config import RunConfig
        from agentmesh.discovery import EndpointCache, connect
        from agentmesh.loader import load_object
        from agentmesh.tracing import configure_tracing_from

        cfg = RunConfig.from_dict(self._run["config"])
        run_id: str = self._run["run_id"]
        role = cfg.roles[self._role_name]
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        configure_tracing_from(f"agentmesh.{self._role_name}", cfg.tracing)
        discovery = connect(self._run["discovery_url"])
        cache = EndpointCache(discovery)
        metrics: Any = None
        if cfg.metrics.enabled:
            import agentmesh.metrics as metrics
        llm = None
        if role.llm is not None:
            from agentmesh.llm_gateway.client import LlmClient
            from agentmesh.llm_gateway.constants import LLM_MEASURE_TTFT

            llm = LlmClient(cfg.llms[role.llm].model, cache, measure_ttft=LLM_MEASURE_TTFT)
        self._llm = llm
        containers = None
        if role.container:
            from agentmesh.container.client import ContainerClient

            # the run is the client: any replica may release what another acquired for a task
            containers = ContainerClient(
                run_id, endpoints=cache, registry_name=cfg.containers.registry or run_id
            )
        limits = cfg.limits
        self.replica = AgentReplica(
            role_name=self._role_name,
            role_factory=load_object(role.cls, key=f"roles.{self._role_name}.class"),
            run_id=run_id,
            programs=build_programs(cfg.routing.programs),
            discovery=discovery,
            limits=ReplicaLimits(
                concurrency=role.concurrency,
                inbox=role.inbox,
                max_attempts=limits.max_attempts,
                retry_backoff_s=limits.retry_backoff_s,
                retry_backoff_max_s=limits.retry_backoff_max_s,
                max_hops=limits.max_hops,
                offload_threshold_bytes=limits.offload_threshold_bytes,
                max_message_bytes=limits.max_message_bytes,
            ),
            params=role.params,
            payloads=RayPayloadStore(run_id),
            llm=llm,
            containers=containers,
            host=self._run.get("host", "127.0.0.1"),
            replica_id=f"{self._role_name}-{self._index}-{os.getpid()}",
            discovery_ttl_s=cfg.discovery.ttl_s,
            endpoint_cache=cache,
            metrics_registry=metrics.REGISTRY if metrics is not None else None,
        )
        address = await self.replica.start()
        if metrics is not None:
            if llm is not None:
                metrics.register_llm_accounting(llm.accounting)
            self._metrics_ep = await metrics.serve_metrics(
                job="agent",
                labels={"run": run_id, "role": self._role_name, "replica": self.replica.replica_id},
                discovery=discovery,
                host=cfg.metrics.host,
                ttl_s=cfg.discovery.ttl_s,
            )
        return address

    def _drain_at_exit(self, grace_s: float = 60.0) -> None:
        if self.replica is None or self._loop.is_closed():
            return
        log.warning("exiting: draining %s", self._role_name)
        with contextlib.suppress(Exception):
            done = asyncio.run_coroutine_threadsafe(self.replica.drain(grace_s), self._loop)
            done.result(timeout=grace_s + 5)
        self._flush()

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM: draining %s", self._role_name)

        def _drain_and_exit() -> None:
            try:
                self._drain_at_exit()
            finally:
                os._exit(0)

        threading.Thread(target=_drain_and_exit, daemon=True).start()

    def address(self) -> str:
        return str(self._address)

    def pid(self) -> int:
        return os.getpid()

    def stats(self) -> dict[str, int]:
        return dict(self.replica.stats)

    def llm_accounting(self) -> dict[str, Any] | None:
        """This replica's LLM accounting snapshot (None for roles without an LLM)."""
        return None if self._llm is None else self._llm.accounting.snapshot()

    def drain(self, grace_s: float = 30.0) -> None:
        asyncio.run_coroutine_threadsafe(self.replica.drain(grace_s), self._loop).result(timeout=grace_s + 10)
        self._flush()

    def stop(self) -> None:
        """The run is over: stop serving and hand over what this process still holds (spans)."""
        if self.replica is not None and not self._loop.is_closed():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.replica.stop(1.0), self._loop).result(timeout=15)
        if self._metrics_ep is not None and not self._loop.is_closed():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._metrics_ep.close(), self._loop).result(timeout=5)
            self._metrics_ep = None
        self._flush()

    def _flush(self) -> None:
        from agentmesh.tracing import force_flush

        with contextlib.suppress(Exception):
            force_flush(10_000)  # ray.kill gives no atexit: spans still batched would be lost


def replica_actor_class() -> Any:
    import ray

    return ray.remote(ReplicaHost)
