"""A real Prometheus discovers agentmesh's /metrics endpoints through ``agentmesh metrics sd`` (a
file it writes from a real etcd), scrapes them, and PromQL returns what the processes counted.

The processes are stand-ins (``prometheus_worker.py``: a driver with RunMetrics, replicas with
ReplicaMetrics and an LLM accounting, each calling serve_metrics) and the real sandbox registry and
holder (``agentmesh container``). Needs Debian's prometheus (deploy/install_prometheus.sh).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentmesh.discovery import connect
from agentmesh.discovery.etcd_server import EtcdServer
from agentmesh.metrics_cli import write_targets_loop
from tests.integration.prometheus_server import PrometheusServer, prometheus_binary, wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.prometheus,
    pytest.mark.skipif(
        prometheus_binary() is None and os.environ.get("AGENTMESH_REQUIRE_PROMETHEUS") != "1",
        reason="prometheus not installed (deploy/install_prometheus.sh)",
    ),
]

HERE = Path(__file__).parent
WORKER = HERE / "prometheus_worker.py"


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer(fast=True) as server:
        yield server


class SdThread:
    """``write_targets_loop`` on a thread of its own (the test body is synchronous)."""

    def __init__(self, discovery_url: str, path: Path, interval_s: float = 0.2) -> None:
        self.path = path
        self._url, self._interval = discovery_url, interval_s
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = threading.Event()

    def _run(self) -> None:
        async def main() -> None:
            self._stop = asyncio.Event()
            disc = connect(self._url)
            self._started.set()
            try:
                await write_targets_loop(disc, self.path, interval_s=self._interval, stop=self._stop)
            finally:
                await disc.close()

        try:
            self._loop.run_until_complete(main())
        except BaseException as exc:  # reported by stop()
            self._error = exc
            self._started.set()

    def __enter__(self) -> SdThread:
        self._thread.start()
        self._started.wait(10)
        wait_until(self.path.exists, timeout_s=20, what=f"the sd file {self.path}")
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        if self._error is not None:
            raise self._error

    def groups(self) -> list[dict[str, object]]:
        try:
            return list(json.loads(self.path.read_text()))
        except (OSError, ValueError):
            return []


def spawn_worker(etcd: EtcdServer, *args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), "--discovery", etcd.url, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=HERE.parents[1],
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("READY "), f"worker {args} did not start: {line!r}"
    return proc, line.split()[1]


def stop_worker(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        assert proc.stdin is not None
        proc.stdin.close()  # the worker withdraws its entry and exits
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_prometheus_discovers_scrapes_and_counts(etcd: EtcdServer, tmp_path: Path) -> None:
    run = f"run-{time.monotonic_ns() % 10**9}"
    sd_file = tmp_path / "targets.json"
    procs: list[subprocess.Popen[str]] = []
    try:
        t0 = time.monotonic()
        with SdThread(etcd.url, sd_file) as sd, PrometheusServer(tmp_path / "prom", sd_file) as prom:
            t_prom = time.monotonic() - t0
            driver, _ = spawn_worker(etcd, "--run", run, "--job", "driver", "--done", "37", "--failed", "3")
            procs.append(driver)
            roles = {"solver": 2, "critic": 1, "judge": 1}
            for role, n in roles.items():
                for i in range(n):
                    p, _ = spawn_worker(
                        etcd, "--run", run, "--job", "agent", "--role", role, "--replica", f"{role}-{i}",
                        "--steps", "5", "--queued", str(i + 1),
                    )  # fmt: skip
                    procs.append(p)
            t_spawned = time.monotonic()
            wait_until(lambda: len(sd.groups()) == 5, timeout_s=20, what="5 targets in the sd file")
            t_file = time.monotonic() - t_spawned

            done = wait_until(
                lambda: prom.scalar(f'sum(agentmesh_tasks_done_total{{run="{run}"}})'),
                timeout_s=30,
                what="Prometheus to scrape the driver",
            )
            t_first_value = time.monotonic() - t_spawned
            assert done == 37
            assert prom.scalar(f'sum(agentmesh_tasks_failed_total{{run="{run}",code="judged_bad"}})') == 3
            assert prom.scalar(f'sum(agentmesh_tasks_in_flight{{run="{run}"}})') == 0

            def agents_up() -> dict[str, int]:
                res = prom.query(f'count by (role) (up{{job="agent",run="{run}"}} == 1)')
                return {r["metric"]["role"]: int(float(r["value"][1])) for r in res}

            wait_until(
                lambda: agents_up() == roles, timeout_s=30, what=f"agent targets of every role {roles}"
            )
            t_all_up = time.monotonic() - t_spawned
            # The series keep their own labels (honor_labels) and the target's job comes from sd.
            inbox = prom.query(f'agentmesh_inbox_tasks{{run="{run}",role="solver"}}')
            assert sorted(float(r["value"][1]) for r in inbox) == [1.0, 2.0]
            assert all(r["metric"]["job"] == "agent" and "exported_run" not in r["metric"] for r in inbox)
            steps = prom.scalar(f'sum(agentmesh_steps_total{{run="{run}",outcome="ok"}})')
            assert steps == 5 * sum(roles.values())
            assert prom.scalar(f'sum(agentmesh_role_tokens_total{{run="{run}",kind="completion"}})') == 200
            assert prom.scalar('sum(agentmesh_llm_requests_total{model="sim-model"})') == 20
            buckets = f'agentmesh_step_duration_seconds_bucket{{run="{run}"}}'
            p95 = prom.scalar(f"histogram_quantile(0.95, sum by (le) ({buckets}))")
            assert p95 is not None and 0.1 < p95 <= 0.25  # steps took 0.05..0.25 s

            # A replica that goes away leaves the sd file and Prometheus's targets.
            stop_worker(procs.pop())
            wait_until(
                lambda: len(sd.groups()) == 4, timeout_s=20, what="the stopped replica to leave the file"
            )
            wait_until(
                lambda: sum(1 for t in prom.targets() if t["labels"].get("run") == run) == 4,
                timeout_s=20,
                what="Prometheus to drop the stopped replica's target",
            )
            t_dropped = time.monotonic() - t_spawned
        print(
            f"\nprometheus figures: prometheus ready {t_prom:.2f}s; after the 5 processes registered: "
            f"sd file complete {t_file:.2f}s, first PromQL value {t_first_value:.2f}s, every role up "
            f"{t_all_up:.2f}s; a stopped replica dropped from the targets after {t_dropped:.2f}s"
        )
    finally:
        for p in procs:
            stop_worker(p)


def test_http_sd_serves_the_targets(etcd: EtcdServer) -> None:
    worker, metrics_url = spawn_worker(etcd, "--run", "http-sd", "--job", "driver", "--done", "1")
    sd = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agentmesh.metrics_cli",
            "sd",
            "--discovery",
            etcd.url,
            "--http",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sd.stdout is not None
        line = sd.stdout.readline()
        assert line.startswith("METRICS_SD_READY url="), line
        url = line.strip().split("url=", 1)[1]
        with urllib.request.urlopen(url, timeout=5) as r:
            assert r.headers.get_content_type() == "application/json"
            groups = json.load(r)
        mine = [g for g in groups if g["labels"].get("run") == "http-sd"]
        assert mine == [
            {"targets": [metrics_url.removeprefix("http://").removesuffix("/metrics")],
             "labels": {"job": "driver", "run": "http-sd"}}
        ]  # fmt: skip
        with urllib.request.urlopen(metrics_url, timeout=5) as r:
            assert 'agentmesh_tasks_done_total{run="http-sd"} 1.0' in r.read().decode()
    finally:
        sd.terminate()
        sd.wait(10)
        stop_worker(worker)


def test_sd_with_an_unreachable_store_is_one_line() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agentmesh.metrics_cli", "sd", "--discovery", "etcd://127.0.0.1:9", "--once"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "etcd://127.0.0.1:9" in lines[0], out.stderr


def test_container_services_serve_metrics(etcd: EtcdServer, tmp_path: Path) -> None:
    """``agentmesh container registry|holder`` register /metrics (jobs registry, holder); the
    registry's pool gauge shows the warm sandbox it made."""
    name = f"prom{time.monotonic_ns() % 10**6}"
    # Not under pytest's tmp dir (private to root): sandboxes run as uids of their own.
    root = Path(tempfile.mkdtemp(prefix="am-sbx-prom-", dir="/tmp"))
    os.chmod(root, 0o711)
    common = ["--name", name, "--discovery", etcd.url]
    cmd = [sys.executable, "-m", "agentmesh.cli", "container"]
    procs = []
    try:
        holder = subprocess.Popen(
            [*cmd, "holder", *common, "--root", str(root), "--id", "h0"],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(holder)
        registry = subprocess.Popen(
            [*cmd, "registry", *common, "--pool", "bubblewrap=1"], stdout=subprocess.PIPE, text=True
        )
        procs.append(registry)
        urls = {}
        for job, p in (("holder", holder), ("registry", registry)):
            assert p.stdout is not None
            urls[job] = json.loads(p.stdout.readline())["metrics"]

        def scrape(url: str) -> str:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read().decode()

        wait_until(
            lambda: (
                'agentmesh_sandbox_pool{pool="bubblewrap/default",state="warm"} 1.0'
                in scrape(urls["registry"])
            ),
            timeout_s=30,
            what="the registry's warm pool gauge",
        )
        out = subprocess.run(
            [sys.executable, "-m", "agentmesh.metrics_cli", "sd", "--discovery", etcd.url, "--once"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        groups = [g for g in json.loads(out.stdout) if g["labels"].get("registry") == name]
        assert {g["labels"]["job"] for g in groups} == {"registry", "holder"}
        assert any(g["labels"].get("holder") == "h0" for g in groups)
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(root, ignore_errors=True)


def test_a_pipeline_run_is_discovered_and_counted(tmp_path: Path) -> None:
    """The collaborative-reasoning pipeline over the simulator: Prometheus finds the driver and every
    role's replicas through the run's own etcd, and its done count equals the sink's."""
    from agentmesh.sink import read_records

    out = tmp_path / "out"
    sd_file = tmp_path / "targets.json"
    run_proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agentmesh.cli",
            "run",
            "-q",
            "examples/collab_reasoning/sim.yaml",
            "dataset.limit=6",
            f"output.dir={out}",
            "metrics.linger_s=6",
        ],
        cwd=HERE.parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        t0 = time.monotonic()
        info = wait_until(lambda: _run_json(out), timeout_s=120, what=f"{out}/run.json")
        run_id = info["run_id"]
        with PrometheusServer(tmp_path / "prom", sd_file) as prom, SdThread(info["discovery_url"], sd_file):
            try:
                run_out, _ = run_proc.communicate(timeout=400)
            except subprocess.TimeoutExpired:
                run_proc.kill()
                raise
            wall_s = time.monotonic() - t0
            assert run_proc.returncode in (0, 1), run_out[-3000:]
            records = list(read_records(out))
            sink_done = sum(1 for r in records if r["status"] == "done")
            assert len(records) == 6
            # The run is over and its targets are gone: read the last samples of the range.
            sel = f'run="{run_id}"'
            assert prom.scalar(f"sum(last_over_time(agentmesh_tasks_done_total{{{sel}}}[10m]))") == sink_done
            admitted = prom.scalar(f"sum(last_over_time(agentmesh_tasks_admitted_total{{{sel}}}[10m]))")
            assert admitted == 6
            up = prom.query(f'count by (role) (max_over_time(up{{job="agent",{sel}}}[10m]) == 1)')
            roles_up = {r["metric"]["role"]: int(float(r["value"][1])) for r in up}
            assert roles_up == {"teacher": 2, "student": 2, "extractor": 1, "matcher": 1}, roles_up
            steps = prom.scalar(f'sum(last_over_time(agentmesh_steps_total{{{sel},outcome="ok"}}[10m]))')
            assert steps is not None and steps >= sink_done
            tokens = prom.scalar(f"sum(last_over_time(agentmesh_role_tokens_total{{{sel}}}[10m]))")
            assert tokens is not None and tokens > 0
            print(
                f"\nprometheus pipeline figures: run {run_id} of 6 tasks ({sink_done} done) "
                f"in {wall_s:.1f}s "
                f"(incl. 6 s linger); PromQL done={sink_done}, agent targets up per role {roles_up}, "
                f"ok steps {steps:.0f}, tokens {tokens:.0f}"
            )
    finally:
        if run_proc.poll() is None:
            run_proc.kill()
            run_proc.wait()


def _run_json(out: Path) -> dict[str, str] | None:
    try:
        info = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return None
    return info if info.get("discovery_url") and info.get("run_id") else None
