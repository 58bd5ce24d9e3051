"""The job store and the rules it applies: backoff schedule, retry decisions, job-state derivation,
cancellation, and that all of it survives reopening the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentmesh.jobs.spec import parse_job_spec
from agentmesh.jobs.states import AttemptOutcome, backoff_delay, derive_job_state
from agentmesh.jobs.store import JobStore


def test_backoff_schedule_doubles_and_caps() -> None:
    assert [backoff_delay(k, 1.0, 60.0) for k in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff_delay(1, 0.25, 60.0) == 0.25
    assert backoff_delay(3, 0.25, 0.6) == 0.6
    assert backoff_delay(0, 1.0, 60.0) == 0.0
    assert backoff_delay(10_000, 1.0, 60.0) == 60.0  # no overflow


@pytest.mark.parametrize(
    ("states", "cancelled", "expected"),
    [
        (["PENDING", "PENDING"], False, "PENDING"),
        (["RUNNING", "PENDING"], False, "RUNNING"),
        (["SUCCEEDED", "PENDING"], False, "RUNNING"),
        (["BACKOFF", "SUCCEEDED"], False, "RUNNING"),
        (["SUCCEEDED", "SUCCEEDED"], False, "SUCCEEDED"),
        (["SUCCEEDED", "FAILED"], False, "FAILED"),
        (["FAILED", "RUNNING"], False, "RUNNING"),
        (["SUCCEEDED", "CANCELLED"], False, "FAILED"),
        (["RUNNING"], True, "CANCELLED"),
    ],
)
def test_job_state_from_task_states(states: list[str], cancelled: bool, expected: str) -> None:
    assert derive_job_state(states, cancelled=cancelled) == expected


def _names(job: str, task: str):  # type: ignore[no-untyped-def]
    return lambda k: (f"job:{job}:{task}:{k}", f"/logs/{task}.{k}.log")


def _spec():  # type: ignore[no-untyped-def]
    return parse_job_spec(
        {
            "name": "j",
            "concurrency": 2,
            "retries": 2,
            "backoff_s": 1.0,
            "tasks": [
                {"name": "a", "command": "true"},
                {"name": "b", "command": "false"},
                {"name": "c", "command": "true", "retries": 0},
            ],
        }
    )


def test_attempts_retries_and_job_state(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    store.add_job("j-1", _spec(), now=100.0)
    assert store.get_job("j-1").state == "PENDING"  # type: ignore[union-attr]
    runnable = store.runnable_tasks("j-1", 100.0, 2)
    assert [r.spec.name for r in runnable] == ["a", "b"]
    ra = store.start_attempt("j-1", "a", _names("j-1", "a"), 101.0)
    rb = store.start_attempt("j-1", "b", _names("j-1", "b"), 101.0)
    assert (ra.attempt, ra.actor, ra.log_path) == (1, "job:j-1:a:1", "/logs/a.1.log")
    assert store.running_count("j-1") == 2
    assert store.get_job("j-1").state == "RUNNING"  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        store.start_attempt("j-1", "a", _names("j-1", "a"), 101.0)  # already running

    ok = AttemptOutcome(
        ok=True, exit_code=0, result_json='{"v": 1}', started_unix=101.5, ended_unix=102.0, node="n"
    )
    assert store.finish_attempt("j-1", "a", 1, ok, 102.0) == "SUCCEEDED"
    assert store.finish_attempt("j-1", "a", 1, ok, 102.0) is None  # settled once only
    bad = AttemptOutcome(ok=False, exit_code=1, error="exit code 1: boom", ended_unix=102.0)
    assert store.finish_attempt("j-1", "b", 1, bad, 102.0) == "BACKOFF"
    t = store.get_job("j-1").task("b")  # type: ignore[union-attr]
    assert (t.state, t.retry_at_unix, t.exit_code, t.error) == ("BACKOFF", 103.0, 1, "exit code 1: boom")
    assert store.next_retry_at() == 103.0
    # not due yet: only c may start; at 103 b is due again
    assert [r.spec.name for r in store.runnable_tasks("j-1", 102.5, 5)] == ["c"]
    assert [r.spec.name for r in store.runnable_tasks("j-1", 103.0, 5)] == ["b", "c"]
    rb2 = store.start_attempt("j-1", "b", _names("j-1", "b"), 103.0)
    assert rb2.attempt == 2
    assert store.finish_attempt("j-1", "b", 2, bad, 104.0) == "BACKOFF"
    assert store.get_job("j-1").task("b").retry_at_unix == 106.0  # type: ignore[union-attr]  # 1 * 2**1
    store.start_attempt("j-1", "b", _names("j-1", "b"), 106.0)
    assert store.finish_attempt("j-1", "b", 3, bad, 107.0) == "FAILED"  # 1 try + 2 retries
    store.start_attempt("j-1", "c", _names("j-1", "c"), 107.0)
    assert store.get_job("j-1").state == "RUNNING"  # type: ignore[union-attr]
    store.finish_attempt("j-1", "c", 1, ok, 108.0)
    job = store.get_job("j-1")
    assert job is not None and job.state == "FAILED" and job.ended_unix == 108.0
    assert job.task_counts == {"SUCCEEDED": 2, "FAILED": 1}
    a = job.task("a")
    assert (a.result, a.started_unix, a.ended_unix, a.node, a.attempts) == ({"v": 1}, 101.5, 102.0, "n", 1)
    assert ra.attempt == 1 and rb.attempt == 1
    store.close()


def test_state_survives_reopening(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    store.add_job("j-1", _spec(), now=1.0)
    store.start_attempt("j-1", "a", _names("j-1", "a"), 2.0)
    store.close()  # as good as a crash: every method commits before returning
    again = JobStore(tmp_path / "jobs.sqlite")
    running = again.running_attempts()
    assert [(r.task, r.attempt, r.actor) for r in running] == [("a", 1, "job:j-1:a:1")]
    assert again.active_jobs() == [("j-1", 2)]
    assert again.attempt("j-1", "a") == running[0]
    assert again.attempt("j-1", "b") is None
    again.close()


def test_cancel_settles_everything_unfinished(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    store.add_job("j-1", _spec(), now=1.0)
    store.start_attempt("j-1", "a", _names("j-1", "a"), 2.0)
    running = store.cancel_job("j-1", 3.0)
    assert running is not None and [r.actor for r in running] == ["job:j-1:a:1"]
    job = store.get_job("j-1")
    assert job is not None and job.state == "CANCELLED"
    assert {t.state for t in job.tasks} == {"CANCELLED"}
    # an outcome arriving after the cancel changes nothing
    assert store.finish_attempt("j-1", "a", 1, AttemptOutcome(ok=True, exit_code=0), 4.0) is None
    assert store.get_job("j-1").task("a").state == "CANCELLED"  # type: ignore[union-attr]
    assert store.runnable_tasks("j-1", 10.0, 5) == []
    assert store.cancel_job("j-1", 5.0) == []  # already ended: nothing to stop
    assert store.cancel_job("nope", 5.0) is None
    store.close()


def test_listing_is_newest_first(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    store.add_job("j-1", _spec(), now=1.0)
    store.add_job("j-2", _spec(), now=2.0)
    assert [j.job_id for j in store.list_jobs()] == ["j-2", "j-1"]
    assert store.list_jobs()[0].task_counts == {"PENDING": 3}
    assert store.get_job("missing") is None
    store.close()
