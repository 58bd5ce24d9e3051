"""Acceptance benchmark: 10,000 tasks in flight, memory flat, simulated replicas kept busy.

    python bench/concurrency.py [--tasks 40000] [--in-flight 10000] [--replicas 4] [--quick]

Backend: the vLLM-compatible SIMULATOR (``agentmesh.llm_gateway.simulator``, not vLLM), ``--replicas``
replicas of one calibrated profile (default ``llama-3.1-8b-h100``: a + b·batch decode steps,
``max_num_seqs`` 256, an unbounded FIFO waiting queue), all served by ONE separate subprocess so that
the mesh process's CPU and memory are its own. Every request asks for ``--max-tokens`` and gets
exactly that many tokens (``--fixed-output-len``). The baseline is the fleet's own maximum on this
workload: its batching model run in virtual time on a queue that never empties, prefill included
(:func:`fleet_task_ceiling`), and its decode ceiling (full batch, no prefill).

Mesh (this process): one LLM role (``--agent-replicas`` replicas, each a real grpc.aio server on
loopback) that makes one chat call per task through :class:`~agentmesh.llm_gateway.client.LlmClient`
(simulator endpoints registered in the same in-memory discovery; the client's default connection
limit, 4,096, so the tasks beyond it wait in the client), then the sink
(:class:`~agentmesh.driver.RunDriver` with a real :class:`~agentmesh.sink.SinkWriter` writing JSONL to a
temp dir). Rows come from a generator (never materialised).

Three phases, back to back in this one process, against the same mesh and simulator:
``max_in_flight`` = in-flight/10, in-flight/2, in-flight (1k, 5k, 10k by default). A phase's steady
window runs from one full turnover (``finished >= max_in_flight``) until the source runs dry. Sampled
every second: tasks in flight, RSS and CPU of both processes, the simulator's running / waiting /
busy seconds / generated tokens / lag from its ``/metrics``, the machine's load average.

Reported: peak in flight; RSS (median over the steady window) at each level and the slope in MB per
1,000 tasks in flight (least squares over the levels); RSS in the first vs the last quarter of the
steady window at full load and its trend per 10,000 tasks completed (flat = no growth while tasks
complete); simulator utilisation (busy seconds / wall seconds, and the same net of the seconds the
simulator process itself ran late for want of CPU), mean batch occupancy (running / max_num_seqs),
tokens/s and tasks/s against the baseline; failed tasks (must be 0).

Agent replicas: 2 by default. (A first version of this benchmark needed 4: grpc cancels calls past
3,000 pending on a server by default, and a 10,000-task admission burst over 2 replicas stalled. The
runtime now lifts that limit on its servers and admits at most 256 tasks at once; see
``test_a_burst_of_5000_deliveries_is_accepted_not_cancelled``.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, cpu_seconds, print_table, rss_bytes, write_json

from agentmesh.agent import Role, Task
from agentmesh.agent.local import LocalMesh, LocalRole
from agentmesh.agent.replica import ReplicaLimits
from agentmesh.agent.routing import Sequential
from agentmesh.discovery import Endpoint, EndpointCache
from agentmesh.discovery.memory import MemoryDiscovery
from agentmesh.driver import RunDriver
from agentmesh.llm_gateway.client import AiohttpTransport, LlmClient, llm_service_name
from agentmesh.llm_gateway.constants import LLM_CONNECTOR_LIMIT
from agentmesh.llm_gateway.sim_profiles import get_profile
from agentmesh.llm_gateway.simulator import plan_chat, simulate_offline
from agentmesh.sink import SinkWriter

__all__ = ["main"]

PLOT_PATH = Path(__file__).resolve().parents[1] / "docs" / "img" / "concurrency.png"
RUN_ID = "concurrency"
ROLE = "chat"
MB = 1024 * 1024


# --- the simulated fleet (one subprocess) ------------------------------------------------------------


class SimFleet:
    """``n`` simulated replicas served by one ``python -m agentmesh.llm_gateway.simulator`` process."""

    def __init__(self, n: int, profile: str, workdir: Path) -> None:
        self.n = n
        self.profile = profile
        self._stderr_path = workdir / "simulator.stderr"
        self.proc: asyncio.subprocess.Process | None = None
        self.urls: list[str] = []
        self.cards: list[dict[str, Any]] = []
        self._session: aiohttp.ClientSession | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "agentmesh.llm_gateway.simulator",
            "--port",
            "0",
            "--replicas",
            str(self.n),
            "--profile",
            self.profile,
            "--fixed-output-len",
        ]
        with open(self._stderr_path, "wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                *cmd, stdout=asyncio.subprocess.PIPE, stderr=err, preexec_fn=_die_with_parent
            )
        assert self.proc.stdout is not None
        while len(self.urls) < self.n:
            line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
            if not line:
                raise RuntimeError(f"simulator exited early: {self._stderr_path.read_text()[-2000:]}")
            text = line.decode().strip()
            if text.startswith("SIMULATOR_READY "):
                self.urls.append(text.split(" ", 1)[1])
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        for url in self.urls:
            async with self._session.get(f"{url}/v1/models") as resp:
                self.cards.append((await resp.json())["data"][0])

    async def register(self, discovery: MemoryDiscovery) -> str:
        model = self.cards[0]["id"]
        for i, url in enumerate(self.urls):
            address = url.removeprefix("http://")
            ep = Endpoint(llm_service_name(model), f"sim-{i}", address, {"scheme": "http", "model": model})
            await discovery.register(ep)
        return str(model)

    async def scrape(self) -> list[dict[str, float]]:
        """Per replica: running, waiting, busy_s, uptime_s, gen_tokens, lag_s, steps."""
        assert self._session is not None
        texts = await asyncio.gather(*(self._get_metrics(u) for u in self.urls))
        return [_parse_metrics(t) for t in texts]

    async def _get_metrics(self, url: str) -> str:
        assert self._session is not None
        async with self._session.get(f"{url}/metrics") as resp:
            return await resp.text()

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the benchmark dies, so no simulator is left behind (Linux)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


_METRIC_KEYS = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:generation_tokens_total": "gen_tokens",
    "agentmesh_sim_busy_seconds_total": "busy_s",
    "agentmesh_sim_uptime_seconds": "uptime_s",
    "agentmesh_sim_lag_seconds_total": "lag_s",
    "agentmesh_sim_steps_total": "steps",
}


def _parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name_labels, _, value = line.rpartition(" ")
        key = _METRIC_KEYS.get(name_labels.split("{", 1)[0])
        if key is not None:
            out[key] = float(value)
    return out


# --- the mesh ------------------------------------------------------------------------------------------


class ChatOnce(Role):
    """One chat call per task with a fixed ``max_tokens``; the answer becomes the task's only turn."""

    async def step(self, task: Task) -> None:
        reply = await self.llm.chat(
            [{"role": "user", "content": task.input["q"]}],
            max_tokens=int(self.ctx.params["max_tokens"]),
            seed=task.seed,
        )
        task.add_turn(
            reply.text, prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens
        )


def question(phase: int, i: int) -> str:
    return f"Question {i} of phase {phase}: explain step {i % 97} briefly."


def rows(phase: int, n: int) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """The dataset, streamed: ``n`` short questions (ids unique across phases)."""
    for i in range(n):
        yield f"p{phase}-t{i}", 0, {"q": question(phase, i)}


def fleet_task_ceiling(profile: str, replicas: int, max_tokens: int) -> tuple[float, int]:
    """The baseline: tasks/s the simulated fleet does at most on this workload (prefill included).

    Runs the simulator's own batching model in virtual time (:func:`simulate_offline`) on a queue
    that never empties (4 full batches per replica arriving at t=0), with the parameters the
    subprocess serves (the profile, ``--fixed-output-len``, seed = replica index). Returns the
    ceiling and the prompt tokens of one request.
    """
    total = 0.0
    prompt = 0
    for i in range(replicas):
        params = get_profile(profile).replace(output_len=None, seed=i)
        body = {"messages": [{"role": "user", "content": question(0, 0)}], "max_tokens": max_tokens}
        prompt = plan_chat(params, body).prompt_tokens
        n = 4 * params.max_num_seqs
        results, _ = simulate_offline(params, [(0.0, prompt, max_tokens)] * n)
        total += n / max(r.finished_at for r in results)
    return total, prompt


# --- sampling ------------------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    phase: int
    target: int
    in_flight: int
    admitted: int
    finished: int
    failed: int
    rss_mesh_mb: float
    rss_sim_mb: float
    cpu_mesh_s: float
    cpu_sim_s: float
    running: float
    waiting: float
    busy_s: list[float]
    uptime_s: list[float]
    gen_tokens: float
    lag_s: list[float]
    load1: float


class Sampler:
    def __init__(self, fleet: SimFleet, t0: float) -> None:
        self.fleet = fleet
        self.t0 = t0
        self.samples: list[Sample] = []
        self.phase = -1
        self.target = 0
        self.driver: RunDriver | None = None

    async def sample(self) -> Sample:
        sims = await self.fleet.scrape()
        d = self.driver
        p = d.progress if d is not None else None
        s = Sample(
            t=time.monotonic() - self.t0,
            phase=self.phase,
            target=self.target,
            in_flight=p.in_flight if p else 0,
            admitted=p.admitted if p else 0,
            finished=p.finished if p else 0,
            failed=p.failed if p else 0,
            rss_mesh_mb=rss_bytes() / MB,
            rss_sim_mb=rss_bytes(self.fleet.pid) / MB,
            cpu_mesh_s=cpu_seconds(),
            cpu_sim_s=cpu_seconds(self.fleet.pid),
            running=sum(m["running"] for m in sims),
            waiting=sum(m["waiting"] for m in sims),
            busy_s=[m["busy_s"] for m in sims],
            uptime_s=[m["uptime_s"] for m in sims],
            gen_tokens=sum(m["gen_tokens"] for m in sims),
            lag_s=[m["lag_s"] for m in sims],
            load1=os.getloadavg()[0],
        )
        self.samples.append(s)
        return s

    async def loop(self, every_s: float = 1.0) -> None:
        next_at = time.monotonic()
        while True:
            next_at += every_s
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            try:
                await self.sample()
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                logging.warning("sample skipped: %s", exc)


# --- one phase -----------------------------------------------------------------------------------------


async def run_phase(
    k: int,
    target: int,
    n_rows: int,
    *,
    discovery: MemoryDiscovery,
    program: Sequential,
    sampler: Sampler,
    workdir: Path,
    timeout_s: float,
) -> dict[str, Any]:
    writer = SinkWriter(workdir / f"phase{k}", formats=("jsonl",))
    writer.open()
    driver = RunDriver(
        run_id=RUN_ID,
        program=program,
        discovery=discovery,
        writer=writer,
        tasks=rows(k, n_rows),
        roles=program.roles(),
        max_in_flight=target,
        total=n_rows,
    )
    await driver.start()
    sampler.phase, sampler.target, sampler.driver = k, target, driver
    started = time.monotonic()
    try:
        progress = await asyncio.wait_for(driver.run(), timeout_s)
    finally:
        await sampler.sample()  # the final state of this phase
        sampler.driver = None
        writer.close()
        await driver.stop()
        shutil.rmtree(workdir / f"phase{k}", ignore_errors=True)
    return {
        "phase": k,
        "max_in_flight": target,
        "rows": n_rows,
        "wall_s": time.monotonic() - started,
        "done": progress.done,
        "failed": progress.failed,
        "failures_by_code": dict(progress.failures_by_code),
        "duplicates": progress.duplicates,
        "recovered": progress.recovered,
        "completion_tokens": progress.completion_tokens,
    }


# --- analysis ------------------------------------------------------------------------------------------


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if n == 0:
        return math.nan
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    n = len(xs)
    if n < 2:
        return math.nan
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else math.nan


def steady_window(samples: list[Sample], phase: int, target: int, rows_: int) -> list[Sample]:
    """From one full turnover until the source runs dry, while in flight stays near the target."""
    return [
        s
        for s in samples
        if s.phase == phase and s.finished >= target and s.admitted < rows_ and s.in_flight >= 0.95 * target
    ]


def analyse_window(
    win: list[Sample], sims: list[dict[str, Any]], task_ceiling: float, max_tokens: int
) -> dict[str, Any]:
    if len(win) < 2:
        return {"samples": len(win)}
    a, b = win[0], win[-1]
    dt = b.t - a.t
    cap_seqs = sum(c["simulator"]["max_num_seqs"] for c in sims)
    ceiling_tok_s = sum(c["simulator"]["max_decode_tokens_per_s"] for c in sims)
    util = [
        (bb - ab) / (bu - au)
        for ab, bb, au, bu in zip(a.busy_s, b.busy_s, a.uptime_s, b.uptime_s, strict=True)
        if bu > au
    ]
    # Seconds in which the simulator process itself ran late (it did not get the CPU in time) are
    # not idle seconds of the simulated GPU: the model time they cover is missing from both sides.
    util_model = [
        (bb - ab) / (bu - au - (bl - al))
        for ab, bb, au, bu, al, bl in zip(
            a.busy_s, b.busy_s, a.uptime_s, b.uptime_s, a.lag_s, b.lag_s, strict=True
        )
        if bu - au - (bl - al) > 0
    ]
    tok_s = (b.gen_tokens - a.gen_tokens) / dt
    tasks_s = (b.finished - a.finished) / dt
    quarter = max(1, len(win) // 4)
    head, tail = win[:quarter], win[-quarter:]
    done = [float(s.finished) for s in win]
    return {
        "samples": len(win),
        "duration_s": dt,
        "in_flight_mean": sum(s.in_flight for s in win) / len(win),
        "in_flight_min": min(s.in_flight for s in win),
        "rss_mesh_mb": _median([s.rss_mesh_mb for s in win]),
        "rss_sim_mb": _median([s.rss_sim_mb for s in win]),
        "rss_mesh_start_mb": _median([s.rss_mesh_mb for s in head]),
        "rss_mesh_end_mb": _median([s.rss_mesh_mb for s in tail]),
        "rss_sim_start_mb": _median([s.rss_sim_mb for s in head]),
        "rss_sim_end_mb": _median([s.rss_sim_mb for s in tail]),
        "rss_mesh_max_mb": max(s.rss_mesh_mb for s in win),
        "rss_mesh_mb_per_10k_completed": _slope(done, [s.rss_mesh_mb for s in win]) * 10_000,
        "rss_sim_mb_per_10k_completed": _slope(done, [s.rss_sim_mb for s in win]) * 10_000,
        "tasks_completed_in_window": b.finished - a.finished,
        "tasks_per_s": tasks_s,
        "task_ceiling_per_s": task_ceiling,
        # Completions come in waves (fixed lengths: a batch finishes together), tokens every step:
        # compare the backend's work, in tokens, with the baseline's.
        "tasks_vs_ceiling": tok_s / (task_ceiling * max_tokens),
        "gen_tokens_per_s": tok_s,
        "decode_ceiling_tokens_per_s": ceiling_tok_s,
        "tokens_vs_ceiling": tok_s / ceiling_tok_s,
        "sim_utilisation_mean": sum(util) / len(util) if util else math.nan,
        "sim_utilisation_min": min(util) if util else math.nan,
        "sim_utilisation_model_time": sum(util_model) / len(util_model) if util_model else math.nan,
        "batch_occupancy_mean": sum(s.running for s in win) / len(win) / cap_seqs,
        "sim_running_mean": sum(s.running for s in win) / len(win),
        "sim_waiting_mean": sum(s.waiting for s in win) / len(win),
        "in_mesh_mean": sum(s.in_flight - s.running - s.waiting for s in win) / len(win),
        "sim_lag_fraction": (sum(b.lag_s) - sum(a.lag_s)) / dt / len(sims),
        "cpu_mesh_cores": (b.cpu_mesh_s - a.cpu_mesh_s) / dt,
        "cpu_sim_cores": (b.cpu_sim_s - a.cpu_sim_s) / dt,
    }


def plot(samples: list[Sample], levels: list[dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", flush=True)
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    t = [s.t for s in samples]
    ax1.plot(t, [s.in_flight for s in samples], label="tasks in flight", color="tab:blue")
    ax1.plot(t, [s.running for s in samples], label="simulator running", color="tab:green", lw=0.8)
    ax1.set_xlabel("seconds")
    ax1.set_ylabel("tasks")
    ax1b = ax1.twinx()
    ax1b.plot(t, [s.rss_mesh_mb for s in samples], label="RSS mesh (MB)", color="tab:red")
    ax1b.plot(t, [s.rss_sim_mb for s in samples], label="RSS simulator (MB)", color="tab:orange")
    ax1b.set_ylabel("MB")
    ax1.legend(loc="upper left", fontsize=8)
    ax1b.legend(loc="lower right", fontsize=8)
    ax1.set_title("in flight and memory over time")
    xs = [lv["in_flight_mean"] for lv in levels]
    ax2.plot(xs, [lv["rss_mesh_mb"] for lv in levels], "o-", label="mesh process", color="tab:red")
    ax2.plot(xs, [lv["rss_sim_mb"] for lv in levels], "o-", label="simulator process", color="tab:orange")
    ax2.set_xlabel("tasks in flight (steady window)")
    ax2.set_ylabel("RSS, MB (median over window)")
    ax2.set_title("RSS vs tasks in flight")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", flush=True)
    return path


# --- main ----------------------------------------------------------------------------------------------


async def main_async(ns: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="am-conc-"))
    fleet = SimFleet(ns.replicas, ns.profile, workdir)
    t0 = time.monotonic()
    await fleet.start()
    discovery = MemoryDiscovery()
    cache = EndpointCache(discovery)
    mesh: LocalMesh | None = None
    llm: LlmClient | None = None
    sampler_task: asyncio.Task[None] | None = None
    phases: list[dict[str, Any]] = []
    try:
        model = await fleet.register(discovery)
        connector_limit = ns.connector_limit or LLM_CONNECTOR_LIMIT
        llm = LlmClient(model, cache, transport=AiohttpTransport(connector_limit=connector_limit))
        # Every replica must be able to hold its share of the tasks in flight (p2c spreads them
        # unevenly for a moment at admission, hence the 25% margin).
        per_replica = math.ceil(1.25 * ns.in_flight / ns.agent_replicas)
        limits = ReplicaLimits(concurrency=per_replica, inbox=per_replica)
        program = Sequential("one-call", [ROLE])
        mesh = LocalMesh(
            run_id=RUN_ID,
            roles={
                ROLE: LocalRole(
                    ChatOnce,
                    replicas=ns.agent_replicas,
                    limits=limits,
                    params={"max_tokens": ns.max_tokens},
                    llm=llm,
                )
            },
            programs={program.name: program},
            discovery=discovery,
        )
        await mesh.start()
        sampler = Sampler(fleet, t0)
        idle = await sampler.sample()
        sampler_task = asyncio.create_task(sampler.loop())

        ceiling_tok_s = sum(c["simulator"]["max_decode_tokens_per_s"] for c in fleet.cards)
        rate, prompt_tokens = fleet_task_ceiling(ns.profile, ns.replicas, ns.max_tokens)
        targets = [*ns.stages, ns.in_flight]
        plan = []
        for k, target in enumerate(targets):
            # A stage holds `target` in flight for `hold_s` after one full turnover; the last phase
            # runs --tasks rows.
            n = ns.tasks if k == len(targets) - 1 else int(2 * target + rate * ns.hold_s)
            plan.append((k, target, n))
        print(
            f"simulator: {ns.replicas} x {ns.profile}, decode ceiling {ceiling_tok_s:.0f} tok/s; "
            f"task ceiling {rate:.0f} tasks/s at {prompt_tokens} prompt + {ns.max_tokens} output tokens "
            f"(prefill included); phases (max_in_flight, rows): {[(t, n) for _, t, n in plan]}",
            flush=True,
        )
        for k, target, n in plan:
            expected = n / rate
            print(
                f"phase {k}: max_in_flight {target}, {n} rows (~{expected:.0f} s at the ceiling)", flush=True
            )
            res = await run_phase(
                k,
                target,
                n,
                discovery=discovery,
                program=program,
                sampler=sampler,
                workdir=workdir,
                timeout_s=3 * expected + 60,
            )
            phases.append(res)
            print(
                f"  done {res['done']} failed {res['failed']} in {res['wall_s']:.1f} s "
                f"({res['done'] / res['wall_s']:.0f} tasks/s)",
                flush=True,
            )
        sampler_task.cancel()
        samples = sampler.samples
        levels = []
        for k, target, n in plan:
            win = steady_window(samples, k, target, n)
            levels.append({"max_in_flight": target, **analyse_window(win, fleet.cards, rate, ns.max_tokens)})
        return {
            "fleet": fleet,
            "idle": idle,
            "samples": samples,
            "phases": phases,
            "levels": levels,
            "model": model,
            "prompt_tokens": prompt_tokens,
            "task_ceiling_per_s": rate,
            "connector_limit": connector_limit,
            "limits": asdict(limits),
            "wall_s": time.monotonic() - t0,
        }
    finally:
        if sampler_task is not None:
            sampler_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler_task
        if mesh is not None:
            await mesh.stop()
        if llm is not None:
            await llm.close()
        await cache.close()
        await fleet.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def report(ns: argparse.Namespace, r: dict[str, Any]) -> dict[str, Any]:
    levels: list[dict[str, Any]] = r["levels"]
    phases: list[dict[str, Any]] = r["phases"]
    samples: list[Sample] = r["samples"]
    fleet: SimFleet = r["fleet"]
    idle: Sample = r["idle"]
    ok = [lv for lv in levels if lv.get("samples", 0) >= 2]
    xs = [lv["in_flight_mean"] for lv in ok]
    slope_mesh = _slope(xs, [lv["rss_mesh_mb"] for lv in ok]) * 1000
    slope_sim = _slope(xs, [lv["rss_sim_mb"] for lv in ok]) * 1000
    full = levels[-1]
    failed = sum(p["failed"] for p in phases)
    peak = max(s.in_flight for s in samples)
    card = fleet.cards[0]["simulator"]

    print_table(
        f"Concurrency vs the vLLM-compatible SIMULATOR ({ns.replicas} x {ns.profile}, "
        f"max_num_seqs {card['max_num_seqs']}, {ns.max_tokens} tokens per call) — steady windows",
        [
            "max in flight",
            "in flight (mean)",
            "window s",
            "RSS mesh MB",
            "RSS sim MB",
            "tasks/s",
            "vs ceiling",
            "sim busy",
            "batch occ.",
            "sim run/wait",
            "in mesh",
            "CPU mesh/sim",
        ],
        [
            [
                lv["max_in_flight"],
                lv.get("in_flight_mean", math.nan),
                lv.get("duration_s", math.nan),
                lv.get("rss_mesh_mb", math.nan),
                lv.get("rss_sim_mb", math.nan),
                lv.get("tasks_per_s", math.nan),
                f"{lv.get('tasks_vs_ceiling', math.nan):.1%}",
                f"{lv.get('sim_utilisation_mean', math.nan):.1%}",
                f"{lv.get('batch_occupancy_mean', math.nan):.1%}",
                f"{lv.get('sim_running_mean', math.nan):.0f}/{lv.get('sim_waiting_mean', math.nan):.0f}",
                lv.get("in_mesh_mean", math.nan),
                f"{lv.get('cpu_mesh_cores', math.nan):.2f}/{lv.get('cpu_sim_cores', math.nan):.2f}",
            ]
            for lv in levels
        ],
    )
    full_phase = [s for s in samples if s.phase == len(levels) - 1]
    summary = {
        "peak_in_flight": peak,
        "failed_tasks": failed,
        "recovered_tasks": sum(p["recovered"] for p in phases),
        "rss_idle_mesh_mb": idle.rss_mesh_mb,
        "rss_idle_sim_mb": idle.rss_sim_mb,
        "rss_slope_mesh_mb_per_1k_in_flight": slope_mesh,
        "rss_slope_sim_mb_per_1k_in_flight": slope_sim,
        "rss_peak_mesh_mb_full_phase": max(s.rss_mesh_mb for s in full_phase),
        "steady_full_rss_mesh_start_mb": full.get("rss_mesh_start_mb"),
        "steady_full_rss_mesh_end_mb": full.get("rss_mesh_end_mb"),
        "steady_full_rss_mesh_mb_per_10k_completed": full.get("rss_mesh_mb_per_10k_completed"),
        "steady_full_rss_sim_start_mb": full.get("rss_sim_start_mb"),
        "steady_full_rss_sim_end_mb": full.get("rss_sim_end_mb"),
        "steady_full_tasks_completed": full.get("tasks_completed_in_window"),
        "steady_full_duration_s": full.get("duration_s"),
        "sim_utilisation_full": full.get("sim_utilisation_mean"),
        "sim_utilisation_full_min_replica": full.get("sim_utilisation_min"),
        "sim_utilisation_full_model_time": full.get("sim_utilisation_model_time"),
        "sim_lag_fraction_full": full.get("sim_lag_fraction"),
        "batch_occupancy_full": full.get("batch_occupancy_mean"),
        "tokens_vs_ceiling_full": full.get("tokens_vs_ceiling"),
        "tasks_per_s_full": full.get("tasks_per_s"),
        "task_ceiling_per_s": full.get("task_ceiling_per_s"),
        "tasks_vs_ceiling_full": full.get("tasks_vs_ceiling"),
        "load_avg_1m_max": max(s.load1 for s in samples),
        "target_busy": 0.95,
        "meets_busy_target_wall": (full.get("sim_utilisation_mean") or 0) >= 0.95,
        "meets_busy_target_model_time": (full.get("sim_utilisation_model_time") or 0) >= 0.95,
    }
    su = summary
    print_table(
        "Summary",
        ["measure", "value"],
        [
            ["peak tasks in flight", peak],
            ["failed tasks (all phases) / re-admitted by recovery", f"{failed} / {su['recovered_tasks']}"],
            ["RSS idle, mesh / simulator (MB)", f"{idle.rss_mesh_mb:.0f} / {idle.rss_sim_mb:.0f}"],
            ["RSS slope, mesh (MB per 1,000 in flight)", slope_mesh],
            ["RSS slope, simulator (MB per 1,000 in flight)", slope_sim],
            ["RSS peak, mesh, full-load phase (admission burst included)", su["rss_peak_mesh_mb_full_phase"]],
            [
                f"RSS mesh at {full['max_in_flight']} in flight, first -> last quarter of the window (MB)",
                f"{full.get('rss_mesh_start_mb', math.nan):.0f} -> "
                f"{full.get('rss_mesh_end_mb', math.nan):.0f} over "
                f"{full.get('tasks_completed_in_window', 0)} tasks completed in "
                f"{full.get('duration_s', math.nan):.0f} s; trend "
                f"{full.get('rss_mesh_mb_per_10k_completed', math.nan):+.1f} MB per 10k completed",
            ],
            [
                "RSS simulator, first -> last quarter of the window (MB)",
                f"{full.get('rss_sim_start_mb', math.nan):.0f} -> {full.get('rss_sim_end_mb', math.nan):.0f}",
            ],
            [
                "simulator busy: busy s / wall s, mean (min replica)",
                f"{su['sim_utilisation_full']:.1%} ({su['sim_utilisation_full_min_replica']:.1%})",
            ],
            [
                "simulator lag: wall time it ran behind its own model (no CPU)",
                f"{su['sim_lag_fraction_full']:.1%}",
            ],
            [
                "simulator busy in model time: busy s / (wall s - lag s)",
                f"{su['sim_utilisation_full_model_time']:.1%}",
            ],
            ["mean batch occupancy (running / max_num_seqs)", f"{su['batch_occupancy_full']:.1%}"],
            [
                "generated tok/s vs decode ceiling (full batch, no prefill)",
                f"{su['tokens_vs_ceiling_full']:.1%}",
            ],
            [
                "tasks/s (completions) / the fleet's task ceiling (baseline, prefill included)",
                f"{su['tasks_per_s_full']:.0f} / {su['task_ceiling_per_s']:.0f}",
            ],
            [
                "backend work vs the baseline (generated tokens / ceiling x max_tokens)",
                f"{su['tasks_vs_ceiling_full']:.1%}",
            ],
            [
                "machine load average (1 min), max during the run",
                f"{su['load_avg_1m_max']:.1f} on {os.cpu_count()} cores",
            ],
            ["total wall time (s)", f"{r['wall_s']:.0f}"],
        ],
    )
    return {
        "backend": "vLLM-compatible SIMULATOR (agentmesh.llm_gateway.simulator), not vLLM",
        "command": "python bench/concurrency.py " + " ".join(sys.argv[1:]),
        "config": {
            "tasks": ns.tasks,
            "in_flight": ns.in_flight,
            "stages": ns.stages,
            "hold_s": ns.hold_s,
            "replicas": ns.replicas,
            "profile": ns.profile,
            "max_tokens": ns.max_tokens,
            "fixed_output_len": True,
            "agent_replicas": ns.agent_replicas,
            "agent_limits": r["limits"],
            "llm_connector_limit": r["connector_limit"],
            "model": r["model"],
            "prompt_tokens_per_call": r["prompt_tokens"],
        },
        "baseline": {
            "what": "the simulated fleet's own maximum on this workload: its batching model run in virtual "
            "time on a queue that never empties (prefill included), and its decode ceiling (full batch, "
            "no prefill)",
            "task_ceiling_per_s": r["task_ceiling_per_s"],
            "decode_ceiling_tokens_per_s": sum(
                c["simulator"]["max_decode_tokens_per_s"] for c in fleet.cards
            ),
        },
        "simulator_params": [c["simulator"] for c in fleet.cards],
        "summary": summary,
        "levels": levels,
        "phases": phases,
        "samples": [asdict(s) for s in samples],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=None, help="rows of the full-load phase (default 40000)")
    parser.add_argument("--in-flight", type=int, default=None, help="max tasks in flight (default 10000)")
    parser.add_argument("--replicas", type=int, default=4, help="simulated LLM replicas")
    parser.add_argument("--profile", default="llama-3.1-8b-h100", help="simulator profile")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per chat call")
    parser.add_argument(
        "--agent-replicas",
        type=int,
        default=2,
        help="replicas of the LLM role",
    )
    parser.add_argument(
        "--stages", default=None, help="comma-separated lower in-flight levels (default in-flight/10, /2)"
    )
    parser.add_argument("--hold-s", type=float, default=None, help="steady seconds per lower stage")
    parser.add_argument(
        "--connector-limit",
        type=int,
        default=0,
        help=f"LlmClient connections (default {LLM_CONNECTOR_LIMIT})",
    )
    parser.add_argument("--quick", action="store_true", help="~30 s smoke test (2,000 in flight)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--replot",
        action="store_true",
        help=f"only redraw {PLOT_PATH.name} from bench/results/concurrency.json",
    )
    ns = parser.parse_args()
    if ns.replot:
        saved = json.loads((RESULTS / "concurrency.json").read_text())
        samples = [Sample(**d) for d in saved["samples"]]
        plot(samples, [lv for lv in saved["levels"] if lv.get("samples", 0) >= 2], PLOT_PATH)
        return
    if ns.in_flight is None:
        ns.in_flight = 2000 if ns.quick else 10_000
    if ns.tasks is None:
        ns.tasks = 6000 if ns.quick else 40_000
    if ns.hold_s is None:
        ns.hold_s = 3.0 if ns.quick else 8.0
    if ns.stages is None:
        ns.stages = [ns.in_flight // 10, ns.in_flight // 2]
    else:
        ns.stages = [int(x) for x in str(ns.stages).split(",") if x.strip()]
    if ns.tasks < 2 * ns.in_flight:
        parser.error(f"--tasks must be at least 2 x --in-flight ({2 * ns.in_flight}) for a steady window")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    r = asyncio.run(main_async(ns))
    payload = report(ns, r)
    write_json("concurrency_quick" if ns.quick else "concurrency", payload)
    if not ns.no_plot and not ns.quick:
        plot(r["samples"], [lv for lv in r["levels"] if lv.get("samples", 0) >= 2], PLOT_PATH)
    if payload["summary"]["failed_tasks"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
