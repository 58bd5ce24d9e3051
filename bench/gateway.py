"""Client-side power of two choices against a real nginx ``least_conn`` proxy and uniform random choice.

    python bench/gateway.py                      # 8 and 16 replicas, ~5 min
    python bench/gateway.py --quick              # ~1.5 min smoke run
    python bench/gateway.py --replicas 8,16 --duration 20 --concurrency 1024

Needs nginx on PATH (Debian: ``apt-get install -y nginx``; the benchmark starts its own instance).

Backend: the vLLM-compatible SIMULATOR (not vLLM), profile ``llama-3.1-8b-h100`` with
``--max-num-seqs`` (default 32); every request gets exactly the ``max_tokens`` it asks for, drawn
uniformly from [m/2, 3m/2] for a mean m of ``--max-tokens`` (default 128) by each caller's own
seeded RNG, so all configurations send the same requests. Half the replicas run at
``--slow-factor`` (default 2: every decode step twice as long), so the fleet is heterogeneous. Fast
and slow replicas are two separate simulator processes, apart from this one.

Load: a closed loop of ``--concurrency`` callers in this process (default 1.5 x the fleet's batch
slots, n x max_num_seqs; the saturation sweep shows why), each sending one chat request after the
other. Every configuration gets the same fleet, the same request, the same callers, a warm-up of
``--warmup`` seconds before its window of ``--duration`` seconds, and an idle fleet to start from.
Configurations, in this order, one fleet per size:

``direct``
    The floor: the benchmark calls the replicas itself with the bare HTTP transport (the same
    :class:`AiohttpTransport` the client uses, plus ``json.loads``), choosing the replica with the
    fewest of its own requests in flight (exact join-shortest-queue, no retries, no tracing).
``p2c``
    (a) agentmesh: ``LlmClient(policy="p2c")`` over the replicas registered in discovery.
``nginx``
    (b) the issue's baseline: one nginx in front of the replicas, ``least_conn``, upstream
    keepalive, ``worker_processes`` stated in the output (1 by default, nginx's own default), the
    upstream state shared between workers (``zone``). The client is the same ``LlmClient`` code
    path with ONE endpoint registered in discovery: nginx's address (with one candidate the
    client's choice is a no-op; ``probe=none``, since a proxy is not a replica).
``nginx_rr``
    (b') the same nginx with nginx's default round robin, which is what LLM-Swarm's own template
    (``templates/nginx.template.conf``) configures: no balancing directive, no upstream keepalive
    (kept here, so only the balancing differs from (b)).
``random``
    (c) ``LlmClient(policy="random")``: uniform choice among the replicas.

Measured, per configuration, over the window:

* requests/s: replies completed in the window / window; and as a share of the fleet's ceiling (its
  own batching model in virtual time on a queue that never empties, prefill included).
* overhead per request: client-observed latency minus the replica's own time for the request, which
  the simulator returns in ``x-sim-service-time`` (from its handler's entry to the reply built,
  queueing in the replica included). It is everything outside the replica: the client library,
  sockets, event-loop waits, and nginx for (b). **Added latency** of a configuration = its overhead
  percentile minus the same percentile of ``direct`` in the same run, at the same concurrency.
  Latency and overhead percentiles are over the requests both sent and answered inside the window
  (requests sent in the start-up burst, when every caller opens its connection at once, would
  measure that burst instead of the steady state).
* imbalance: the replicas' own in-flight counts (running + waiting, from ``GET /sim/stats``),
  sampled every ``--sample-every`` seconds; per sample max / mean over replicas; reported: the mean
  over samples (and the 95th percentile).
* utilisation: batch occupancy from the simulator's accounting: sequence-seconds of batch slots
  occupied (step duration x batch size, summed) / (seconds x max_num_seqs), over all replicas
  between the window's first and last snapshot. 100% = every replica decoding a full batch all the
  time. Also: busy (>= 1 sequence running) and the seconds the simulator itself ran late for want of
  CPU ("lag"), and CPU use of each process and of the machine, to show the cores were not the limit.

Goals (issue 3) on (a): >= 1.3x the requests/s of (b), added latency p50 <= 0.5 ms, imbalance
<= 1.2, utilisation >= 95%. Printed as PASS/MISS per fleet size, with the ratios (a)/(b), (a)/(b')
and (a)/(c).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_seconds, percentile, print_table, write_json

from agentmesh.discovery import Endpoint, EndpointCache
from agentmesh.discovery.memory import MemoryDiscovery
from agentmesh.llm_gateway.balancer import Policy
from agentmesh.llm_gateway.client import AiohttpTransport, LlmClient, TransportResponse, llm_service_name
from agentmesh.llm_gateway.sim_profiles import get_profile
from agentmesh.llm_gateway.simulator import SERVICE_TIME_HEADER, plan_chat, simulate_offline

__all__ = ["imbalance", "main", "nginx_conf", "utilisation"]

CONFIGS = ("direct", "p2c", "nginx", "nginx_rr", "random")
LABELS = {
    "direct": "direct (floor)",
    "p2c": "(a) p2c client",
    "nginx": "(b) nginx least_conn",
    "nginx_rr": "(b') nginx round-robin",
    "random": "(c) random client",
}
QUESTION = "Summarise the main idea of the last paragraph in one sentence."
GOAL_RATIO_VS_NGINX = 1.3
GOAL_ADDED_P50_MS = 0.5
GOAL_IMBALANCE = 1.2
GOAL_UTILISATION = 0.95


# --- pure pieces (unit-tested) ---------------------------------------------------------------------


def imbalance(samples: Sequence[Sequence[float]]) -> list[float]:
    """Per sample, max / mean of the per-replica in-flight counts (samples with nothing in flight are
    skipped: an idle fleet is not imbalanced)."""
    out: list[float] = []
    for counts in samples:
        if not counts:
            continue
        mean = sum(counts) / len(counts)
        if mean > 0:
            out.append(max(counts) / mean)
    return out


def utilisation(before: Sequence[Mapping[str, float]], after: Sequence[Mapping[str, float]]) -> float:
    """Batch occupancy of the fleet between two ``/sim/stats`` snapshots (one per replica, same order):
    slot-seconds used / slot-seconds available."""
    used = 0.0
    available = 0.0
    for b, a in zip(before, after, strict=True):
        used += a["slot_busy_s"] - b["slot_busy_s"]
        available += (a["uptime_s"] - b["uptime_s"]) * a["max_num_seqs"]
    return used / available if available > 0 else math.nan


def nginx_conf(
    *,
    upstreams: Sequence[str],
    port: int,
    workdir: Path,
    workers: int,
    keepalive: int,
    worker_connections: int,
    balance: str = "least_conn",
) -> str:
    """nginx.conf for a proxy on 127.0.0.1:``port`` in front of ``upstreams`` (``host:port``),
    balancing by ``balance`` (``least_conn`` or ``round_robin``, nginx's default), every path and
    temp dir inside ``workdir``, in the foreground."""
    if not upstreams:
        raise ValueError("upstreams: expected at least one host:port")
    if balance not in ("least_conn", "round_robin"):
        raise ValueError(f"balance: expected 'least_conn' or 'round_robin', got {balance!r}")
    method = "least_conn;" if balance == "least_conn" else "# round robin (nginx's default)"
    if workers < 1:
        raise ValueError(f"workers: expected >= 1, got {workers}")
    d = workdir
    servers = "\n".join(f"        server {u} max_fails=0;" for u in upstreams)
    return f"""# written by bench/gateway.py
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile {4 * worker_connections};
pid {d}/nginx.pid;
error_log {d}/error.log warn;

events {{
    worker_connections {worker_connections};
}}

http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_timeout 300s;
    keepalive_requests 1000000;

    upstream replicas {{
        {method}
        # balancing state shared by all workers (with one worker this changes nothing)
        zone replicas 1m;
{servers}
        keepalive {keepalive};
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}

    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://replicas;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
        }}
    }}
}}
"""


# --- processes: simulated replicas and nginx ---------------------------------------------------------


def _die_with_parent() -> None:
    """In the child: SIGTERM when the benchmark dies, so nothing is left behind (Linux)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


async def _stop_process(proc: asyncio.subprocess.Process, sig: int = signal.SIGTERM) -> None:
    if proc.returncode is None:
        proc.send_signal(sig)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@dataclass
class Fleet:
    """``n`` simulated replicas in two processes: the fast half and the slow half."""

    n: int
    profile: str
    max_num_seqs: int
    slow_factor: float
    workdir: Path
    procs: list[asyncio.subprocess.Process] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    slowdowns: list[float] = field(default_factory=list)
    model: str = ""

    async def start(self) -> None:
        n_slow = self.n // 2
        groups = [(self.n - n_slow, 1.0, 0), (n_slow, self.slow_factor, 1000)]
        for k, (count, slowdown, seed) in enumerate(groups):
            if count == 0:
                continue
            cmd = [
                sys.executable,
                "-m",
                "agentmesh.llm_gateway.simulator",
                "--port=0",
                f"--replicas={count}",
                f"--profile={self.profile}",
                f"--max-num-seqs={self.max_num_seqs}",
                f"--slowdown={slowdown}",
                f"--seed={seed}",
                "--fixed-output-len",
            ]
            err_path = self.workdir / f"sim{self.n}-{k}.stderr"
            with open(err_path, "wb") as err:
                proc = await asyncio.create_subprocess_exec(
                    *cmd, stdout=asyncio.subprocess.PIPE, stderr=err, preexec_fn=_die_with_parent
                )
            self.procs.append(proc)
            assert proc.stdout is not None
            got = 0
            while got < count:
                line = await asyncio.wait_for(proc.stdout.readline(), 60)
                if not line:
                    raise RuntimeError(f"simulator exited early: {err_path.read_text()[-2000:]}")
                text = line.decode().strip()
                if text.startswith("SIMULATOR_READY "):
                    self.urls.append(text.split(" ", 1)[1])
                    self.slowdowns.append(slowdown)
                    got += 1
        self.model = get_profile(self.profile).model

    @property
    def addresses(self) -> list[str]:
        return [u.removeprefix("http://") for u in self.urls]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    async def stop(self) -> None:
        for p in self.procs:
            await _stop_process(p)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Nginx:
    """A private nginx in the foreground (``daemon off``): own config, pid file, logs, temp dirs."""

    def __init__(
        self, upstreams: Sequence[str], workdir: Path, *, workers: int, keepalive: int, balance: str
    ) -> None:
        self.upstreams = list(upstreams)
        self.balance = balance
        self.workdir = workdir
        self.workers = workers
        self.keepalive = keepalive
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.binary = shutil.which("nginx") or next(
            (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(p)), None
        )
        self.version = ""

    async def start(self, worker_connections: int) -> None:
        if self.binary is None:
            raise RuntimeError("nginx not found: install it (Debian: apt-get install -y nginx)")
        out = await asyncio.create_subprocess_exec(self.binary, "-v", stderr=asyncio.subprocess.PIPE)
        _, banner = await out.communicate()
        self.version = banner.decode().strip().removeprefix("nginx version: ")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _attempt in range(5):
            self.port = _free_port()  # a small race with other processes; retried below
            conf = self.workdir / "nginx.conf"
            conf.write_text(
                nginx_conf(
                    upstreams=self.upstreams,
                    port=self.port,
                    workdir=self.workdir,
                    workers=self.workers,
                    keepalive=self.keepalive,
                    worker_connections=worker_connections,
                    balance=self.balance,
                )
            )
            log = self.workdir / "stderr.log"
            with open(log, "ab") as err:
                self.proc = await asyncio.create_subprocess_exec(
                    self.binary,
                    "-p",
                    str(self.workdir),
                    "-c",
                    str(conf),
                    "-e",
                    str(self.workdir / "error.log"),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=err,
                    preexec_fn=_die_with_parent,
                )
            if await self._wait_listening():
                return
            await _stop_process(self.proc, signal.SIGQUIT)
        raise RuntimeError(f"nginx did not start: {(self.workdir / 'error.log').read_text()[-2000:]}")

    async def _wait_listening(self) -> bool:
        assert self.proc is not None
        for _ in range(100):
            if self.proc.returncode is not None:
                return False
            with contextlib.suppress(OSError):
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                return True
            await asyncio.sleep(0.05)
        return False

    @property
    def pids(self) -> list[int]:
        """The master and its workers."""
        if self.proc is None:
            return []
        master = self.proc.pid
        pids = [master]
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == master:
                            pids.append(int(entry))
        return pids

    async def stop(self) -> None:
        if self.proc is not None:
            await _stop_process(self.proc, signal.SIGQUIT)  # SIGQUIT: graceful shutdown


# --- the client side --------------------------------------------------------------------------------

# Each caller task holds a one-element list here; the transport writes the replica's service time
# into it, so the caller can pair it with the latency it measured around the whole call.
_SERVICE_TIME: contextvars.ContextVar[list[float]] = contextvars.ContextVar("service_time")


class TimedTransport(AiohttpTransport):
    """:class:`AiohttpTransport` that hands the reply's ``x-sim-service-time`` to the caller."""

    async def post_json(
        self, url: str, payload: Mapping[str, Any], *, headers: Mapping[str, str], timeout_s: float
    ) -> TransportResponse:
        resp = await super().post_json(url, payload, headers=headers, timeout_s=timeout_s)
        slot = _SERVICE_TIME.get(None)
        if slot is not None:
            slot[0] = float(resp.headers.get(SERVICE_TIME_HEADER, "nan"))
        return resp


async def register(
    discovery: MemoryDiscovery, model: str, addresses: Sequence[str], prefix: str, **meta: str
) -> None:
    for i, address in enumerate(addresses):
        metadata = {"scheme": "http", "model": model, **meta}
        await discovery.register(Endpoint(llm_service_name(model), f"{prefix}-{i}", address, metadata))


# --- one measurement ----------------------------------------------------------------------------------


class StatsReader:
    """Reads ``GET /sim/stats`` of every replica (its own HTTP session, not the callers')."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = list(urls)
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    async def read(self) -> list[dict[str, float]]:
        async def one(url: str) -> dict[str, float]:
            async with self.session.get(f"{url}/sim/stats") as resp:
                data: dict[str, float] = await resp.json()
                return data

        return list(await asyncio.gather(*(one(u) for u in self.urls)))

    async def wait_idle(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(s["running"] + s["waiting"] == 0 for s in await self.read()):
                return
            await asyncio.sleep(0.1)
        raise RuntimeError("the simulated fleet did not drain")

    async def close(self) -> None:
        await self.session.close()


def _machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + vals[4]
    return float(sum(vals) - idle), float(sum(vals))


def _cpu(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


async def measure(
    name: str,
    call: Callable[[random.Random], Awaitable[None]],
    *,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    sample_every_s: float,
    stats: StatsReader,
    pids: Mapping[str, Sequence[int]],
) -> dict[str, Any]:
    """Run ``concurrency`` callers of ``call`` in a closed loop; measure the window after warm-up.

    ``call(rng)`` gets its caller's own RNG (seeded by the caller's index), so every configuration
    sends the same sequence of requests from each caller."""
    window = [math.inf, math.inf]
    lat: list[float] = []
    overhead: list[float] = []
    errors: list[str] = []
    done = [0]

    async def caller(index: int) -> None:
        slot = [math.nan]
        _SERVICE_TIME.set(slot)
        rng = random.Random(index)
        while True:
            slot[0] = math.nan
            t = time.perf_counter()
            try:
                await call(rng)
            except Exception as exc:  # counted and shown; the loop goes on
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                await asyncio.sleep(0.01)
                continue
            end = time.perf_counter()
            if window[0] <= end < window[1]:
                done[0] += 1
                # Latencies only of requests sent inside the window: the ones sent in the start-up
                # burst (every caller at once, new connections) carry its queueing, not steady state.
                if t >= window[0]:
                    lat.append(end - t)
                    overhead.append(end - t - slot[0])

    in_flight: list[list[float]] = []

    async def sampler() -> None:
        while True:
            await asyncio.sleep(sample_every_s)
            snap = await stats.read()
            if window[0] <= time.perf_counter() < window[1]:
                in_flight.append([s["running"] + s["waiting"] for s in snap])

    await stats.wait_idle()
    tasks = [asyncio.create_task(caller(i)) for i in range(concurrency)]
    await asyncio.sleep(warmup_s)
    snap0 = await stats.read()
    cpu0 = {k: _cpu(v) for k, v in pids.items()}
    m0 = _machine_cpu()
    window[0] = t0 = time.perf_counter()
    window[1] = t0 + duration_s
    sample_task = asyncio.create_task(sampler())
    await asyncio.sleep(duration_s)
    t1 = time.perf_counter()
    snap1 = await stats.read()
    cpu1 = {k: _cpu(v) for k, v in pids.items()}
    m1 = _machine_cpu()
    sample_task.cancel()
    for t in tasks:
        t.cancel()
    await asyncio.gather(sample_task, *tasks, return_exceptions=True)
    wall = t1 - t0
    ratios = imbalance(in_flight)
    missing_header = sum(1 for o in overhead if math.isnan(o))
    good = [o for o in overhead if not math.isnan(o)]
    uptime = sum(a["uptime_s"] - b["uptime_s"] for a, b in zip(snap0, snap1, strict=True))
    return {
        "config": name,
        "concurrency": concurrency,
        "window_s": wall,
        "completed": done[0],
        "latency_samples": len(lat),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
        "missing_service_time": missing_header,
        "req_per_s": done[0] / wall,
        "latency_p50_s": percentile(lat, 50),
        "latency_p99_s": percentile(lat, 99),
        "overhead_p50_ms": percentile(good, 50) * 1e3,
        "overhead_p99_ms": percentile(good, 99) * 1e3,
        "imbalance_mean": sum(ratios) / len(ratios) if ratios else math.nan,
        "imbalance_p95": percentile(ratios, 95),
        "imbalance_samples": len(ratios),
        "in_flight_mean_per_replica": [sum(col) / len(col) for col in zip(*in_flight, strict=True)]
        if in_flight
        else [],
        "utilisation": utilisation(snap0, snap1),
        "busy": sum(a["busy_s"] - b["busy_s"] for a, b in zip(snap0, snap1, strict=True)) / uptime,
        "sim_lag_s": sum(a["lag_s"] - b["lag_s"] for a, b in zip(snap0, snap1, strict=True)),
        "cpu_share": {k: (cpu1[k] - cpu0[k]) / wall for k in pids},
        "machine_cpu_busy": (m1[0] - m0[0]) / (m1[1] - m0[1]) if m1[1] > m0[1] else math.nan,
    }


async def run_config(
    name: str, fleet: Fleet, ns: argparse.Namespace, concurrency: int, stats: StatsReader, workdir: Path
) -> dict[str, Any]:
    messages = [{"role": "user", "content": QUESTION}]
    lo, hi = output_range(ns.max_tokens)
    pids: dict[str, list[int]] = {"loadgen": [os.getpid()], "simulators": fleet.pids}
    transport = TimedTransport()
    nginx: Nginx | None = None
    client: LlmClient | None = None
    cache: EndpointCache | None = None
    extra: dict[str, Any] = {}
    try:
        if name == "direct":
            urls = [f"{u}/v1/chat/completions" for u in fleet.urls]
            counts = [0] * len(urls)
            rng = random.Random(7)

            async def call(r: random.Random) -> None:
                body = {
                    "model": fleet.model,
                    "messages": messages,
                    "max_tokens": r.randint(lo, hi),
                    "temperature": 0.0,
                }
                i = min(range(len(counts)), key=lambda k: (counts[k], rng.random()))
                counts[i] += 1
                try:
                    resp = await transport.post_json(urls[i], body, headers={}, timeout_s=300.0)
                finally:
                    counts[i] -= 1
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
                json.loads(resp.body)

        else:
            discovery = MemoryDiscovery()
            cache = EndpointCache(discovery)
            if name in ("nginx", "nginx_rr"):
                balance = "least_conn" if name == "nginx" else "round_robin"
                nginx = Nginx(
                    fleet.addresses,
                    workdir / f"{name}-{fleet.n}",
                    workers=ns.nginx_workers,
                    keepalive=1024,
                    balance=balance,
                )
                await nginx.start(worker_connections=max(4096, 4 * concurrency))
                pids["nginx"] = nginx.pids
                extra["nginx"] = {
                    "version": nginx.version,
                    "worker_processes": ns.nginx_workers,
                    "balance": balance,
                }
                # probe=none: a proxy is not a replica; its /metrics would be some replica's.
                await register(discovery, fleet.model, [f"127.0.0.1:{nginx.port}"], "nginx", probe="none")
            else:
                await register(discovery, fleet.model, fleet.addresses, "sim")
            policy: Policy = "random" if name == "random" else "p2c"
            # The production defaults otherwise (load probes of the replicas' /metrics included).
            client = LlmClient(fleet.model, cache, policy=policy, transport=transport, timeout_s=300.0)
            llm = client

            async def call(r: random.Random) -> None:
                await llm.chat(messages, max_tokens=r.randint(lo, hi))

        result = await measure(
            name,
            call,
            concurrency=concurrency,
            warmup_s=ns.warmup,
            duration_s=ns.duration,
            sample_every_s=ns.sample_every,
            stats=stats,
            pids=pids,
        )
        result.update(extra)
        return result
    finally:
        if client is not None:
            await client.close()
        else:
            await transport.close()
        if cache is not None:
            with contextlib.suppress(Exception):
                await cache.close()
        if nginx is not None:
            await nginx.stop()


def output_range(mean: int) -> tuple[int, int]:
    """Output lengths are uniform in [mean/2, 3*mean/2]: varied lengths keep a closed loop from
    running in lockstep (fixed lengths make every batch finish, and every caller resend, at once)."""
    return max(1, mean // 2), max(1, mean // 2) + mean


def fleet_ceiling(fleet: Fleet, mean_tokens: int) -> float:
    """Requests/s the fleet does at most on this workload: each replica's batching model in virtual
    time on a queue that never empties (16 batches' worth at t=0, the same length distribution,
    prefill included), counted over the middle 60% of the run (no start-up or drain)."""
    total = 0.0
    lo, hi = output_range(mean_tokens)
    for i, slowdown in enumerate(fleet.slowdowns):
        params = get_profile(fleet.profile).replace(
            max_num_seqs=fleet.max_num_seqs, output_len=None, slowdown=slowdown, seed=i
        )
        body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": hi}
        prompt = plan_chat(params, body).prompt_tokens
        rng = random.Random(i)
        reqs = [(0.0, prompt, rng.randint(lo, hi)) for _ in range(16 * params.max_num_seqs)]
        results, _ = simulate_offline(params, reqs)
        end = max(r.finished_at for r in results)
        a, b = 0.2 * end, 0.8 * end
        total += sum(1 for r in results if a <= r.finished_at < b) / (b - a)
    return total


# --- the run -----------------------------------------------------------------------------------------


def _row(n: int, r: dict[str, Any], floor: dict[str, Any], ceiling: float) -> list[Any]:
    return [
        n,
        LABELS[r["config"]],
        r["concurrency"],
        r["req_per_s"],
        f"{r['req_per_s'] / ceiling:.1%}",
        r["overhead_p50_ms"],
        r["overhead_p99_ms"],
        "-" if r is floor else f"{r['overhead_p50_ms'] - floor['overhead_p50_ms']:+.3f}",
        "-" if r is floor else f"{r['overhead_p99_ms'] - floor['overhead_p99_ms']:+.3f}",
        r["latency_p50_s"],
        r["latency_p99_s"],
        f"{r['imbalance_mean']:.2f}",
        f"{r['utilisation']:.1%}",
        f"{r['busy']:.1%}",
        f"{r['sim_lag_s']:.2f}",
        " ".join(f"{k[:3]}={v:.0%}" for k, v in r["cpu_share"].items()),
        f"{r['machine_cpu_busy']:.0%}",
        r["errors"],
    ]


COLUMNS = [
    "replicas",
    "config",
    "callers",
    "req/s",
    "of ceiling",
    "ovh p50 ms",
    "ovh p99 ms",
    "added p50 ms",
    "added p99 ms",
    "lat p50 s",
    "lat p99 s",
    "imbalance",
    "utilisation",
    "busy",
    "sim lag s",
    "cpu (1 core = 100%)",
    "machine",
    "errors",
]


async def main_async(ns: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="agentmesh-gw-"))
    sizes = [int(x) for x in ns.replicas.split(",") if x.strip()]
    results: dict[str, Any] = {
        "params": {k: v for k, v in vars(ns).items()},
        "setup": {
            "profile": ns.profile,
            "max_num_seqs": ns.max_num_seqs,
            "max_tokens": ns.max_tokens,
            "slow_factor": ns.slow_factor,
            "nginx_worker_processes": ns.nginx_workers,
        },
        "sizes": [],
    }
    print(
        f"bench/gateway.py: simulator {ns.profile}, max_num_seqs {ns.max_num_seqs}, {ns.max_tokens} output "
        f"tokens on average, half the replicas {ns.slow_factor:g}x slower; "
        f"nginx worker_processes {ns.nginx_workers}; "
        f"warm-up {ns.warmup:g}s, window {ns.duration:g}s per configuration",
        flush=True,
    )
    rows: list[list[Any]] = []
    verdicts: list[list[Any]] = []
    try:
        for n in sizes:
            fleet = Fleet(n, ns.profile, ns.max_num_seqs, ns.slow_factor, workdir)
            stats: StatsReader | None = None
            try:
                await fleet.start()
                stats = StatsReader(fleet.urls)
                ceiling = fleet_ceiling(fleet, ns.max_tokens)
                slots = n * ns.max_num_seqs
                concurrency = ns.concurrency or math.ceil(1.5 * slots)
                size: dict[str, Any] = {
                    "replicas": n,
                    "slowdowns": fleet.slowdowns,
                    "batch_slots": slots,
                    "ceiling_req_per_s": ceiling,
                    "concurrency": concurrency,
                    "configs": {},
                }
                print(f"\n{n} replicas: {slots} batch slots, ceiling {ceiling:.0f} req/s", flush=True)
                if ns.sweep and n == max(sizes):
                    size["sweep"] = []
                    for mult in (0.5, 1.0, 1.5, 2.0):
                        sub = argparse.Namespace(**{**vars(ns), "duration": ns.sweep_duration})
                        r = await run_config(
                            "p2c", fleet, sub, max(1, math.ceil(mult * slots)), stats, workdir
                        )
                        r["slots_multiple"] = mult
                        size["sweep"].append(r)
                        print(
                            f"  sweep p2c {r['concurrency']:5d} callers ({mult:g}x slots): "
                            f"{r['req_per_s']:.0f} req/s ({r['req_per_s'] / ceiling:.1%} of ceiling), "
                            f"utilisation {r['utilisation']:.1%}",
                            flush=True,
                        )
                for name in CONFIGS:
                    r = await run_config(name, fleet, ns, concurrency, stats, workdir)
                    size["configs"][name] = r
                    print(
                        f"  {LABELS[name]:22s} {r['req_per_s']:7.1f} req/s, overhead p50 "
                        f"{r['overhead_p50_ms']:.3f} ms, imbalance {r['imbalance_mean']:.2f}, "
                        f"utilisation {r['utilisation']:.1%}, errors {r['errors']}",
                        flush=True,
                    )
                cfg = size["configs"]
                floor = cfg["direct"]
                for name in CONFIGS:
                    rows.append(_row(n, cfg[name], floor, ceiling))
                a, b, c = cfg["p2c"], cfg["nginx"], cfg["random"]
                added = {
                    k: {
                        "p50_ms": cfg[k]["overhead_p50_ms"] - floor["overhead_p50_ms"],
                        "p99_ms": cfg[k]["overhead_p99_ms"] - floor["overhead_p99_ms"],
                    }
                    for k in ("p2c", "nginx", "nginx_rr", "random")
                }
                size["added_latency"] = added
                goals = {
                    "throughput_a_over_b": (a["req_per_s"] / b["req_per_s"], GOAL_RATIO_VS_NGINX, ">="),
                    "added_p50_ms": (added["p2c"]["p50_ms"], GOAL_ADDED_P50_MS, "<="),
                    "imbalance": (a["imbalance_mean"], GOAL_IMBALANCE, "<="),
                    "utilisation": (a["utilisation"], GOAL_UTILISATION, ">="),
                }
                size["ratio_a_over_b"] = a["req_per_s"] / b["req_per_s"]
                size["ratio_a_over_b_round_robin"] = a["req_per_s"] / cfg["nginx_rr"]["req_per_s"]
                size["ratio_a_over_c"] = a["req_per_s"] / c["req_per_s"]
                size["goals"] = {}
                for goal, (value, target, op) in goals.items():
                    ok = value >= target if op == ">=" else value <= target
                    size["goals"][goal] = {"value": value, "goal": f"{op} {target}", "pass": ok}
                    verdicts.append([n, goal, f"{value:.3f}", f"{op} {target}", "PASS" if ok else "MISS"])
                results["sizes"].append(size)
            finally:
                if stats is not None:
                    await stats.close()
                await fleet.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    results["table"] = print_table(
        "bench/gateway.py — overhead = client latency - replica's own time; added = overhead - direct's",
        COLUMNS,
        rows,
    )
    print()
    for size in results["sizes"]:
        print(
            f"{size['replicas']} replicas: (a)/(b) = {size['ratio_a_over_b']:.2f}x, "
            f"(a)/(c) = {size['ratio_a_over_c']:.2f}x requests/s; "
            f"(a)/(b') = {size['ratio_a_over_b_round_robin']:.2f}x (nginx round-robin, LLM-Swarm's template)"
        )
    print()
    results["verdicts"] = print_table(
        "goals on (a)", ["replicas", "goal", "value", "target", "verdict"], verdicts
    )
    return results


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", default="8,16", help="comma-separated fleet sizes (default 8,16)")
    ap.add_argument("--duration", type=float, default=15.0, help="measurement window per configuration, s")
    ap.add_argument("--warmup", type=float, default=5.0, help="warm-up before each window, s")
    ap.add_argument(
        "--concurrency",
        type=int,
        default=0,
        help="closed-loop callers (default: 1.5 x the fleet's batch slots)",
    )
    ap.add_argument("--profile", default="llama-3.1-8b-h100")
    ap.add_argument("--max-num-seqs", type=int, default=32, help="batch capacity of each replica")
    ap.add_argument("--max-tokens", type=int, default=128, help="mean output tokens (uniform in [m/2, 3m/2])")
    ap.add_argument("--slow-factor", type=float, default=2.0, help="slowdown of the slow half of the fleet")
    ap.add_argument("--nginx-workers", type=int, default=1, help="nginx worker_processes")
    ap.add_argument("--sample-every", type=float, default=0.5, help="in-flight sampling period, s")
    ap.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the saturation sweep")
    ap.add_argument("--sweep-duration", type=float, default=6.0, help="window of each sweep point, s")
    ap.add_argument("--quick", action="store_true", help="~1.5 min: 4 s windows, 3 s warm-up, no sweep")
    ap.add_argument("--out", default="gateway", help="results name under bench/results/ (default gateway)")
    ns = ap.parse_args(argv)
    if ns.quick:
        ns.duration, ns.warmup, ns.sweep = 4.0, 3.0, False
    if ns.duration <= 0 or ns.warmup < 0 or ns.max_num_seqs < 1 or ns.max_tokens < 1 or ns.slow_factor <= 0:
        ap.error("--duration > 0, --warmup >= 0, --max-num-seqs >= 1, --max-tokens >= 1, --slow-factor > 0")
    results = asyncio.run(main_async(ns))
    write_json(ns.out, results)


if __name__ == "__main__":
    main()
