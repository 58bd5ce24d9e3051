"""One LLM replica: a backend server plus its discovery registration, as a Ray actor or in-process.

A replica starts an OpenAI-compatible backend — ``"vllm"`` (``vllm serve`` on GPUs,
:class:`~agentmesh.llm_gateway.vllm_gpu.VllmServer`), ``"vllm-cpu"`` (:class:`VllmCpuServer`, the
real model on the CPU) or ``"simulator"`` (:class:`~agentmesh.llm_gateway.simulator.SimulatedReplica`,
named a simulator everywhere) — then registers ``host:port`` in discovery as service ``llm.<model>``
with metadata ``scheme=http``, ``backend``, ``model`` under a lease, which the discovery backend
keeps alive. :meth:`LlmReplica.stop` deregisters first (clients stop choosing it), then stops the
server.

The external backends ``"openai"``, ``"azure"`` and ``"gemini"`` start no server: the replica only
holds a registration of the provider's API (metadata keys as documented in
:mod:`agentmesh.llm_gateway.providers`: ``provider``, ``base_url``, ``api_key_env``, ``deployment``,
``api_version``, ``model``, ``probe=none``). The key itself never enters discovery; clients read
the variable ``api_key_env`` names from their own environment.

A watchdog checks the backend process; when it dies, the replica deregisters and calls
``on_backend_exit``. :class:`LlmReplicaActor` uses that to exit its process, so that Ray restarts
the actor (``max_restarts``); the restarted actor re-runs its constructor, which starts the
backend and registers again by itself — no caller has to call anything after a restart.

The actor keeps the replica on an event loop in a thread of its own, started from ``__init__``:
Ray actor constructors cannot be coroutines, and this way the start-up begins at construction
(and at every restart) rather than at some later method call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, get_args
from urllib.parse import urlsplit

import ray

from agentmesh.discovery import connect
from agentmesh.discovery.base import Discovery, Endpoint, Registration
from agentmesh.errors import ConfigError, LlmError
from agentmesh.llm_gateway.client import llm_service_name
from agentmesh.llm_gateway.constants import LLM_REPLICA_TTL_S, VLLM_STARTUP_TIMEOUT_S
from agentmesh.llm_gateway.providers import PROVIDERS

__all__ = ["EXTERNAL_BACKENDS", "BackendKind", "LlmReplica", "LlmReplicaActor"]

log = logging.getLogger(__name__)

BackendKind = Literal["vllm", "vllm-cpu", "simulator", "openai", "azure", "gemini"]
_BACKENDS: tuple[str, ...] = get_args(BackendKind)
EXTERNAL_BACKENDS = ("openai", "azure", "gemini")
"""Backends that start no server: a registration of a provider's API."""

_WATCHDOG_INTERVAL_S = 1.0


class _Backend(Protocol):
    async def start(self, host: str) -> str: ...
    async def stop(self) -> None: ...
    def alive(self) -> bool: ...
    def endpoint(self, base_url: str, advertise_host: str) -> tuple[str, dict[str, str]]:
        """The discovery address and metadata of the started backend."""
        ...


def _local_endpoint(base_url: str, advertise_host: str) -> tuple[str, dict[str, str]]:
    """Address and metadata of a server this replica runs: ``advertise_host:port``, plain HTTP."""
    port = base_url.rsplit(":", 1)[1].rstrip("/")
    return f"{advertise_host}:{port}", {"scheme": "http"}


class _VllmGpuBackend:
    def __init__(
        self,
        model: str,
        tensor_parallel_size: int,
        max_num_seqs: int,
        vllm_bin: str | None,
        log_dir: Path | None,
        extra_args: Sequence[str],
        startup_timeout_s: float,
    ) -> None:
        from agentmesh.llm_gateway.vllm_gpu import VllmServer

        self._log_dir = log_dir
        self._service = llm_service_name(model)
        self._tp = tensor_parallel_size
        self.server = VllmServer(
            model,
            served_model_name=model,
            tensor_parallel_size=tensor_parallel_size,
            max_num_seqs=max_num_seqs,
            vllm_bin=vllm_bin,
            extra_args=extra_args,
            startup_timeout_s=startup_timeout_s,
        )

    async def start(self, host: str) -> str:
        from agentmesh.llm_gateway.constants import agentmesh_home

        self.server.host = host
        # Named after the service, not the model: a Hugging Face id holds a '/'.
        log_dir = self._log_dir if self._log_dir is not None else agentmesh_home() / "logs"
        self.server.log_path = log_dir / f"vllm-{self._service}-{os.getpid()}.log"
        return str(await self.server.start())

    async def stop(self) -> None:
        await self.server.stop()

    def alive(self) -> bool:
        return bool(self.server.running())

    def endpoint(self, base_url: str, advertise_host: str) -> tuple[str, dict[str, str]]:
        address, meta = _local_endpoint(base_url, advertise_host)
        return address, {**meta, "tensor_parallel_size": str(self._tp)}


class _ExternalBackend:
    """A provider's API: nothing to start; the registration says where it is and which key to use."""

    def __init__(
        self,
        provider: str,
        model: str,
        base_url: str | None,
        api_key_env: str | None,
        deployment: str | None,
        api_version: str | None,
    ) -> None:
        # The provider's own defaults (Azure has no base_url: it is the resource's endpoint).
        defaults = PROVIDERS[provider]
        url = base_url or defaults.default_base_url
        if not url:
            raise ConfigError(f"backend {provider!r} needs a base_url (its API root)", key="base_url")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"expected an http(s) URL, got {url!r}", key="base_url")
        if provider == "azure" and not api_version:
            raise ConfigError("backend 'azure' needs an api_version (e.g. 2024-10-21)", key="api_version")
        self.metadata = {
            "provider": provider,
            "scheme": parts.scheme,
            "base_url": url.rstrip("/"),
            "api_key_env": api_key_env or str(defaults.default_key_env),
            "model": model,
            "probe": "none",
        }
        if provider == "azure":
            self.metadata["deployment"] = deployment or model
            self.metadata["api_version"] = str(api_version)
        self._base_url = url

    async def start(self, host: str) -> str:
        return self._base_url

    async def stop(self) -> None:
        return None

    def alive(self) -> bool:
        return True

    def endpoint(self, base_url: str, advertise_host: str) -> tuple[str, dict[str, str]]:
        return urlsplit(base_url).netloc, dict(self.metadata)


class _VllmCpuBackend:
    def __init__(
        self,
        model: str,
        model_dir: Path | None,
        max_num_seqs: int,
        log_dir: Path | None,
        extra_args: Sequence[str],
        startup_timeout_s: float,
    ) -> None:
        self._model = model
        self._model_dir = model_dir
        self._max_num_seqs = max_num_seqs
        self._log_dir = log_dir
        self._extra_args = tuple(extra_args)
        self._startup_timeout_s = startup_timeout_s
        self.server: Any = None
        self.startup_s: float | None = None

    async def start(self, host: str) -> str:
        from agentmesh.llm_gateway.models import ensure_smollm2
        from agentmesh.llm_gateway.vllm_cpu import VllmCpuServer

        model_dir = self._model_dir
        if model_dir is None:
            # The only model shipped in a package; others are served from an explicit folder.
            model_dir = await asyncio.to_thread(ensure_smollm2)
        log_path = None
        if self._log_dir is not None:
            log_path = self._log_dir / f"vllm-{self._model}-{os.getpid()}.log"
        self.server = VllmCpuServer(
            model_dir,
            served_model_name=self._model,
            host=host,
            max_num_seqs=self._max_num_seqs,
            log_path=log_path,
            extra_args=self._extra_args,
            startup_timeout_s=self._startup_timeout_s,
        )
        url = str(await self.server.start())
        self.startup_s = self.server.startup_s
        return url

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()

    def alive(self) -> bool:
        return self.server is not None and bool(self.server.running())

    def endpoint(self, base_url: str, advertise_host: str) -> tuple[str, dict[str, str]]:
        return _local_endpoint(base_url, advertise_host)


class _SimulatorBackend:
    def __init__(self, model: str, profile: str, overrides: Mapping[str, Any]) -> None:
        self._model = model
        self._profile = profile
        self._overrides = dict(overrides)
        self.sim: Any = None

    async def start(self, host: str) -> str:
        # Imported lazily: the simulator is only needed where a replica runs one.
        from agentmesh.llm_gateway.sim_profiles import get_profile
        from agentmesh.llm_gateway.simulator import SimulatedReplica

        params = get_profile(self._profile, **{"model": self._model, **self._overrides})
        self.sim = SimulatedReplica(params)
        return str(await self.sim.start(host, 0))

    async def stop(self) -> None:
        if self.sim is not None:
            await self.sim.stop()

    def alive(self) -> bool:
        return self.sim is not None  # in-process: alive while this process is

    def endpoint(self, base_url: str, advertise_host: str) -> tuple[str, dict[str, str]]:
        return _local_endpoint(base_url, advertise_host)


class LlmReplica:
    """A backend server for ``model`` registered in discovery. Plain asyncio, no Ray.

    ``discovery`` is a :class:`Discovery` (not closed by the replica) or a URL for
    :func:`agentmesh.discovery.connect` (opened and closed by the replica). ``model_dir`` is the
    Hugging Face folder vLLM CPU serves; without it the packaged SmolLM2-135M-Instruct is used.
    ``advertise_host`` is the host written to discovery when it differs from the bind ``host``.
    ``tensor_parallel_size`` and ``vllm_bin`` are for ``backend="vllm"`` (GPU; ``vllm_bin`` defaults
    to ``$AGENTMESH_VLLM_BIN``, else ``vllm`` on ``PATH``). ``base_url``, ``api_key_env`` (the NAME of
    the variable holding the key), ``deployment`` and ``api_version`` are for the external backends.
    """

    def __init__(
        self,
        model: str,
        *,
        discovery: Discovery | str,
        backend: BackendKind = "vllm-cpu",
        replica_id: str | None = None,
        host: str = "127.0.0.1",
        advertise_host: str | None = None,
        ttl_s: float = LLM_REPLICA_TTL_S,
        model_dir: Path | str | None = None,
        max_num_seqs: int = 16,
        vllm_extra_args: Sequence[str] = (),
        startup_timeout_s: float = VLLM_STARTUP_TIMEOUT_S,
        simulator_profile: str = "fast-test",
        simulator_overrides: Mapping[str, Any] | None = None,
        log_dir: Path | str | None = None,
        metadata: Mapping[str, str] | None = None,
        on_backend_exit: Callable[[], None] | None = None,
        tensor_parallel_size: int = 1,
        vllm_bin: str | None = None,
        base_url: str | None = None,
        api_key_env: str | None = None,
        deployment: str | None = None,
        api_version: str | None = None,
    ) -> None:
        if backend not in _BACKENDS:
            raise ConfigError(f"expected one of {list(_BACKENDS)}, got {backend!r}", key="backend")
        self.model = model
        self.service = llm_service_name(model)
        self.backend_kind: BackendKind = backend
        self.replica_id = replica_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.host = host
        self.advertise_host = advertise_host or host
        self.ttl_s = ttl_s
        self._discovery_arg = discovery
        self._discovery: Discovery | None = None
        self._extra_metadata = dict(metadata or {})
        self._on_backend_exit = on_backend_exit
        self._backend: _Backend
        if backend == "vllm":
            self._backend = _VllmGpuBackend(
                model,
                tensor_parallel_size,
                max_num_seqs,
                vllm_bin,
                Path(log_dir) if log_dir is not None else None,
                vllm_extra_args,
                startup_timeout_s,
            )
        elif backend in EXTERNAL_BACKENDS:
            self._backend = _ExternalBackend(backend, model, base_url, api_key_env, deployment, api_version)
        elif backend == "vllm-cpu":
            self._backend = _VllmCpuBackend(
                model,
                Path(model_dir) if model_dir is not None else None,
                max_num_seqs,
                Path(log_dir) if log_dir is not None else None,
                vllm_extra_args,
                startup_timeout_s,
            )
        else:
            self._backend = _SimulatorBackend(model, simulator_profile, simulator_overrides or {})
        self._registration: Registration | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.endpoint: Endpoint | None = None
        self.base_url: str | None = None
        self.startup_s: float | None = None
        self._stopped = False

    async def start(self) -> Endpoint:
        """Start the backend, then register it. On failure everything started is stopped again."""
        if self.endpoint is not None:
            return self.endpoint
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            self.base_url = await self._backend.start(self.host)
            self.startup_s = loop.time() - t0
            address, backend_metadata = self._backend.endpoint(self.base_url, self.advertise_host)
            endpoint = Endpoint(
                service=self.service,
                id=self.replica_id,
                address=address,
                metadata={
                    **self._extra_metadata,
                    "backend": self.backend_kind,
                    "model": self.model,
                    **backend_metadata,
                },
            )
            if isinstance(self._discovery_arg, str):
                self._discovery = connect(self._discovery_arg)
            else:
                self._discovery = self._discovery_arg
            self._registration = await self._discovery.register(endpoint, ttl_s=self.ttl_s)
        except BaseException:
            await self.stop()
            raise
        self.endpoint = endpoint
        self._watchdog = asyncio.create_task(
            self._watch_backend(), name=f"llm-replica-watchdog:{self.replica_id}"
        )
        log.info(
            "LLM replica %s (%s, %s) serving %s, registered as %s in %.1fs",
            self.replica_id,
            self.backend_kind,
            self.model,
            self.base_url,
            self.service,
            self.startup_s,
        )
        return endpoint

    async def _watch_backend(self) -> None:
        while not self._stopped:
            await asyncio.sleep(_WATCHDOG_INTERVAL_S)
            if self._stopped or self._backend.alive():
                continue
            log.error(
                "LLM replica %s: the %s backend died; deregistering", self.replica_id, self.backend_kind
            )
            await self._deregister()
            if self._on_backend_exit is not None:
                self._on_backend_exit()
            return

    async def _deregister(self) -> None:
        reg, self._registration = self._registration, None
        if reg is not None:
            try:
                await reg.close()
            except Exception as exc:  # the lease expires on its own
                log.warning("LLM replica %s: deregistering failed: %s", self.replica_id, exc)

    async def stop(self) -> None:
        """Deregister (clients stop choosing it), then stop the backend. Idempotent."""
        self._stopped = True
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None and watchdog is not asyncio.current_task():
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
        await self._deregister()
        await self._backend.stop()
        if isinstance(self._discovery_arg, str) and self._discovery is not None:
            with contextlib.suppress(Exception):
                await self._discovery.close()
        self._discovery = None

    def info(self) -> dict[str, Any]:
        """What the replica is: for logs, CLIs and tests."""
        return {
            "replica_id": self.replica_id,
            "model": self.model,
            "service": self.service,
            "backend": self.backend_kind,
            "base_url": self.base_url,
            "address": self.endpoint.address if self.endpoint else None,
            "registered": self._registration is not None,
            "startup_s": self.startup_s,
            "pid": os.getpid(),
        }


def _exit_for_restart() -> None:
    # os._exit, not sys.exit: this runs on the replica's own thread, and only the process ending
    # makes Ray count a crash and restart the actor (whose constructor starts everything again).
    log.error("exiting the actor process so that Ray restarts the replica")
    os._exit(1)


@ray.remote(num_cpus=0.1, max_restarts=-1, max_task_retries=0)
class LlmReplicaActor:
    """:class:`LlmReplica` as a Ray actor. Starts in the constructor (and again after a restart).

    ``LlmReplicaActor.remote(model, discovery_url, backend=..., **LlmReplica options)``; then
    ``await actor.ready.remote()`` for the endpoint info (it raises if the start failed) and
    ``actor.stop.remote()`` before ``ray.kill``. Override ``num_cpus``/``max_restarts`` with
    ``.options(...)``; the vLLM server's real CPU use is outside Ray's accounting.
    """

    def __init__(self, model: str, discovery_url: str, **options: Any) -> None:
        logging.basicConfig(level=logging.INFO)
        options.setdefault("on_backend_exit", _exit_for_restart)
        self._replica = LlmReplica(model, discovery=discovery_url, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="llm-replica-loop", daemon=True)
        self._thread.start()
        self._started: concurrent.futures.Future[Endpoint] = asyncio.run_coroutine_threadsafe(
            self._replica.start(), self._loop
        )

    async def _on_loop(self, coro: Any) -> Any:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def ready(self) -> dict[str, Any]:
        """Wait until the backend serves and is registered; raise :class:`LlmError` if it failed."""
        try:
            await asyncio.wrap_future(self._started)
        except Exception as exc:
            raise LlmError(f"LLM replica {self._replica.replica_id} failed to start: {exc}") from exc
        return self._replica.info()

    async def info(self) -> dict[str, Any]:
        return self._replica.info()

    async def stop(self) -> None:
        """Deregister and stop the backend (call before ``ray.kill`` for a graceful drain)."""
        with contextlib.suppress(Exception):
            await asyncio.wrap_future(self._started)
        await self._on_loop(self._replica.stop())
