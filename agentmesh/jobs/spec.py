"""Job specs: what a job is made of, parsed and checked before anything runs.

A spec comes as a dict (Python API), or as a YAML or JSON file (``agentmesh job submit FILE``).
Job-level ``retries``, ``backoff_s``, ``backoff_max_s``, ``timeout_s``, ``resources``, ``env`` and
``cwd`` are defaults that every task may override; :func:`parse_job_spec` resolves them, so a
:class:`TaskSpec` carries every value it runs with. Every error is a
:class:`~agentmesh.errors.ConfigError` whose key names the field, e.g.
``tasks[3].resources.cpus: expected a number >= 0, got -1``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agentmesh.errors import ConfigError

__all__ = [
    "MAX_TASKS",
    "JobSpec",
    "TaskSpec",
    "load_job_spec",
    "parse_job_spec",
]

MAX_TASKS = 100_000
_JOB_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_TASK_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_FUNCTION_RE = re.compile(rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

_DEFAULT_KEYS = ("retries", "backoff_s", "backoff_max_s", "timeout_s", "resources", "env", "cwd")
_JOB_KEYS = frozenset({"name", "concurrency", "tasks", *_DEFAULT_KEYS})
_TASK_KEYS = frozenset({"name", "command", "function", "args", *_DEFAULT_KEYS})
_RESOURCE_KEYS = ("cpus", "gpus", "memory_mb")


@dataclass(frozen=True)
class TaskSpec:
    """One task with every default resolved: exactly one of ``command`` and ``function`` is set."""

    name: str
    command: list[str] | None = None
    """argv; a string in the spec becomes ``["/bin/sh", "-c", string]``."""
    function: str | None = None
    """``module:function``, importable where the task runs; called with ``args`` as kwargs."""
    args: dict[str, Any] = field(default_factory=dict)
    cpus: float = 1.0
    gpus: float = 0.0
    memory_mb: float = 0.0
    retries: int = 0
    backoff_s: float = 1.0
    backoff_max_s: float = 60.0
    timeout_s: float = 0.0
    """Per attempt; 0 means none."""
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = ""
    """Working directory of the task's process; "" leaves it to the manager (its own cwd)."""

    def to_dict(self) -> dict[str, Any]:
        """The resolved task as a spec entry that :func:`parse_job_spec` reads back unchanged."""
        d: dict[str, Any] = {"name": self.name}
        if self.command is not None:
            d["command"] = list(self.command)
        else:
            d["function"] = self.function
            d["args"] = dict(self.args)
        d["resources"] = {"cpus": self.cpus, "gpus": self.gpus, "memory_mb": self.memory_mb}
        d.update(
            retries=self.retries,
            backoff_s=self.backoff_s,
            backoff_max_s=self.backoff_max_s,
            timeout_s=self.timeout_s,
            env=dict(self.env),
        )
        if self.cwd:
            d["cwd"] = self.cwd
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TaskSpec:
        """Inverse of :meth:`to_dict` for specs this module produced (no validation)."""
        res = d.get("resources", {})
        command = d.get("command")
        return cls(
            name=d["name"],
            command=list(command) if command is not None else None,
            function=d.get("function"),
            args=dict(d.get("args", {})),
            cpus=float(res.get("cpus", _DEFAULT_TASK.cpus)),
            gpus=float(res.get("gpus", _DEFAULT_TASK.gpus)),
            memory_mb=float(res.get("memory_mb", _DEFAULT_TASK.memory_mb)),
            retries=int(d.get("retries", _DEFAULT_TASK.retries)),
            backoff_s=float(d.get("backoff_s", _DEFAULT_TASK.backoff_s)),
            backoff_max_s=float(d.get("backoff_max_s", _DEFAULT_TASK.backoff_max_s)),
            timeout_s=float(d.get("timeout_s", _DEFAULT_TASK.timeout_s)),
            env=dict(d.get("env", {})),
            cwd=str(d.get("cwd", "")),
        )


_DEFAULT_TASK = TaskSpec(name="")
"""Where the defaults of every task field come from (the spec, its parser and its reader)."""


@dataclass(frozen=True)
class JobSpec:
    """A validated job: its name, concurrency limit and resolved tasks (in spec order)."""

    name: str
    tasks: list[TaskSpec]
    concurrency: int = 1

    def to_dict(self) -> dict[str, Any]:
        """A spec dict (every task fully resolved) that :func:`parse_job_spec` accepts."""
        return {
            "name": self.name,
            "concurrency": self.concurrency,
            "tasks": [t.to_dict() for t in self.tasks],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    def with_default_cwd(self, cwd: str) -> JobSpec:
        """This job with ``cwd`` as the working directory of every task that names none."""
        if all(t.cwd for t in self.tasks):
            return self
        return replace(self, tasks=[t if t.cwd else replace(t, cwd=cwd) for t in self.tasks])


# -- field checks ----------------------------------------------------------------------------------


def _number(value: Any, key: str, *, minimum: float = 0.0, integer: bool = False) -> float:
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"expected {kind} >= {minimum:g}, got {value!r}", key=key)
    if value < minimum:
        raise ConfigError(f"expected {kind} >= {minimum:g}, got {value!r}", key=key)
    return value


def _mapping(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a mapping, got {type(value).__name__}", key=key)
    for k in value:
        if not isinstance(k, str):
            raise ConfigError(f"expected string keys, got {k!r}", key=key)
    return value


def _no_unknown(d: Mapping[str, Any], allowed: frozenset[str] | tuple[str, ...], where: str) -> None:
    for k in d:
        if k not in allowed:
            raise ConfigError(f"unknown key; expected one of {', '.join(sorted(allowed))}", key=f"{where}{k}")


def _resources(value: Any, key: str, base: dict[str, float]) -> dict[str, float]:
    d = _mapping(value, key)
    _no_unknown(d, _RESOURCE_KEYS, f"{key}.")
    out = dict(base)
    for k in _RESOURCE_KEYS:
        if k in d:
            out[k] = float(_number(d[k], f"{key}.{k}"))
    return out


def _env(value: Any, key: str, base: dict[str, str]) -> dict[str, str]:
    d = _mapping(value, key)
    out = dict(base)
    for k, v in d.items():
        if not _ENV_NAME_RE.match(k):
            raise ConfigError("expected a variable name [A-Za-z_][A-Za-z0-9_]*", key=f"{key}.{k}")
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            raise ConfigError(f"expected a string or number, got {type(v).__name__}", key=f"{key}.{k}")
        text = str(v)
        if "\x00" in text:
            raise ConfigError("holds a NUL byte", key=f"{key}.{k}")
        out[k] = text
    return out


def _cwd(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\x00" in value:
        raise ConfigError(f"expected an absolute path, got {value!r}", key=key)
    return value


def _defaults(d: Mapping[str, Any], where: str, base: dict[str, Any]) -> dict[str, Any]:
    """The overridable fields of ``d`` applied over ``base`` (defaults of the level above)."""
    out = dict(base)
    if "retries" in d:
        out["retries"] = int(_number(d["retries"], f"{where}retries", integer=True))
    for k in ("backoff_s", "backoff_max_s", "timeout_s"):
        if k in d:
            out[k] = float(_number(d[k], f"{where}{k}"))
    if "resources" in d:
        out["resources"] = _resources(d["resources"], f"{where}resources", out["resources"])
    if "env" in d:
        out["env"] = _env(d["env"], f"{where}env", out["env"])
    if "cwd" in d:
        out["cwd"] = _cwd(d["cwd"], f"{where}cwd")
    return out


def _command(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        if not value.strip():
            raise ConfigError("expected a non-empty command", key=key)
        if "\x00" in value:
            raise ConfigError("holds a NUL byte", key=key)
        return ["/bin/sh", "-c", value]
    if isinstance(value, list) and value:
        for i, a in enumerate(value):
            if not isinstance(a, str) or "\x00" in a:
                raise ConfigError(f"expected a string without NUL bytes, got {a!r}", key=f"{key}[{i}]")
        if not value[0]:
            raise ConfigError("expected the program to run, got an empty string", key=f"{key}[0]")
        return list(value)
    raise ConfigError(
        f"expected a non-empty argv list or a shell string, got {type(value).__name__}", key=key
    )


def _task(raw: Any, i: int, base: dict[str, Any]) -> TaskSpec:
    where = f"tasks[{i}]"
    d = _mapping(raw, where)
    _no_unknown(d, _TASK_KEYS, f"{where}.")
    name = d.get("name")
    if not isinstance(name, str) or not _TASK_NAME_RE.match(name):
        raise ConfigError(f"expected [A-Za-z0-9_.-]{{1,128}}, got {name!r}", key=f"{where}.name")
    has_cmd, has_fn = "command" in d, "function" in d
    if has_cmd == has_fn:
        raise ConfigError(
            "expected exactly one of command and function, got " + ("both" if has_cmd else "neither"),
            key=where,
        )
    vals = _defaults(d, f"{where}.", base)
    command = function = None
    args: dict[str, Any] = {}
    if has_cmd:
        command = _command(d["command"], f"{where}.command")
        if "args" in d:
            raise ConfigError("only a function task takes args", key=f"{where}.args")
    else:
        function = d["function"]
        if not isinstance(function, str) or not _FUNCTION_RE.match(function):
            raise ConfigError(
                f"expected 'package.module:function', got {function!r}", key=f"{where}.function"
            )
        if "args" in d:
            args = dict(_mapping(d["args"], f"{where}.args"))
            try:
                json.dumps(args, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"expected JSON values ({exc})", key=f"{where}.args") from None
    res = vals["resources"]
    return TaskSpec(
        name=name,
        command=command,
        function=function,
        args=args,
        cpus=res["cpus"],
        gpus=res["gpus"],
        memory_mb=res["memory_mb"],
        retries=vals["retries"],
        backoff_s=vals["backoff_s"],
        backoff_max_s=vals["backoff_max_s"],
        timeout_s=vals["timeout_s"],
        env=vals["env"],
        cwd=vals["cwd"],
    )


def parse_job_spec(raw: Any) -> JobSpec:
    """Validate a job spec (a mapping, as read from YAML/JSON) and resolve every task's defaults.

    Raises :class:`~agentmesh.errors.ConfigError` naming the first bad field.
    """
    d = _mapping(raw, "job")
    _no_unknown(d, _JOB_KEYS, "")
    name = d.get("name")
    if not isinstance(name, str) or not _JOB_NAME_RE.match(name):
        raise ConfigError(f"expected [A-Za-z0-9_.-]{{1,64}}, got {name!r}", key="name")
    concurrency = int(_number(d.get("concurrency", 1), "concurrency", minimum=1, integer=True))
    dt = _DEFAULT_TASK
    base: dict[str, Any] = {
        "retries": dt.retries,
        "backoff_s": dt.backoff_s,
        "backoff_max_s": dt.backoff_max_s,
        "timeout_s": dt.timeout_s,
        "resources": {"cpus": dt.cpus, "gpus": dt.gpus, "memory_mb": dt.memory_mb},
        "env": {},
        "cwd": dt.cwd,
    }
    base = _defaults(d, "", base)
    tasks_raw = d.get("tasks")
    if not isinstance(tasks_raw, list) or not tasks_raw:
        raise ConfigError("expected a non-empty list of tasks", key="tasks")
    if len(tasks_raw) > MAX_TASKS:
        raise ConfigError(f"expected at most {MAX_TASKS} tasks, got {len(tasks_raw)}", key="tasks")
    tasks: list[TaskSpec] = []
    seen: dict[str, int] = {}
    for i, t in enumerate(tasks_raw):
        task = _task(t, i, base)
        if task.name in seen:
            raise ConfigError(
                f"duplicate task name {task.name!r} (also tasks[{seen[task.name]}])", key=f"tasks[{i}].name"
            )
        seen[task.name] = i
        tasks.append(task)
    return JobSpec(name=name, tasks=tasks, concurrency=concurrency)


def load_job_spec(path: str | Path) -> JobSpec:
    """Read and validate a YAML or JSON job spec file; errors name the file and the field."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", file=str(p)) from None
    try:
        if p.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError: the parser's own message
        kind = "JSON" if p.suffix.lower() == ".json" else "YAML"
        raise ConfigError(f"not valid {kind}: {exc}", file=str(p)) from None
    try:
        return parse_job_spec(raw)
    except ConfigError as exc:
        message = str(exc).removeprefix(f"{exc.key}: ") if exc.key else str(exc)
        raise ConfigError(message, file=str(p), key=exc.key) from None
