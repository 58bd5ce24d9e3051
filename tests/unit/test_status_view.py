"""agentmesh status from canned exposition text: adding up, quantiles, rates, rendering, the loop."""

from __future__ import annotations

import io
import json
import math
import os
import time
from pathlib import Path

import pytest

from agentmesh import status_view
from agentmesh.discovery.base import Endpoint
from agentmesh.discovery.memory import MemoryDiscovery
from agentmesh.report_cli import main
from agentmesh.status_view import (
    METRICS_SERVICE,
    RunInfo,
    histogram_quantile,
    parse_exposition,
    read_run_dir,
    render,
    watch,
)

RUN = "demo-1a2b3c"

DRIVER = f"""\
# HELP agentmesh_tasks_admitted_total Tasks admitted.
# TYPE agentmesh_tasks_admitted_total counter
agentmesh_tasks_admitted_total{{run="{RUN}"}} 40.0
# HELP agentmesh_tasks_in_flight Tasks in flight.
# TYPE agentmesh_tasks_in_flight gauge
agentmesh_tasks_in_flight{{run="{RUN}"}} 12.0
# HELP agentmesh_tasks_done_total Tasks done.
# TYPE agentmesh_tasks_done_total counter
agentmesh_tasks_done_total{{run="{RUN}"}} 25.0
# HELP agentmesh_tasks_failed_total Tasks failed.
# TYPE agentmesh_tasks_failed_total counter
agentmesh_tasks_failed_total{{code="DEADLINE_EXCEEDED",run="{RUN}"}} 2.0
agentmesh_tasks_failed_total{{code="LLM_ERROR",run="{RUN}"}} 1.0
"""


def replica(
    role: str, rep: str, *, queued: int, busy: int, ok: int, failed: int, tokens: int, run: str = RUN
) -> str:
    """One replica process's exposition: its role series, its LLM accounting."""
    lab = f'replica="{rep}",role="{role}",run="{run}"'
    # Step durations: `ok` observations, half below 1 s, the rest in (1, 2].
    below = ok // 2
    return f"""\
# HELP agentmesh_inbox_tasks Inbox.
# TYPE agentmesh_inbox_tasks gauge
agentmesh_inbox_tasks{{{lab}}} {queued}.0
# HELP agentmesh_steps_in_progress In progress.
# TYPE agentmesh_steps_in_progress gauge
agentmesh_steps_in_progress{{{lab}}} {busy}.0
# HELP agentmesh_steps_total Steps.
# TYPE agentmesh_steps_total counter
agentmesh_steps_total{{outcome="ok",{lab}}} {ok}.0
agentmesh_steps_total{{outcome="failed",{lab}}} {failed}.0
# HELP agentmesh_step_retries_total Retries.
# TYPE agentmesh_step_retries_total counter
agentmesh_step_retries_total{{{lab}}} 1.0
# HELP agentmesh_step_duration_seconds Step duration.
# TYPE agentmesh_step_duration_seconds histogram
agentmesh_step_duration_seconds_bucket{{le="1.0",{lab}}} {below}.0
agentmesh_step_duration_seconds_bucket{{le="2.0",{lab}}} {ok}.0
agentmesh_step_duration_seconds_bucket{{le="+Inf",{lab}}} {ok}.0
agentmesh_step_duration_seconds_count{{{lab}}} {ok}.0
agentmesh_step_duration_seconds_sum{{{lab}}} {ok * 1.2}
# HELP agentmesh_role_tokens_total Tokens.
# TYPE agentmesh_role_tokens_total counter
agentmesh_role_tokens_total{{kind="prompt",{lab}}} {tokens}.0
agentmesh_role_tokens_total{{kind="completion",{lab}}} {tokens}.0
# HELP agentmesh_llm_requests_total LLM requests.
# TYPE agentmesh_llm_requests_total counter
agentmesh_llm_requests_total{{model="tiny",replica="tiny-0"}} {ok}.0
# HELP agentmesh_llm_errors_total LLM errors.
# TYPE agentmesh_llm_errors_total counter
agentmesh_llm_errors_total{{kind="timeout",model="tiny",replica="tiny-0"}} {failed}.0
# HELP agentmesh_llm_tokens_total LLM tokens.
# TYPE agentmesh_llm_tokens_total counter
agentmesh_llm_tokens_total{{kind="prompt",model="tiny",replica="tiny-0"}} {tokens}.0
agentmesh_llm_tokens_total{{kind="completion",model="tiny",replica="tiny-0"}} {tokens}.0
# HELP agentmesh_llm_latency_seconds LLM latency.
# TYPE agentmesh_llm_latency_seconds histogram
agentmesh_llm_latency_seconds_bucket{{le="0.5",model="tiny",replica="tiny-0"}} {ok}.0
agentmesh_llm_latency_seconds_bucket{{le="+Inf",model="tiny",replica="tiny-0"}} {ok}.0
agentmesh_llm_latency_seconds_count{{model="tiny",replica="tiny-0"}} {ok}.0
agentmesh_llm_latency_seconds_sum{{model="tiny",replica="tiny-0"}} 1.0
"""


def texts(scale: int = 1) -> list[str]:
    return [
        DRIVER,
        replica("teacher", "teacher-0", queued=3, busy=4, ok=10 * scale, failed=1, tokens=100 * scale),
        replica("teacher", "teacher-1", queued=2, busy=4, ok=10 * scale, failed=0, tokens=300 * scale),
        replica("student", "student-0", queued=0, busy=1, ok=8 * scale, failed=0, tokens=50 * scale),
        # Another run's replica in a shared process: ignored, except its (unlabelled) LLM series.
        replica("teacher", "teacher-9", queued=99, busy=99, ok=0, failed=0, tokens=0, run="other"),
    ]


def test_histogram_quantile() -> None:
    assert math.isnan(histogram_quantile(0.5, {}))
    assert math.isnan(histogram_quantile(0.5, {1.0: 0, math.inf: 0}))
    assert histogram_quantile(0.5, {1.0: 10, 2.0: 20, math.inf: 20}) == pytest.approx(1.0)
    assert histogram_quantile(0.75, {1.0: 10, 2.0: 20, math.inf: 20}) == pytest.approx(1.5)
    assert histogram_quantile(0.25, {1.0: 10, 2.0: 20, math.inf: 20}) == pytest.approx(0.5)
    # Beyond the last finite bound: that bound (Prometheus does the same).
    assert histogram_quantile(0.9, {1.0: 1, math.inf: 10}) == pytest.approx(1.0)


def test_parse_adds_up_replicas_and_ignores_other_runs() -> None:
    snap = parse_exposition(texts(), RUN, taken_unix=1000.0)
    assert snap.scraped == 5
    assert (snap.admitted, snap.in_flight, snap.done, snap.failed) == (40, 12, 25, 3)
    assert dict(snap.failed_by_code) == {"DEADLINE_EXCEEDED": 2, "LLM_ERROR": 1}
    teacher = snap.roles["teacher"]
    assert teacher.replicas == {"teacher-0", "teacher-1"}
    assert (teacher.queued, teacher.in_progress, teacher.steps_ok, teacher.steps_failed) == (5, 8, 20, 1)
    assert teacher.retries == 2 and teacher.tokens == 800
    assert teacher.step_p50_s == pytest.approx(1.0)  # 10 of 20 at or below 1 s
    assert snap.roles["student"].replicas == {"student-0"}
    assert set(snap.roles) == {"teacher", "student"}
    tiny = snap.llms["tiny"]
    assert tiny.replicas == {"tiny-0"}
    assert (tiny.requests, tiny.errors, tiny.tokens) == (28, 1, 2 * 450)
    assert tiny.latency_p50_s == pytest.approx(0.25)


def test_render_rates_between_refreshes() -> None:
    before = parse_exposition(texts(1), RUN, taken_unix=1000.0)
    after = parse_exposition(texts(2), RUN, taken_unix=1002.0)
    text = render(after, before, role_order=("student", "teacher"))
    lines = text.splitlines()
    assert "rates over the last 2.0s" in lines[0]
    assert lines[1] == (
        "tasks: admitted 40  in flight 12  done 25  failed 3 (DEADLINE_EXCEEDED 2, LLM_ERROR 1)  tasks/s 0.00"
    )
    header = next(i for i, line in enumerate(lines) if line.startswith("ROLE"))
    # The config's role order, not alphabetical.
    assert lines[header + 1].split()[0] == "student" and lines[header + 2].split()[0] == "teacher"
    teacher = lines[header + 2].split()
    # teacher: replicas 2, in progress 8, queued 5, steps done 40, failed 1, retries 2, p50, tok/s
    assert teacher[1:7] == ["2", "8", "5", "40", "1", "2"]
    assert teacher[8] == "400.0"  # (1600 - 800) tokens over 2 s
    llm = next(line for line in lines if line.startswith("tiny")).split()
    # replicas 1, requests 56, req/s 14.0, tok/s 450.0, errors 1, p50 250ms
    assert llm[1:] == ["1", "56", "14.0", "450.0", "1", "250ms"]


def test_render_first_snapshot_averages_since_start() -> None:
    snap = parse_exposition(texts(), RUN, taken_unix=1010.0)
    info = RunInfo(run_id=RUN, discovery_url="memory://", name="demo", started_unix=1000.0)
    text = render(snap, info=info)
    assert "demo run demo-1a2b3c" in text and "average since the run started" in text
    assert "tasks/s 2.80" in text  # 28 finished in 10 s
    student = next(line for line in text.splitlines() if line.startswith("student")).split()
    assert student[-1] == "10.0"  # 100 tokens in 10 s
    # Without a start time: no rates yet.
    text = render(snap)
    assert "after the next refresh" in text
    assert next(line for line in text.splitlines() if line.startswith("student")).split()[-1] == "-"


def test_render_without_driver_and_with_unreachable() -> None:
    snap = parse_exposition(texts()[1:2], RUN, taken_unix=1.0)
    snap.endpoints = 2
    snap.errors = {"127.0.0.1:9": "connection refused"}
    text = render(snap)
    assert "1/2 endpoints" in text
    assert "the driver's endpoint was not scraped" in text
    assert text.rstrip().endswith("unreachable: 127.0.0.1:9 (connection refused)")


def write_run_json(run_dir: Path, **extra: object) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "run_id": RUN,
        "name": "demo",
        "discovery_url": "memory://",
        "pid": os.getpid(),
        "started_unix": time.time() - 10,
        "config": {"roles": {"teacher": {}, "student": {}}},
        **extra,
    }
    (run_dir / "run.json").write_text(json.dumps(doc))
    return run_dir


def test_read_run_dir(tmp_path: Path) -> None:
    info = read_run_dir(write_run_json(tmp_path / "run"))
    assert (info.run_id, info.discovery_url, info.roles) == (RUN, "memory://", ("teacher", "student"))
    assert info.process_alive() is True
    assert info.summary() is None
    with pytest.raises(status_view.StatusError, match=r"run\.json: not found"):
        read_run_dir(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "run.json").write_text('{"run_id": "x"}')
    with pytest.raises(status_view.StatusError, match="'discovery_url' is missing"):
        read_run_dir(tmp_path / "bad")


async def registered(*endpoints: tuple[str, str, dict[str, str]]) -> MemoryDiscovery:
    disc = MemoryDiscovery()
    for ep_id, address, meta in endpoints:
        await disc.register(Endpoint(METRICS_SERVICE, ep_id, address, meta))
    return disc


async def test_watch_once_scrapes_the_runs_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    canned = dict(zip(["d:1", "t0:1", "t1:1", "s0:1"], texts()[:4], strict=True))
    asked: list[list[str]] = []

    async def fake_scrape(addresses: list[str], **_: object) -> dict[str, str | Exception]:
        asked.append(list(addresses))
        return {a: canned.get(a, ConnectionRefusedError("refused")) for a in addresses}

    monkeypatch.setattr(status_view, "scrape", fake_scrape)
    disc = await registered(
        ("driver", "d:1", {"job": "driver", "run": RUN}),
        ("t0", "t0:1", {"job": "agent", "run": RUN, "role": "teacher"}),
        ("t0-again", "t0:1", {"job": "agent", "run": RUN, "role": "teacher", "x": "1"}),  # same process
        ("t1", "t1:1", {"job": "agent", "run": RUN}),
        ("s0", "s0:1", {"job": "agent", "run": RUN}),
        ("dead", "dead:1", {"job": "agent", "run": RUN}),
        ("other", "o:1", {"job": "agent", "run": "another-run"}),
    )
    out = io.StringIO()
    info = RunInfo(run_id=RUN, discovery_url="memory://", started_unix=time.time() - 5)
    assert await watch(info, once=True, out=out, discovery=disc) == 0
    assert sorted(asked[0]) == ["d:1", "dead:1", "s0:1", "t0:1", "t1:1"]  # one per address, this run only
    text = out.getvalue()
    assert "4/5 endpoints" in text and "unreachable: dead:1 (refused)" in text
    assert "\x1b[" not in text  # not a terminal: no escape codes
    assert "done 25" in text


async def test_watch_refreshes_until_the_run_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = write_run_json(tmp_path / "run")
    info = read_run_dir(run_dir)
    disc = await registered(("driver", "d:1", {"job": "driver", "run": RUN}))
    scrapes = 0

    async def fake_scrape(addresses: list[str], **_: object) -> dict[str, str | Exception]:
        nonlocal scrapes
        scrapes += 1
        if scrapes == 2:  # the run ends: endpoint withdrawn, summary written after run.json
            disc.kill(METRICS_SERVICE, "driver")
            (run_dir / "summary.json").write_text(
                json.dumps(
                    {"tasks": 40, "done": 38, "failed": 2, "failures_by_code": {"X": 2}, "elapsed_s": 75}
                )
            )
            future = time.time() + 5
            os.utime(run_dir / "summary.json", (future, future))
        return {a: DRIVER for a in addresses}

    monkeypatch.setattr(status_view, "scrape", fake_scrape)
    out = io.StringIO()
    assert await watch(info, interval_s=0.01, out=out, discovery=disc) == 0
    text = out.getvalue()
    assert text.count("agentmesh status: demo run") == 2  # two refreshes, as plain blocks
    assert "has finished" in text and "tasks 40: done 38, failed 2 (X 2) in 1m15s" in text


async def test_watch_no_endpoints(tmp_path: Path) -> None:
    out = io.StringIO()
    info = RunInfo(run_id=RUN, discovery_url="memory://")
    disc = await registered(("other", "o:1", {"job": "agent", "run": "another-run"}))
    assert await watch(info, once=True, out=out, discovery=disc) == 1
    assert "no /metrics endpoints of run 'demo-1a2b3c'" in out.getvalue()


async def test_finished_run_prints_its_summary(tmp_path: Path) -> None:
    run_dir = write_run_json(tmp_path / "run")
    (run_dir / "summary.json").write_text(json.dumps({"tasks": 3, "done": 3, "failed": 0, "elapsed_s": 2.5}))
    out = io.StringIO()
    assert await watch(read_run_dir(run_dir), once=True, out=out, discovery=await registered()) == 0
    assert "has finished" in out.getvalue() and "tasks 3: done 3, failed 0 in 2.5s" in out.getvalue()
    # A summary older than run.json belongs to an earlier run that this one resumes: not finished.
    old = time.time() - 100
    os.utime(run_dir / "summary.json", (old, old))
    out = io.StringIO()
    assert await watch(read_run_dir(run_dir), once=True, out=out, discovery=await registered()) == 1


def test_cli_argument_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status"]) == 2
    assert "give RUN_DIR, or --discovery URL and --run RUN_ID" in capsys.readouterr().err
    assert main(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "run.json") in err
    assert main(["status", "--discovery", "bogus", "--run", "x", "--once"]) == 1
    err = capsys.readouterr().err
    assert "bad discovery url" in err and "Traceback" not in err
    assert main(["status", "--discovery", "memory://", "--run", "x", "--interval", "0"]) == 2


class LateDiscovery(MemoryDiscovery):
    """Registers the driver's endpoint only at the third look, as a starting run would."""

    def __init__(self) -> None:
        super().__init__()
        self.looks = 0

    async def snapshot(self, service: str) -> list[Endpoint]:
        self.looks += 1
        if self.looks == 3:
            await self.register(Endpoint(METRICS_SERVICE, "driver", "d:1", {"job": "driver", "run": RUN}))
        return await super().snapshot(service)


async def test_watch_waits_for_a_starting_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = write_run_json(tmp_path / "run")

    async def fake_scrape(addresses: list[str], **_: object) -> dict[str, str | Exception]:
        (run_dir / "summary.json").write_text(json.dumps({"tasks": 1, "done": 1, "failed": 0}))
        future = time.time() + 5
        os.utime(run_dir / "summary.json", (future, future))
        disc.kill(METRICS_SERVICE, "driver")
        return {a: DRIVER for a in addresses}

    monkeypatch.setattr(status_view, "scrape", fake_scrape)
    disc = LateDiscovery()
    out = io.StringIO()
    assert await watch(read_run_dir(run_dir), interval_s=0.01, out=out, discovery=disc) == 0
    lines = out.getvalue().splitlines()
    assert lines[0] == "agentmesh status: waiting for the run's /metrics endpoints"  # said once
    assert lines[1].startswith("agentmesh status: demo run demo-1a2b3c")
    assert "has finished" in out.getvalue()
    assert disc.looks == 4

    # Past the startup wait (or with --once), no endpoints is an answer, not a wait.
    out = io.StringIO()
    code = await watch(
        read_run_dir(write_run_json(tmp_path / "r2")), out=out, discovery=MemoryDiscovery(), startup_wait_s=0
    )
    assert code == 1 and "no /metrics endpoints" in out.getvalue()
