"""The job manager: decides which attempt runs when, hands it to Ray, and records how it ended.

One asyncio loop schedules every job: a job has at most ``concurrency`` tasks RUNNING; a task
waiting for a retry (BACKOFF) starts again once its stored due time has passed. Each attempt is a
detached, named Ray actor (:mod:`agentmesh.jobs.runner`) — Ray places it on a node with the task's
resources — and one watcher coroutine per attempt waits for its outcome, commits it to the
:class:`~agentmesh.jobs.store.JobStore`, and only then kills the actor.

Restarts lose nothing: on start the manager re-attaches (by name) to every attempt the store says
is RUNNING and waits for it like before; an attempt whose actor is gone (its node died, or the
manager died between recording the attempt and creating its actor) counts as a failed attempt and
goes through the retry rule. Actors of attempts the store has already settled (the manager died
between commit and kill) are killed. A task therefore never runs twice to completion: an attempt
is only retried after it has been recorded as failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

from agentmesh.errors import ConfigError
from agentmesh.jobs.runner import (
    NAMESPACE,
    AttemptLaunch,
    AttemptRunner,
    actor_name,
    function_argv,
    parse_actor_name,
)
from agentmesh.jobs.spec import JobSpec, TaskSpec
from agentmesh.jobs.states import RUNNING, AttemptOutcome, JobStatus
from agentmesh.jobs.store import AttemptRecord, JobStore, RunnableTask

__all__ = ["JobManager", "UnknownJob"]

log = logging.getLogger(__name__)

_WAIT_SLICE_S = 20.0  # one wait() call on an actor blocks one of its threads at most this long
_STOP_TIMEOUT_S = 15.0


class UnknownJob(KeyError):
    """No job (or task) by that name in this manager's store; ``field`` names the request field."""

    def __init__(self, message: str, *, field: str = "job_id") -> None:
        super().__init__(message)
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.args[0]}"


def _new_job_id(name: str) -> str:
    return f"{name[:48]}-{secrets.token_hex(4)}"


class JobManager:
    """Schedules jobs onto Ray and keeps their state under ``state_dir``.

    Ray must be initialised (``ray.init(address=..., namespace=...)``) before :meth:`start`.
    """

    def __init__(
        self, state_dir: str | Path, *, namespace: str = NAMESPACE, check_resources: bool = True
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(self.state_dir / "jobs.sqlite")
        self.namespace = namespace
        self.check_resources = check_resources
        self._wake = asyncio.Event()
        self._watchers: dict[tuple[str, str, int], asyncio.Task[None]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._actor_cls: Any = None
        self._cwd = os.getcwd()

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Re-attach to the attempts left running, sweep settled attempts' actors, start scheduling."""
        import ray

        running = self.store.running_attempts()
        for rec in running:
            try:
                actor = ray.get_actor(rec.actor, namespace=self.namespace)
            except ValueError:
                log.warning("attempt %s is gone (no actor): counting it as failed", rec.actor)
                self._settle(rec, self._lost(f"attempt lost: its actor {rec.actor} no longer exists"))
                continue
            self._watch(rec, actor)
        await self._sweep()
        if running:
            log.info("job manager: re-attached to %d running attempt(s)", len(self._watchers))
        self._loop_task = asyncio.create_task(self._loop(), name="job-scheduler")

    async def stop(self) -> None:
        """Stop scheduling and watching. Running attempts keep running; the next manager on the same
        state directory re-attaches to them."""
        tasks = [t for t in (self._loop_task, *self._watchers.values()) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._watchers.clear()
        self.store.close()

    async def _sweep(self) -> None:
        """Kill attempt actors of this store's jobs that the store has already settled."""
        import ray

        try:
            named = ray.util.list_named_actors(all_namespaces=True)
        except Exception as exc:  # not fatal: the leftovers only hold resources
            log.warning("job manager: cannot list named actors (%s); skipping the sweep", exc)
            return
        for entry in named:
            if entry.get("namespace") != self.namespace:
                continue
            parsed = parse_actor_name(str(entry.get("name", "")))
            if parsed is None or not self.store.has_job(parsed[0]):
                continue
            if (parsed[0], parsed[1], parsed[2]) in self._watchers:
                continue
            rec = self.store.attempt(*parsed)
            if rec is None or rec.state != RUNNING:
                with contextlib.suppress(Exception):
                    await self._release(ray.get_actor(entry["name"], namespace=self.namespace))

    # -- API ----------------------------------------------------------------------------------
    def submit(self, spec: JobSpec) -> str:
        """Accept a validated job; returns its id. ConfigError if no node could ever run a task."""
        if self.check_resources:
            self._check_feasible(spec)
        spec = spec.with_default_cwd(self._cwd)
        job_id = _new_job_id(spec.name)
        self.store.add_job(job_id, spec, time.time())
        log.info("job %s: %d task(s), concurrency %d", job_id, len(spec.tasks), spec.concurrency)
        self._wake.set()
        return job_id

    def _check_feasible(self, spec: JobSpec) -> None:
        import ray

        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        if not nodes:
            return
        for i, t in enumerate(spec.tasks):
            need = {
                "cpus": ("CPU", t.cpus),
                "gpus": ("GPU", t.gpus),
                "memory_mb": ("memory", t.memory_mb * 2**20),
            }
            if any(all(res.get(k, 0.0) >= v for k, v in need.values()) for res in nodes):
                continue
            for field, (k, v) in need.items():
                most = max(res.get(k, 0.0) for res in nodes)
                if most < v:
                    have = most / 2**20 if field == "memory_mb" else most
                    raise ConfigError(
                        f"{v / 2**20 if field == 'memory_mb' else v:g} requested, "
                        f"but no node of the cluster has more than {have:g}",
                        key=f"tasks[{i}].resources.{field}",
                    )
            raise ConfigError("no single node of the cluster has all of these", key=f"tasks[{i}].resources")

    def get(self, job_id: str) -> JobStatus:
        status = self.store.get_job(job_id)
        if status is None:
            raise UnknownJob(f"no job {job_id!r}")
        return status

    def list(self) -> list[JobStatus]:
        return self.store.list_jobs()

    async def cancel(self, job_id: str) -> JobStatus:
        """Cancel a job: the store first (so nothing more starts and no outcome is taken), then the
        attempts' processes and actors."""
        running = self.store.cancel_job(job_id, time.time())
        if running is None:
            raise UnknownJob(f"no job {job_id!r}")
        import ray

        stops = []
        for rec in running:
            watcher = self._watchers.pop((rec.job_id, rec.task, rec.attempt), None)
            if watcher is not None:
                watcher.cancel()
            with contextlib.suppress(ValueError):
                stops.append(self._release(ray.get_actor(rec.actor, namespace=self.namespace)))
        if stops:
            await asyncio.gather(*stops, return_exceptions=True)
        self._wake.set()
        return self.get(job_id)

    def attempt(self, job_id: str, task: str, attempt: int | None) -> AttemptRecord | None:
        """The attempt to read logs of; UnknownJob if the job or task does not exist."""
        if not self.store.has_job(job_id):
            raise UnknownJob(f"no job {job_id!r}")
        if self.store.task_state(job_id, task) is None:
            raise UnknownJob(f"job {job_id} has no task {task!r}", field="task")
        return self.store.attempt(job_id, task, attempt)

    # -- scheduling ---------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                self._schedule()
            except Exception:
                log.exception("job manager: scheduling pass failed")
            due = self.store.next_retry_at()
            timeout = None if due is None else max(0.0, due - time.time()) + 0.01
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=min(timeout or 5.0, 5.0))

    def _schedule(self) -> None:
        now = time.time()
        for job_id, concurrency in self.store.active_jobs():
            free = concurrency - self.store.running_count(job_id)
            for rt in self.store.runnable_tasks(job_id, now, free):
                self._launch(rt)

    def _paths(self, job_id: str, task: str, attempt: int) -> tuple[Path, Path]:
        log_path = self.state_dir / "logs" / job_id / f"{task}.{attempt}.log"
        result = self.state_dir / "results" / job_id / f"{task}.{attempt}.json"
        return log_path, result

    def _launch(self, rt: RunnableTask) -> None:
        spec = rt.spec
        rec = self.store.start_attempt(
            rt.job_id,
            spec.name,
            lambda k: (actor_name(rt.job_id, spec.name, k), str(self._paths(rt.job_id, spec.name, k)[0])),
            time.time(),
        )
        try:
            actor = self._create_actor(rec, spec)
        except Exception as exc:
            log.warning("attempt %s could not be started: %s", rec.actor, exc)
            self._settle(rec, self._lost(f"could not start the attempt: {exc}"))
            return
        self._watch(rec, actor)

    def _create_actor(self, rec: AttemptRecord, spec: TaskSpec) -> Any:
        import ray

        if self._actor_cls is None:
            self._actor_cls = ray.remote(AttemptRunner)
        log_path, result_path = self._paths(rec.job_id, rec.task, rec.attempt)
        env = {
            **spec.env,
            "AGENTMESH_JOB_ID": rec.job_id,
            "AGENTMESH_TASK_NAME": rec.task,
            "AGENTMESH_TASK_ATTEMPT": str(rec.attempt),
            "AGENTMESH_TASK_RESULT": str(result_path),
            "PYTHONUNBUFFERED": "1",  # a Python task's prints reach its log as they happen
        }
        launch = AttemptLaunch(
            job_id=rec.job_id,
            task=rec.task,
            attempt=rec.attempt,
            argv=spec.command if spec.command is not None else function_argv(spec.function or ""),
            env=env,
            cwd=spec.cwd or self._cwd,
            log_path=str(log_path),
            result_path=str(result_path),
            timeout_s=spec.timeout_s,
        )
        if spec.function is not None:
            launch.args_path = str(result_path.with_suffix(".args.json"))
            launch.args_json = json.dumps(spec.args)
            env["AGENTMESH_TASK_ARGS"] = launch.args_path
        options: dict[str, Any] = {
            "name": rec.actor,
            "namespace": self.namespace,
            "lifetime": "detached",
            "max_restarts": 0,
            "max_concurrency": 4,
            "num_cpus": spec.cpus,
            "num_gpus": spec.gpus,
        }
        if spec.memory_mb > 0:
            options["memory"] = int(spec.memory_mb * 2**20)
        return self._actor_cls.options(**options).remote(launch.to_dict())

    # -- watching -----------------------------------------------------------------------------
    def _watch(self, rec: AttemptRecord, actor: Any) -> None:
        key = (rec.job_id, rec.task, rec.attempt)
        task = asyncio.create_task(self._follow(rec, actor), name=f"watch-{rec.actor}")
        self._watchers[key] = task
        task.add_done_callback(
            lambda _t: self._watchers.pop(key, None) if self._watchers.get(key) is _t else None
        )

    async def _follow(self, rec: AttemptRecord, actor: Any) -> None:
        from ray.exceptions import ActorUnavailableError, RayActorError

        try:
            while True:
                try:
                    raw = await actor.wait.remote(_WAIT_SLICE_S)
                except ActorUnavailableError:
                    # Unreachable for now (its node is restarting its connection), not dead: a
                    # retry here could run the task twice. Ask again.
                    await asyncio.sleep(1.0)
                    continue
                if raw is not None:
                    outcome = AttemptOutcome(**raw)
                    break
        except RayActorError as exc:
            outcome = self._lost(f"attempt lost: its actor died ({_short(exc)})")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            outcome = self._lost(f"attempt lost: {type(exc).__name__}: {_short(exc)}")
        self._settle(rec, outcome)
        await self._release(actor)  # only now: the outcome is committed

    @staticmethod
    def _lost(error: str) -> AttemptOutcome:
        return AttemptOutcome(ok=False, error=error, ended_unix=time.time())

    def _settle(self, rec: AttemptRecord, outcome: AttemptOutcome) -> None:
        state = self.store.finish_attempt(rec.job_id, rec.task, rec.attempt, outcome, time.time())
        if state is not None:
            log.info("attempt %s: %s%s", rec.actor, state, f" ({outcome.error})" if outcome.error else "")
        self._wake.set()

    async def _release(self, actor: Any) -> None:
        """Stop the attempt's process group (if still there) and kill its actor."""
        import ray

        with contextlib.suppress(Exception):
            await asyncio.wait_for(actor.terminate.remote("cancelled"), timeout=_STOP_TIMEOUT_S)
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text[:limit] + ("…" if len(text) > limit else "")
