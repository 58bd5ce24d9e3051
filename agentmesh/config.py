"""Run configuration: Hydra/YAML composition, validated into frozen dataclasses with clear errors.

A run is one YAML file (plus the files its ``defaults:`` list composes) and command-line overrides::

    cfg = load_config("pipelines/debate/run.yaml", ["dataset.limit=10", "+roles.teacher.params.t=0.7"])
    cfg = load_config("pkg://agentmesh.pipelines.collab_reasoning/config.yaml")

Composition is Hydra's compose API with the file's directory as the config directory, so
``defaults: [_self_, {dataset: small}]`` loads ``dataset/small.yaml`` next to the file, and
overrides use Hydra's grammar (``key=value`` changes, ``+key=value`` adds, ``~key`` deletes,
``group=option`` picks another file). Interpolations (``${...}``) are resolved; the ``pkg``
resolver, ``${pkg:package.module/relative/file}``, gives the absolute path of a file inside an
installed package. A ``pkg://package.module/file.yaml`` config path is located the same way.

The composed tree is then validated into :class:`RunConfig`: unknown keys, wrong types, values out
of range and dangling references (a routing program naming a role that does not exist, a role
naming an unknown LLM) are :class:`~agentmesh.errors.ConfigError`\\ s whose text is
``FILE: KEY: expected ..., got ...``. FILE is the file that set KEY where it can be told (the
top file or a composed group file); a value set by an override says so.

Paths: a relative ``dataset.path`` or ``output.dir`` is resolved against the current working
directory of the process that calls :func:`load_config` (not the config file's directory), and
stored absolute, so Ray actors elsewhere see the same path.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import json
import re
import threading
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

import yaml
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from agentmesh.errors import ConfigError

__all__ = [
    "EXTERNAL_LLM_BACKENDS",
    "LLM_BACKENDS",
    "OUTPUT_FORMATS",
    "PROGRAM_KINDS",
    "SAMPLING_MODES",
    "SINK",
    "DatasetConfig",
    "DiscoveryConfig",
    "LimitsConfig",
    "LlmConfig",
    "MetricsConfig",
    "OutputConfig",
    "ProgramConfig",
    "RayConfig",
    "RoleConfig",
    "RoutingConfig",
    "RunConfig",
    "TracingConfig",
    "TransitionConfig",
    "iter_dataset",
    "load_config",
    "resolve_package_path",
]

SINK = "sink"
"""Reserved role name: where a routing program ends."""
LLM_BACKENDS = ("vllm-cpu", "simulator", "openai-compatible", "openai", "azure", "gemini")
EXTERNAL_LLM_BACKENDS = ("openai-compatible", "openai", "azure", "gemini")
"""Backends that are an API somewhere (``base_url``), not replicas agentmesh starts."""
PROGRAM_KINDS = ("sequential", "loop_until", "state_machine")
SANDBOX_BACKENDS = ("bubblewrap", "nsjail", "podman")
SAMPLING_MODES = ("off", "always", "ratio", "tail")
OUTPUT_FORMATS = ("jsonl", "parquet")

_NAME = r"^[A-Za-z_][A-Za-z0-9_-]*$"
_OBJECT_REF = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$"
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
_DISCOVERY_URL = r"^(etcd|consul|memory)://"


def _meta(
    *,
    yaml_key: str | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    choices: Sequence[str] | None = None,
    pattern: str | None = None,
    expected: str | None = None,
) -> dict[str, Any]:
    """Validation metadata of a field (see :func:`_check_value`)."""
    return {
        k: v
        for k, v in {
            "yaml": yaml_key,
            "ge": ge,
            "gt": gt,
            "le": le,
            "choices": choices,
            "pattern": pattern,
            "expected": expected,
        }.items()
        if v is not None
    }


# Fields whose value is the entry's key in its parent mapping, not a YAML key.
_FROM_KEY: dict[str, Any] = {"from_key": True}


# --------------------------------------------------------------------------------------------
# The schema


@dataclass(frozen=True)
class DatasetConfig:
    """The input rows: one task per row (times ``trials``)."""

    path: str
    """The JSONL file of input rows (one JSON object per line); stored absolute."""
    format: str = field(default="jsonl", metadata=_meta(choices=("jsonl",)))
    """File format; only ``jsonl`` for now."""
    id_field: str = field(default="id", metadata=_meta(pattern=r"."))
    """The row field holding its id; a row without it is ``row-<n>`` (n = 0-based row index)."""
    limit: int | None = field(default=None, metadata=_meta(ge=0))
    """Read at most this many rows (None: all)."""
    trials: int = field(default=1, metadata=_meta(ge=1))
    """Run each row this many times; task id is ``<id>`` for 1 trial, else ``<id>#t<trial>``."""


@dataclass(frozen=True)
class LlmConfig:
    """A model served by replicas behind the LLM gateway."""

    name: str = field(metadata=_FROM_KEY)
    """Its key under ``llms``."""
    backend: str = field(metadata=_meta(choices=LLM_BACKENDS))
    """``vllm-cpu``, ``simulator`` (the vLLM-compatible simulator), or an external API:
    ``openai-compatible`` (any OpenAI-compatible server at ``base_url``), ``openai``, ``azure``
    (Azure OpenAI) or ``gemini`` (Gemini's OpenAI-compatible endpoint)."""
    model: str = "smollm2-135m-instruct"
    """Model name the backend serves (and that requests ask for)."""
    replicas: int = field(default=1, metadata=_meta(ge=1))
    """Number of server replicas to start (not used by the external backends)."""
    max_num_seqs: int = field(default=16, metadata=_meta(ge=1))
    """Most sequences one replica batches at once."""
    simulator_profile: str | None = None
    """Latency profile of the simulator (``simulator`` backend)."""
    base_url: str | None = field(
        default=None,
        metadata=_meta(pattern=r"^https?://[^/\s]+[^\s]*$", expected="an http:// or https:// URL"),
    )
    """API root of an external backend: required for ``openai-compatible`` (e.g.
    ``http://host:8000/v1``; a URL without a path gets ``/v1``) and ``azure`` (the resource endpoint,
    ``https://NAME.openai.azure.com``); optional for ``openai`` and ``gemini`` (their public APIs)."""
    api_key_env: str | None = field(
        default=None,
        metadata=_meta(pattern=_ENV_NAME, expected="the NAME of an environment variable (never the key)"),
    )
    """Name of the environment variable that holds the API key; never the key itself. Defaults:
    ``OPENAI_API_KEY`` (openai), ``AZURE_OPENAI_API_KEY`` (azure), ``GEMINI_API_KEY`` (gemini);
    ``openai-compatible`` sends no key unless this is set."""
    deployment: str | None = field(
        default=None,
        metadata=_meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", expected="an Azure deployment name"),
    )
    """Azure OpenAI deployment name (``azure`` backend only; required there)."""
    api_version: str | None = field(
        default=None,
        metadata=_meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", expected="an api-version such as 2024-10-21"),
    )
    """Azure OpenAI ``api-version`` query value (``azure`` backend only; required there)."""
    num_cpus: float = field(default=0.1, metadata=_meta(ge=0))
    """Ray CPUs reserved per replica actor."""
    options: dict[str, Any] = field(default_factory=dict)
    """Backend-specific options, passed through."""


@dataclass(frozen=True)
class RoleConfig:
    """An agent role: a class whose replicas do one step of a task."""

    name: str = field(metadata=_FROM_KEY)
    """Its key under ``roles``."""
    cls: str = field(
        metadata=_meta(yaml_key="class", pattern=_OBJECT_REF, expected="'package.module:ClassName'")
    )
    """YAML key ``class``: ``package.module:ClassName`` of the role implementation."""
    replicas: int = field(default=1, metadata=_meta(ge=1))
    """Number of replicas (each a Ray actor serving gRPC)."""
    concurrency: int = field(default=8, metadata=_meta(ge=1))
    """Steps one replica runs at once."""
    inbox: int = field(default=1024, metadata=_meta(ge=1))
    """Tasks a replica queues before it refuses more (back-pressure)."""
    num_cpus: float = field(default=0.05, metadata=_meta(ge=0))
    """Ray CPUs reserved per replica actor."""
    llm: str | None = None
    """Key of the entry of ``llms`` this role calls, if any."""
    container: bool = False
    """The role runs commands in its task's sandbox (see ``containers``)."""
    params: dict[str, Any] = field(default_factory=dict)
    """Passed to the role's constructor."""


@dataclass(frozen=True)
class TransitionConfig:
    """One edge of a state machine: after ``src`` acts, go to ``dst`` if the condition holds."""

    src: str = field(metadata=_meta(yaml_key="from"))
    """YAML key ``from``: the role that just acted."""
    dst: str = field(metadata=_meta(yaml_key="to"))
    """YAML key ``to``: the next role, or ``sink`` to end."""
    when: dict[str, str] = field(default_factory=dict)
    """Every ``results[key] == value`` must hold (empty: always)."""
    when_fn: str | None = field(
        default=None, metadata=_meta(pattern=_OBJECT_REF, expected="'package.module:function'")
    )
    """``package.module:function``, a predicate ``f(results: Mapping[str, str]) -> bool``."""


@dataclass(frozen=True)
class ProgramConfig:
    """A routing program: which role acts next. Fields apply to one ``kind`` each."""

    name: str = field(metadata=_FROM_KEY)
    """Its key under ``routing.programs``."""
    kind: str = field(metadata=_meta(choices=PROGRAM_KINDS))
    """``sequential``, ``loop_until`` or ``state_machine``."""
    order: tuple[str, ...] = ()
    """sequential: the roles in order; the sink follows."""
    body: tuple[str, ...] = ()
    """loop_until: the roles of one pass of the loop."""
    until: str | None = field(
        default=None, metadata=_meta(pattern=_OBJECT_REF, expected="'package.module:function'")
    )
    """loop_until: ``package.module:function``, ``predicate(results) -> bool`` ending the loop."""
    max_turns: int = field(default=3, metadata=_meta(ge=1))
    """loop_until: most passes of the body."""
    then: tuple[str, ...] = ()
    """loop_until: roles after the loop, before the sink."""
    start: str | None = None
    """state_machine: the first role."""
    transitions: tuple[TransitionConfig, ...] = ()
    """state_machine: edges, tried in order; the first that holds wins."""

    _KIND_FIELDS: ClassVar[dict[str, frozenset[str]]] = {
        "sequential": frozenset({"order"}),
        "loop_until": frozenset({"body", "until", "max_turns", "then"}),
        "state_machine": frozenset({"start", "transitions"}),
    }


@dataclass(frozen=True)
class RoutingConfig:
    """The routing programs of the run and the one tasks start with."""

    program: str
    """Key of the program in ``programs`` that new tasks follow."""
    programs: dict[str, ProgramConfig]
    """Programs by name."""


@dataclass(frozen=True)
class OutputConfig:
    """Where and how the sink writes the dataset."""

    dir: str = "out"
    """Output directory (created); stored absolute."""
    formats: tuple[str, ...] = field(default=("jsonl", "parquet"), metadata=_meta(choices=OUTPUT_FORMATS))
    """Any of ``jsonl`` and ``parquet``."""
    compression: str = field(default="none", metadata=_meta(choices=("none", "zstd")))
    """``none`` or ``zstd`` (JSONL as ``records.jsonl.zst``)."""
    flush_every: int = field(default=64, metadata=_meta(ge=1))
    """Records buffered before a durable flush."""


@dataclass(frozen=True)
class LimitsConfig:
    """Back-pressure, retries, deadlines and message sizes."""

    max_in_flight: int = field(default=256, metadata=_meta(ge=1))
    """Tasks admitted and not yet written, at most."""
    max_attempts: int = field(default=3, metadata=_meta(ge=1))
    """Attempts of one step before the task fails."""
    retry_backoff_s: float = field(default=0.2, metadata=_meta(ge=0))
    """First delay between attempts (doubles each time)."""
    retry_backoff_max_s: float = field(default=5.0, metadata=_meta(ge=0))
    """Cap of the delay between attempts."""
    task_timeout_s: float = field(default=900.0, metadata=_meta(gt=0))
    """Deadline of a task from admission."""
    max_hops: int = field(default=256, metadata=_meta(ge=1))
    """Hard cap on hops of one task (against routing loops)."""
    offload_threshold_bytes: int = field(default=65536, metadata=_meta(ge=0))
    """History entries larger than this travel as payload references."""
    max_message_bytes: int = field(default=16777216, metadata=_meta(ge=1024))
    """gRPC message size limit."""
    recovery_interval_s: float = field(default=5.0, metadata=_meta(gt=0))
    """How often the source re-admits tasks lost with a dead replica."""


@dataclass(frozen=True)
class ContainersConfig:
    """Sandboxes for roles with ``container: true``: a registry and holders the run starts (or an
    existing registry of the cluster, by name)."""

    backend: str = field(default="bubblewrap", metadata=_meta(choices=SANDBOX_BACKENDS))
    """Sandbox backend: bubblewrap (default), nsjail or podman."""
    registry: str | None = None
    """Name of a registry already serving in discovery; None: the run starts its own."""
    holders: int = field(default=1, metadata=_meta(ge=1))
    """Holder actors the run starts (each keeps up to ``capacity`` sandboxes)."""
    capacity: int = field(default=128, metadata=_meta(ge=1))
    """Sandboxes one holder keeps at most."""
    pool: int = field(default=8, metadata=_meta(ge=0))
    """Warm sandboxes kept ready, so that acquiring one is fast."""
    image: str = "default"
    """Image of the sandboxes (``default``: the backend's own)."""
    lease_s: float = field(default=300.0, metadata=_meta(gt=0))
    """A sandbox unused this long is reclaimed (every exec renews it)."""
    limits: dict[str, Any] = field(default_factory=dict)
    """Per-sandbox limits: cpu_time_s, memory_bytes, max_processes, wall_time_s, output_bytes, network."""
    num_cpus: float = field(default=0.05, metadata=_meta(ge=0))
    """Ray CPUs reserved per holder and for the registry."""


@dataclass(frozen=True)
class DiscoveryConfig:
    """The service discovery store."""

    url: str | None = field(
        default=None, metadata=_meta(pattern=_DISCOVERY_URL, expected="etcd://, consul:// or memory://")
    )
    """``etcd://host:port``, ``consul://host:port`` or ``memory://``; None starts an embedded etcd."""
    ttl_s: float = field(default=5.0, metadata=_meta(gt=0))
    """Lease TTL of registrations: a dead replica disappears after this long."""


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus exposition: every process of the run serves ``/metrics`` and registers it in
    discovery (service ``agentmesh-metrics``) for ``agentmesh metrics sd`` and ``agentmesh status``."""

    enabled: bool = True
    """Serve metrics (the cost is a counter update per event and an HTTP thread per process)."""
    host: str = field(default="127.0.0.1", metadata=_meta(pattern=r"\S"))
    """Interface the endpoints listen on (``0.0.0.0`` for a scraper on another machine)."""
    linger_s: float = field(default=0.0, metadata=_meta(ge=0, le=3600))
    """Keep the endpoints up this long after the last task, so that a scraper sees the final counts."""


@dataclass(frozen=True)
class TracingConfig:
    """OpenTelemetry export."""

    otlp_endpoint: str | None = None
    """OTLP/gRPC endpoint, e.g. ``http://localhost:4317``; None: no export."""
    sampling: str | None = field(default=None, metadata=_meta(choices=SAMPLING_MODES))
    """``off``, ``always``, ``ratio`` (head: decided at admission) or ``tail`` (decided at the sink:
    failed and slow tasks kept, plus ``sample_ratio`` of the rest); None: ``always``, or ``ratio``
    when ``sample_ratio`` < 1."""
    sample_ratio: float = field(default=1.0, metadata=_meta(ge=0, le=1))
    """Fraction of tasks traced (``ratio``), or kept besides the failed and slow ones (``tail``)."""
    slow_s: float = field(default=0.0, metadata=_meta(ge=0))
    """``tail``: a task that took at least this long is kept (0: duration does not count)."""
    console: bool = False
    """Also print spans to the console."""


@dataclass(frozen=True)
class RayConfig:
    """The Ray cluster the run uses."""

    address: str | None = None
    """Address of an existing cluster (e.g. ``auto``); None starts a local Ray."""
    temp_dir: str | None = None
    """Temp dir of a local Ray (keep it short; one per cluster)."""
    num_cpus: int | None = field(default=None, metadata=_meta(ge=1))
    """CPUs a local Ray offers (None: all)."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """A whole run: dataset + LLMs + roles + routing + output + limits + services."""

    name: str = field(metadata=_meta(pattern=r"\S"))
    """Name of the run (used in the run id, metrics and traces)."""
    seed: int = field(default=0, metadata=_meta(ge=0, le=2**64 - 1))
    """Base seed; task seeds derive from it and the trial."""
    dataset: DatasetConfig
    """The input rows."""
    llms: dict[str, LlmConfig] = field(default_factory=dict)
    """Models by name."""
    roles: dict[str, RoleConfig]
    """Roles by name (``sink`` is reserved)."""
    routing: RoutingConfig
    """Routing programs."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Where the dataset goes."""
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    """Back-pressure, retries, deadlines."""
    containers: ContainersConfig = field(default_factory=ContainersConfig)
    """Sandboxes for tool-running roles."""
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    """Service discovery."""
    tracing: TracingConfig = field(default_factory=TracingConfig)
    """Tracing export."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """Prometheus metrics."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray cluster."""
    source_file: str = field(default="", metadata={"internal": True})
    """The top config file (for messages); not a YAML key."""

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-able dict in the YAML's shape (plus ``source_file``); see :meth:`from_dict`."""
        out = _to_plain(self)
        out["source_file"] = self.source_file
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        """Validate a dict in the YAML's shape (e.g. from :meth:`to_dict`) into a RunConfig."""
        data = dict(data)
        source = data.pop("source_file", None) or "<dict>"
        return _validate(data, _Context(str(source)))


# --------------------------------------------------------------------------------------------
# Validation


class _Context:
    """Knows which file set a key (for messages) and which overrides were given."""

    def __init__(
        self,
        top_file: str,
        *,
        config_dir: Path | None = None,
        choices: Mapping[str, Any] | None = None,
        overrides: Sequence[str] = (),
    ) -> None:
        self.top_file = top_file
        self.overrides = list(overrides)
        self._yaml_cache: dict[Path, Any] = {}
        # (package path, file) of each composed group file, most recently composed last.
        self._groups: list[tuple[list[str], Path]] = []
        if config_dir is not None and choices:
            for group, option in choices.items():
                if group.startswith("hydra") or not isinstance(option, str):
                    continue
                path = config_dir / group / f"{option}.yaml"
                if path.is_file():
                    self._groups.append((self._package(path, group), path))

    @staticmethod
    def _package(path: Path, group: str) -> list[str]:
        try:
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    m = re.match(r"\s*#\s*@package\s+(\S+)", line)
                    if m:
                        pkg = m.group(1)
                        if pkg == "_global_":
                            return []
                        if pkg != "_group_":
                            return pkg.split(".")
                        break
                    if line.strip() and not line.lstrip().startswith("#"):
                        break
        except OSError:
            pass
        return group.split("/")

    def _load(self, path: Path) -> Any:
        if path not in self._yaml_cache:
            try:
                with open(path, encoding="utf-8") as fh:
                    self._yaml_cache[path] = yaml.safe_load(fh)
            except (OSError, yaml.YAMLError):
                self._yaml_cache[path] = None
        return self._yaml_cache[path]

    def file_for(self, key: str) -> str:
        """The file that set ``key`` (or its nearest parent): a group file, else the top file."""
        parts = _split_key(key)
        for depth in range(len(parts), 0, -1):
            prefix = parts[:depth]
            for package, path in reversed(self._groups):
                if prefix[: len(package)] == package and _has_path(self._load(path), prefix[len(package) :]):
                    return str(path)
            if self.top_file.endswith(".yaml") and _has_path(self._load(Path(self.top_file)), prefix):
                return self.top_file
        return self.top_file

    def override_for(self, key: str) -> str | None:
        parts = _split_key(key)
        for ov in reversed(self.overrides):
            ov_key = ov.lstrip("+~").split("=", 1)[0].strip()
            ov_parts = _split_key(ov_key)
            if ov_parts and parts[: len(ov_parts)] == ov_parts:
                return ov
        return None

    def error(self, key: str, message: str) -> ConfigError:
        ov = self.override_for(key) if key else None
        if ov is not None:
            message += f" (set by override {ov!r})"
        return ConfigError(message, file=self.file_for(key) if key else self.top_file, key=key or None)


def _split_key(key: str) -> list[str | int]:
    parts: list[str | int] = []
    for piece in key.split("."):
        m = re.fullmatch(r"([^\[]*)((?:\[\d+\])*)", piece)
        if m is None:
            parts.append(piece)
            continue
        if m.group(1):
            parts.append(m.group(1))
        parts.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    return parts


def _has_path(data: Any, parts: Sequence[str | int]) -> bool:
    for part in parts:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return False
    return data is not None or not parts


def _got(value: Any) -> str:
    if value is None:
        return "null"
    kind = {
        bool: "bool",
        int: "int",
        float: "float",
        str: "str",
        list: "list",
        tuple: "list",
        dict: "mapping",
    }
    name = kind.get(type(value), type(value).__name__)
    text = repr(value) if not isinstance(value, dict) else json.dumps(value, default=str)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{name} {text}"


def _describe(hint: Any) -> str:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(hint) if a is not type(None)]
        return " or ".join(_describe(a) for a in inner) + " or null"
    if hint is bool:
        return "a bool (true/false)"
    if hint is int:
        return "an int"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if origin is tuple:
        return f"a list of {_describe(get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return "a value"


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def _build(cls: type, node: Any, key: str, ctx: _Context, *, name: str | None = None) -> Any:
    """Validate ``node`` (a mapping) into dataclass ``cls``; ``key`` is its dotted path."""
    prefix = f"{key}." if key else ""
    fields = [
        f
        for f in dataclasses.fields(cls)
        if not f.metadata.get("from_key") and not f.metadata.get("internal")
    ]
    allowed = [f.metadata.get("yaml", f.name) for f in fields]
    if not isinstance(node, Mapping):
        raise ctx.error(key, f"expected a mapping with keys {', '.join(allowed)}; got {_got(node)}")
    for k in node:
        if k not in allowed:
            hint = difflib.get_close_matches(str(k), allowed, n=1)
            maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ctx.error(
                f"{prefix}{k}", f"unknown key; expected one of {', '.join(allowed)}; got {k!r}{maybe}"
            )
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    if name is not None:
        kwargs["name"] = name
    for f in fields:
        yaml_key = f.metadata.get("yaml", f.name)
        fkey = f"{prefix}{yaml_key}"
        hint = hints[f.name]
        if yaml_key in node:
            kwargs[f.name] = _convert(hint, node[yaml_key], fkey, ctx, f.metadata)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hint):
                # Point at the deepest missing key (e.g. dataset.path), not at the section.
                kwargs[f.name] = _build(hint, {}, fkey, ctx)  # type: ignore[arg-type]
            else:
                raise ctx.error(fkey, f"expected {_describe(hint)} (required), got nothing")
    return cls(**kwargs)


def _convert(hint: Any, value: Any, key: str, ctx: _Context, meta: Mapping[str, Any]) -> Any:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in get_args(hint) if a is not type(None)]
        return _convert(inner, value, key, ctx, meta)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key, ctx)  # type: ignore[arg-type]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ctx.error(key, f"expected {_describe(hint)}, got {_got(value)}")
        (item,) = get_args(hint)[:1]
        return tuple(_convert(item, v, f"{key}[{i}]", ctx, meta) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ctx.error(key, f"expected {_describe(hint)}, got {_got(value)}")
        _, vtype = get_args(hint)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ctx.error(key, f"expected string keys, got {_got(k)}")
            if dataclasses.is_dataclass(vtype):
                if not re.match(_NAME, k):
                    raise ctx.error(f"{key}.{k}", f"expected a name matching {_NAME}, got {k!r}")
                has_name = any(f.metadata.get("from_key") for f in dataclasses.fields(vtype))
                out[k] = _build(vtype, v, f"{key}.{k}", ctx, name=k if has_name else None)  # type: ignore[arg-type]
            else:
                out[k] = _convert(vtype, v, f"{key}.{k}", ctx, {})
        return out
    ok = (
        (hint is bool and isinstance(value, bool))
        or (hint is int and isinstance(value, int) and not isinstance(value, bool))
        or (hint is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (hint is str and isinstance(value, str))
    )
    if not ok:
        extra = ""
        if hint is str and isinstance(value, bool | int | float):
            extra = " (quote it in YAML to make it a string)"
        raise ctx.error(key, f"expected {meta.get('expected') or _describe(hint)}, got {_got(value)}{extra}")
    if hint is float:
        value = float(value)
    _check_value(value, key, ctx, meta)
    return value


def _check_value(value: Any, key: str, ctx: _Context, meta: Mapping[str, Any]) -> None:
    if "choices" in meta and value not in meta["choices"]:
        raise ctx.error(key, f"expected one of {', '.join(meta['choices'])}, got {_got(value)}")
    if "pattern" in meta and not re.search(meta["pattern"], value):
        raise ctx.error(key, f"expected {meta.get('expected') or 'a non-empty string'}, got {_got(value)}")
    if "ge" in meta and value < meta["ge"]:
        raise ctx.error(key, f"expected a value >= {meta['ge']}, got {_got(value)}")
    if "gt" in meta and not value > meta["gt"]:
        raise ctx.error(key, f"expected a value > {meta['gt']}, got {_got(value)}")
    if "le" in meta and value > meta["le"]:
        raise ctx.error(key, f"expected a value <= {meta['le']}, got {_got(value)}")


def _validate(raw: Mapping[str, Any], ctx: _Context) -> RunConfig:
    """Types, then cross-references, then absolute paths."""
    cfg: RunConfig = _build(RunConfig, raw, "", ctx)
    _cross_check(cfg, raw, ctx)
    return dataclasses.replace(
        cfg,
        dataset=dataclasses.replace(cfg.dataset, path=_absolute(cfg.dataset.path)),
        output=dataclasses.replace(cfg.output, dir=_absolute(cfg.output.dir)),
        source_file=ctx.top_file,
    )


def _absolute(path: str) -> str:
    return str((Path.cwd() / Path(path).expanduser()).resolve())


def _cross_check(cfg: RunConfig, raw: Mapping[str, Any], ctx: _Context) -> None:
    if not cfg.roles:
        raise ctx.error("roles", "expected at least one role, got an empty mapping")
    if SINK in cfg.roles:
        raise ctx.error(
            f"roles.{SINK}", f"expected a role name other than {SINK!r} (reserved: where a program ends)"
        )
    for name, role in cfg.roles.items():
        if role.llm is not None and role.llm not in cfg.llms:
            known = ", ".join(sorted(cfg.llms)) or "none defined"
            raise ctx.error(f"roles.{name}.llm", f"expected a key of llms ({known}), got {role.llm!r}")
    if cfg.containers.limits:
        from agentmesh.container.sandbox import Limits, SandboxError

        try:
            Limits.from_mapping(cfg.containers.limits)
        except SandboxError as exc:
            raise ctx.error("containers.limits", str(exc).removeprefix("limits: ")) from None
    for name, llm in cfg.llms.items():
        required = {"openai-compatible": ("base_url",), "azure": ("base_url", "deployment", "api_version")}
        for key in required.get(llm.backend, ()):
            if not getattr(llm, key):
                what = {"base_url": "a URL", "deployment": "a deployment name"}.get(key, f"an {key}")
                raise ctx.error(
                    f"llms.{name}.{key}",
                    f"expected {what} for the {llm.backend} backend (required), got nothing",
                )
        for key in ("deployment", "api_version"):
            if getattr(llm, key) is not None and llm.backend != "azure":
                raise ctx.error(
                    f"llms.{name}.{key}",
                    f"expected no {key} for the {llm.backend} backend (it is for azure only), "
                    f"got {getattr(llm, key)!r}",
                )

    routing = cfg.routing
    if routing.program not in routing.programs:
        known = ", ".join(sorted(routing.programs)) or "none defined"
        raise ctx.error(
            "routing.program", f"expected a key of routing.programs ({known}), got {routing.program!r}"
        )
    roles = ", ".join(sorted(cfg.roles))

    def check_role(key: str, role: str | None, *, sink_ok: bool = False) -> None:
        if role in cfg.roles or (sink_ok and role == SINK):
            return
        also = f" or {SINK!r}" if sink_ok else ""
        why = " (the sink follows the program's last role by itself)" if role == SINK else ""
        raise ctx.error(key, f"expected a role of roles ({roles}){also}, got {role!r}{why}")

    raw_programs = raw.get("routing", {}).get("programs", {})
    for pname, prog in routing.programs.items():
        pkey = f"routing.programs.{pname}"
        # Fields of another kind are errors when given a value (an empty/default one, as
        # to_dict writes for every field, is fine).
        defaults = {f.name: f.default for f in dataclasses.fields(ProgramConfig)}
        present = {k for k in raw_programs.get(pname, {}) if k in defaults and k != "kind"}
        present = {k for k in present if getattr(prog, k) != defaults[k]}
        allowed = ProgramConfig._KIND_FIELDS[prog.kind]
        for k in sorted(present - allowed):
            owner = next(kind for kind, fs in ProgramConfig._KIND_FIELDS.items() if k in fs)
            raise ctx.error(
                f"{pkey}.{k}",
                f"expected only {', '.join(sorted(allowed))} for a {prog.kind} program, got {k!r} "
                f"(a {owner} field)",
            )
        if prog.kind == "sequential":
            if not prog.order:
                raise ctx.error(f"{pkey}.order", "expected a non-empty list of roles, got nothing")
            for i, r in enumerate(prog.order):
                check_role(f"{pkey}.order[{i}]", r)
        elif prog.kind == "loop_until":
            if not prog.body:
                raise ctx.error(f"{pkey}.body", "expected a non-empty list of roles, got nothing")
            for field_name, seq in (("body", prog.body), ("then", prog.then)):
                for i, r in enumerate(seq):
                    check_role(f"{pkey}.{field_name}[{i}]", r)
        else:
            if prog.start is None:
                raise ctx.error(f"{pkey}.start", "expected the first role (required), got nothing")
            check_role(f"{pkey}.start", prog.start)
            if not prog.transitions:
                raise ctx.error(
                    f"{pkey}.transitions", "expected a non-empty list of transitions, got nothing"
                )
            for i, t in enumerate(prog.transitions):
                check_role(f"{pkey}.transitions[{i}].from", t.src)
                check_role(f"{pkey}.transitions[{i}].to", t.dst, sink_ok=True)

    limits = cfg.limits
    if limits.retry_backoff_max_s < limits.retry_backoff_s:
        raise ctx.error(
            "limits.retry_backoff_max_s",
            f"expected a value >= limits.retry_backoff_s ({limits.retry_backoff_s}), "
            f"got {_got(limits.retry_backoff_max_s)}",
        )
    formats = cfg.output.formats
    if not formats or len(set(formats)) != len(formats):
        raise ctx.error(
            "output.formats", f"expected a non-empty list of distinct formats, got {list(formats)}"
        )


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.metadata.get("yaml", f.name): _to_plain(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not f.metadata.get("from_key") and not f.metadata.get("internal")
        }
    if isinstance(obj, tuple | list):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------------
# Packages, Hydra composition


def resolve_package_path(spec: str) -> Path:
    """``package.module/relative/path`` -> absolute path of that file inside the installed package."""
    package, sep, rel = spec.partition("/")
    if not package or not sep or not rel:
        raise ConfigError(f"expected 'package.module/relative/path', got {spec!r}")
    try:
        root = importlib.resources.files(package)
    except (ModuleNotFoundError, TypeError, ValueError) as exc:
        raise ConfigError(f"expected an importable package, got {package!r} ({exc})") from None
    target = root.joinpath(rel)
    if not isinstance(target, Path):
        raise ConfigError(
            f"expected package {package!r} installed as plain files, got {type(target).__name__}"
        )
    return target.resolve()


def _pkg_resolver(spec: str) -> str:
    return str(resolve_package_path(str(spec)))


OmegaConf.register_new_resolver("pkg", _pkg_resolver, replace=True)

# Hydra keeps its state in a process-wide singleton: compose one config at a time.
_hydra_lock = threading.Lock()


def _override_key(ov: str) -> str:
    return ov.lstrip("+~").split("=", 1)[0].strip() or ov


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_overrides(overrides: Sequence[str], top: str) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for ov in overrides:
        if not isinstance(ov, str):
            raise ConfigError(f"expected an override string, got {_got(ov)}", file=top, key="overrides")
        try:
            parser.parse_overrides([ov])
        except OverrideParseException as exc:
            lines = [ln for ln in str(exc).splitlines() if ln.strip() and "hydra.cc" not in ln]
            detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error parsing") else lines[0]
            raise ConfigError(
                f"expected an override KEY=VALUE, +KEY=VALUE or ~KEY, got {ov!r} ({detail.strip()})",
                file=top,
                key=_override_key(ov),
            ) from None


def _upsert(override: str, config_dir: Path) -> str:
    """``key=value`` -> ``++key=value`` unless ``key`` is a config group.

    Hydra refuses ``key=value`` for a key that the YAML does not set, but most keys have defaults
    in the dataclasses rather than in the YAML; a mistyped key is still caught by validation
    (unknown key, with the override named). A group choice (``dataset=small``) stays as it is.
    """
    if override.startswith(("+", "~")) or "=" not in override:
        return override
    key = override.split("=", 1)[0].strip()
    if "@" in key or key.startswith("hydra") or (config_dir / key.replace(".", "/")).is_dir():
        return override
    return "++" + override


def _yaml_error_file(config_dir: Path, top: Path) -> tuple[str, str]:
    """Find which YAML file under ``config_dir`` does not parse; (file, problem)."""
    for path in [top, *sorted(p for p in config_dir.rglob("*.yaml") if p != top)]:
        try:
            with open(path, encoding="utf-8") as fh:
                yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
            problem = getattr(exc, "problem", None) or _first_line(exc)
            return str(path), f"{where}expected valid YAML, got a syntax error ({problem})"
        except OSError:
            continue
    return str(top), "expected valid YAML, got a syntax error"


def _compose(path: Path, overrides: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Compose with Hydra; return (plain resolved config, group choices). Errors -> ConfigError."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException

    top = str(path)
    ctx = _Context(top, overrides=overrides)
    with _hydra_lock:
        # A caller may itself run under @hydra.main: set its Hydra aside and put it back after.
        outer = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(path.parent), version_base=None):
                try:
                    cfg = compose(config_name=path.stem, overrides=overrides, return_hydra_config=True)
                except MissingConfigException as exc:
                    raise _missing_config_error(exc, ctx) from None
                except ConfigCompositionException as exc:
                    # e.g. "+key=v" where key exists, "~key" where it does not.
                    full_key = getattr(exc.__cause__, "full_key", None)
                    quoted = re.search(r"'([^']+)'", str(exc))
                    key = str(full_key or (quoted.group(1) if quoted else ""))
                    raise ctx.error(
                        key, f"expected an override that applies, got: {_first_line(exc)}"
                    ) from None
                except yaml.YAMLError:
                    file, message = _yaml_error_file(path.parent, path)
                    raise ConfigError(message, file=file) from None
                except OmegaConfBaseException as exc:
                    raise ctx.error(
                        str(getattr(exc, "full_key", "") or ""), _omegaconf_message(exc)
                    ) from None
                except HydraException as exc:
                    raise ConfigError(_first_line(exc), file=top) from None
                choices = OmegaConf.to_container(cfg.hydra.runtime.choices, resolve=False)
                with open_dict(cfg):
                    del cfg["hydra"]
                ctx = _Context(top, config_dir=path.parent, choices=choices, overrides=overrides)  # type: ignore[arg-type]
                try:
                    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
                except OmegaConfBaseException as exc:
                    raise ctx.error(
                        str(getattr(exc, "full_key", "") or ""), _omegaconf_message(exc)
                    ) from None
        finally:
            GlobalHydra.instance().clear()
            if outer is not None:
                GlobalHydra.instance().initialize(outer)
    assert isinstance(plain, dict)
    return plain, choices  # type: ignore[return-value]


def _omegaconf_message(exc: OmegaConfBaseException) -> str:
    if isinstance(exc, MissingMandatoryValue):
        return "expected a value, got ??? (mandatory: set it in the file or with an override KEY=VALUE)"
    msg = getattr(exc, "msg", None) or _first_line(exc)
    return f"expected a resolvable value, got an error ({msg.splitlines()[0]})"


def _missing_config_error(exc: Exception, ctx: _Context) -> ConfigError:
    text = str(exc)
    missing = re.search(r"Could not find '([^']+)'", text)
    if missing is None:
        return ConfigError(f"expected a config file, got {_first_line(exc)}", file=ctx.top_file)
    group, _, option = missing.group(1).rpartition("/")
    available = re.search(r"Available options in '[^']+':\n((?:\t.*\n?)*)", text)
    options = ", ".join(o.strip() for o in available.group(1).splitlines() if o.strip()) if available else ""
    expected = f"one of {options}" if options else f"a file {missing.group(1)}.yaml"
    key = group.replace("/", ".") if group else option
    return ctx.error(key, f"expected {expected} (files in {group or '.'}/), got {option!r}")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Compose, resolve and validate a run config.

    ``path`` is a YAML file or ``pkg://package.module/relative/file.yaml``; ``overrides`` use
    Hydra's syntax. Raises :class:`ConfigError` naming the file, the key and what was expected.
    """
    text = str(path)
    if text.startswith("pkg://"):
        try:
            file = resolve_package_path(text.removeprefix("pkg://"))
        except ConfigError as exc:
            raise ConfigError(str(exc), file=text) from None
    else:
        file = Path(text).expanduser().resolve()
    if file.suffix != ".yaml":
        raise ConfigError(f"expected a .yaml file, got {file.name!r}", file=text)
    if not file.is_file():
        raise ConfigError("expected an existing YAML file, got nothing there", file=str(file))
    overrides = list(overrides)
    _check_overrides(overrides, str(file))
    plain, choices = _compose(file, [_upsert(ov, file.parent) for ov in overrides])
    ctx = _Context(str(file), config_dir=file.parent, choices=choices, overrides=overrides)
    return _validate(plain, ctx)


# --------------------------------------------------------------------------------------------
# The dataset


def iter_dataset(cfg: DatasetConfig) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """Yield ``(task_id, trial, row)`` lazily, streaming the file (never loading it whole).

    Trials are 0-based; with ``trials == 1`` the task id is the row id, else ``<id>#t<trial>``.
    Blank lines are skipped. Bad JSON, a row that is not an object, an id that is not a string or
    int, or a duplicate id raise :class:`ConfigError` naming the file and line.
    """
    path = Path(cfg.path)
    if not path.is_file():
        raise ConfigError(
            "expected an existing JSONL file, got nothing there", file=str(path), key="dataset.path"
        )
    seen: set[str] = set()
    rows = 0
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if cfg.limit is not None and rows >= cfg.limit:
                return
            if not line.strip():
                continue
            where = f"line {lineno}"
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ConfigError(
                    f"expected a JSON object, got invalid JSON ({exc})", file=str(path), key=where
                ) from None
            if not isinstance(row, dict):
                raise ConfigError(f"expected a JSON object, got {_got(row)}", file=str(path), key=where)
            raw_id = row.get(cfg.id_field)
            if raw_id is None:
                row_id = f"row-{rows}"
            elif isinstance(raw_id, str | int) and not isinstance(raw_id, bool) and str(raw_id):
                row_id = str(raw_id)
            else:
                raise ConfigError(
                    f"expected {cfg.id_field!r} to be a non-empty string or an int, got {_got(raw_id)}",
                    file=str(path),
                    key=where,
                )
            if row_id in seen:
                raise ConfigError(
                    f"expected unique ids in field {cfg.id_field!r}, got {row_id!r} again",
                    file=str(path),
                    key=where,
                )
            seen.add(row_id)
            rows += 1
            if cfg.trials == 1:
                yield row_id, 0, row
            else:
                for trial in range(cfg.trials):
                    yield f"{row_id}#t{trial}", trial, row
