"""Bring a run up and down: Ray, discovery, LLM replicas, role replicas, then the driver.

The embedded default needs nothing but this machine: a local Ray, a local etcd (started here, on
loopback, with a private data dir), the configured LLM replicas as Ray actors (vLLM CPU serving a
model a package ships, or the simulator), and every role's replicas as Ray actors. With
``ray.address`` and ``discovery.url`` set, the same code joins an existing cluster instead.
Everything this module starts, it stops, in reverse order, whatever happened in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentmesh.agent.routing import build_programs
from agentmesh.config import RunConfig, iter_dataset
from agentmesh.driver import RunDriver, RunProgress
from agentmesh.errors import ConfigError

__all__ = ["RunHandle", "count_tasks", "init_ray", "run_pipeline"]

log = logging.getLogger(__name__)

RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
}


def init_ray(
    address: str | None, *, temp_dir: str | None = None, num_cpus: int | None = None
) -> Callable[[], None]:
    """Start (or join) Ray with this machine's required settings; returns the shutdown function."""
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        return lambda: None
    own_tmp = None
    if address is None and temp_dir is None:
        own_tmp = tempfile.mkdtemp(
            prefix="am-ray-", dir="/tmp"
        )  # short: Ray's socket paths are length-limited
        temp_dir = own_tmp
    os.environ.setdefault("TMPDIR", temp_dir or tempfile.gettempdir())
    pythonpath = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.WARNING,
        "runtime_env": {"env_vars": {**RAY_ENV, "PYTHONPATH": pythonpath}},
    }
    if address is None:
        kwargs["_node_ip_address"] = "127.0.0.1"  # the embedded default stays on loopback
        kwargs["_temp_dir"] = temp_dir
        kwargs["num_cpus"] = num_cpus or os.cpu_count() or 2
    ray.init(address=address, **kwargs)

    def shutdown() -> None:
        ray.shutdown()
        if own_tmp:
            shutil.rmtree(own_tmp, ignore_errors=True)

    return shutdown


def count_tasks(cfg: RunConfig, done: set[str]) -> int:
    return sum(1 for task_id, _, _ in iter_dataset(cfg.dataset) if task_id not in done)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "run"


@dataclass
class RunHandle:
    """What a started run exposes (tests use it to kill replicas mid-run)."""

    run_id: str
    config: RunConfig
    discovery_url: str
    role_actors: dict[str, list[Any]]
    llm_actors: dict[str, list[Any]]
    driver: RunDriver | None = None


def _used_llms(cfg: RunConfig) -> list[str]:
    return sorted({r.llm for r in cfg.roles.values() if r.llm is not None})


ACTOR_BACKENDS = ("vllm-cpu", "simulator")


def _start_llms(cfg: RunConfig, discovery_url: str, say: Callable[[str], None]) -> dict[str, list[Any]]:
    """Start the actor-hosted LLM replicas (vLLM CPU, simulator) and wait until they serve."""
    import ray

    from agentmesh.llm_gateway.replica import LlmReplicaActor

    actors: dict[str, list[Any]] = {}
    for name in _used_llms(cfg):
        llm = cfg.llms[name]
        if llm.backend not in ACTOR_BACKENDS:
            continue
        say(f"starting {llm.replicas} {llm.backend} replica(s) of {llm.model} ...")
        t0 = time.monotonic()
        options: dict[str, Any] = {"backend": llm.backend, "max_num_seqs": llm.max_num_seqs}
        if llm.backend == "simulator":
            options["simulator_profile"] = llm.simulator_profile or "fast-test"
            options["simulator_overrides"] = dict(llm.options)
        actors[name] = [
            LlmReplicaActor.options(  # type: ignore[attr-defined]
                num_cpus=llm.num_cpus, name=f"agentmesh-llm-{name}-{i}-{uuid.uuid4().hex[:4]}"
            ).remote(llm.model, discovery_url, replica_id=f"{name}-{i}", **options)
            for i in range(llm.replicas)
        ]
        ray.get([a.ready.remote() for a in actors[name]], timeout=600)
        say(f"  {llm.model}: {llm.replicas} replica(s) healthy in {time.monotonic() - t0:.1f}s")
    return actors


async def _register_external_llms(cfg: RunConfig, discovery: Any) -> list[Any]:
    """Put the external APIs the roles call (OpenAI-compatible servers, OpenAI, Azure OpenAI,
    Gemini) in discovery, so the roles' LLM clients find them like any replica.

    The endpoint carries what :mod:`agentmesh.llm_gateway.providers` needs to address the API: the
    provider, ``base_url``, the *name* of the key's environment variable, Azure's deployment and
    api-version, and ``probe=none``. Never the key: each process reads it from its own environment
    when it sends a request. The variable must be set here already (a clear error now beats every
    request failing later).
    """
    from urllib.parse import urlsplit

    from agentmesh.discovery import Endpoint
    from agentmesh.llm_gateway.client import llm_service_name
    from agentmesh.llm_gateway.providers import PROVIDERS

    registrations = []
    for name in _used_llms(cfg):
        llm = cfg.llms[name]
        if llm.backend in ACTOR_BACKENDS:
            continue
        key = f"llms.{name}"
        provider = "openai" if llm.backend == "openai-compatible" else llm.backend
        meta: dict[str, str] = {
            "provider": provider,
            "backend": llm.backend,
            "model": llm.model,
            "probe": "none",
        }
        base_url = llm.base_url
        if llm.backend == "openai-compatible":
            if not base_url:
                raise ConfigError(
                    "backend 'openai-compatible' needs base_url", file=cfg.source_file, key=f"{key}.base_url"
                )
            if urlsplit(base_url).path in ("", "/"):
                base_url = base_url.rstrip("/") + "/v1"  # a server root: OpenAI's API lives under /v1
            if not llm.api_key_env:
                meta["auth"] = "none"
        if llm.backend == "azure":
            for field_name in ("base_url", "deployment", "api_version"):
                if not getattr(llm, field_name):
                    raise ConfigError(
                        f"backend 'azure' needs {field_name}", file=cfg.source_file, key=f"{key}.{field_name}"
                    )
            meta["deployment"] = str(llm.deployment)
            meta["api_version"] = str(llm.api_version)
        defaults = PROVIDERS[provider]
        base_url = base_url or defaults.default_base_url or ""
        meta["base_url"] = base_url
        key_env = llm.api_key_env or (None if "auth" in meta else defaults.default_key_env)
        if key_env:
            meta["api_key_env"] = key_env
            if not os.environ.get(key_env):
                raise ConfigError(
                    f"environment variable {key_env} is not set; it must hold the API key of the "
                    f"{llm.backend} backend (set it in the environment, never in the config)",
                    file=cfg.source_file,
                    key=f"{key}.api_key_env",
                )
        url = urlsplit(base_url)
        port = url.port or (443 if url.scheme == "https" else 80)
        ep = Endpoint(llm_service_name(llm.model), f"{name}-external", f"{url.hostname}:{port}", meta)
        registrations.append(await discovery.register(ep, ttl_s=cfg.discovery.ttl_s))
    return registrations


def _uses_containers(cfg: RunConfig) -> bool:
    return any(r.container for r in cfg.roles.values())


def _start_containers(
    cfg: RunConfig, run_id: str, discovery_url: str, say: Callable[[str], None]
) -> dict[str, list[Any]]:
    """The run's own sandbox holders and registry (named after the run), as Ray actors."""
    import ray

    from agentmesh.container.host import service_actor_class

    c = cfg.containers
    actor_cls = service_actor_class()
    say(f"starting {c.holders} sandbox holder(s) ({c.backend}) and a registry with {c.pool} warm ...")
    t0 = time.monotonic()
    holders = [
        actor_cls.options(  # type: ignore[attr-defined]
            num_cpus=c.num_cpus, max_restarts=-1, name=f"agentmesh-{run_id}-holder-{i}"
        ).remote("holder", discovery_url, {"registry_name": run_id, "capacity": c.capacity})
        for i in range(c.holders)
    ]
    ray.get([h.address.remote() for h in holders], timeout=120)
    registry = actor_cls.options(  # type: ignore[attr-defined]
        num_cpus=c.num_cpus, max_restarts=-1, name=f"agentmesh-{run_id}-registry"
    ).remote(
        "registry",
        discovery_url,
        {
            "name": run_id,
            "pools": {f"{c.backend}:{c.image}": c.pool},
            "default_backend": c.backend,
            "default_lease_s": c.lease_s,
            "limits": dict(c.limits),
        },
    )
    ray.get(registry.address.remote(), timeout=120)
    say(f"sandboxes ready in {time.monotonic() - t0:.1f}s")
    # the registry stops first (it destroys its warm pool through the holders), then the holders
    return {"registry": [registry], "holders": holders}


def _start_roles(cfg: RunConfig, run_id: str, discovery_url: str) -> dict[str, list[Any]]:
    import ray

    from agentmesh.agent.host import replica_actor_class

    actor_cls = replica_actor_class()
    payload = {"config": cfg.to_dict(), "run_id": run_id, "discovery_url": discovery_url}
    actors: dict[str, list[Any]] = {}
    for name, role in cfg.roles.items():
        actors[name] = [
            actor_cls.options(  # type: ignore[attr-defined]
                num_cpus=role.num_cpus,
                max_restarts=-1,
                max_task_retries=0,
                name=f"agentmesh-{run_id}-{name}-{i}",
            ).remote(payload, name, i)
            for i in range(role.replicas)
        ]
    # wait until every replica serves (its __init__ returns once registered)
    ray.get([a.address.remote() for reps in actors.values() for a in reps], timeout=300)
    return actors


def run_pipeline(
    cfg: RunConfig,
    *,
    say: Callable[[str], None] = print,
    on_progress: Callable[[RunProgress], None] | None = None,
    on_started: Callable[[RunHandle], None] | None = None,
    progress_interval_s: float = 1.0,
) -> RunProgress:
    """Run ``cfg`` to the end and return its progress counters (also written to summary.json)."""
    from agentmesh.agent.payload import RayPayloadStore
    from agentmesh.sink import SinkWriter
    from agentmesh.tracing import configure_tracing_from, force_flush

    out_dir = Path(cfg.output.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    programs = build_programs(cfg.routing.programs)
    program = programs[cfg.routing.program]
    writer = SinkWriter(
        out_dir,
        formats=cfg.output.formats,
        compression=cfg.output.compression,
        flush_every=cfg.output.flush_every,
    )
    done = writer.open()
    total = count_tasks(cfg, done)
    run_id = f"{_slug(cfg.name)}-{uuid.uuid4().hex[:6]}"
    if done:
        say(f"resuming: {len(done)} task(s) already in {out_dir}, {total} to do")
    if total == 0:
        writer.close()
        say("nothing to do: every task of the dataset is already written")
        return RunProgress(total=0, resumed=len(done))

    configure_tracing_from("agentmesh.driver", cfg.tracing)
    with contextlib.ExitStack() as stack:
        # Last out: the driver's spans (task roots) reach the exporter even for in-process callers.
        stack.callback(force_flush)
        stack.callback(writer.close)
        discovery_url = cfg.discovery.url
        if discovery_url is None:
            from agentmesh.discovery.etcd_server import EtcdServer

            etcd = EtcdServer()
            etcd.start()
            stack.callback(etcd.stop)
            discovery_url = etcd.url
            say(f"embedded etcd on {etcd.client_endpoint}")
        # what `agentmesh status OUT` needs to find the run while it runs (left behind afterwards)
        (out_dir / "run.json").write_text(
            json.dumps(
                {
                    "run_id": run_id,
                    "name": cfg.name,
                    "discovery_url": discovery_url,
                    "pid": os.getpid(),
                    "started_unix": time.time(),
                    "config": cfg.to_dict(),
                },
                indent=2,
            )
            + "\n"
        )
        t0 = time.monotonic()
        stack.callback(init_ray(cfg.ray.address, temp_dir=cfg.ray.temp_dir, num_cpus=cfg.ray.num_cpus))
        say(f"ray ready in {time.monotonic() - t0:.1f}s")
        import ray

        payloads = RayPayloadStore(run_id, create=True)
        stack.callback(lambda: ray.kill(payloads._actor))
        llm_actors: dict[str, list[Any]] = {}
        stack.callback(lambda: _kill_all(llm_actors))
        llm_actors.update(_start_llms(cfg, discovery_url, say))
        container_actors: dict[str, list[Any]] = {}
        stack.callback(lambda: _kill_all(container_actors))
        if _uses_containers(cfg) and cfg.containers.registry is None:
            container_actors.update(_start_containers(cfg, run_id, discovery_url, say))
        role_actors: dict[str, list[Any]] = {}
        stack.callback(lambda: _kill_all(role_actors))
        t0 = time.monotonic()
        role_actors.update(_start_roles(cfg, run_id, discovery_url))
        n = sum(len(v) for v in role_actors.values())
        say(
            f"{n} role replicas up in {time.monotonic() - t0:.1f}s: "
            + ", ".join(f"{k} x{len(v)}" for k, v in role_actors.items())
        )
        handle = RunHandle(run_id, cfg, discovery_url, role_actors, llm_actors)
        progress = asyncio.run(
            _drive(
                cfg,
                run_id,
                program,
                discovery_url,
                writer,
                done,
                total,
                payloads,
                handle,
                on_progress,
                on_started,
                progress_interval_s,
            )
        )
        progress.resumed = len(done)
        progress.llm = _llm_summary(role_actors, progress.elapsed_s)
        _write_summary(out_dir, run_id, progress)
        return progress
    raise AssertionError("unreachable")  # pragma: no cover


async def _drive(
    cfg: RunConfig,
    run_id: str,
    program: Any,
    discovery_url: str,
    writer: Any,
    done: set[str],
    total: int,
    payloads: Any,
    handle: RunHandle,
    on_progress: Callable[[RunProgress], None] | None,
    on_started: Callable[[RunHandle], None] | None,
    interval_s: float,
) -> RunProgress:
    from agentmesh.discovery import connect

    discovery = connect(discovery_url)
    external = await _register_external_llms(cfg, discovery)
    containers = None
    container_cache = None
    if _uses_containers(cfg):
        from agentmesh.container.client import ContainerClient
        from agentmesh.discovery import EndpointCache

        container_cache = EndpointCache(discovery)
        containers = ContainerClient(
            run_id, endpoints=container_cache, registry_name=cfg.containers.registry or run_id
        )
    tasks: Iterator[tuple[str, int, dict[str, Any]]] = (
        t for t in iter_dataset(cfg.dataset) if t[0] not in done
    )
    run_metrics = metrics_ep = None
    if cfg.metrics.enabled:
        from agentmesh.metrics import RunMetrics, serve_metrics

        run_metrics = RunMetrics(run_id)
        metrics_ep = await serve_metrics(
            job="driver",
            labels={"run": run_id},
            discovery=discovery,
            host=cfg.metrics.host,
            ttl_s=cfg.discovery.ttl_s,
        )
    driver = RunDriver(
        run_id=run_id,
        program=program,
        discovery=discovery,
        writer=writer,
        tasks=tasks,
        roles=program.roles(),
        max_in_flight=cfg.limits.max_in_flight,
        task_timeout_s=cfg.limits.task_timeout_s,
        seed=cfg.seed,
        payloads=payloads,
        total=total,
        recovery_interval_s=cfg.limits.recovery_interval_s,
        max_message_bytes=cfg.limits.max_message_bytes,
        discovery_ttl_s=cfg.discovery.ttl_s,
        containers=containers,
        metrics=run_metrics,
    )
    await driver.start()
    handle.driver = driver
    if on_started is not None:
        on_started(handle)
    ticker = None
    if on_progress is not None:

        async def tick() -> None:
            while True:
                await asyncio.sleep(interval_s)
                on_progress(driver.progress)

        ticker = asyncio.create_task(tick())
    try:
        progress = await driver.run()
        if metrics_ep is not None and cfg.metrics.linger_s > 0:
            await asyncio.sleep(cfg.metrics.linger_s)  # every replica still serves its final counts
        return progress
    finally:
        if ticker is not None:
            ticker.cancel()
        if on_progress is not None:
            on_progress(driver.progress)
        await driver.stop()
        if metrics_ep is not None:
            await metrics_ep.close()
        if containers is not None:
            await _close_containers(containers, driver.progress)
        if container_cache is not None:
            await container_cache.close()
        for reg in external:
            await reg.close()
        await discovery.close()


async def _close_containers(containers: Any, progress: RunProgress) -> None:
    """Give back whatever the run still holds (tasks lost with a replica), note the registry's counts."""
    from google.protobuf.json_format import MessageToDict

    try:
        left = await containers.release_all()
        pools = MessageToDict(await containers.pools(), always_print_fields_with_no_presence=True)
        progress.sandboxes = {**pools, "released_at_end": left}
    except Exception as exc:
        log.warning("sandboxes: the end-of-run release failed (%s); leases reclaim them", exc)
    await containers.close()


def _kill_all(actors: dict[str, list[Any]]) -> None:
    import ray

    for reps in actors.values():
        stops = []
        for a in reps:
            if hasattr(a, "stop"):
                with contextlib.suppress(Exception):
                    stops.append(a.stop.remote())
        with contextlib.suppress(Exception):
            ray.get(stops, timeout=30)
        for a in reps:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)


def _llm_summary(role_actors: dict[str, list[Any]], elapsed_s: float) -> list[dict[str, Any]]:
    """Every role replica's LLM accounting, added up per model and LLM replica."""
    import ray

    from agentmesh.llm_gateway.accounting import merge_snapshots, summarize

    refs = [a.llm_accounting.remote() for actors in role_actors.values() for a in actors]
    try:
        snaps = ray.get(refs, timeout=30)
    except Exception as exc:  # a summary is not worth failing a finished run for
        log.warning("could not collect LLM accounting from the role replicas: %s", exc)
        return []
    return summarize(merge_snapshots(s for s in snaps if s), wall_s=elapsed_s)


def _write_summary(out_dir: Path, run_id: str, p: RunProgress) -> None:
    summary = {
        "run_id": run_id,
        "tasks": p.total,
        "done": p.done,
        "failed": p.failed,
        "resumed": p.resumed,
        "recovered": p.recovered,
        "duplicates_dropped": p.duplicates,
        "failures_by_code": p.failures_by_code,
        "prompt_tokens": p.prompt_tokens,
        "completion_tokens": p.completion_tokens,
        "elapsed_s": round(p.elapsed_s, 3),
        "tokens_per_s": round(p.tokens_per_s, 2),
        "completion_tokens_per_s": round(p.completion_tokens_per_s, 2),
        "llm": p.llm,
        "sandboxes_released": p.sandboxes_released,
        "sandboxes": p.sandboxes,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
