"""Job spec validation: defaults resolve per task, every error names its field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agentmesh.errors import ConfigError
from agentmesh.jobs.spec import JobSpec, load_job_spec, parse_job_spec


def _job(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "j", "tasks": [{"name": "a", "command": "true"}]}
    base.update(over)
    return base


def test_defaults_resolve_into_every_task() -> None:
    spec = parse_job_spec(
        {
            "name": "eval-ckpts",
            "concurrency": 4,
            "retries": 2,
            "backoff_s": 0.5,
            "timeout_s": 30,
            "resources": {"cpus": 0.5, "memory_mb": 100},
            "env": {"A": "1", "N": 2},
            "tasks": [
                {"name": "hello", "command": ["sh", "-c", "echo hi"]},
                {
                    "name": "eval-0",
                    "function": "pkg.mod:fn",
                    "args": {"seed": 0},
                    "resources": {"gpus": 1},
                    "retries": 0,
                    "env": {"B": "x"},
                },
                {"name": "shell", "command": "echo $A"},
            ],
        }
    )
    assert spec.concurrency == 4
    hello, ev, shell = spec.tasks
    assert hello.command == ["sh", "-c", "echo hi"] and hello.function is None
    assert (hello.cpus, hello.gpus, hello.memory_mb, hello.retries, hello.timeout_s) == (0.5, 0, 100, 2, 30)
    assert hello.env == {"A": "1", "N": "2"}
    assert ev.function == "pkg.mod:fn" and ev.args == {"seed": 0} and ev.command is None
    assert (ev.cpus, ev.gpus, ev.retries, ev.backoff_s) == (0.5, 1, 0, 0.5)
    assert ev.env == {"A": "1", "N": "2", "B": "x"}
    assert shell.command == ["/bin/sh", "-c", "echo $A"]


def test_round_trip_through_to_dict() -> None:
    spec = parse_job_spec(
        _job(concurrency=3, tasks=[{"name": "f", "function": "m:f", "args": {"x": [1]}, "timeout_s": 2}])
    )
    again = parse_job_spec(json.loads(spec.to_json()))
    assert again == spec
    assert isinstance(again, JobSpec)


@pytest.mark.parametrize(
    ("spec", "key", "fragment"),
    [
        (_job(name="bad name!"), "name", "[A-Za-z0-9_.-]"),
        (_job(name="x" * 65), "name", "1,64"),
        (_job(concurrency=0), "concurrency", ">= 1"),
        (_job(concurrency=1.5), "concurrency", "integer"),
        (_job(concurrency=True), "concurrency", "integer"),
        (_job(retries=-1), "retries", ">= 0"),
        (_job(timeout_s="soon"), "timeout_s", "number"),
        (_job(backoff_s=float("nan")), "backoff_s", "number"),
        (_job(resources={"cpus": -1}), "resources.cpus", "got -1"),
        (_job(resources={"tpus": 1}), "resources.tpus", "unknown key"),
        (_job(env={"1BAD": "x"}), "env.1BAD", "variable name"),
        (_job(env={"A": ["x"]}), "env.A", "string or number"),
        (_job(cwd="relative/dir"), "cwd", "absolute"),
        (_job(colour="red"), "colour", "unknown key"),
        (_job(tasks=[]), "tasks", "non-empty"),
        (_job(tasks="a"), "tasks", "non-empty"),
        (_job(tasks=[{"name": "a"}]), "tasks[0]", "neither"),
        (_job(tasks=[{"name": "a", "command": "x", "function": "m:f"}]), "tasks[0]", "both"),
        (_job(tasks=[{"name": "a", "command": ""}]), "tasks[0].command", "non-empty"),
        (_job(tasks=[{"name": "a", "command": []}]), "tasks[0].command", "argv"),
        (_job(tasks=[{"name": "a", "command": ["sh", 3]}]), "tasks[0].command[1]", "string"),
        (_job(tasks=[{"name": "a", "command": "x", "args": {}}]), "tasks[0].args", "function"),
        (_job(tasks=[{"name": "a", "function": "nomodule"}]), "tasks[0].function", "module:function"),
        (_job(tasks=[{"name": "a", "function": "m:f()"}]), "tasks[0].function", "module:function"),
        (_job(tasks=[{"name": "a", "function": "m:f", "args": [1]}]), "tasks[0].args", "mapping"),
        (_job(tasks=[{"name": "a", "function": "m:f", "args": {"x": {1, 2}}}]), "tasks[0].args", "JSON"),
        (_job(tasks=[{"name": "a:b", "command": "x"}]), "tasks[0].name", "[A-Za-z0-9_.-]"),
        (_job(tasks=["x"]), "tasks[0]", "mapping"),
        (_job(tasks=[{"name": "a", "command": "x", "weight": 1}]), "tasks[0].weight", "unknown key"),
        (
            _job(
                tasks=[{"name": "a", "command": "x"}] * 3
                + [{"name": "b", "command": "x", "resources": {"cpus": -1}}]
            ),
            "tasks[1].name",
            "duplicate",
        ),
    ],
)
def test_errors_name_the_field(spec: dict[str, Any], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_job_spec(spec)
    assert info.value.key == key
    assert fragment in str(info.value)
    assert str(info.value).startswith(f"{key}: ")


def test_the_example_error_message() -> None:
    tasks: list[dict[str, Any]] = [{"name": f"t{i}", "command": "true"} for i in range(3)]
    tasks.append({"name": "t3", "command": "true", "resources": {"cpus": -1}})
    with pytest.raises(ConfigError, match=r"^tasks\[3\]\.resources\.cpus: expected a number >= 0, got -1$"):
        parse_job_spec(_job(tasks=tasks))


def test_not_a_mapping() -> None:
    with pytest.raises(ConfigError, match="job: expected a mapping"):
        parse_job_spec(["x"])


def test_load_yaml_and_json_files(tmp_path: Path) -> None:
    y = tmp_path / "job.yaml"
    y.write_text("name: y\nconcurrency: 2\ntasks:\n  - name: a\n    command: echo hi\n")
    assert load_job_spec(y).concurrency == 2
    j = tmp_path / "job.json"
    j.write_text(json.dumps(_job(name="j2")))
    assert load_job_spec(j).name == "j2"


def test_load_errors_name_the_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: y\ntasks:\n  - name: a\n    command: x\n    retries: -2\n")
    with pytest.raises(ConfigError) as info:
        load_job_spec(bad)
    assert str(info.value) == f"{bad}: tasks[0].retries: expected an integer >= 0, got -2"
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_job_spec(broken)
    with pytest.raises(ConfigError, match="cannot read"):
        load_job_spec(tmp_path / "missing.yaml")


def test_status_table_lists_every_task() -> None:
    from agentmesh.jobs.cli import render_status
    from agentmesh.jobs.states import JobStatus, TaskStatus

    status = JobStatus(
        job_id="j-1",
        name="j",
        state="FAILED",
        tasks=[
            TaskStatus("ok", "SUCCEEDED", 1, 0, "", None, 10.0, 12.5),
            TaskStatus("bad", "FAILED", 3, 4, "exit code 4: boom"),
        ],
        task_counts={"SUCCEEDED": 1, "FAILED": 1},
    )
    lines = render_status(status).splitlines()
    assert lines[0] == "job j-1 (j): FAILED  [1 failed, 1 succeeded]"
    assert lines[1].split() == ["TASK", "STATE", "ATTEMPTS", "EXIT", "DURATION", "ERROR"]
    assert lines[2].split() == ["ok", "SUCCEEDED", "1", "0", "2.5s"]
    assert lines[3].split() == ["bad", "FAILED", "3", "4", "-", "exit", "code", "4:", "boom"]
