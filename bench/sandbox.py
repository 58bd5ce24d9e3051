"""Sandboxes as deployed: warm and cold acquire, a 100-wide burst, how many are held at once, and
the one-Ray-actor-per-sandbox alternative measured in the same run.

    .venv/bin/python bench/sandbox.py [--warm 200] [--cold 30] [--burst 100] [--held 1000] [--actors 10]

Setup: a real etcd (``EtcdServer(fast=True)``); the container registry and ONE sandbox holder each
run as an ``agentmesh container registry|holder`` subprocess on it, as deployed; the client
(:class:`agentmesh.container.client.ContainerClient`) runs in this process. Backend: bubblewrap.

Measured:

1. Warm acquire p50/p99: before every acquire the pool (target ``--pool``) is refilled and idle
   (``Pools`` shows warm == target, creating == 0), so each acquire meets the warm path; the
   fraction the registry reports as served warm (``AcquireReply.warm``). Release is not timed.
2. Cold create → first exec p50/p95: acquires keyed to a pool of target 0 (other limits:
   ``wall_time_s=29``), so each one creates; timed from the acquire call to the end of the first
   ``exec(["true"])``, also split into its acquire and exec parts.
3. Burst: ``--burst`` concurrent acquires against the idle warm pool; success rate, wall time,
   acquire p50/p99, and sandboxes created against requested. Counting: once the pool has refilled
   and nothing is creating, ``created_total`` (registry) has grown by exactly
   ``requested + warm_after - warm_before`` when nothing was over-created (the warm sandboxes were
   handed out, the rest created for their waiters, the pool refilled to its target); the excess
   over that is the over-creation.
4. Held at once: up to ``--held`` sandboxes acquired and kept, ``true`` run in each; the holder
   process's RSS (from /proc), the disk the sandbox root uses, and a second exec in every one.
5. Baseline: one Ray actor per sandbox (each container held by its own actor): a local Ray, an
   actor created per sandbox that creates a bubblewrap sandbox and runs its first exec, timed
   sequentially (p50); RSS of each actor's worker process. Ratios against 2. and 4.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, percentile, print_table, rss_bytes, write_json

from agentmesh.container.client import ContainerClient, SandboxRef
from agentmesh.discovery import EndpointCache, connect
from agentmesh.discovery.etcd_server import EtcdServer
from agentmesh.v1 import container_pb2 as cpb

__all__ = ["dir_usage_bytes", "over_creation", "pool_row", "summarize_ms", "verdicts"]

COLD_LIMITS = {"wall_time_s": 29.0}  # not the registry's default limits: a pool of its own, target 0
LEASE_S = 600.0  # nothing here may be reclaimed while the benchmark still uses it


# -- pure helpers (unit-tested) ----------------------------------------------------------------
def over_creation(requested: int, created_delta: int, warm_before: int, warm_after: int) -> int:
    """Sandboxes created beyond need during a burst of ``requested`` acquires.

    Need: every request not served from the ``warm_before`` ready ones is created for it, and the
    pool is refilled from what is left to ``warm_after``; so without over-creation
    ``created_delta == requested + warm_after - warm_before``.
    """
    return created_delta - (requested + warm_after - warm_before)


def pool_row(reply: cpb.PoolsReply, backend: str, target: int) -> cpb.PoolStats | None:
    """The pool of ``backend`` with this target (the reply does not name a pool's limits)."""
    for p in reply.pools:
        if p.backend == backend and p.target == target:
            return p
    return None


def summarize_ms(values_s: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max/mean in milliseconds of durations given in seconds."""
    if not values_s:
        return {"n": 0}
    return {
        "n": len(values_s),
        "p50_ms": percentile(values_s, 50) * 1e3,
        "p95_ms": percentile(values_s, 95) * 1e3,
        "p99_ms": percentile(values_s, 99) * 1e3,
        "max_ms": max(values_s) * 1e3,
        "mean_ms": sum(values_s) / len(values_s) * 1e3,
    }


def dir_usage_bytes(path: Path) -> int:
    """Disk blocks used under ``path`` (like ``du -s --block-size=1``), directories included."""
    total = 0
    stack = [path]
    while stack:
        d = stack.pop()
        try:
            st = d.lstat()
        except FileNotFoundError:
            continue
        total += st.st_blocks * 512
        if d.is_dir() and not d.is_symlink():
            with contextlib.suppress(FileNotFoundError, PermissionError):
                stack.extend(d.iterdir())
    return total


def verdicts(r: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(goal, measured, passed) for each of the issue's goals, from the results dict."""
    warm, cold, burst, held = r["warm"], r["cold"], r["burst"], r["held"]
    return [
        ("warm acquire p50 <= 30 ms", f"{warm['p50_ms']:.1f} ms", warm["p50_ms"] <= 30.0),
        ("warm acquire p99 <= 150 ms", f"{warm['p99_ms']:.1f} ms", warm["p99_ms"] <= 150.0),
        (
            "cold create -> first exec p50 <= 0.4 s",
            f"{cold['total']['p50_ms'] / 1e3:.3f} s",
            cold["total"]["p50_ms"] <= 400.0,
        ),
        (
            "burst: 100% success",
            f"{burst['succeeded']}/{burst['requested']}",
            burst["succeeded"] == burst["requested"],
        ),
        (
            "burst: no over-creation",
            f"created {burst['created_delta']}, needed {burst['created_needed']}",
            burst["over_created"] <= 0,
        ),
        (
            ">= 100 sandboxes held at once",
            f"{held['held']} held, {held['exec_ok_after']} exec ok",
            held["held"] >= 100 and held["exec_ok_after"] == held["held"],
        ),
    ]


def _slab_bytes() -> int:
    """Kernel slab memory of the whole machine (cgroups, dentries, inodes live there)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Slab:"):
                return int(line.split()[1]) * 1024
    return 0


# -- processes ----------------------------------------------------------------------------------
def _container_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "agentmesh.cli", "container", *args]


async def _spawn(args: list[str], log: Path) -> asyncio.subprocess.Process:
    """Start a service that prints one JSON line ``{"address": ...}`` once it serves."""
    with open(log, "ab") as err:
        proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=err)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    if not line:
        await proc.wait()
        raise RuntimeError(f"{args[4:6]} exited ({proc.returncode}) before serving; see {log}")
    json.loads(line)
    return proc


async def _stop(proc: asyncio.subprocess.Process, wait_s: float = 60.0) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), wait_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def _poll(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f}s for {what}")
        await asyncio.sleep(0.005)


class Bench:
    def __init__(self, client: ContainerClient, pool_target: int) -> None:
        self.client = client
        self.target = pool_target

    async def pool(self) -> tuple[cpb.PoolsReply, cpb.PoolStats]:
        reply = await self.client.pools()
        row = pool_row(reply, "bubblewrap", self.target)
        assert row is not None, f"no bubblewrap pool with target {self.target}: {reply}"
        return reply, row

    async def pool_idle(self) -> bool:
        _, row = await self.pool()
        return row.warm == self.target and row.creating == 0

    async def wait_idle(self, timeout_s: float = 120.0) -> cpb.PoolsReply:
        await _poll(self.pool_idle, timeout_s, f"the pool to hold {self.target} warm, none creating")
        return (await self.pool())[0]

    # 1 ------------------------------------------------------------------------------------------
    async def warm(self, n: int) -> dict[str, Any]:
        lat: list[float] = []
        warm = 0
        for _ in range(n):
            await self.wait_idle()
            t0 = time.perf_counter()
            ref = await self.client.acquire(lease_s=LEASE_S)
            lat.append(time.perf_counter() - t0)
            warm += ref.warm
            await self.client.release(ref)
        return {**summarize_ms(lat), "served_warm": warm, "warm_fraction": warm / n}

    # 2 ------------------------------------------------------------------------------------------
    async def cold(self, n: int) -> dict[str, Any]:
        acq: list[float] = []
        first: list[float] = []
        total: list[float] = []
        second: list[float] = []
        warm = 0
        for _ in range(n):
            t0 = time.perf_counter()
            ref = await self.client.acquire(limits=COLD_LIMITS, lease_s=LEASE_S)
            t1 = time.perf_counter()
            res = await self.client.exec(ref, ["true"])
            t2 = time.perf_counter()
            assert res.ok, res
            await self.client.exec(ref, ["true"])
            second.append(time.perf_counter() - t2)
            acq.append(t1 - t0)
            first.append(t2 - t1)
            total.append(t2 - t0)
            warm += ref.warm
            await self.client.release(ref)
        return {
            "total": summarize_ms(total),
            "acquire": summarize_ms(acq),
            "first_exec": summarize_ms(first),
            "second_exec": summarize_ms(second),
            "served_warm": warm,
        }

    # 3 ------------------------------------------------------------------------------------------
    async def burst(self, n: int) -> dict[str, Any]:
        before, row = await self.pool()
        warm_before = row.warm
        lat: list[float] = []
        refs: list[SandboxRef] = []
        errors: list[str] = []

        async def one() -> None:
            t0 = time.perf_counter()
            try:
                ref = await self.client.acquire(lease_s=LEASE_S, timeout_s=60.0)
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            lat.append(time.perf_counter() - t0)
            refs.append(ref)

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        wall = time.perf_counter() - t0
        after = await self.wait_idle()
        settled = time.perf_counter() - t0
        created = int(after.created_total - before.created_total)
        _, row_after = await self.pool()
        needed = n + row_after.warm - warm_before
        exec_ok = sum(r.ok for r in await asyncio.gather(*(self.client.exec(x, ["true"]) for x in refs)))
        for ref in refs:
            await self.client.release(ref)
        return {
            "requested": n,
            "succeeded": len(refs),
            "errors": errors[:5],
            "served_warm": sum(r.warm for r in refs),
            "warm_before": warm_before,
            "warm_after": row_after.warm,
            "created_delta": created,
            "created_needed": needed,
            "over_created": over_creation(n, created, warm_before, row_after.warm),
            "wall_s": wall,
            "settled_s": settled,
            "exec_ok": exec_ok,
            "acquire": summarize_ms(lat),
        }

    # 4 ------------------------------------------------------------------------------------------
    async def held(
        self, n: int, holder_pid: int, registry_pid: int, root: Path, width: int = 16
    ) -> dict[str, Any]:
        await self.wait_idle()
        rss_holder0, rss_registry0 = rss_bytes(holder_pid), rss_bytes(registry_pid)
        disk0 = dir_usage_bytes(root)
        slab0 = _slab_bytes()
        refs: list[SandboxRef] = []
        failure: list[str] = []
        gate = asyncio.Semaphore(width)

        async def take() -> None:
            if failure:
                return
            async with gate:
                try:
                    refs.append(await self.client.acquire(lease_s=LEASE_S, timeout_s=60.0))
                except Exception as exc:
                    failure.append(f"{type(exc).__name__}: {exc}")

        t0 = time.perf_counter()
        await asyncio.gather(*(take() for _ in range(n)))
        acquire_s = time.perf_counter() - t0

        async def run_all() -> tuple[int, float]:
            async def one(ref: SandboxRef) -> bool:
                async with gate:
                    return (await self.client.exec(ref, ["true"])).ok

            t = time.perf_counter()
            ok = sum(await asyncio.gather(*(one(r) for r in refs)))
            return ok, time.perf_counter() - t

        ok1, exec1_s = await run_all()
        await self.wait_idle()  # the pool's own warm sandboxes are part of what the holder keeps
        rss_holder, rss_registry = rss_bytes(holder_pid), rss_bytes(registry_pid)
        disk = dir_usage_bytes(root)
        slab = _slab_bytes()
        pools, _ = await self.pool()
        ok2, exec2_s = await run_all()
        t = time.perf_counter()
        released = await self.client.release_all()
        release_s = time.perf_counter() - t
        held = len(refs)
        return {
            "asked": n,
            "held": held,
            "stopped_by": failure[:1],
            "acquire_s": acquire_s,
            "exec_ok": ok1,
            "exec_all_s": exec1_s,
            "exec_ok_after": ok2,
            "exec_all_after_s": exec2_s,
            "holder_keeps": int(pools.acquired) + self.target,
            "holder_rss_before_mb": rss_holder0 / 2**20,
            "holder_rss_mb": rss_holder / 2**20,
            "registry_rss_before_mb": rss_registry0 / 2**20,
            "registry_rss_mb": rss_registry / 2**20,
            "holder_rss_per_sandbox_kb": rss_holder / max(held, 1) / 1024,
            "holder_rss_marginal_kb": (rss_holder - rss_holder0) / max(held, 1) / 1024,
            "disk_before_kb": disk0 / 1024,
            "disk_mb": disk / 2**20,
            "disk_per_sandbox_kb": (disk - disk0) / max(held, 1) / 1024,
            "kernel_slab_delta_mb": (slab - slab0) / 2**20,
            "kernel_slab_per_sandbox_kb": (slab - slab0) / max(held, 1) / 1024,
            "released": released,
            "release_all_s": release_s,
        }


# -- 5: the baseline, one Ray actor per sandbox -------------------------------------------------
def ray_baseline(n: int, root: Path) -> dict[str, Any]:
    from agentmesh.launcher import init_ray

    t = time.perf_counter()
    shutdown = init_ray(None, num_cpus=2)
    init_s = time.perf_counter() - t
    import ray

    @ray.remote(num_cpus=0.01)
    class SandboxActor:
        """What the alternative design runs: an actor that holds one sandbox."""

        def __init__(self, root: str) -> None:
            from agentmesh.container.backends import get_backend

            self.backend = get_backend("bubblewrap", root=root)
            self.sandbox: Any = None

        async def create_and_exec(self, sandbox_id: str) -> tuple[int, int]:
            from agentmesh.container.sandbox import SandboxSpec

            self.sandbox = await self.backend.create(sandbox_id, SandboxSpec())
            result = await self.sandbox.exec(["true"])
            return result.exit_code, os.getpid()

        async def exec_true(self) -> int:
            return int((await self.sandbox.exec(["true"])).exit_code)

        async def destroy(self) -> None:
            if self.sandbox is not None:
                await self.sandbox.destroy()
            await self.backend.close()

    actors: list[Any] = []
    try:
        cold: list[float] = []
        pids: list[int] = []
        for i in range(n):
            t0 = time.perf_counter()
            a = SandboxActor.remote(str(root))  # type: ignore[attr-defined]
            actors.append(a)
            code, pid = ray.get(a.create_and_exec.remote(f"ray-{i}"))
            cold.append(time.perf_counter() - t0)
            assert code == 0, code
            pids.append(pid)
        ok = sum(c == 0 for c in ray.get([a.exec_true.remote() for a in actors]))
        rss = [rss_bytes(p) for p in pids]
        ray.get([a.destroy.remote() for a in actors])
        return {
            "actors": n,
            "ray_init_s": init_s,
            "cold": summarize_ms(cold),
            "cold_each_ms": [x * 1e3 for x in cold],
            "exec_ok": ok,
            "rss_per_actor_mb": sum(rss) / len(rss) / 2**20,
            "rss_min_mb": min(rss) / 2**20,
            "rss_max_mb": max(rss) / 2**20,
        }
    finally:
        for a in actors:
            with contextlib.suppress(Exception):
                ray.kill(a)
        shutdown()


# -- the run ------------------------------------------------------------------------------------
async def ours(ns: argparse.Namespace, base: Path) -> dict[str, Any]:
    root, logs = base / "holders", base / "logs"
    root.mkdir()
    logs.mkdir()
    out: dict[str, Any] = {}
    with EtcdServer(fast=True) as etcd:
        name = f"bench-{uuid.uuid4().hex[:6]}"
        common = ["--name", name, "--discovery", etcd.url]
        procs: list[asyncio.subprocess.Process] = []
        disc = connect(etcd.url)
        cache = EndpointCache(disc)
        client = ContainerClient("bench-sandbox", endpoints=cache, registry_name=name, timeout_s=60.0)
        try:
            capacity = ns.held + ns.pool + 8  # the machine, not the holder's capacity, is the limit
            holder = await _spawn(
                _container_cmd(
                    "holder", *common, "--root", str(root), "--id", "h0", "--capacity", str(capacity)
                ),
                logs / "holder.log",
            )
            procs.append(holder)
            registry = await _spawn(
                _container_cmd("registry", *common, "--pool", f"bubblewrap={ns.pool}"),
                logs / "registry.log",
            )
            procs.append(registry)
            bench = Bench(client, ns.pool)
            t = time.perf_counter()
            await bench.wait_idle()
            out["setup"] = {"holder_capacity": capacity, "pool_target": ns.pool}
            out["setup"]["pool_fill_s"] = time.perf_counter() - t
            print(f"pool of {ns.pool} warm in {out['setup']['pool_fill_s']:.2f}s", flush=True)
            out["warm"] = await bench.warm(ns.warm)
            print(f"warm: {out['warm']}", flush=True)
            out["cold"] = await bench.cold(ns.cold)
            print(f"cold: {out['cold']['total']}", flush=True)
            out["burst"] = await bench.burst(ns.burst)
            print(f"burst: { {k: v for k, v in out['burst'].items() if k != 'acquire'} }", flush=True)
            out["held"] = await bench.held(ns.held, holder.pid, registry.pid, root)
            print(f"held: {out['held']}", flush=True)
        except BaseException:
            for log in sorted(logs.iterdir()):
                tail = log.read_text(errors="replace").splitlines()[-15:]
                print(f"--- last lines of {log.name}:", *tail, sep="\n", file=sys.stderr)
            raise
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.release_all(), 120)
            await client.close()
            await cache.close()
            await disc.close()
            for p in reversed(procs):
                await _stop(p)
    return out


def _machine() -> dict[str, Any]:
    info = machine()
    with contextlib.suppress(Exception):
        info["bwrap"] = subprocess.run(
            ["bwrap", "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
    info["kernel"] = os.uname().release
    info["cgroup"] = "v2" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "v1"
    with open("/proc/meminfo") as f:
        info["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    return info


def report(r: dict[str, Any], ns: argparse.Namespace) -> None:
    warm, cold, burst, held, ray = r["warm"], r["cold"], r["burst"], r["held"], r.get("ray")

    def lat(label: str, s: dict[str, Any], extra: str = "") -> list[Any]:
        return [label, s["n"], s["p50_ms"], s["p95_ms"], s["p99_ms"], s["max_ms"], extra]

    rows = [
        lat("warm acquire", warm, f"{warm['served_warm']}/{warm['n']} served warm"),
        lat("cold acquire → end of 1st exec", cold["total"], f"{cold['served_warm']} served warm"),
        lat("  of which: acquire (creates)", cold["acquire"]),
        lat("  of which: 1st exec `true`", cold["first_exec"]),
        lat("  (2nd exec `true`, not in total)", cold["second_exec"]),
        lat(f"burst of {burst['requested']}: each acquire", burst["acquire"], f"{burst['served_warm']} warm"),
    ]
    if ray:
        rows.append(lat("Ray actor per sandbox: cold → 1st exec", ray["cold"], "sequential"))
    print_table("latency (ms)", ["what", "n", "p50", "p95", "p99", "max", "note"], rows)
    print_table(
        f"burst: {burst['requested']} concurrent acquires, pool target {ns.pool} (warm, idle before)",
        ["succeeded", "served warm", "created Δ", "needed", "over-created", "wall s", "settled s", "exec ok"],
        [
            [
                f"{burst['succeeded']}/{burst['requested']}",
                burst["served_warm"],
                burst["created_delta"],
                burst["created_needed"],
                burst["over_created"],
                burst["wall_s"],
                burst["settled_s"],
                burst["exec_ok"],
            ]
        ],
    )
    print_table(
        f"held at once (asked {held['asked']}; + the pool's {ns.pool} warm on the same holder)",
        [
            "held",
            "acquire s",
            "exec all s",
            "exec ok after",
            "holder RSS MB",
            "KB/sandbox",
            "registry RSS MB",
            "disk MB",
            "disk KB/sandbox",
            "kernel slab Δ KB/sandbox*",
        ],
        [
            [
                held["held"],
                held["acquire_s"],
                held["exec_all_s"],
                f"{held['exec_ok_after']}/{held['held']}",
                f"{held['holder_rss_before_mb']:.0f} → {held['holder_rss_mb']:.0f}",
                f"{held['holder_rss_per_sandbox_kb']:.0f} (marginal {held['holder_rss_marginal_kb']:.0f})",
                f"{held['registry_rss_before_mb']:.0f} → {held['registry_rss_mb']:.0f}",
                held["disk_mb"],
                held["disk_per_sandbox_kb"],
                held["kernel_slab_per_sandbox_kb"],
            ]
        ],
    )
    print("* machine-wide /proc/meminfo Slab delta per held sandbox (cgroups, dirs); other work adds noise")
    if ray:
        per_sb_mb = held["holder_rss_mb"] / max(held["held"], 1)
        r["ratios"] = {
            "cold_p50_ours_over_actor": cold["total"]["p50_ms"] / ray["cold"]["p50_ms"],
            "rss_per_sandbox_ours_over_actor": per_sb_mb / ray["rss_per_actor_mb"],
        }
        print_table(
            f"against one Ray actor per sandbox ({ray['actors']} actors, same run)",
            ["measure", "ours", "actor per sandbox", "ours / actor"],
            [
                [
                    "cold create → 1st exec p50",
                    f"{cold['total']['p50_ms']:.1f} ms",
                    f"{ray['cold']['p50_ms']:.0f} ms",
                    f"{r['ratios']['cold_p50_ours_over_actor']:.3f}",
                ],
                [
                    "RSS per held sandbox",
                    f"{held['holder_rss_per_sandbox_kb']:.0f} KB (holder RSS / {held['held']})",
                    f"{ray['rss_per_actor_mb']:.0f} MB (worker RSS)",
                    f"{r['ratios']['rss_per_sandbox_ours_over_actor']:.4f}",
                ],
            ],
        )
    v = verdicts(r)
    r["verdicts"] = [{"goal": g, "measured": m, "pass": ok} for g, m, ok in v]
    print_table(
        "verdict", ["goal", "measured", "result"], [[g, m, "PASS" if ok else "FAIL"] for g, m, ok in v]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pool", type=int, default=16, help="warm pool target")
    parser.add_argument("--warm", type=int, default=200, help="warm acquires")
    parser.add_argument("--cold", type=int, default=30, help="cold create → first exec samples")
    parser.add_argument("--burst", type=int, default=100, help="concurrent acquires in the burst")
    parser.add_argument("--held", type=int, default=1000, help="sandboxes to hold at once, at most")
    parser.add_argument("--actors", type=int, default=10, help="Ray actors of the baseline (0: skip)")
    ns = parser.parse_args()
    info = _machine()
    print("machine: " + json.dumps(info), flush=True)
    base = Path(tempfile.mkdtemp(prefix="am-bench-sbx-", dir="/tmp"))
    os.chmod(base, 0o711)  # sandboxes run as their own uids: they walk down to their scratch
    t0 = time.perf_counter()
    try:
        results: dict[str, Any] = {"command": "python bench/sandbox.py " + " ".join(sys.argv[1:])}
        results["params"] = vars(ns)
        results.update(asyncio.run(ours(ns, base)))
        if ns.actors:
            (base / "ray").mkdir(mode=0o711)
            try:
                results["ray"] = ray_baseline(ns.actors, base / "ray")
                print(f"ray: {results['ray']}", flush=True)
            except Exception as exc:  # the rest of the run still counts; say why the baseline is missing
                results["ray_error"] = f"{type(exc).__name__}: {exc}"
                print(f"Ray baseline failed: {results['ray_error']}", file=sys.stderr, flush=True)
        results["wall_s"] = time.perf_counter() - t0
        print(
            f"bench/sandbox.py on {info['cpus']} cores, {info['mem_gib']} GiB, {info['bwrap']}, "
            f"cgroup {info['cgroup']}; run took {results['wall_s']:.0f}s"
        )
        report(results, ns)
        write_json("sandbox", {"machine_extra": info, **results})
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
