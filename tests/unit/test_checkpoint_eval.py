"""Checkpoint evaluation without a cluster: benchmarks and scorers, aggregation, the job spec, the
outcomes read from a job's status, the checkpoints' copies, the report, bad command lines."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agentmesh.errors import ConfigError
from agentmesh.jobs.spec import parse_job_spec
from agentmesh.pipelines.checkpoint_eval import job as job_mod
from agentmesh.pipelines.checkpoint_eval.aggregate import (
    TaskOutcome,
    aggregate,
    format_cell,
    format_table,
    mean_stderr,
)
from agentmesh.pipelines.checkpoint_eval.benchmarks import (
    BENCHMARKS,
    load_benchmark,
    parse_benchmark_names,
    score_letter,
    score_number,
    score_text,
)
from agentmesh.pipelines.checkpoint_eval.job import (
    TASK_FUNCTION,
    Checkpoint,
    build_job_spec,
    make_checkpoints,
    outcomes_from_status,
)
from agentmesh.pipelines.checkpoint_eval.report import write_report
from agentmesh.pipelines.checkpoint_eval.task import evaluate, task_model_name

# -- benchmarks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_bundled_benchmarks_load_with_unique_ids_and_short_prompts(name: str) -> None:
    bench = load_benchmark(name)
    assert 15 <= len(bench.items) <= 25
    assert len({i.id for i in bench.items}) == len(bench.items)
    assert all(len(i.prompt) < 200 and i.answers for i in bench.items)


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_item_accepts_its_own_answer_and_refuses_another(name: str) -> None:
    bench = load_benchmark(name)
    for k, item in enumerate(bench.items):
        assert bench.score(item, item.answers[0]), item
        other = bench.items[(k + 1) % len(bench.items)]
        if set(other.answers) & set(item.answers):
            continue  # e.g. two arithmetic items with the same result
        assert not bench.score(item, other.answers[0]), (item, other)


def test_choice_answers_are_spread_over_the_letters() -> None:
    letters = [i.answers[0] for i in load_benchmark("choice").items]
    assert {letters.count(x) for x in "ABCD"} == {5}


@pytest.mark.parametrize(
    ("reply", "ok"),
    [
        ("12", True),
        ("The answer is 12.", True),
        ("7 + 5 = 12", True),
        ("7 + 5 = 13", False),
        ("1,2", False),
        ("twelve", False),
        ("", False),
        ("-12", False),
    ],
)
def test_score_number(reply: str, ok: bool) -> None:
    assert score_number(reply, ("12",)) is ok


@pytest.mark.parametrize(
    ("reply", "ok"),
    [
        ("Paris", True),
        ("The capital of France is Paris.", True),
        ("PARIS!", True),
        ("Parisian food", False),
        ("Lyon", False),
        ("Mexico City", False),  # the answer below is Bogotá: accents folded, whole words only
        ("bogota", True),
    ],
)
def test_score_text(reply: str, ok: bool) -> None:
    answers = ("Bogotá",) if reply.lower() in ("mexico city", "bogota") else ("Paris",)
    assert score_text(reply, answers) is ok


@pytest.mark.parametrize(
    ("reply", "picked_b"),
    [
        ("B", True),
        ("B) 8", True),
        ("(B)", True),
        ("b", False),  # lower-case b is a word, not an option
        ("The answer is B.", True),
        ("Answer: B", True),
        ("I think it is 8, so B) 8", True),
        ("A) 6", False),
        ("A spider has 8 legs, B)", True),  # the article "A" is not option A
        ("Eight", False),
    ],
)
def test_score_letter(reply: str, picked_b: bool) -> None:
    assert score_letter(reply, ("B",)) is picked_b


def test_benchmark_names_checked_and_deduplicated() -> None:
    assert parse_benchmark_names("arith, capitals,arith") == ["arith", "capitals"]
    with pytest.raises(ConfigError, match=r"benchmarks: no benchmark named 'mmlu'"):
        parse_benchmark_names("arith,mmlu")
    with pytest.raises(ConfigError, match="benchmarks: expected at least one"):
        parse_benchmark_names(" , ")
    with pytest.raises(ConfigError, match="benchmark: no benchmark named 'nope'"):
        load_benchmark("nope")


# -- aggregation -----------------------------------------------------------------------------------


def _ok(ckpt: str, bench: str, seed: int, acc: float) -> TaskOutcome:
    return TaskOutcome(f"{ckpt}.{bench}.s{seed}", ckpt, bench, seed, "SUCCEEDED", acc, attempts=1)


def test_mean_stderr_uses_the_sample_std_over_sqrt_n() -> None:
    mean, se = mean_stderr([0.2, 0.4, 0.6])
    assert mean == pytest.approx(0.4)
    assert se == pytest.approx(0.2 / math.sqrt(3))  # sample std of 0.2, 0.4, 0.6 is 0.2
    assert mean_stderr([0.5]) == (0.5, None)
    assert mean_stderr([]) == (None, None)
    assert mean_stderr([0.3, 0.3]) == (pytest.approx(0.3), 0.0)


def test_aggregate_cells_and_table() -> None:
    outcomes = [
        _ok("ckpt-1", "arith", 0, 0.4),
        _ok("ckpt-1", "arith", 1, 0.6),
        _ok("ckpt-1", "capitals", 0, 0.5),
        _ok("ckpt-1", "capitals", 1, 0.7),
        _ok("ckpt-2", "arith", 0, 0.1),
        TaskOutcome("ckpt-2.arith.s1", "ckpt-2", "arith", 1, "FAILED", None, "boom", 2),
        TaskOutcome("ckpt-2.capitals.s0", "ckpt-2", "capitals", 0, "FAILED", None, "deploy failed", 2),
        TaskOutcome("ckpt-2.capitals.s1", "ckpt-2", "capitals", 1, "CANCELLED", None, ""),
    ]
    cells = aggregate(outcomes, ["ckpt-1", "ckpt-2"], ["arith", "capitals"])
    assert [(c.checkpoint, c.benchmark) for c in cells] == [
        ("ckpt-1", "arith"),
        ("ckpt-1", "capitals"),
        ("ckpt-2", "arith"),
        ("ckpt-2", "capitals"),
    ]
    c11, _, c21, c22 = cells
    assert c11.mean == pytest.approx(0.5) and c11.stderr == pytest.approx(0.1) and c11.n == 2
    assert format_cell(c11) == "0.50 ± 0.10 (n=2)"
    # A failed seed is counted and kept, not dropped: one accuracy left, so no spread.
    assert (c21.n, c21.seeds, c21.failed, c21.stderr) == (1, 2, 1, None)
    assert c21.failures == ["seed 1: FAILED: boom"]
    assert format_cell(c21) == "0.10 ± n/a (n=1) [1 failed]"
    assert c22.mean is None and format_cell(c22) == "failed (0/2)"
    assert c22.failures == ["seed 0: FAILED: deploy failed", "seed 1: CANCELLED: no accuracy"]

    table = format_table(cells, ["ckpt-1", "ckpt-2"], ["arith", "capitals"]).splitlines()
    assert table[0].split() == ["checkpoint", "arith", "capitals"]
    assert (
        table[2].startswith("ckpt-1") and "0.50 ± 0.10 (n=2)" in table[2] and "0.60 ± 0.10 (n=2)" in table[2]
    )
    assert "[1 failed]" in table[3] and "failed (0/2)" in table[3]


def test_aggregate_refuses_an_outcome_outside_the_table() -> None:
    with pytest.raises(ValueError, match="not in the table"):
        aggregate([_ok("ckpt-9", "arith", 0, 1.0)], ["ckpt-1"], ["arith"])


def test_a_succeeded_task_without_accuracy_is_not_counted() -> None:
    o = TaskOutcome("t", "c", "arith", 0, "SUCCEEDED", None, "no accuracy")
    (cell,) = aggregate([o], ["c"], ["arith"])
    assert cell.n == 0 and cell.failed == 1


# -- the job spec ----------------------------------------------------------------------------------


def _ckpts(n: int) -> list[Checkpoint]:
    return [Checkpoint(f"ckpt-{i}", f"/models/ckpt-{i}") for i in range(1, n + 1)]


def test_spec_has_one_function_task_per_checkpoint_benchmark_and_seed() -> None:
    spec, keys = build_job_spec(
        _ckpts(3),
        ["arith", "capitals"],
        [0, 1, 2, 3],
        ray_address="127.0.0.1:1",
        discovery_url="etcd://127.0.0.1:2",
        concurrency=3,
        max_items=5,
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert len(spec["tasks"]) == len(keys) == 3 * 2 * 4
    names = [t["name"] for t in spec["tasks"]]
    assert len(set(names)) == len(names)
    assert spec["concurrency"] == 3
    assert spec["retries"] == 1 and spec["timeout_s"] == 900.0 and spec["resources"]["cpus"] == 0.9
    assert spec["env"] == {"HF_HUB_OFFLINE": "1"}
    t = next(t for t in spec["tasks"] if t["name"] == "ckpt-2.capitals.s3")
    assert t["function"] == TASK_FUNCTION
    assert t["args"] == {
        "checkpoint": "ckpt-2",
        "checkpoint_dir": "/models/ckpt-2",
        "benchmark": "capitals",
        "seed": 3,
        "ray_address": "127.0.0.1:1",
        "discovery_url": "etcd://127.0.0.1:2",
        "backend": "vllm-cpu",
        "concurrency": 4,
        "max_items": 5,
    }
    assert keys["ckpt-2.capitals.s3"] == job_mod.TaskKey("ckpt-2", "capitals", 3)
    # The job manager's own parser takes it as is.
    parsed = parse_job_spec(spec)
    assert parsed.concurrency == 3 and len(parsed.tasks) == 24
    # The task function accepts exactly these keyword arguments.
    import inspect

    assert set(t["args"]) <= set(inspect.signature(evaluate).parameters)


def test_spec_defaults_follow_the_backend() -> None:
    spec, _ = build_job_spec(
        _ckpts(1), ["choice"], [0], ray_address="a:1", discovery_url="etcd://b:2", backend="simulator"
    )
    assert spec["resources"]["cpus"] == 0.2 and spec["timeout_s"] == 180.0 and "env" not in spec


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"checkpoints": []}, "checkpoints: expected at least one"),
        ({"checkpoints": [Checkpoint("a b", "/x")]}, "checkpoints: expected"),
        ({"checkpoints": [Checkpoint("a", "/x"), Checkpoint("a", "/y")]}, "checkpoint names repeat"),
        ({"benchmarks": ["arith", "gsm8k"]}, "benchmarks: no benchmark named 'gsm8k'"),
        ({"seeds": []}, "seeds: expected"),
        ({"seeds": [0, 0]}, "seeds repeat"),
        ({"concurrency": 0}, "concurrency: expected an integer >= 1"),
        ({"backend": "vllm"}, "backend: expected one of"),
    ],
)
def test_spec_refuses_bad_input(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"checkpoints": _ckpts(1), "benchmarks": ["arith"], "seeds": [0]}
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        build_job_spec(
            args.pop("checkpoints"),
            args.pop("benchmarks"),
            args.pop("seeds"),
            ray_address="a:1",
            discovery_url="etcd://b:2",
            **args,
        )


def test_outcomes_from_status_keep_failures_and_missing_tasks() -> None:
    _, keys = build_job_spec(
        _ckpts(1), ["arith"], [0, 1, 2, 3], ray_address="a:1", discovery_url="etcd://b:2"
    )
    ts = SimpleNamespace
    status = SimpleNamespace(
        state="FAILED",
        tasks=[
            ts(name="ckpt-1.arith.s0", state="SUCCEEDED", result={"accuracy": 0.25}, error="", attempts=1),
            ts(
                name="ckpt-1.arith.s1",
                state="FAILED",
                result=None,
                error="Traceback\nDeployFailed: x",
                attempts=2,
            ),
            ts(name="ckpt-1.arith.s2", state="SUCCEEDED", result={"oops": 1}, error="", attempts=1),
        ],
    )
    by_seed = {o.seed: o for o in outcomes_from_status(status, keys)}
    assert by_seed[0].ok and by_seed[0].accuracy == 0.25
    assert by_seed[1].state == "FAILED" and "DeployFailed" in by_seed[1].error and by_seed[1].attempts == 2
    assert not by_seed[2].ok and "no accuracy" in by_seed[2].error
    assert by_seed[3].state == "MISSING"


# -- checkpoints, names, report, command line ------------------------------------------------------


def test_make_checkpoints_hard_links_the_model_under_distinct_names(tmp_path: Path) -> None:
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"\0" * 10)
    ckpts = make_checkpoints(3, tmp_path / "ck", src)
    assert [c.name for c in ckpts] == ["ckpt-1", "ckpt-2", "ckpt-3"]
    for c in ckpts:
        assert (Path(c.path) / "sub" / "w.bin").read_bytes() == b"\0" * 10
        assert os.stat(Path(c.path) / "config.json").st_ino == os.stat(src / "config.json").st_ino
    again = make_checkpoints(1, tmp_path / "ck", src)  # replaces an existing folder
    assert again[0].path == ckpts[0].path
    with pytest.raises(ConfigError, match="checkpoints: expected an integer >= 1"):
        make_checkpoints(0, tmp_path / "ck", src)
    with pytest.raises(ConfigError, match="model_dir: not a directory"):
        make_checkpoints(1, tmp_path / "ck", tmp_path / "missing")


def test_task_model_names_are_stable_per_job_and_unique_per_task() -> None:
    a = task_model_name("ckpt-1", "arith", 3, job_id="job-1")
    assert a == task_model_name("ckpt-1", "arith", 3, job_id="job-1")
    assert a.startswith("ckpt-1-arith-s3-")
    others = {
        task_model_name("ckpt-1", "arith", 4, job_id="job-1"),
        task_model_name("ckpt-2", "arith", 3, job_id="job-1"),
        task_model_name("ckpt-1", "arith", 3, job_id="job-2"),
        task_model_name("ckpt-1", "arith", 3),
    }
    assert a not in others and len(others) == 4


def test_evaluate_checks_its_arguments_before_deploying(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="benchmark: no benchmark named 'x'"):
        evaluate("c", str(tmp_path), "x", 0)
    with pytest.raises(ConfigError, match="checkpoint_dir: not a directory"):
        evaluate("c", str(tmp_path / "nope"), "arith", 0)
    with pytest.raises(ConfigError, match="seed: expected an integer >= 0"):
        evaluate("c", str(tmp_path), "arith", -1)
    with pytest.raises(ConfigError, match="backend: expected"):
        evaluate("c", str(tmp_path), "arith", 0, backend="openai")
    with pytest.raises(ConfigError, match="ray_address: give ray_address and discovery_url together"):
        evaluate("c", str(tmp_path), "arith", 0, ray_address="127.0.0.1:1")


def test_write_report(tmp_path: Path) -> None:
    outcomes = [_ok("c1", "arith", 0, 0.5), _ok("c1", "arith", 1, 0.7)]
    cells = aggregate(outcomes, ["c1"], ["arith"])
    table = format_table(cells, ["c1"], ["arith"])
    files = write_report(
        tmp_path / "out",
        job_id="j",
        state="SUCCEEDED",
        config={"seeds": 2},
        outcomes=outcomes,
        cells=cells,
        table=table,
        wall_s=1.5,
        checkpoints=["c1"],
        benchmarks=["arith"],
    )
    results = json.loads(Path(files["results"]).read_text())
    assert results["cells"][0]["mean"] == pytest.approx(0.6) and results["cells"][0]["n"] == 2
    assert len(results["tasks"]) == 2 and results["state"] == "SUCCEEDED"
    assert Path(files["table"]).read_text().strip() == table
    assert Path(files["chart"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_names_a_bad_benchmark_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert job_mod.main(["--benchmarks", "arith,trivia"]) == 2
    err = capsys.readouterr().err
    assert "no benchmark named 'trivia'" in err and "arith, capitals, choice" in err


def test_main_wants_ray_address_and_discovery_together(capsys: pytest.CaptureFixture[str]) -> None:
    assert job_mod.main(["--ray-address", "127.0.0.1:1"]) == 2
    assert "--ray-address" in capsys.readouterr().err


def test_main_rejects_a_bad_count() -> None:
    with pytest.raises(SystemExit) as exc:
        job_mod.main(["--seeds", "0"])
    assert exc.value.code == 2
