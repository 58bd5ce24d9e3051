"""Checkpoint evaluation as a job: N checkpoints x M benchmarks x S seeds, at most C at once.

:func:`make_checkpoints` makes the local stand-ins for checkpoints (hard-linked copies of the
bundled SmolLM2-135M-Instruct folder, each under its own name), :func:`build_job_spec` the job spec
(one function task :func:`~agentmesh.pipelines.checkpoint_eval.task.evaluate` per checkpoint,
benchmark and seed), :func:`run_checkpoint_eval` submits it to the cluster's job manager, reports
progress while it runs, and aggregates the tasks' accuracies into mean ± standard error per
checkpoint and benchmark (:mod:`.aggregate`), written out by :mod:`.report`. :func:`main` is the
command line (``python -m agentmesh.pipelines.checkpoint_eval``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agentmesh.errors import AgentMeshError, ConfigError
from agentmesh.jobs.states import TERMINAL
from agentmesh.pipelines.checkpoint_eval.aggregate import TaskOutcome, aggregate, format_table
from agentmesh.pipelines.checkpoint_eval.benchmarks import BENCHMARKS, parse_benchmark_names

__all__ = [
    "TASK_FUNCTION",
    "Checkpoint",
    "EvalConfig",
    "EvalResult",
    "TaskKey",
    "build_job_spec",
    "main",
    "make_checkpoints",
    "outcomes_from_status",
    "resolve_jobs_address",
    "run_checkpoint_eval",
]

TASK_FUNCTION = "agentmesh.pipelines.checkpoint_eval.task:evaluate"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")
# Ray CPUs per task. A vLLM CPU task also starts a replica that Ray accounts at 0.1 CPU: 0.9 + 0.1
# makes one evaluation one core, so C evaluations fit a C-core cluster instead of starving the
# last replica of its 0.1 (a deploy that would then wait forever).
_TASK_CPUS = {"vllm-cpu": 0.9, "simulator": 0.2}
_TIMEOUT_S = {"vllm-cpu": 900.0, "simulator": 180.0}


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A checkpoint to evaluate: a name (used in task names and the table) and its model folder."""

    name: str
    path: str


@dataclass(frozen=True, slots=True)
class TaskKey:
    """Which (checkpoint, benchmark, seed) a task of the job evaluates."""

    checkpoint: str
    benchmark: str
    seed: int


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def make_checkpoints(n: int, root: Path, source: Path, *, prefix: str = "ckpt") -> list[Checkpoint]:
    """``n`` checkpoint folders ``root/<prefix>-1 .. <prefix>-n``, each a hard-linked copy of ``source``.

    Existing folders of those names are replaced. Hard links cost no space; a copy is made where
    linking fails.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"expected an integer >= 1, got {n!r}", key="checkpoints")
    if not source.is_dir():
        raise ConfigError(f"not a directory: {source}", key="model_dir")
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(1, n + 1):
        name = f"{prefix}-{i}"
        dest = root / name
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(source, dest, copy_function=_link_or_copy)
        out.append(Checkpoint(name, str(dest.resolve())))
    return out


def _stub_source(root: Path) -> Path:
    """A placeholder model folder for the simulator backend, which loads nothing."""
    stub = root / "_simulator-stub"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "README.txt").write_text("placeholder checkpoint: the simulator backend loads no weights\n")
    return stub


def build_job_spec(
    checkpoints: Sequence[Checkpoint],
    benchmarks: Sequence[str],
    seeds: Sequence[int],
    *,
    ray_address: str,
    discovery_url: str,
    concurrency: int = 1,
    backend: str = "vllm-cpu",
    name: str = "checkpoint-eval",
    cpus: float | None = None,
    retries: int = 1,
    timeout_s: float | None = None,
    max_items: int | None = None,
    eval_concurrency: int = 4,
    env: dict[str, str] | None = None,
) -> tuple[dict[str, Any], dict[str, TaskKey]]:
    """The job spec (a dict per the jobs contract) and which task evaluates what.

    One function task per (checkpoint, benchmark, seed), named ``<checkpoint>.<benchmark>.s<seed>``.
    ``cpus`` (default 0.9 for vllm-cpu, 0.2 for the simulator), ``retries`` and ``timeout_s``
    (per attempt; default 900 s for vllm-cpu, 180 s for the simulator) are job-level defaults;
    ``env`` is the tasks' environment (e.g. where the vLLM venv is).
    """
    if not checkpoints:
        raise ConfigError("expected at least one checkpoint", key="checkpoints")
    names = [c.name for c in checkpoints]
    for c in checkpoints:
        if not _NAME_RE.match(c.name):
            raise ConfigError(f"expected [A-Za-z0-9_.-]{{1,40}}, got {c.name!r}", key="checkpoints")
    if len(set(names)) != len(names):
        raise ConfigError(f"checkpoint names repeat: {names}", key="checkpoints")
    bench_names = parse_benchmark_names(list(benchmarks))
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError(f"expected integers >= 0, got {list(seeds)!r}", key="seeds")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds repeat: {list(seeds)}", key="seeds")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ConfigError(f"expected an integer >= 1, got {concurrency!r}", key="concurrency")
    if backend not in _TASK_CPUS:
        raise ConfigError(f"expected one of {', '.join(_TASK_CPUS)}, got {backend!r}", key="backend")

    keys: dict[str, TaskKey] = {}
    tasks = []
    for ckpt in checkpoints:
        for bench in bench_names:
            for seed in seeds:
                task_name = f"{ckpt.name}.{bench}.s{seed}"
                keys[task_name] = TaskKey(ckpt.name, bench, seed)
                args: dict[str, Any] = {
                    "checkpoint": ckpt.name,
                    "checkpoint_dir": ckpt.path,
                    "benchmark": bench,
                    "seed": seed,
                    "ray_address": ray_address,
                    "discovery_url": discovery_url,
                    "backend": backend,
                    "concurrency": eval_concurrency,
                }
                if max_items is not None:
                    args["max_items"] = max_items
                tasks.append({"name": task_name, "function": TASK_FUNCTION, "args": args})
    spec = {
        "name": name,
        "concurrency": concurrency,
        "retries": retries,
        "backoff_s": 2.0,
        "timeout_s": timeout_s if timeout_s is not None else _TIMEOUT_S[backend],
        "resources": {"cpus": cpus if cpus is not None else _TASK_CPUS[backend], "gpus": 0, "memory_mb": 0},
        "tasks": tasks,
    }
    if env:
        spec["env"] = dict(env)
    return spec, keys


def outcomes_from_status(status: Any, keys: dict[str, TaskKey]) -> list[TaskOutcome]:
    """The job's task statuses (``JobStatus.tasks``) as :class:`TaskOutcome`, one per task in ``keys``.

    A task the status does not mention (it should not happen) is an outcome with state ``MISSING``,
    so the table shows it as failed instead of the cell quietly having fewer seeds.
    """
    by_name = {t.name: t for t in getattr(status, "tasks", [])}
    out = []
    for task_name, key in keys.items():
        t = by_name.get(task_name)
        if t is None:
            out.append(
                TaskOutcome(
                    task_name, key.checkpoint, key.benchmark, key.seed, "MISSING", None, "not in the job"
                )
            )
            continue
        result = t.result if isinstance(t.result, dict) else None
        acc = result.get("accuracy") if result else None
        accuracy = float(acc) if isinstance(acc, int | float) and not isinstance(acc, bool) else None
        error = str(t.error or "")
        if t.state == "SUCCEEDED" and accuracy is None:
            error = error or f"no accuracy in the task's result: {t.result!r}"[:300]
        out.append(
            TaskOutcome(
                task_name,
                key.checkpoint,
                key.benchmark,
                key.seed,
                str(t.state),
                accuracy,
                error,
                int(t.attempts or 0),
                result,
            )
        )
    return out


# -- running it ------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    """Everything one evaluation run needs; :func:`main` builds it from the command line."""

    checkpoints: int = 2
    benchmarks: list[str] = field(default_factory=lambda: ["arith", "capitals"])
    seeds: int = 2
    concurrency: int = 1
    backend: str = "vllm-cpu"
    out: Path = Path("checkpoint-eval-out")
    cluster: str = "default"
    ray_address: str | None = None
    discovery_url: str | None = None
    jobs_address: str | None = None
    model_dir: Path | None = None
    """The folder the checkpoints copy (default: the bundled SmolLM2; a stub for the simulator)."""
    max_items: int | None = None
    eval_concurrency: int = 4
    retries: int = 1
    timeout_s: float | None = None
    cpus: float | None = None
    job_name: str = "checkpoint-eval"
    wait_timeout_s: float | None = None
    poll_s: float = 1.0


@dataclass
class EvalResult:
    """What a run produced: the job, its outcomes, the table and where the files went."""

    job_id: str
    state: str
    outcomes: list[TaskOutcome]
    table: str
    wall_s: float
    files: dict[str, str]

    @property
    def ok(self) -> bool:
        return self.state == "SUCCEEDED"


def resolve_jobs_address(cluster: str, discovery_url: str, explicit: str | None = None) -> str:
    """The job manager's ``host:port``: ``explicit``, else the cluster record's ``jobs_address``,
    else the ``agentmesh-jobs`` service in discovery. Raises :class:`ConfigError` if none."""
    if explicit:
        return explicit
    from agentmesh.cluster import NoClusterError, load_record
    from agentmesh.jobs.server import DISCOVERY_SERVICE

    with contextlib.suppress(NoClusterError):
        if address := load_record(cluster).jobs_address:
            return address

    async def look() -> str | None:
        from agentmesh.discovery import connect

        d = connect(discovery_url)
        try:
            eps = await d.snapshot(DISCOVERY_SERVICE)
        finally:
            await d.close()
        return eps[0].address if eps else None

    found = asyncio.run(look())
    if not found:
        raise ConfigError(
            f"no job manager: cluster {cluster!r} has no jobs_address and discovery has no "
            f"{DISCOVERY_SERVICE!r} service; give --jobs-address HOST:PORT",
            key="--jobs-address",
        )
    return found


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_checkpoint_eval(cfg: EvalConfig, *, say: Callable[[str], None] = _stderr) -> EvalResult:
    """Make the checkpoints, submit the job, follow it, aggregate and write the report.

    The report (``results.json``, ``table.txt``, ``accuracy.png``, ``job.json``) goes to ``cfg.out``.
    Ctrl-C cancels the job. A job with failed tasks still produces its table (the failed seeds
    marked); ``EvalResult.ok`` says whether every task succeeded.
    """
    from agentmesh.cluster import resolve_cluster
    from agentmesh.jobs.client import JobClient
    from agentmesh.llm_gateway.deploy import forwarded_env
    from agentmesh.pipelines.checkpoint_eval.report import write_report

    benchmarks = parse_benchmark_names(cfg.benchmarks)
    if isinstance(cfg.seeds, bool) or not isinstance(cfg.seeds, int) or cfg.seeds < 1:
        raise ConfigError(f"expected an integer >= 1, got {cfg.seeds!r}", key="seeds")
    ray_address, discovery_url = resolve_cluster(
        cfg.cluster, ray_address=cfg.ray_address, discovery_url=cfg.discovery_url
    )
    jobs_address = resolve_jobs_address(cfg.cluster, discovery_url, cfg.jobs_address)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.model_dir is not None:
        source = Path(cfg.model_dir)
    elif cfg.backend == "simulator":
        source = _stub_source(out)
    else:
        from agentmesh.llm_gateway.models import ensure_smollm2

        source = ensure_smollm2()
    checkpoints = make_checkpoints(cfg.checkpoints, out / "checkpoints", source)
    spec, keys = build_job_spec(
        checkpoints,
        benchmarks,
        list(range(cfg.seeds)),
        ray_address=ray_address,
        discovery_url=discovery_url,
        concurrency=cfg.concurrency,
        backend=cfg.backend,
        name=cfg.job_name,
        cpus=cfg.cpus,
        retries=cfg.retries,
        timeout_s=cfg.timeout_s,
        max_items=cfg.max_items,
        eval_concurrency=cfg.eval_concurrency,
        # The tasks run where the job manager's Ray workers run, with their environment: carry this
        # process's agentmesh, vLLM and Hugging Face settings (never a secret's) to them, as deploy does.
        env={
            k: v
            for k, v in forwarded_env(os.environ).items()
            if not k.startswith(("AGENTMESH_TASK_", "AGENTMESH_JOB_"))  # the manager sets those
        },
    )
    (out / "job.json").write_text(json.dumps(spec, indent=2) + "\n")

    t0 = time.monotonic()
    client = JobClient(jobs_address)
    try:
        job_id = client.submit(spec)
        say(
            f"submitted job {job_id}: {len(keys)} tasks ({len(checkpoints)} checkpoints x "
            f"{len(benchmarks)} benchmarks x {cfg.seeds} seeds), concurrency {cfg.concurrency}, "
            f"backend {cfg.backend}, job manager {jobs_address}"
        )
        try:
            status = _follow(client, job_id, len(keys), cfg, t0, say)
        except KeyboardInterrupt:
            say(f"interrupted: cancelling job {job_id}")
            client.cancel(job_id)
            raise
    finally:
        client.close()
    wall_s = time.monotonic() - t0

    outcomes = outcomes_from_status(status, keys)
    names = [c.name for c in checkpoints]
    cells = aggregate(outcomes, names, benchmarks)
    table = format_table(cells, names, benchmarks)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    files = write_report(
        out,
        job_id=job_id,
        state=str(status.state),
        config=config,
        outcomes=outcomes,
        cells=cells,
        table=table,
        wall_s=wall_s,
        checkpoints=names,
        benchmarks=benchmarks,
    )
    return EvalResult(job_id, str(status.state), outcomes, table, wall_s, files)


def _follow(
    client: Any, job_id: str, total: int, cfg: EvalConfig, t0: float, say: Callable[[str], None]
) -> Any:
    """Poll the job until it ends, saying a line per task that ends and a summary every 30 s."""
    seen: set[str] = set()
    last_summary = time.monotonic()
    while True:
        status = client.status(job_id)
        for t in status.tasks:
            if t.state in TERMINAL and t.name not in seen:
                seen.add(t.name)
                say(f"[{len(seen)}/{total}] {_task_line(t)}  ({time.monotonic() - t0:.0f} s)")
        if status.done:
            return status
        now = time.monotonic()
        if now - last_summary >= 30:
            last_summary = now
            counts = status.task_counts
            say(f"job {job_id} {status.state}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        if cfg.wait_timeout_s is not None and now - t0 > cfg.wait_timeout_s:
            client.cancel(job_id)
            raise AgentMeshError(f"job {job_id} did not finish within {cfg.wait_timeout_s:g} s; cancelled it")
        time.sleep(cfg.poll_s)


def _task_line(t: Any) -> str:
    result = t.result if isinstance(t.result, dict) else {}
    if t.state == "SUCCEEDED" and "accuracy" in result:
        return (
            f"{t.name}: {result['correct']}/{result['n']} = {result['accuracy']:.2f} "
            f"(serve {result.get('serve_s', 0):.0f} s, eval {result.get('eval_s', 0):.0f} s)"
        )
    err = (t.error or "").strip().splitlines()
    return f"{t.name}: {t.state} after {t.attempts} attempt(s)" + (f": {err[-1][:200]}" if err else "")


# -- command line ----------------------------------------------------------------------------------

EXAMPLES = """\
examples:
  agentmesh cluster up
  python -m agentmesh.pipelines.checkpoint_eval --checkpoints 2 --benchmarks arith,capitals --seeds 2 \\
      --concurrency 1 --out /tmp/ckpt-eval
  python -m agentmesh.pipelines.checkpoint_eval --backend simulator --checkpoints 2 --seeds 2 --concurrency 2
  agentmesh cluster down
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m agentmesh.pipelines.checkpoint_eval",
        description="Evaluate N checkpoints x M benchmarks x S seeds as a job on a cluster; print mean ± "
        "standard error per checkpoint and benchmark.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoints", type=_positive_int, default=2, help="N: checkpoints (copies of the model)"
    )
    p.add_argument(
        "--benchmarks",
        default="arith,capitals",
        help=f"comma-separated, of: {', '.join(BENCHMARKS)} (default arith,capitals)",
    )
    p.add_argument("--seeds", type=_positive_int, default=2, help="S: seeds per checkpoint and benchmark")
    p.add_argument("--concurrency", type=_positive_int, default=1, help="C: tasks running at once")
    p.add_argument("--backend", choices=sorted(_TASK_CPUS), default="vllm-cpu", help="default vllm-cpu")
    p.add_argument("--out", type=Path, default=Path("checkpoint-eval-out"), help="output folder")
    p.add_argument("--cluster", default="default", help="cluster name (default 'default')")
    p.add_argument("--ray-address", default=None, help="with --discovery: no cluster record needed")
    p.add_argument("--discovery", default=None, help="discovery URL, e.g. etcd://127.0.0.1:2379")
    p.add_argument("--jobs-address", default=None, help="job manager HOST:PORT (default: from the cluster)")
    p.add_argument("--model-dir", type=Path, default=None, help="folder the checkpoints copy")
    p.add_argument("--max-items", type=_positive_int, default=None, help="first K items of each benchmark")
    p.add_argument("--eval-concurrency", type=_positive_int, default=4, help="requests in flight per task")
    p.add_argument("--retries", type=int, default=1, help="extra attempts of a failed task (default 1)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per task attempt")
    p.add_argument("--cpus", type=float, default=None, help="Ray CPUs per task")
    p.add_argument("--job-name", default="checkpoint-eval", help="the job's name")
    p.add_argument("--wait-timeout", type=float, default=None, help="cancel the job after this many seconds")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0: every task succeeded; 1: the table was printed but some tasks failed; 2: bad input;
    3: the run itself failed; 130: interrupted (the job is cancelled)."""
    from agentmesh.cluster import NoClusterError
    from agentmesh.launcher import RAY_ENV

    ns = _parser().parse_args(list(argv) if argv is not None else None)
    try:
        benchmarks = parse_benchmark_names(ns.benchmarks)
        if (ns.ray_address is None) != (ns.discovery is None):
            raise ConfigError("give --ray-address and --discovery together", key="--ray-address")
        cfg = EvalConfig(
            checkpoints=ns.checkpoints,
            benchmarks=benchmarks,
            seeds=ns.seeds,
            concurrency=ns.concurrency,
            backend=ns.backend,
            out=ns.out,
            cluster=ns.cluster,
            ray_address=ns.ray_address,
            discovery_url=ns.discovery,
            jobs_address=ns.jobs_address,
            model_dir=ns.model_dir,
            max_items=ns.max_items,
            eval_concurrency=ns.eval_concurrency,
            retries=ns.retries,
            timeout_s=ns.timeout,
            cpus=ns.cpus,
            job_name=ns.job_name,
            wait_timeout_s=ns.wait_timeout,
        )
        # Before Ray is imported (the job client does not need it, the cluster lookups may).
        for k, v in RAY_ENV.items():
            os.environ.setdefault(k, v)
        result = run_checkpoint_eval(cfg)
    except (ConfigError, NoClusterError) as exc:
        _stderr(f"checkpoint_eval: {exc}")
        return 2
    except AgentMeshError as exc:
        _stderr(f"checkpoint_eval: {exc}")
        return 3
    except KeyboardInterrupt:
        _stderr("checkpoint_eval: interrupted")
        return 130
    print(result.table)
    print(
        f"\njob {result.job_id} {result.state} in {result.wall_s:.0f} s; "
        + ", ".join(f"{k}: {v}" for k, v in result.files.items())
    )
    return 0 if result.ok else 1
