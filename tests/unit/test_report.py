"""agentmesh report over synthetic records: the numbers, the plots, the edge cases, the error path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agentmesh.report import (
    ReportError,
    headline,
    in_flight_series,
    key_sentence,
    load_run,
    role_stats,
    throughput_series,
    time_breakdown,
    write_report,
)
from agentmesh.report_cli import main

S = 1_000_000_000  # ns per second
T0 = 1_800_000_000 * S  # a fixed wall clock origin


def turn(role: str, start_s: float, end_s: float, prompt: int = 10, completion: int = 5) -> dict[str, Any]:
    return {
        "role": role,
        "replica_id": f"{role}-0",
        "content": "x",
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion},
        "started_unix_ns": T0 + int(start_s * S),
        "finished_unix_ns": T0 + int(end_s * S),
        "metadata": {},
    }


def record(
    task_id: str,
    admitted_s: float,
    finished_s: float,
    turns: list[dict[str, Any]],
    *,
    code: str | None = None,
) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "run_id": "r1",
        "status": "failed" if code else "done",
        "error": {"code": code, "message": f"{code} happened", "role": "student"} if code else None,
        "history": turns,
        "results": {},
        "tokens": {
            "prompt_tokens": sum(t["usage"]["prompt_tokens"] for t in turns),
            "completion_tokens": sum(t["usage"]["completion_tokens"] for t in turns),
        },
        "turns": len(turns),
        "timings": {
            "admitted_unix_ns": T0 + int(admitted_s * S),
            "finished_unix_ns": T0 + int(finished_s * S),
            "duration_s": finished_s - admitted_s,
        },
    }


def write_run(run_dir: Path, records: list[dict[str, Any]], *, summary: dict[str, Any] | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "records.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def three_tasks() -> list[dict[str, Any]]:
    # Task a: wait 1 s, teacher 3 s, wait 1 s, student 1 s, 1 s to the sink: 7 s.
    # Task b: wait 0 s, teacher 2 s, wait 0 s, student 2 s, 0 s to the sink: 4 s.
    # Task c fails in the student after 2 s of teacher; 3 s in all.
    return [
        record("a", 0, 7, [turn("teacher", 1, 4), turn("student", 5, 6)]),
        record("b", 2, 6, [turn("teacher", 2, 4), turn("student", 4, 6)]),
        record("c", 3, 6, [turn("teacher", 3, 5, 7, 3)], code="DEADLINE_EXCEEDED"),
    ]


def test_numbers_of_a_small_run(tmp_path: Path) -> None:
    data = load_run(write_run(tmp_path / "run", three_tasks()))
    assert (data.tasks, data.done, data.failed) == (3, 2, 1)
    assert data.roles == ["teacher", "student"]
    head = headline(data)
    assert head["wall_s"] == pytest.approx(7.0)
    assert head["tasks_per_s"] == pytest.approx(3 / 7)
    assert head["tokens"] == (10 + 5) * 4 + 7 + 3
    assert head["task_p50_s"] == pytest.approx(4.0)
    assert head["slowest_role"] == "teacher"  # step p50: teacher 2 s, student 1.5 s

    pieces = {p.label: p for p in time_breakdown(data)}
    total = 7 + 4 + 3
    assert sum(p.share for p in pieces.values()) == pytest.approx(1.0)
    assert pieces["teacher steps"].seconds == pytest.approx(3 + 2 + 2)
    assert pieces["student steps"].seconds == pytest.approx(1 + 2)
    assert pieces["waiting before teacher"].seconds == pytest.approx(1)
    assert pieces["waiting before student"].seconds == pytest.approx(1)
    # a: 1 s after its last step; c failed in the student 1 s after its teacher step.
    assert pieces["after the last step (to the sink)"].seconds == pytest.approx(1)
    assert pieces["in student until the task failed there"].seconds == pytest.approx(1)
    assert pieces["teacher steps"].share == pytest.approx(7 / total)

    stats = {s.role: s for s in role_stats(data)}
    assert stats["teacher"].steps == 3 and stats["teacher"].p50_s == pytest.approx(2.0)
    assert stats["student"].max_s == pytest.approx(2.0)
    assert stats["teacher"].prompt_tokens == 27

    sentence = key_sentence(data)
    assert sentence.startswith("3 tasks: 2 done, 1 failed.")
    assert "50% of task time was spent in teacher's steps" in sentence
    assert "21% in student's" in sentence
    assert "waiting between steps (queue + hop) took 14%" in sentence
    assert "7% went to steps that failed the task (not in the records), most in student (7%)" in sentence
    assert "to the sink" in sentence  # 1 s of 14: over 5%


def test_throughput_and_in_flight_series(tmp_path: Path) -> None:
    data = load_run(write_run(tmp_path / "run", three_tasks()))
    edges, done, failed = throughput_series(data)
    assert done.sum() == 2 and failed.sum() == 1
    assert edges[0] == 0 and edges[-1] == pytest.approx(7.0)
    edges, mean = in_flight_series(data, bins=7)
    # 0-1 s: a alone; 2-3 s: a and b; 3-6 s: a, b, c; 6-7 s: a.
    assert mean[0] == pytest.approx(1.0)
    assert mean[3] == pytest.approx(3.0)
    assert mean[6] == pytest.approx(1.0)
    # The area under the curve is the summed task time.
    assert float((mean * np.diff(edges)).sum()) == pytest.approx(14.0)


def test_overlapping_steps_are_counted_once(tmp_path: Path) -> None:
    # Two steps of one task run at once (a fan-out): wall time must not be counted twice.
    rec = record("p", 0, 10, [turn("left", 1, 6), turn("right", 2, 9)])
    data = load_run(write_run(tmp_path / "run", [rec]))
    pieces = {p.label: p.seconds for p in time_breakdown(data)}
    assert sum(pieces.values()) == pytest.approx(10.0)
    assert pieces["left steps"] == pytest.approx(5.0)
    assert pieces["right steps"] == pytest.approx(3.0)  # 6..9: the part the left step did not cover


def test_markdown_report_and_pngs(tmp_path: Path) -> None:
    run = write_run(
        tmp_path / "run",
        three_tasks(),
        summary={
            "run_id": "r1",
            "elapsed_s": 7.5,
            "llm": [{"model": "m", "replica": "m-0", "requests": 5, "errors": 0, "latency_mean_s": 1.5}],
        },
    )
    path = write_report(run)
    assert path == run / "report" / "report.md"
    text = path.read_text()
    assert key_sentence(load_run(run)) in text
    assert "| tasks | 3 |" in text and "| failed | 1 |" in text
    assert "| DEADLINE_EXCEEDED | 1 | DEADLINE_EXCEEDED happened |" in text
    assert "| m | m-0 | 5 | 0 |" in text
    for name in (
        "throughput.png",
        "in_flight.png",
        "step_latency.png",
        "time_by_role.png",
        "tokens_per_task.png",
        "failures.png",
    ):
        png = run / "report" / name
        assert f"]({name})" in text
        assert png.stat().st_size > 5000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_report_is_self_contained(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", three_tasks())
    assert main(["report", str(run), "--format", "html", "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.html").read_text()
    assert text.count('src="data:image/png;base64,') == 6
    assert ".png" not in text.replace("image/png", "")
    assert "<table>" in text and "3 tasks: 2 done, 1 failed." in text


def test_all_failed(tmp_path: Path) -> None:
    recs = [record(f"t{i}", i, i + 2, [turn("solo", i, i + 1)], code="LLM_ERROR") for i in range(4)]
    recs.append(record("t9", 0, 1, [], code="TIMEOUT"))
    run = write_run(tmp_path / "run", recs)
    data = load_run(run)
    assert data.failures == {"LLM_ERROR": 4, "TIMEOUT": 1}
    assert key_sentence(data).startswith("All 5 tasks failed, most with LLM_ERROR.")
    text = write_report(run).read_text()
    assert "| LLM_ERROR | 4 |" in text and "| TIMEOUT | 1 |" in text
    assert "| student | 5 |" in text  # failed in role
    _, done, failed = throughput_series(data)
    assert done.sum() == 0 and failed.sum() == 5


def test_records_without_timings(tmp_path: Path) -> None:
    old = record("old", 0, 3, [turn("teacher", 1, 2)])
    del old["timings"]
    for t in old["history"]:
        del t["started_unix_ns"], t["finished_unix_ns"]
    del old["tokens"]  # even older: tokens only in the turns' usage
    run = write_run(tmp_path / "run", [old, *three_tasks()])
    data = load_run(run)
    assert (data.tasks, data.untimed_tasks, data.untimed_steps) == (4, 1, 1)
    assert int(data.prompt_tokens.sum()) == 10 + 47
    assert sum(p.share for p in time_breakdown(data)) == pytest.approx(1.0)
    text = write_report(run).read_text()
    assert "1 of 4 records carry no task timings" in text


def test_only_untimed_records(tmp_path: Path) -> None:
    old = record("old", 0, 3, [turn("teacher", 1, 2)])
    del old["timings"]
    run = write_run(tmp_path / "run", [old])
    data = load_run(run)
    assert time_breakdown(data) == []
    assert "no breakdown" in key_sentence(data)
    text = write_report(run).read_text()
    assert "throughput.png" not in text and "tokens_per_task.png" in text
    assert not (run / "report" / "throughput.png").exists()


def test_no_records_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "empty") in err and "no records" in err
    assert "Traceback" not in err

    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err

    run = write_run(tmp_path / "run0", [])
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert str(run / "records.jsonl") in err and "no records yet" in err


def test_damaged_records_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run(tmp_path / "run", three_tasks())
    lines = (run / "records.jsonl").read_text().splitlines()
    (run / "records.jsonl").write_text("\n".join([lines[0], "{not json", lines[1]]) + "\n")
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "records.jsonl" in err
    with pytest.raises(ReportError):
        load_run(run)


def test_rerun_removes_stale_plots(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", three_tasks())
    write_report(run)
    assert (run / "report" / "failures.png").exists()
    write_run(run, three_tasks()[:2])  # the same directory, now without failures
    text = write_report(run).read_text()
    assert "No task failed." in text
    assert not (run / "report" / "failures.png").exists()


@pytest.mark.parametrize(("llm_mean_s", "said"), [(2.5, True), (1.5, False)])
def test_key_sentence_says_when_steps_are_llm_calls(tmp_path: Path, llm_mean_s: float, said: bool) -> None:
    # Step means: teacher 7/3 s, student 1.5 s; the note needs the LLM call >= 80% of each.
    summary = {"llm": [{"model": "m", "replica": "m-0", "latency_mean_s": llm_mean_s}]}
    data = load_run(write_run(tmp_path / "run", three_tasks(), summary=summary))
    assert ("(mostly LLM calls, mean 2.5 s each)" in key_sentence(data)) is said
