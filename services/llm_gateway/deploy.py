"""Deploy LLM replicas onto a Ray cluster, report on them, remove them (``agentmesh llm ...``).

Each replica is a DETACHED, NAMED :class:`~agentmesh.llm_gateway.replica.LlmReplicaActor` in the Ray
namespace ``agentmesh``, named ``llm:<service>:<i>`` (``<service>`` is the model's discovery service,
:func:`~agentmesh.llm_gateway.client.llm_service_name`). Detached: it outlives the command that
deployed it; named: a later command finds it by listing the namespace, with no state of its own.
``max_restarts=-1``: a replica whose process dies is restarted by Ray, and its constructor starts the
backend and registers it in discovery again by itself.

A replica with ``gpus_per_replica = K > 0`` first gets a placement group of its own — one bundle
``{"GPU": K, "CPU": c}``, ``STRICT_PACK``, named like the actor — and the actor is scheduled into it
with ``num_gpus=K``, so Ray gives its process ``CUDA_VISIBLE_DEVICES`` with K devices, which
``vllm serve --tensor-parallel-size K`` inherits. (Ray warns that a restartable detached actor in a
placement group dies for good when the group is removed: that is what :func:`remove` wants.)

Replica processes get this command's ``AGENTMESH_*``, ``VLLM_*`` and Hugging Face cache/offline
variables (through the actor's runtime environment), never a variable whose name says it holds a
secret (``KEY``, ``TOKEN``, ``SECRET``, ``PASSWORD``): external providers' keys are read by the
clients, from their own environment.

:func:`status` asks each actor for its info, Ray for its state and restart count, discovery whether it
is registered, and the replica itself for ``/health`` and ``/metrics`` (vLLM's metric names, which
the simulator shares): requests running and waiting, and generated tokens per second from two reads
``sample_s`` apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, get_args

import aiohttp

from agentmesh.errors import ConfigError, LlmError
from agentmesh.llm_gateway.client import llm_service_name
from agentmesh.llm_gateway.constants import VLLM_STARTUP_TIMEOUT_S
from agentmesh.llm_gateway.replica import EXTERNAL_BACKENDS, BackendKind, LlmReplica
from agentmesh.text import align_columns

__all__ = [
    "BACKENDS",
    "NAMESPACE",
    "DeploySpec",
    "ReplicaStatus",
    "actor_name",
    "actor_options",
    "deploy",
    "format_status",
    "forwarded_env",
    "make_spec",
    "parse_actor_name",
    "parse_metrics",
    "placement_bundle",
    "remove",
    "status",
]

log = logging.getLogger(__name__)

NAMESPACE = "agentmesh"
"""The Ray namespace of deployed replicas (and of their placement groups)."""

BACKENDS: tuple[str, ...] = get_args(BackendKind)
_ACTOR_PREFIX = "llm:"
_SECRET_RE = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)
_FORWARD_PREFIXES = ("AGENTMESH_", "VLLM_")
_FORWARD_NAMES = ("HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE")
_PLACEMENT_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 30.0
_METRIC_RUNNING = "vllm:num_requests_running"
_METRIC_WAITING = "vllm:num_requests_waiting"
_METRIC_GENERATED = "vllm:generation_tokens_total"


def actor_name(service: str, index: int) -> str:
    """The Ray name of replica ``index`` of ``service`` (also its placement group's name)."""
    return f"{_ACTOR_PREFIX}{service}:{index}"


def parse_actor_name(name: str) -> tuple[str, int] | None:
    """``(service, index)`` of a replica actor's name; None for any other name."""
    if not name.startswith(_ACTOR_PREFIX):
        return None
    service, sep, index = name[len(_ACTOR_PREFIX) :].rpartition(":")
    if not sep or not service or not index.isdigit():
        return None
    return service, int(index)


@dataclass(frozen=True)
class DeploySpec:
    """A validated deployment: what :func:`deploy` starts."""

    model: str
    replicas: int
    backend: str
    gpus_per_replica: int
    num_cpus: float
    replica_options: Mapping[str, Any] = field(default_factory=dict)
    """Keyword arguments of :class:`LlmReplica` (backend included)."""

    @property
    def service(self) -> str:
        return llm_service_name(self.model)

    def replica_id(self, index: int) -> str:
        """Stable across restarts: a restarted replica replaces its own discovery entry."""
        return f"{self.service.removeprefix('llm.')}-{index}"


def make_spec(
    model: str,
    replicas: int,
    *,
    backend: str | None = None,
    gpus_per_replica: int = 0,
    num_cpus: float | None = None,
    **replica_options: Any,
) -> DeploySpec:
    """Check a deployment request; every error names the option at fault.

    ``backend`` defaults to ``vllm`` with GPUs and ``vllm-cpu`` without. ``vllm`` needs
    ``gpus_per_replica >= 1``; ``vllm-cpu`` and the external backends take none (the simulator may
    reserve logical GPUs, to exercise placement). ``num_cpus`` (Ray's accounting of the actor)
    defaults to 1 for ``vllm`` and 0.1 otherwise. ``replica_options`` go to :class:`LlmReplica`,
    which validates them here too, before anything starts.
    """
    if not isinstance(model, str) or not model.strip():
        raise ConfigError("expected a non-empty model name", key="model")
    try:
        llm_service_name(model)
    except ValueError as exc:
        raise ConfigError(str(exc), key="model") from None
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ConfigError(f"expected an integer >= 1, got {replicas!r}", key="replicas")
    if isinstance(gpus_per_replica, bool) or not isinstance(gpus_per_replica, int) or gpus_per_replica < 0:
        raise ConfigError(f"expected an integer >= 0, got {gpus_per_replica!r}", key="gpus_per_replica")
    kind = backend or ("vllm" if gpus_per_replica > 0 else "vllm-cpu")
    if kind not in BACKENDS:
        raise ConfigError(f"expected one of {', '.join(BACKENDS)}, got {kind!r}", key="backend")
    if kind == "vllm" and gpus_per_replica < 1:
        raise ConfigError("backend 'vllm' runs on GPUs: give --gpus-per-replica >= 1", key="gpus_per_replica")
    if gpus_per_replica and kind not in ("vllm", "simulator"):
        raise ConfigError(
            f"backend {kind!r} uses no GPU: leave --gpus-per-replica at 0", key="gpus_per_replica"
        )
    cpus = num_cpus if num_cpus is not None else (1.0 if kind == "vllm" else 0.1)
    if not (isinstance(cpus, int | float) and math.isfinite(cpus) and cpus > 0):
        raise ConfigError(f"expected a number > 0, got {num_cpus!r}", key="num_cpus")
    options: dict[str, Any] = {k: v for k, v in replica_options.items() if v is not None}
    options["backend"] = kind
    if kind == "vllm":
        options["tensor_parallel_size"] = gpus_per_replica
        options.setdefault("max_num_seqs", 256)  # vLLM's own default on GPUs
    # The constructor checks the options (and starts nothing): fail here, not in N actors.
    LlmReplica(model, discovery="memory://", **options)
    return DeploySpec(model.strip(), replicas, kind, gpus_per_replica, float(cpus), options)


def placement_bundle(spec: DeploySpec) -> dict[str, float] | None:
    """The one bundle of a replica's placement group, or None when it needs no GPU."""
    if spec.gpus_per_replica < 1:
        return None
    return {"GPU": float(spec.gpus_per_replica), "CPU": spec.num_cpus}


def forwarded_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables replica processes get from the deploying command (never a secret's)."""
    return {
        k: v
        for k, v in environ.items()
        if (k.startswith(_FORWARD_PREFIXES) or k in _FORWARD_NAMES) and not _SECRET_RE.search(k)
    }


def actor_options(
    spec: DeploySpec, index: int, *, env: Mapping[str, str] | None = None, placement_group: Any = None
) -> dict[str, Any]:
    """Keyword arguments for ``LlmReplicaActor.options`` of replica ``index``."""
    options: dict[str, Any] = {
        "name": actor_name(spec.service, index),
        "namespace": NAMESPACE,
        "lifetime": "detached",
        "max_restarts": -1,
        "max_task_retries": 0,
        "num_cpus": spec.num_cpus,
    }
    if env:
        options["runtime_env"] = {"env_vars": dict(env)}
    if spec.gpus_per_replica > 0:
        options["num_gpus"] = spec.gpus_per_replica
        if placement_group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group, placement_group_bundle_index=0
            )
    return options


# -- Ray -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _ray(address: str) -> Iterator[Any]:
    """A driver connected to ``address`` in namespace ``agentmesh`` (one already connected is reused)."""
    import ray

    if ray.is_initialized():
        if ray.get_runtime_context().namespace != NAMESPACE:
            raise LlmError(
                f"this process is connected to Ray in another namespace; deploy needs {NAMESPACE!r}"
            )
        yield ray
        return
    from ray._private import ray_constants

    host = address.rsplit(":", 1)[0]
    if ray_constants.ENABLE_RAY_CLUSTER and host in ("127.0.0.1", "localhost", "::1"):
        # Ray would rewrite the loopback address into this machine's external one, where a local
        # cluster does not listen; it decides at import, from the environment.
        raise LlmError(
            "Ray was imported without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: set it (and the rest of "
            "agentmesh.launcher.RAY_ENV) before importing Ray to reach a loopback cluster"
        )
    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError) as exc:
        raise LlmError(f"cannot reach the Ray cluster at {address}: {exc}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _deployed(ray: Any, service: str | None = None) -> dict[str, list[int]]:
    """Replica indexes per service among the namespace's named actors."""
    found: dict[str, list[int]] = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") != NAMESPACE:
            continue
        parsed = parse_actor_name(entry["name"])
        if parsed is None or (service is not None and parsed[0] != service):
            continue
        found.setdefault(parsed[0], []).append(parsed[1])
    return {s: sorted(ix) for s, ix in sorted(found.items())}


def _placement_groups(ray: Any, service: str | None = None) -> list[str]:
    """Names of this namespace's live replica placement groups (of ``service``, or all)."""
    names = []
    for entry in ray.util.placement_group_table().values():
        parsed = parse_actor_name(entry.get("name") or "")
        if parsed is None or entry.get("state") == "REMOVED":
            continue
        if service is None or parsed[0] == service:
            names.append(entry["name"])
    return sorted(set(names))


def _error_text(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)  # a RayTaskError carries the replica's own exception
    return str(cause if cause is not None else exc).strip().splitlines()[0][:2000]


def _kill(ray: Any, names: Sequence[str]) -> None:
    for name in names:
        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
    deadline = time.monotonic() + 15.0
    while time.monotonic() < deadline:
        alive = {
            e["name"]
            for e in ray.util.list_named_actors(all_namespaces=True)
            if e.get("namespace") == NAMESPACE
        }
        if not alive & set(names):
            return
        time.sleep(0.1)


def _remove_groups(ray: Any, names: Sequence[str]) -> None:
    from ray.util import get_placement_group, remove_placement_group

    for name in names:
        with contextlib.suppress(ValueError):
            remove_placement_group(get_placement_group(name))


def deploy(
    model: str,
    replicas: int,
    *,
    ray_address: str,
    discovery_url: str,
    backend: str | None = None,
    gpus_per_replica: int = 0,
    num_cpus: float | None = None,
    timeout_s: float = VLLM_STARTUP_TIMEOUT_S + 60.0,
    env: Mapping[str, str] | None = None,
    say: Callable[[str], None] = lambda _msg: None,
    **replica_options: Any,
) -> list[dict[str, Any]]:
    """Start ``replicas`` replicas of ``model`` and wait until each serves and is registered.

    Returns each replica's info. ``env`` adds variables for the replica processes (on top of
    :func:`forwarded_env` of this process's). On any failure — a replica that cannot start, no
    room for a placement group, the timeout, Ctrl-C — everything this call started is removed
    before the error propagates. Deploying a model that is already deployed is an error.
    """
    spec = make_spec(
        model,
        replicas,
        backend=backend,
        gpus_per_replica=gpus_per_replica,
        num_cpus=num_cpus,
        **replica_options,
    )
    replica_env = {**forwarded_env(os.environ), **(env or {})}
    with _ray(ray_address) as ray:
        from agentmesh.llm_gateway.replica import LlmReplicaActor

        existing = _deployed(ray, spec.service).get(spec.service)
        if existing:
            raise ConfigError(
                f"{spec.model!r} is already deployed ({len(existing)} replica(s)): "
                f"`agentmesh llm remove --model {spec.model}` first",
                key="model",
            )
        bundle = placement_bundle(spec)
        if bundle is not None:
            total = ray.cluster_resources().get("GPU", 0.0)
            free = ray.available_resources().get("GPU", 0.0)
            need = spec.gpus_per_replica * spec.replicas
            if need > free:
                raise ConfigError(
                    f"{spec.replicas} replica(s) x {spec.gpus_per_replica} GPU(s) need {need} GPUs; "
                    f"the cluster has {total:g}, {free:g} of them free",
                    key="gpus_per_replica",
                )
        names = [actor_name(spec.service, i) for i in range(spec.replicas)]
        groups: list[str] = []
        t0 = time.monotonic()
        try:
            actors = []
            for i, name in enumerate(names):
                pg = None
                if bundle is not None:
                    from ray.util.placement_group import placement_group

                    pg = placement_group([bundle], strategy="STRICT_PACK", name=name, lifetime="detached")
                    groups.append(name)
                    ready, _ = ray.wait([pg.ready()], timeout=_PLACEMENT_TIMEOUT_S)
                    if not ready:
                        raise LlmError(
                            f"no room for replica {i}'s placement group {bundle} "
                            f"within {_PLACEMENT_TIMEOUT_S:.0f}s (free: "
                            f"{ray.available_resources().get('GPU', 0):g} GPUs, "
                            f"{ray.available_resources().get('CPU', 0):g} CPUs)"
                        )
                options = actor_options(spec, i, env=replica_env, placement_group=pg)
                actors.append(
                    LlmReplicaActor.options(**options).remote(  # type: ignore[attr-defined]
                        spec.model, discovery_url, replica_id=spec.replica_id(i), **spec.replica_options
                    )
                )
            say(
                f"starting {spec.replicas} {spec.backend} replica(s) of {spec.model}"
                + (f", {spec.gpus_per_replica} GPU(s) each" if spec.gpus_per_replica else "")
                + " ..."
            )
            return _wait_ready(ray, actors, spec, t0, timeout_s, say)
        except BaseException:
            say(f"deploy of {spec.model} failed: removing the {len(names)} replica(s) it started")
            _kill(ray, names)
            _remove_groups(ray, groups)
            raise


def _wait_ready(
    ray: Any, actors: list[Any], spec: DeploySpec, t0: float, timeout_s: float, say: Callable[[str], None]
) -> list[dict[str, Any]]:
    index = {a.ready.remote(): i for i, a in enumerate(actors)}
    infos: dict[int, dict[str, Any]] = {}
    pending = list(index)
    deadline = t0 + timeout_s
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise LlmError(
                f"{len(pending)} of {spec.replicas} replica(s) of {spec.model} "
                f"not ready within {timeout_s:.0f}s"
            )
        done, pending = ray.wait(pending, num_returns=1, timeout=min(10.0, remaining))
        if not done:
            say(f"  waiting: {len(infos)}/{spec.replicas} ready after {time.monotonic() - t0:.0f}s")
            continue
        i = index[done[0]]
        try:
            info = ray.get(done[0])
        except Exception as exc:
            raise LlmError(f"replica {i} of {spec.model} failed to start: {_error_text(exc)}") from None
        infos[i] = info
        where = info.get("base_url") if spec.backend in EXTERNAL_BACKENDS else info.get("address")
        say(f"  replica {i} ready at {where} ({time.monotonic() - t0:.1f}s, {len(infos)}/{spec.replicas})")
    say(f"{spec.model}: {spec.replicas} replica(s) healthy and registered as {spec.service}")
    return [infos[i] for i in range(len(actors))]


# -- status ----------------------------------------------------------------------------------------


@dataclass
class ReplicaStatus:
    """One deployed replica as ``llm status`` shows it."""

    service: str
    index: int
    name: str
    state: str
    """Ray's actor state: ALIVE, RESTARTING, PENDING_CREATION, DEAD (or UNKNOWN)."""
    restarts: int | None = None
    model: str | None = None
    backend: str | None = None
    replica_id: str | None = None
    address: str | None = None
    base_url: str | None = None
    pid: int | None = None
    gpus: int = 0
    registered: bool = False
    health: str = "unknown"
    """``ok``, ``down`` (no answer or not 200), ``n/a`` (external API: not probed) or ``unknown``."""
    running: float | None = None
    waiting: float | None = None
    tokens_per_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_metrics(text: str, names: Sequence[str]) -> dict[str, float]:
    """Sum of each named metric over its label sets in Prometheus text (missing names are absent)."""
    wanted = set(names)
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, rest = line.partition(" ")
        name = head.split("{", 1)[0]
        if name not in wanted:
            continue
        if "{" in head and "}" not in head:  # label values with spaces: the value is after the '}'
            _, _, rest = line.partition("} ")
        try:
            value = float(rest.split()[0])
        except (IndexError, ValueError):
            continue
        out[name] = out.get(name, 0.0) + value
    return out


def _actor_table(names: set[str]) -> dict[str, tuple[str, int]]:
    """``name -> (state, restarts)`` from Ray's actor table (the newest entry per name)."""
    try:
        from ray._private import state as ray_state  # no public API without the dashboard

        table = ray_state.actors()
    except Exception as exc:  # a Ray without this table: states show as UNKNOWN
        log.debug("no actor table: %s", exc)
        return {}
    newest: dict[str, tuple[float, str, int]] = {}
    for entry in table.values():
        name = entry.get("Name")
        if name not in names:
            continue
        started = float(entry.get("StartTime") or 0)
        if name not in newest or started >= newest[name][0]:
            newest[name] = (started, str(entry.get("State")), int(entry.get("NumRestarts") or 0))
    return {n: (s, r) for n, (_t, s, r) in newest.items()}


async def _probe(rows: list[ReplicaStatus], discovery_url: str, sample_s: float) -> None:
    from agentmesh.discovery import connect

    services = sorted({r.service for r in rows})
    registered: set[tuple[str, str]] = set()
    with contextlib.suppress(Exception):
        discovery = connect(discovery_url)
        try:
            for service in services:
                registered |= {(service, ep.id) for ep in await discovery.snapshot(service)}
        finally:
            await discovery.close()
    for r in rows:
        r.registered = r.replica_id is not None and (r.service, r.replica_id) in registered
    local = [r for r in rows if r.base_url and r.backend not in EXTERNAL_BACKENDS]
    for r in rows:
        if r.backend in EXTERNAL_BACKENDS:
            r.health = "n/a"
    timeout = aiohttp.ClientTimeout(total=2.0)
    names = (_METRIC_RUNNING, _METRIC_WAITING, _METRIC_GENERATED)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def read(r: ReplicaStatus) -> tuple[float, dict[str, float]] | None:
            try:
                async with session.get(f"{r.base_url}/metrics") as resp:
                    if resp.status != 200:
                        return None
                    return time.monotonic(), parse_metrics(await resp.text(), names)
            except (aiohttp.ClientError, TimeoutError, OSError):
                return None

        async def health(r: ReplicaStatus) -> None:
            try:
                async with session.get(f"{r.base_url}/health") as resp:
                    r.health = "ok" if resp.status == 200 else "down"
            except (aiohttp.ClientError, TimeoutError, OSError):
                r.health = "down"

        await asyncio.gather(*(health(r) for r in local))
        first = await asyncio.gather(*(read(r) for r in local))
        if sample_s > 0 and any(first):
            await asyncio.sleep(sample_s)
        second = await asyncio.gather(*(read(r) for r in local))
    for r, a, b in zip(local, first, second, strict=True):
        latest = b or a
        if latest is not None:
            r.running = latest[1].get(_METRIC_RUNNING)
            r.waiting = latest[1].get(_METRIC_WAITING)
        if a is not None and b is not None and b[0] > a[0]:
            ga, gb = a[1].get(_METRIC_GENERATED), b[1].get(_METRIC_GENERATED)
            if ga is not None and gb is not None:
                r.tokens_per_s = max(0.0, gb - ga) / (b[0] - a[0])


def status(
    *, ray_address: str, discovery_url: str, model: str | None = None, sample_s: float = 1.0
) -> list[ReplicaStatus]:
    """Every deployed replica (of ``model``, or all), with state, registration, health and load."""
    service = llm_service_name(model) if model else None
    with _ray(ray_address) as ray:
        deployed = _deployed(ray, service)
        rows = [
            ReplicaStatus(service=s, index=i, name=actor_name(s, i), state="UNKNOWN")
            for s, indexes in deployed.items()
            for i in indexes
        ]
        table = _actor_table({r.name for r in rows})
        refs = {}
        for r in rows:
            r.state, r.restarts = table.get(r.name, ("UNKNOWN", None))
            with contextlib.suppress(ValueError):
                refs[r.name] = ray.get_actor(r.name, namespace=NAMESPACE).info.remote()
        # A restarting replica does not answer: wait a little, show what is known.
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=3.0) if refs else ([], [])
        done = set(ready)
        for r in rows:
            ref = refs.get(r.name)
            if ref is None or ref not in done:
                continue
            with contextlib.suppress(Exception):
                info = ray.get(ref)
                r.model, r.backend, r.replica_id = (
                    info.get("model"),
                    info.get("backend"),
                    info.get("replica_id"),
                )
                r.address, r.base_url, r.pid = info.get("address"), info.get("base_url"), info.get("pid")
        groups = {
            e.get("name"): e for e in ray.util.placement_group_table().values() if e.get("state") != "REMOVED"
        }
        for r in rows:
            bundles = groups.get(r.name, {}).get("bundles", {})
            r.gpus = int(sum(b.get("GPU", 0) for b in bundles.values()))
    asyncio.run(_probe(rows, discovery_url, sample_s))
    return rows


def _num(value: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def format_status(rows: Sequence[ReplicaStatus]) -> str:
    """The ``llm status`` table (one line per replica, models in order, a header)."""
    if not rows:
        return "no LLM replicas deployed"
    header = ("MODEL", "REPLICA", "BACKEND", "STATE", "RESTARTS", "REGISTERED", "HEALTH", "RUNNING",
              "WAITING", "TOK/S", "GPUS", "ADDRESS")  # fmt: skip
    lines = [header]
    for r in sorted(rows, key=lambda r: (r.service, r.index)):
        lines.append(
            (
                r.model or r.service,
                str(r.index),
                r.backend or "-",
                r.state,
                _num(r.restarts),
                "yes" if r.registered else "no",
                r.health,
                _num(r.running),
                _num(r.waiting),
                _num(r.tokens_per_s, "{:.1f}"),
                str(r.gpus),
                r.address or "-",
            )
        )
    return "\n".join(align_columns(lines))


# -- remove ----------------------------------------------------------------------------------------


def remove(
    *, ray_address: str, model: str | None = None, say: Callable[[str], None] = lambda _msg: None
) -> list[str]:
    """Stop (deregister, stop the backend), kill and forget the replicas of ``model`` (None: all).

    Returns the removed actors' names. Placement groups of those replicas are removed too.
    """
    service = llm_service_name(model) if model else None
    with _ray(ray_address) as ray:
        deployed = _deployed(ray, service)
        names = [actor_name(s, i) for s, indexes in deployed.items() for i in indexes]
        handles = []
        for name in names:
            with contextlib.suppress(ValueError):
                handles.append(ray.get_actor(name, namespace=NAMESPACE))
        if handles:
            say(f"stopping {len(handles)} replica(s) ...")
            stops = [h.stop.remote() for h in handles]
            # A replica that is restarting or stuck is killed anyway after the wait.
            ray.wait(stops, num_returns=len(stops), timeout=_STOP_TIMEOUT_S)
        _kill(ray, names)
        groups = _placement_groups(ray, service)
        _remove_groups(ray, groups)
    for s, indexes in deployed.items():
        say(f"removed {len(indexes)} replica(s) of {s}")
    return names
