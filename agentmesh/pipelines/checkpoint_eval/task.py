"""The task of a checkpoint-evaluation job: serve one checkpoint, run one benchmark with one seed.

:func:`evaluate` is what the job spec names (``agentmesh.pipelines.checkpoint_eval.task:evaluate``,
called with JSON kwargs on a worker). It deploys the checkpoint the way a user does — the real
``agentmesh llm deploy`` command in a subprocess, one replica under a model name unique to the
task — sends the benchmark's prompts to it through :class:`~agentmesh.llm_gateway.client.LlmClient`
over discovery (a few at a time, sampled with ``temperature`` and a per-item seed derived from
``seed``, so that seeds differ and reruns repeat), scores the replies, and always removes the
deployment again (``agentmesh llm remove``), also when something failed.

The model name is derived from the job id and the task when the job manager runs it
(``$AGENTMESH_JOB_ID``), so a retried attempt finds and replaces what a killed earlier attempt
left behind instead of leaking a replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from agentmesh.errors import AgentMeshError, ConfigError
from agentmesh.pipelines.checkpoint_eval.benchmarks import Item, load_benchmark

__all__ = ["DeployFailed", "EvalInterrupted", "evaluate", "task_model_name"]

_CLI = (sys.executable, "-m", "agentmesh.cli")
_NAME_CHARS_RE = re.compile(r"[^A-Za-z0-9_.-]+")
_SEED_STRIDE = 100_003
"""Item i of seed s is sampled with seed ``s * _SEED_STRIDE + i``: distinct across seeds and items."""
_ALREADY_DEPLOYED = "is already deployed"


class DeployFailed(AgentMeshError):
    """``agentmesh llm deploy`` (or ``remove``) did not succeed; the message has its output's tail."""


class EvalInterrupted(AgentMeshError):
    """The task got SIGTERM (cancelled or timed out by the job manager) and cleaned up."""


def task_model_name(checkpoint: str, benchmark: str, seed: int, *, job_id: str | None = None) -> str:
    """A model name for one task's deployment: ``<checkpoint>-<benchmark>-s<seed>-<8 hex>``.

    With a ``job_id`` the suffix is a hash of (job, checkpoint, benchmark, seed): every attempt of
    the task uses the same name. Without one it is random.
    """
    base = _NAME_CHARS_RE.sub("-", f"{checkpoint}-{benchmark}-s{seed}").strip("-.") or "ckpt"
    if job_id:
        digest = hashlib.sha256(f"{job_id}\0{checkpoint}\0{benchmark}\0{seed}".encode()).hexdigest()[:8]
    else:
        digest = uuid.uuid4().hex[:8]
    return f"{base[:100]}-{digest}"


def evaluate(
    checkpoint: str,
    checkpoint_dir: str,
    benchmark: str,
    seed: int,
    *,
    cluster: str = "default",
    ray_address: str | None = None,
    discovery_url: str | None = None,
    backend: str = "vllm-cpu",
    concurrency: int = 4,
    max_items: int | None = None,
    temperature: float = 0.7,
    max_tokens: int = 16,
    deploy_timeout_s: float = 300.0,
    request_timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Serve ``checkpoint_dir`` as a model, run ``benchmark`` against it with ``seed``, score it.

    The cluster is ``ray_address`` + ``discovery_url`` when both are given, else the record of
    ``cluster``. ``backend`` is ``vllm-cpu`` (the real model) or ``simulator`` (random words, for
    tests). ``concurrency`` requests are in flight at once; ``max_items`` keeps the first items only.

    Returns ``{"accuracy", "n", "correct", "checkpoint", "benchmark", "seed", "serve_s",
    "eval_s", "remove_s", "model", "backend", "samples"}`` (``samples``: the first few replies).
    Raises :class:`ConfigError` for bad arguments (before deploying anything),
    :class:`DeployFailed` when the deployment fails, :class:`~agentmesh.errors.LlmError` when a
    request fails for good; the deployment is removed in every case.
    """
    bench = load_benchmark(benchmark)
    _check_args(checkpoint, checkpoint_dir, seed, backend, concurrency, max_items, temperature, max_tokens)
    items = bench.items[:max_items] if max_items else bench.items
    where = _where_flags(cluster, ray_address, discovery_url)
    if discovery_url is None or ray_address is None:
        from agentmesh.cluster import resolve_cluster

        _, discovery_url = resolve_cluster(cluster, ray_address=ray_address, discovery_url=discovery_url)
    model = task_model_name(checkpoint, benchmark, seed, job_id=os.environ.get("AGENTMESH_JOB_ID"))

    deploy_cmd = [
        *_CLI,
        "llm",
        "deploy",
        "--model",
        model,
        "--model-dir",
        str(checkpoint_dir),
        "--replicas",
        "1",
        "--backend",
        backend,
        "--timeout",
        str(deploy_timeout_s),
        *where,
    ]
    remove_cmd = [*_CLI, "llm", "remove", "--model", model, *where]
    with _sigterm_raises():
        t0 = time.monotonic()
        try:
            proc = _run_cli(deploy_cmd, timeout_s=deploy_timeout_s + 60)
            if proc.returncode != 0 and _ALREADY_DEPLOYED in proc.stderr:
                # A killed earlier attempt of this task left its replica: replace it.
                _check_cli("remove", _run_cli(remove_cmd, timeout_s=120))
                proc = _run_cli(deploy_cmd, timeout_s=deploy_timeout_s + 60)
            _check_cli("deploy", proc)
            serve_s = time.monotonic() - t0
            t1 = time.monotonic()
            replies = asyncio.run(
                _ask_all(
                    model, discovery_url, items, seed, concurrency, temperature, max_tokens, request_timeout_s
                )
            )
            eval_s = time.monotonic() - t1
        finally:
            t2 = time.monotonic()
            try:
                removed = _run_cli(remove_cmd, timeout_s=120, own_session=True)
            except subprocess.TimeoutExpired:
                # Do not mask an earlier error with this one; report it below otherwise.
                removed = subprocess.CompletedProcess(remove_cmd, 124, "", "timed out after 120 s")
            remove_s = time.monotonic() - t2
        # Reached only when nothing above raised: a failed removal is then this task's failure.
        _check_cli("remove", removed)

    verdicts = [bench.score(item, reply) for item, reply in zip(items, replies, strict=True)]
    correct = sum(verdicts)
    return {
        "accuracy": correct / len(items),
        "n": len(items),
        "correct": correct,
        "checkpoint": checkpoint,
        "benchmark": bench.name,
        "seed": seed,
        "serve_s": round(serve_s, 3),
        "eval_s": round(eval_s, 3),
        "remove_s": round(remove_s, 3),
        "model": model,
        "backend": backend,
        "samples": [
            {"id": item.id, "reply": reply[:200], "correct": ok}
            for item, reply, ok in list(zip(items, replies, verdicts, strict=True))[:3]
        ],
    }


def _check_args(
    checkpoint: str,
    checkpoint_dir: str,
    seed: int,
    backend: str,
    concurrency: int,
    max_items: int | None,
    temperature: float,
    max_tokens: int,
) -> None:
    if not isinstance(checkpoint, str) or not checkpoint:
        raise ConfigError(f"expected a non-empty string, got {checkpoint!r}", key="checkpoint")
    if not isinstance(checkpoint_dir, str) or not Path(checkpoint_dir).is_dir():
        raise ConfigError(f"not a directory: {checkpoint_dir!r}", key="checkpoint_dir")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"expected an integer >= 0, got {seed!r}", key="seed")
    if backend not in ("vllm-cpu", "simulator"):
        raise ConfigError(f"expected 'vllm-cpu' or 'simulator', got {backend!r}", key="backend")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ConfigError(f"expected an integer >= 1, got {concurrency!r}", key="concurrency")
    if max_items is not None and (
        isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1
    ):
        raise ConfigError(f"expected an integer >= 1 or null, got {max_items!r}", key="max_items")
    if not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
        raise ConfigError(f"expected a number in [0, 2], got {temperature!r}", key="temperature")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ConfigError(f"expected an integer >= 1, got {max_tokens!r}", key="max_tokens")


def _where_flags(cluster: str, ray_address: str | None, discovery_url: str | None) -> list[str]:
    if ray_address and discovery_url:
        return ["--ray-address", ray_address, "--discovery", discovery_url]
    if ray_address or discovery_url:
        raise ConfigError(
            "give ray_address and discovery_url together, or neither (use cluster)", key="ray_address"
        )
    return ["--cluster", cluster]


def _run_cli(
    cmd: Sequence[str], *, timeout_s: float, own_session: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run an ``agentmesh`` command and wait for it.

    When the wait is cut short (timeout, SIGTERM) the command is killed at once: the removal that
    follows cleans up whatever it started. ``own_session`` puts the command in a session of its own,
    out of reach of a signal to this task's process group: the removal must outlive a job manager
    that kills the task (SIGTERM, then SIGKILL shortly after).
    """
    proc = subprocess.Popen(
        list(cmd),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
        start_new_session=own_session,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except BaseException:
        if not own_session:  # a removal is left to finish on its own
            proc.kill()
            proc.communicate()
        raise
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)


def _check_cli(what: str, proc: subprocess.CompletedProcess[str]) -> None:
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise DeployFailed(f"agentmesh llm {what} exited {proc.returncode}: {tail}")


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into :class:`EvalInterrupted` so that the deployment is still removed.

    Only possible on the main thread; elsewhere the job manager's kill is not intercepted.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise EvalInterrupted("interrupted by SIGTERM; the deployment is being removed")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


async def _ask_all(
    model: str,
    discovery_url: str,
    items: Sequence[Item],
    seed: int,
    concurrency: int,
    temperature: float,
    max_tokens: int,
    request_timeout_s: float,
) -> list[str]:
    """Every item's reply, ``concurrency`` requests at a time, in item order."""
    from agentmesh.discovery import connect
    from agentmesh.discovery.base import EndpointCache
    from agentmesh.llm_gateway.client import LlmClient

    discovery = connect(discovery_url)
    cache = EndpointCache(discovery)
    gate = asyncio.Semaphore(concurrency)
    try:
        async with LlmClient(model, cache, timeout_s=request_timeout_s) as client:

            async def ask(i: int, item: Item) -> str:
                async with gate:
                    result = await client.chat(
                        [{"role": "user", "content": item.prompt}],
                        max_tokens=max_tokens,
                        temperature=temperature,
                        seed=seed * _SEED_STRIDE + i,
                    )
                    return result.text

            return list(await asyncio.gather(*(ask(i, item) for i, item in enumerate(items))))
    finally:
        await cache.close()
        await discovery.close()
