"""The job manager's state: one SQLite file (WAL) under the state directory.

Jobs, their tasks and every attempt of every task live here, and every state change is one
transaction: the store is the single source of truth, and a manager started on the same
directory after a crash (even SIGKILL) reads back exactly what had been decided. The manager
commits an attempt's outcome here *before* it lets go of the attempt's Ray actor, so an outcome
is never lost between the two.

The retry rule lives in :meth:`JobStore.finish_attempt` (inside the transaction that records the
outcome), so whether a failed attempt is retried is decided exactly once.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from agentmesh.jobs.spec import JobSpec, TaskSpec
from agentmesh.jobs.states import (
    BACKOFF,
    CANCELLED,
    FAILED,
    PENDING,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    AttemptOutcome,
    JobStatus,
    TaskStatus,
    backoff_delay,
    derive_job_state,
)

__all__ = ["AttemptRecord", "JobStore", "RunnableTask"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    name TEXT NOT NULL,
    concurrency INTEGER NOT NULL,
    state TEXT NOT NULL,
    cancelled INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL NOT NULL DEFAULT 0,
    ended REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS tasks (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    retry_at REAL NOT NULL DEFAULT 0,
    exit_code INTEGER,
    error TEXT NOT NULL DEFAULT '',
    result TEXT,
    started REAL NOT NULL DEFAULT 0,
    ended REAL NOT NULL DEFAULT 0,
    node TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, name)
);
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (job_id, state, idx);
CREATE TABLE IF NOT EXISTS attempts (
    job_id TEXT NOT NULL,
    task TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    actor TEXT NOT NULL,
    state TEXT NOT NULL,
    log_path TEXT NOT NULL,
    started REAL NOT NULL,
    ended REAL NOT NULL DEFAULT 0,
    exit_code INTEGER,
    error TEXT NOT NULL DEFAULT '',
    result TEXT,
    node TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, task, attempt)
);
CREATE INDEX IF NOT EXISTS attempts_by_state ON attempts (state);
"""


@dataclass(frozen=True)
class AttemptRecord:
    """One attempt as stored: enough to re-attach to its actor or to read its log."""

    job_id: str
    task: str
    attempt: int
    actor: str
    state: str
    log_path: str


@dataclass(frozen=True)
class RunnableTask:
    """A task that may start an attempt now, with the number of attempts it already had."""

    job_id: str
    spec: TaskSpec
    attempts: int


class JobStore:
    """Jobs, tasks and attempts in SQLite. Methods are short transactions; safe from one process
    (the manager) with any number of threads (a lock serialises them)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed outcome must survive the machine, not only the process.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- jobs ----------------------------------------------------------------------------------
    def add_job(self, job_id: str, spec: JobSpec, now: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (id, name, concurrency, state, created) VALUES (?, ?, ?, ?, ?)",
                (job_id, spec.name, spec.concurrency, PENDING, now),
            )
            db.executemany(
                "INSERT INTO tasks (job_id, idx, name, spec, state) VALUES (?, ?, ?, ?, ?)",
                [(job_id, i, t.name, json.dumps(t.to_dict()), PENDING) for i, t in enumerate(spec.tasks)],
            )

    def has_job(self, job_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is not None

    def get_job(self, job_id: str, *, with_tasks: bool = True) -> JobStatus | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            status = self._job_status(row)
            if with_tasks:
                rows = self._db.execute(
                    "SELECT * FROM tasks WHERE job_id = ? ORDER BY idx", (job_id,)
                ).fetchall()
                status.tasks = [self._task_status(r) for r in rows]
            return status

    def list_jobs(self) -> list[JobStatus]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY seq DESC").fetchall()
            return [self._job_status(r) for r in rows]

    def active_jobs(self) -> list[tuple[str, int]]:
        """``(job id, concurrency)`` of every job that has not ended, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, concurrency FROM jobs WHERE state IN (?, ?) ORDER BY seq", (PENDING, RUNNING)
            ).fetchall()
            return [(r["id"], r["concurrency"]) for r in rows]

    def _job_status(self, row: sqlite3.Row) -> JobStatus:
        counts = {
            r["state"]: r["n"]
            for r in self._db.execute(
                "SELECT state, COUNT(*) AS n FROM tasks WHERE job_id = ? GROUP BY state", (row["id"],)
            )
        }
        return JobStatus(
            job_id=row["id"],
            name=row["name"],
            state=row["state"],
            created_unix=row["created"],
            started_unix=row["started"],
            ended_unix=row["ended"],
            concurrency=row["concurrency"],
            task_counts=counts,
        )

    @staticmethod
    def _task_status(row: sqlite3.Row) -> TaskStatus:
        return TaskStatus(
            name=row["name"],
            state=row["state"],
            attempts=row["attempts"],
            exit_code=row["exit_code"],
            error=row["error"],
            result=json.loads(row["result"]) if row["result"] is not None else None,
            started_unix=row["started"],
            ended_unix=row["ended"],
            node=row["node"],
            retry_at_unix=row["retry_at"] if row["state"] == BACKOFF else 0.0,
        )

    def _update_job_state(self, db: sqlite3.Connection, job_id: str, now: float) -> str:
        job = db.execute("SELECT state, cancelled, started FROM jobs WHERE id = ?", (job_id,)).fetchone()
        states = [r[0] for r in db.execute("SELECT state FROM tasks WHERE job_id = ?", (job_id,))]
        state = derive_job_state(states, cancelled=bool(job["cancelled"]))
        if state != job["state"]:
            db.execute(
                "UPDATE jobs SET state = ?, ended = ? WHERE id = ?",
                (state, now if state in TERMINAL else 0.0, job_id),
            )
        return state

    # -- tasks and attempts --------------------------------------------------------------------
    def running_count(self, job_id: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM tasks WHERE job_id = ? AND state = ?", (job_id, RUNNING)
            ).fetchone()
            return int(row[0])

    def runnable_tasks(self, job_id: str, now: float, limit: int) -> list[RunnableTask]:
        """Up to ``limit`` tasks of the job that may start now (pending, or backoff that is due)."""
        if limit <= 0:
            return []
        with self._lock:
            rows = self._db.execute(
                "SELECT spec, attempts FROM tasks WHERE job_id = ? AND "
                "(state = ? OR (state = ? AND retry_at <= ?)) ORDER BY idx LIMIT ?",
                (job_id, PENDING, BACKOFF, now, limit),
            ).fetchall()
            return [RunnableTask(job_id, TaskSpec.from_dict(json.loads(r[0])), r[1]) for r in rows]

    def next_retry_at(self) -> float | None:
        """The earliest time a task in backoff becomes due (None if none is waiting)."""
        with self._lock:
            row = self._db.execute("SELECT MIN(retry_at) FROM tasks WHERE state = ?", (BACKOFF,)).fetchone()
            return float(row[0]) if row[0] is not None else None

    def start_attempt(
        self, job_id: str, task: str, names: Callable[[int], tuple[str, str]], now: float
    ) -> AttemptRecord:
        """Record a new RUNNING attempt of a runnable (pending or due) task and return it.

        ``names(attempt)`` gives the attempt's actor name and log path from its number (1-based).
        """
        with self._tx() as db:
            row = db.execute(
                "SELECT state, attempts FROM tasks WHERE job_id = ? AND name = ?", (job_id, task)
            ).fetchone()
            if row is None or row["state"] not in (PENDING, BACKOFF):
                raise ValueError(f"task {job_id}/{task} cannot start an attempt in state {row and row[0]}")
            attempt = row["attempts"] + 1
            actor, log_path = names(attempt)
            db.execute(
                "INSERT INTO attempts (job_id, task, attempt, actor, state, log_path, started) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, task, attempt, actor, RUNNING, log_path, now),
            )
            db.execute(
                "UPDATE tasks SET state = ?, attempts = ?, started = ?, retry_at = 0 "
                "WHERE job_id = ? AND name = ?",
                (RUNNING, attempt, now, job_id, task),
            )
            db.execute("UPDATE jobs SET started = ? WHERE id = ? AND started = 0", (now, job_id))
            self._update_job_state(db, job_id, now)
            return AttemptRecord(job_id, task, attempt, actor, RUNNING, log_path)

    def finish_attempt(
        self, job_id: str, task: str, attempt: int, outcome: AttemptOutcome, now: float
    ) -> str | None:
        """Record how a RUNNING attempt ended and move its task on: SUCCEEDED, BACKOFF (a retry is
        left; its due time is stored) or FAILED. Returns the task's new state, or None when the
        attempt was no longer running (the job was cancelled meanwhile): nothing changes then."""
        with self._tx() as db:
            row = db.execute(
                "SELECT state FROM attempts WHERE job_id = ? AND task = ? AND attempt = ?",
                (job_id, task, attempt),
            ).fetchone()
            if row is None or row["state"] != RUNNING:
                return None
            row = db.execute(
                "SELECT spec FROM tasks WHERE job_id = ? AND name = ?", (job_id, task)
            ).fetchone()
            spec = TaskSpec.from_dict(json.loads(row[0]))
            ended = outcome.ended_unix or now
            db.execute(
                "UPDATE attempts SET state = ?, ended = ?, exit_code = ?, error = ?, result = ?, node = ?, "
                "started = CASE WHEN ? > 0 THEN ? ELSE started END "
                "WHERE job_id = ? AND task = ? AND attempt = ?",
                (
                    SUCCEEDED if outcome.ok else FAILED,
                    ended,
                    outcome.exit_code,
                    outcome.error,
                    outcome.result_json,
                    outcome.node,
                    outcome.started_unix,
                    outcome.started_unix,
                    job_id,
                    task,
                    attempt,
                ),
            )
            retry_at = 0.0
            if outcome.ok:
                state = SUCCEEDED
            elif attempt <= spec.retries:
                state = BACKOFF
                retry_at = now + backoff_delay(attempt, spec.backoff_s, spec.backoff_max_s)
            else:
                state = FAILED
            db.execute(
                "UPDATE tasks SET state = ?, retry_at = ?, exit_code = ?, error = ?, result = ?, node = ?, "
                "ended = ?, started = CASE WHEN ? > 0 THEN ? ELSE started END "
                "WHERE job_id = ? AND name = ?",
                (
                    state,
                    retry_at,
                    outcome.exit_code,
                    outcome.error,
                    outcome.result_json,
                    outcome.node,
                    ended if state in TERMINAL else 0.0,
                    outcome.started_unix,
                    outcome.started_unix,
                    job_id,
                    task,
                ),
            )
            self._update_job_state(db, job_id, now)
            return state

    def cancel_job(self, job_id: str, now: float) -> list[AttemptRecord] | None:
        """Mark the job CANCELLED, its running attempts and unfinished tasks too; returns the
        attempts that were running (their actors are to be stopped), None if there is no such job.
        A job that has already ended is left as it is (and nothing is returned to stop)."""
        with self._tx() as db:
            job = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if job is None:
                return None
            if job["state"] in TERMINAL:
                return []
            running = [
                self._attempt(r)
                for r in db.execute(
                    "SELECT * FROM attempts WHERE job_id = ? AND state = ?", (job_id, RUNNING)
                )
            ]
            db.execute(
                "UPDATE attempts SET state = ?, ended = ?, error = 'cancelled' "
                "WHERE job_id = ? AND state = ?",
                (CANCELLED, now, job_id, RUNNING),
            )
            db.execute(
                "UPDATE tasks SET state = ?, ended = ?, retry_at = 0 WHERE job_id = ? AND state IN (?, ?, ?)",
                (CANCELLED, now, job_id, PENDING, RUNNING, BACKOFF),
            )
            db.execute("UPDATE jobs SET cancelled = 1 WHERE id = ?", (job_id,))
            self._update_job_state(db, job_id, now)
            return running

    @staticmethod
    def _attempt(row: sqlite3.Row) -> AttemptRecord:
        return AttemptRecord(
            job_id=row["job_id"],
            task=row["task"],
            attempt=row["attempt"],
            actor=row["actor"],
            state=row["state"],
            log_path=row["log_path"],
        )

    def running_attempts(self) -> list[AttemptRecord]:
        """Every attempt recorded as RUNNING (after a restart: the ones to re-attach to)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM attempts WHERE state = ? ORDER BY started", (RUNNING,)
            ).fetchall()
            return [self._attempt(r) for r in rows]

    def attempt(self, job_id: str, task: str, attempt: int | None = None) -> AttemptRecord | None:
        """Attempt ``attempt`` of the task, or its latest one; None if there is none (yet)."""
        with self._lock:
            if attempt:
                row = self._db.execute(
                    "SELECT * FROM attempts WHERE job_id = ? AND task = ? AND attempt = ?",
                    (job_id, task, attempt),
                ).fetchone()
            else:
                row = self._db.execute(
                    "SELECT * FROM attempts WHERE job_id = ? AND task = ? ORDER BY attempt DESC LIMIT 1",
                    (job_id, task),
                ).fetchone()
            return self._attempt(row) if row else None

    def task_state(self, job_id: str, task: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT state FROM tasks WHERE job_id = ? AND name = ?", (job_id, task)
            ).fetchone()
            return str(row[0]) if row else None
