"""Clusters on Slurm: a Ray head job and worker jobs, found through the same record as a local one.

``slurm_up`` submits a HEAD job (``deploy/slurm/head.sbatch.in``) whose process picks free ports
and a temp dir of its own, runs the Ray head (``ray start --head --block``, no CPUs for work so that
actors land on workers), the cluster's etcd and, where installed, its job manager, and writes a
ready file into the cluster's state dir ``$AGENTMESH_HOME/clusters/NAME/`` (a shared path on a real
cluster). WORKER jobs (``worker.sbatch.in``, ``--requeue``) wait for that file, join with a Ray node
of their own (own temp dir and ports), leave on SIGTERM and exit by themselves once the head is gone.

The head supervises the workers: every ~2 s it lists the cluster's worker jobs with ``squeue`` and
resubmits the job of a slot that vanished (``scancel`` by hand, a node failure) while the cluster is
``up``; Slurm itself requeues a preempted (or ``scontrol requeue``'d) worker under the same id.

Every process of a cluster carries ``AGENTMESH_CLUSTER_ID`` (and its job's ``AGENTMESH_CLUSTER_JOB``)
in its environment: a job's own cleanup and ``slurm_down`` find by it what left the job's process
tree. ``slurm_down`` marks the record ``stopping`` (no more resubmissions), cancels every job the
cluster ever had (by id and by name), polls ``squeue`` until none is left, kills marked stragglers
on this node, and removes temp dirs, the state dir and the record. Job names, ports, temp dirs and
etcds are per cluster, so any number of clusters share the nodes.

Internal entry points (what the batch scripts run)::

    python -m agentmesh.cluster.slurm head --state-dir DIR --name NAME ...
    python -m agentmesh.cluster.slurm worker --state-dir DIR --name NAME ...
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agentmesh.cluster.local import (
    _RAY_PORT_FLAGS,
    ClusterError,
    ClusterRecord,
    JobManagerProcess,
    NoClusterError,
    _check_name,
    _clusters_lock,
    _etcd_healthy,
    _free_port,
    _name_lock,
    _port_open,
    _remove_files,
    clusters_dir,
    load_record,
    name_flag,
    pids_with_env,
    process_alive,
    ray_env,
    terminate_pids,
    write_record,
)
from agentmesh.cluster.templates import render_file
from agentmesh.errors import ConfigError
from agentmesh.files import write_atomic

__all__ = [
    "SLURM_OPTION_KEYS",
    "HeadNotRunningError",
    "JobInfo",
    "Slurm",
    "SlurmClusterStatus",
    "check_head_running",
    "count_ray_nodes",
    "job_names",
    "marked_pids",
    "parse_slurm_options",
    "parse_squeue",
    "render_job_script",
    "sbatch_directives",
    "slurm_add_workers",
    "slurm_down",
    "slurm_status",
    "slurm_up",
]

# `--slurm KEY=VALUE` keys and the sbatch options they become. Job name, output, requeue and the
# task layout belong to the templates; cpus_per_task goes to the template's own line.
SLURM_OPTION_KEYS: dict[str, str] = {
    "account": "--account",
    "comment": "--comment",
    "constraint": "--constraint",
    "cpus_per_task": "--cpus-per-task",
    "exclude": "--exclude",
    "gpus": "--gpus",
    "gpus_per_node": "--gpus-per-node",
    "gres": "--gres",
    "mem": "--mem",
    "mem_per_cpu": "--mem-per-cpu",
    "nodelist": "--nodelist",
    "partition": "--partition",
    "qos": "--qos",
    "reservation": "--reservation",
    "time": "--time",
}
_VALUE_RE = re.compile(r"^[A-Za-z0-9_.:,/@%+=\[\]-]+$")
_TIME_RE = re.compile(
    r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+(:\d{1,2}(:\d{1,2})?)?|infinite|UNLIMITED)$"
)
_INT_KEYS = ("cpus_per_task", "gpus", "gpus_per_node")

_POLL_S = 2.0
"""How often the head looks at its workers' jobs."""
_HEAD_GONE_S = 6.0
"""A worker leaves once the head's GCS has not answered for this long."""
_RAY_READY_TIMEOUT_S = 90.0
_STOP_GRACE_S = 2.0
"""SIGTERM to SIGKILL inside a job: below the slurm.conf KillWait, after which Slurm kills anyway."""
_ENDED = frozenset(
    {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY"}
)

_WORKER_PORT_FLAGS = _RAY_PORT_FLAGS[2:]  # --port and the client server port are the head's only


class HeadNotRunningError(ClusterError):
    """The cluster's record names a head job that Slurm no longer runs."""


# -- --slurm options -------------------------------------------------------------------------------


def parse_slurm_options(items: Sequence[str]) -> dict[str, str]:
    """``["partition=x,time=1:00:00", "mem=4G"]`` → ``{"partition": "x", ...}``; ConfigError naming the key.

    Items may hold several comma-separated pairs; a comma inside a value (``gres=gpu:a100:2,nic:1``)
    stays with it when what follows has no ``=``. Keys may use ``-`` or ``_``.
    """
    options: dict[str, str] = {}
    for item in items:
        pairs: list[str] = []
        for chunk in item.split(","):
            if "=" in chunk or not pairs:
                pairs.append(chunk)
            else:
                pairs[-1] += "," + chunk
        for pair in pairs:
            raw_key, sep, value = pair.partition("=")
            key = raw_key.strip().replace("-", "_")
            if not sep or not key:
                raise ConfigError(f"expected KEY=VALUE, got {pair!r}", key="--slurm")
            if key not in SLURM_OPTION_KEYS:
                raise ConfigError(
                    f"unknown Slurm option {raw_key!r}; known: {', '.join(sorted(SLURM_OPTION_KEYS))}",
                    key=f"--slurm {raw_key}",
                )
            value = value.strip()
            if not value or not _VALUE_RE.match(value):
                raise ConfigError(
                    f"bad value {value!r} (letters, digits and _.:,/@%+=[]- only)", key=f"--slurm {key}"
                )
            if key == "time" and not _TIME_RE.match(value):
                raise ConfigError(
                    f"expected MINUTES, [H:]M:S, D-H[:M[:S]] or infinite, got {value!r}", key="--slurm time"
                )
            if key in _INT_KEYS and not (value.isdigit() and int(value) > 0):
                raise ConfigError(f"expected a positive integer, got {value!r}", key=f"--slurm {key}")
            if key in options and options[key] != value:
                raise ConfigError(f"given twice: {options[key]!r} and {value!r}", key=f"--slurm {key}")
            options[key] = value
    return options


def sbatch_directives(options: dict[str, str]) -> str:
    """``#SBATCH --option=value`` lines for every option but ``cpus_per_task`` (the template's own)."""
    lines = [
        f"#SBATCH {SLURM_OPTION_KEYS[k]}={v}" for k, v in sorted(options.items()) if k != "cpus_per_task"
    ]
    return "\n".join(lines) if lines else "# (no extra sbatch options)"


def job_names(name: str, cluster_id: str) -> tuple[str, str]:
    """(head job name, worker job name): unique per cluster, so `scancel --name` hits only it."""
    stem = f"am-{name}-{cluster_id[:8]}"
    return f"{stem}-head", f"{stem}-worker"


def render_job_script(
    role: str,
    *,
    record: ClusterRecord,
    python: str = sys.executable,
    object_store_mb: int = 256,
    templates: Path | None = None,
) -> str:
    """The batch script of the cluster's ``head`` or ``worker`` job."""
    if role not in ("head", "worker"):
        raise ValueError(f"role must be head or worker, got {role!r}")
    head_name, worker_name = job_names(record.name, record.cluster_id)
    options = record.slurm_options
    cpus_per_task = options.get("cpus_per_task", "1")
    values = {
        "JOB_NAME": head_name if role == "head" else worker_name,
        "LOG_DIR": str(Path(record.state_dir) / "logs"),
        "CPUS_PER_TASK": cpus_per_task if role == "worker" else "1",
        "SBATCH_OPTIONS": sbatch_directives(options),
        "CLUSTER_ID": record.cluster_id,
        "STATE_DIR": str(record.state_dir),
        "PYTHON": python,
        "NAME": record.name,
        # The head offers no CPUs: pipeline actors (fractional CPUs) land on the workers.
        "RAY_CPUS": "0" if role == "head" else _fmt_cpus(record.worker_cpus),
        "RAY_GPUS": "0" if role == "head" else str(record.num_gpus),
        "OBJECT_STORE_MB": str(object_store_mb),
    }
    # SBATCH_OPTIONS: one `#SBATCH` line per option, each value checked by parse_slurm_options.
    return render_file(
        f"{role}.sbatch.in", values, directory=templates, multiline=frozenset({"SBATCH_OPTIONS"})
    )


def _fmt_cpus(cpus: float) -> str:
    return str(int(cpus)) if float(cpus).is_integer() else str(cpus)


# -- talking to Slurm ------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobInfo:
    """One line of ``squeue``."""

    job_id: str
    name: str
    state: str
    reason: str = ""


_SQUEUE_FORMAT = "%i|%j|%T|%r"


def parse_squeue(text: str) -> dict[str, JobInfo]:
    """Jobs by id from ``squeue -h -o '%i|%j|%T|%r'`` output (blank and malformed lines skipped)."""
    jobs: dict[str, JobInfo] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 3 or not parts[0]:
            continue
        job_id, name, state = parts[0].strip(), parts[1].strip(), parts[2].strip()
        jobs[job_id] = JobInfo(job_id, name, state, parts[3].strip() if len(parts) > 3 else "")
    return jobs


class Slurm:
    """``sbatch``, ``squeue`` and ``scancel`` (whatever ``SLURM_CONF`` the environment names)."""

    def __init__(self, env: dict[str, str] | None = None, *, timeout_s: float = 30.0) -> None:
        self.env = dict(os.environ if env is None else env)
        self.timeout_s = timeout_s

    def _run(self, cmd: list[str], *, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
        if shutil.which(cmd[0], path=self.env.get("PATH")) is None:
            raise ClusterError(f"{cmd[0]} not found: is Slurm installed here (deploy/install_slurm.sh)?")
        try:
            return subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                env=self.env,
                cwd=cwd,
                timeout=self.timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ClusterError(f"{cmd[0]} did not answer within {self.timeout_s}s") from None

    def sbatch(self, script: Path) -> str:
        """Submit ``script``; its job id."""
        done = self._run(["sbatch", "--parsable", str(script)], cwd=str(script.parent))
        if done.returncode != 0:
            raise ClusterError(f"sbatch {script.name} failed: {(done.stderr or done.stdout).strip()}")
        return done.stdout.strip().split(";")[0]

    def squeue(self, *, names: Sequence[str] = (), job_ids: Sequence[str] = ()) -> dict[str, JobInfo] | None:
        """Pending/running/completing jobs with any of ``names`` or ``job_ids``; None if squeue failed."""
        found: dict[str, JobInfo] = {}
        if names:
            done = self._run(["squeue", "-h", "-o", _SQUEUE_FORMAT, "--name", ",".join(names)])
            if done.returncode != 0:
                return None
            found.update(parse_squeue(done.stdout))
        for job_id in job_ids:  # one by one: squeue fails the whole list over one unknown id
            if job_id in found:
                continue
            done = self._run(["squeue", "-h", "-o", _SQUEUE_FORMAT, "-j", job_id])
            if done.returncode == 0:
                found.update(parse_squeue(done.stdout))
            elif "Invalid job id" not in done.stderr:
                return None
        return found

    def start_now(self, job_id: str) -> bool:
        """Make a pending job eligible at once (Slurm holds a requeued job for ~2 minutes)."""
        return self._run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"]).returncode == 0

    def scancel(self, *, job_ids: Sequence[str] = (), names: Sequence[str] = ()) -> None:
        """Cancel jobs by id and by name (unknown ids are fine)."""
        if job_ids:
            self._run(["scancel", *job_ids])
        for name in names:
            self._run(["scancel", "--name", name])


# -- the record ------------------------------------------------------------------------------------


def _record_lock(name: str) -> contextlib.AbstractContextManager[None]:
    # Short read-modify-write of the record (the head's supervisor, add-workers, down's state
    # change); `_name_lock` is the long one an `up` or `down` holds throughout.
    return _clusters_lock(f".{name}.record.lock")


def _update_record(
    name: str, cluster_id: str, change: Callable[[ClusterRecord], bool]
) -> ClusterRecord | None:
    """Apply ``change`` to the record of this cluster under the lock; write it if ``change`` says so."""
    with _record_lock(name):
        try:
            record = load_record(name)
        except ClusterError:
            return None
        if record.cluster_id != cluster_id:
            return None
        if change(record):
            write_record(record)
        return record


# -- processes of a cluster ------------------------------------------------------------------------


def marked_pids(cluster_id: str, job_id: str | None = None) -> list[int]:
    """Live processes on this node whose environment carries the cluster's (and job's) marker."""
    job = [f"AGENTMESH_CLUSTER_JOB={job_id}"] if job_id is not None else []
    return pids_with_env(f"AGENTMESH_CLUSTER_ID={cluster_id}", *job)


def _kill_pids(pids: Sequence[int], *, grace_s: float) -> list[int]:
    """SIGTERM ``pids``, SIGKILL those left after ``grace_s``; the ones still alive after that."""
    return terminate_pids(lambda: [p for p in pids if process_alive(p)], grace_s=grace_s, kill_wait_s=3.0)


def count_ray_nodes(ray_address: str, *, timeout_s: float = 5.0) -> int | None:
    """Alive Ray nodes of the cluster at ``ray_address`` (no driver: one GCS call); None if unreachable."""
    port = ray_address.rpartition(":")[2]
    if not port.isdigit() or not _port_open(int(port), timeout_s=min(timeout_s, 2.0)):
        return None
    from agentmesh.launcher import RAY_ENV

    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    try:
        import ray._raylet

        client = ray._raylet.GcsClient(address=ray_address)  # type: ignore[attr-defined]
        nodes = client.get_all_node_info(timeout=timeout_s)
    except Exception:  # an unreachable or dying GCS: the caller says "unreachable"
        return None
    return sum(1 for info in nodes.values() if int(getattr(info, "state", 1)) == 0)  # 0 = ALIVE


# -- the head and worker processes (inside the jobs) ----------------------------------------------


def _ray_env(temp_dir: Path) -> dict[str, str]:
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (RAY_ENV) makes `ray start --address` refuse to join: here
    # every node names its address with --node-ip-address instead.
    return {**ray_env(temp_dir), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}


def _start_ray_node(
    temp_dir: Path,
    *,
    head_address: str | None,
    num_cpus: float,
    num_gpus: float,
    object_store_mb: int,
    stop: threading.Event,
) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    """``ray start [--head] --block`` as a child of this process (so Slurm tracks it); ready when its
    GCS (head) or raylet (worker) port answers. Retries with fresh ports on a clash."""
    flags = _RAY_PORT_FLAGS if head_address is None else _WORKER_PORT_FLAGS
    log_path = temp_dir / "ray-start.log"
    for _attempt in range(3):
        ports = {f.lstrip("-").replace("-", "_"): _free_port() for f in flags}
        cmd = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--block",
            *(["--head"] if head_address is None else ["--address", head_address]),
            "--node-ip-address", _node_ip(),
            "--temp-dir", str(temp_dir / "ray"),
            "--num-cpus", _fmt_cpus(num_cpus),
            "--num-gpus", _fmt_cpus(num_gpus),
            "--object-store-memory", str(object_store_mb * 1024 * 1024),
            "--disable-usage-stats",
            "--min-worker-port", "0", "--max-worker-port", "0",
            *(["--include-dashboard", "false"] if head_address is None else []),
        ]  # fmt: skip
        for flag in flags:
            cmd += [flag, str(ports[flag.lstrip("-").replace("-", "_")])]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=_ray_env(temp_dir)
            )
        ready_port = ports["port"] if head_address is None else ports["node_manager_port"]
        deadline = time.monotonic() + _RAY_READY_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None and not stop.is_set():
            if _port_open(ready_port, timeout_s=0.5):
                return proc, ports
            time.sleep(0.2)
        if stop.is_set():
            return proc, ports
        _stop_child(proc)
        if proc.returncode not in (1,):  # a hang or usage error: other ports will not help
            break
    tail = log_path.read_text(errors="replace").splitlines()[-20:] if log_path.exists() else []
    raise ClusterError("could not start the Ray node; log tail:\n" + "\n".join(tail))


def _node_ip() -> str:
    # Loopback for a single node; a multi-node Slurm cluster sets the address other nodes reach.
    return os.environ.get("AGENTMESH_RAY_NODE_IP", "127.0.0.1")


def _stop_child(proc: subprocess.Popen[Any] | None, grace_s: float = _STOP_GRACE_S) -> None:
    _stop_children([proc], [], grace_s=grace_s)


def _stop_children(
    procs: Sequence[subprocess.Popen[Any] | None], pids: Sequence[int], *, grace_s: float = _STOP_GRACE_S
) -> None:
    """SIGTERM all at once, SIGKILL what is left after ``grace_s``: all within Slurm's KillWait."""
    live = [p for p in procs if p is not None and p.poll() is None]
    others = [p for p in pids if process_alive(p)]
    for proc in live:
        proc.terminate()
    for pid in others:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and (
        any(p.poll() is None for p in live) or any(process_alive(p) for p in others)
    ):
        time.sleep(0.05)
    for proc in live:
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(2.0)
    for pid in others:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _job_context() -> tuple[str, str]:
    cluster_id = os.environ.get("AGENTMESH_CLUSTER_ID", "")
    job_id = os.environ.get("SLURM_JOB_ID", "")
    if not cluster_id or not job_id:
        raise ClusterError("AGENTMESH_CLUSTER_ID and SLURM_JOB_ID must be set: run inside the cluster's job")
    return cluster_id, job_id


def _install_stop_handlers() -> threading.Event:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop


def _cleanup_job(cluster_id: str, job_id: str, temp_dir: Path) -> None:
    """Whatever of this job survived its children's stop (left the process tree): kill it."""
    left = marked_pids(cluster_id, job_id)
    if left:
        _log(f"killing {len(left)} straggler(s) of job {job_id}: {left}")
        _kill_pids(left, grace_s=1.0)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _run_head(ns: argparse.Namespace) -> int:
    cluster_id, job_id = _job_context()
    stop = _install_stop_handlers()
    state_dir = Path(ns.state_dir)
    ready = state_dir / "head.json"
    temp_dir = Path(f"/tmp/am-{cluster_id[:8]}-h{job_id}")  # short: Ray's unix sockets live under it
    temp_dir.mkdir(parents=True, exist_ok=True)
    ray_proc: subprocess.Popen[bytes] | None = None
    jobs: JobManagerProcess | None = None
    from agentmesh.discovery.etcd_server import EtcdServer

    etcd = EtcdServer(temp_dir / "etcd")
    code = 0
    try:
        etcd.start()
        _log(f"etcd at {etcd.url}")
        ray_proc, ports = _start_ray_node(
            temp_dir,
            head_address=None,
            num_cpus=ns.num_cpus,
            num_gpus=ns.num_gpus,
            object_store_mb=ns.object_store_mb,
            stop=stop,
        )
        if stop.is_set():
            return 0
        ray_address = f"{_node_ip()}:{ports['port']}"
        _log(f"ray head at {ray_address}")
        info: dict[str, Any] = {
            "job_id": job_id,
            "cluster_id": cluster_id,
            "ray_address": ray_address,
            "discovery_url": etcd.url,
            "temp_dir": str(temp_dir),
            "node": socket.gethostname(),
            "ports": {**ports, "etcd": int(etcd.client_endpoint.rsplit(":", 1)[1])},
            "pid": os.getpid(),
            "jobs_address": "",
        }
        _write_json(ready, info)
        jobs = JobManagerProcess(state_dir / "jobs", ray_address, etcd.url, env=_ray_env(temp_dir), log=_log)
        jobs.start()
        supervisor = _WorkerSupervisor(ns.name, cluster_id, state_dir)
        while not stop.wait(_POLL_S):
            if ray_proc.poll() is not None:
                _log(f"ray head exited with code {ray_proc.returncode}; the head job ends")
                code = 1
                break
            if etcd.pid is None or not process_alive(etcd.pid):
                _log("etcd exited; the head job ends")
                code = 1
                break
            if address := jobs.poll():
                _log(f"job manager at {address}")
                info["jobs_address"] = address
                _write_json(ready, info)

                def set_jobs(record: ClusterRecord, address: str = address) -> bool:
                    record.jobs_address = address
                    return True

                _update_record(ns.name, cluster_id, set_jobs)
            supervisor.check()
    except Exception as exc:
        _log(f"head failed: {type(exc).__name__}: {exc}")
        code = 1
    finally:
        _log("stopping")
        with contextlib.suppress(FileNotFoundError, ValueError):
            if json.loads(ready.read_text()).get("job_id") == job_id:
                ready.unlink()
        _stop_children([ray_proc, jobs.proc if jobs is not None else None], [etcd.pid] if etcd.pid else [])
        etcd.stop()
        _cleanup_job(cluster_id, job_id, temp_dir)
        _log(f"stopped (code {code})")
    return code


class _WorkerSupervisor:
    """Resubmits the job of a worker slot that left the queue while the cluster is up."""

    def __init__(self, name: str, cluster_id: str, state_dir: Path) -> None:
        self.name = name
        self.cluster_id = cluster_id
        self.script = state_dir / "worker.sbatch"
        self.worker_name = job_names(name, cluster_id)[1]
        self.slurm = Slurm()
        self.released: set[str] = set()

    def check(self) -> None:
        try:
            record = load_record(self.name)
        except ClusterError:
            return
        if record.cluster_id != self.cluster_id or record.state != "up" or not record.worker_job_ids:
            return
        queued = self.slurm.squeue(names=[self.worker_name])
        if queued is None:
            return
        for job_id in record.worker_job_ids:
            job = queued.get(job_id)
            # A requeued (preempted, `scontrol requeue`d) worker waits ~2 min for its BeginTime:
            # the cluster wants its node back now.
            if job is not None and job.state == "PENDING" and job.reason == "BeginTime":
                if job_id not in self.released and self.slurm.start_now(job_id):
                    _log(f"worker job {job_id} was requeued; made eligible now")
                    self.released.add(job_id)
            elif job is not None and job.state == "RUNNING":
                self.released.discard(job_id)
        gone = [j for j in record.worker_job_ids if j not in queued or queued[j].state in _ENDED]
        if not gone:
            return
        cap = max(10, 5 * len(record.worker_job_ids))

        def resubmit(rec: ClusterRecord) -> bool:
            if rec.state != "up":
                return False
            changed = False
            for old in gone:
                if old not in rec.worker_job_ids:
                    continue
                if rec.resubmitted >= cap:
                    _log(f"worker job {old} vanished; not resubmitted: {cap} resubmissions already")
                    continue
                new = self.slurm.sbatch(self.script)
                rec.worker_job_ids[rec.worker_job_ids.index(old)] = new
                rec.all_job_ids.append(new)
                rec.resubmitted += 1
                changed = True
                _log(f"worker job {old} vanished; resubmitted as {new}")
            return changed

        try:
            _update_record(self.name, self.cluster_id, resubmit)
        except ClusterError as exc:
            _log(f"resubmitting failed: {exc}")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def _read_head(state_dir: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads((state_dir / "head.json").read_text()))
    except (FileNotFoundError, ValueError):
        return None


def _run_worker(ns: argparse.Namespace) -> int:
    cluster_id, job_id = _job_context()
    stop = _install_stop_handlers()
    state_dir = Path(ns.state_dir)
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    temp_dir = Path(f"/tmp/am-{cluster_id[:8]}-w{job_id}-{restart}")
    temp_dir.mkdir(parents=True, exist_ok=True)
    ray_proc: subprocess.Popen[bytes] | None = None
    code = 0
    try:
        deadline = time.monotonic() + ns.wait_head_s
        head = _read_head(state_dir)
        while head is None and time.monotonic() < deadline and not stop.wait(0.2):
            head = _read_head(state_dir)
        if head is None:
            _log("no head appeared" if not stop.is_set() else "stopped before the head appeared")
            return 0 if stop.is_set() else 1
        address = str(head["ray_address"])
        _log(f"joining {address} (head job {head['job_id']}, restart {restart})")
        ray_proc, ports = _start_ray_node(
            temp_dir,
            head_address=address,
            num_cpus=ns.num_cpus,
            num_gpus=ns.num_gpus,
            object_store_mb=ns.object_store_mb,
            stop=stop,
        )
        _log(f"ray node up (raylet port {ports['node_manager_port']})")
        gcs_port = int(address.rsplit(":", 1)[1])
        last_seen = time.monotonic()
        while not stop.wait(1.0):
            if ray_proc.poll() is not None:
                _log(f"ray node exited with code {ray_proc.returncode}")
                code = 1
                break
            now_head = _read_head(state_dir)
            if (
                _port_open(gcs_port, timeout_s=1.0)
                and now_head is not None
                and now_head["job_id"] == head["job_id"]
            ):
                last_seen = time.monotonic()
            elif time.monotonic() - last_seen > _HEAD_GONE_S:
                _log("the head is gone; leaving")
                break
    except Exception as exc:
        _log(f"worker failed: {type(exc).__name__}: {exc}")
        code = 1
    finally:
        _log("stopping")
        _stop_child(ray_proc)
        _cleanup_job(cluster_id, job_id, temp_dir)
        _log(f"stopped (code {code})")
    return code


# -- up / add-workers / status / down --------------------------------------------------------------


def _write_scripts(record: ClusterRecord, object_store_mb: int) -> None:
    for role in ("head", "worker"):
        script = Path(record.state_dir) / f"{role}.sbatch"
        script.write_text(render_job_script(role, record=record, object_store_mb=object_store_mb))


def _submit(slurm: Slurm, record: ClusterRecord, role: str) -> str:
    return slurm.sbatch(Path(record.state_dir) / f"{role}.sbatch")


def slurm_up(
    name: str,
    *,
    workers: int = 1,
    options: dict[str, str] | None = None,
    num_cpus: float = 1.0,
    num_gpus: int = 0,
    object_store_mb: int = 256,
    wait_workers_s: float = 120.0,
    timeout_s: float = 180.0,
    say: Callable[[str], None] = lambda _msg: None,
) -> ClusterRecord:
    """Submit the head and ``workers`` worker jobs; return the record once the head serves.

    Waits up to ``wait_workers_s`` for the workers' Ray nodes (they may queue on a busy cluster: the
    record is complete without them). Raises :class:`ClusterError` (cancelling what it submitted) if
    the head does not come up within ``timeout_s``.
    """
    _check_name(name)
    if workers < 0:
        raise ConfigError(f"expected >= 0, got {workers}", key="workers")
    if num_cpus <= 0:
        raise ConfigError(f"expected > 0, got {num_cpus}", key="num_cpus")
    if num_gpus < 0:
        raise ConfigError(f"expected >= 0, got {num_gpus}", key="num_gpus")
    options = dict(options or {})
    slurm = Slurm()
    with _name_lock(name):
        with contextlib.suppress(NoClusterError):
            old = load_record(name)
            if _cluster_alive(old, slurm):
                raise ClusterError(
                    f"cluster {name!r} is already up ({old.kind}, ray {old.ray_address or '(starting)'}); "
                    f"`agentmesh cluster down{name_flag(name)}` first"
                )
            say(f"cluster {name!r}: its record names nothing alive; replacing it")
            _remove_all(old)
        cluster_id = uuid.uuid4().hex
        state_dir = clusters_dir() / name
        shutil.rmtree(state_dir, ignore_errors=True)
        (state_dir / "logs").mkdir(parents=True)
        record = ClusterRecord(
            name=name,
            ray_address="",
            discovery_url="",
            temp_dir="",
            ray_session=0,
            ray_pids=[],
            etcd_pid=0,
            etcd_keeper_pid=0,
            num_cpus=0,
            num_gpus=num_gpus,
            created_at=time.time(),
            kind="slurm",
            cluster_id=cluster_id,
            state="starting",
            job_names=list(job_names(name, cluster_id)),
            state_dir=str(state_dir),
            slurm_options=options,
            worker_cpus=num_cpus,
        )
        t0 = time.monotonic()
        try:
            with _record_lock(name):
                write_record(record)  # before any sbatch: a failed `up` leaves something `down` can find
                _write_scripts(record, object_store_mb)
                record.head_job_id = _submit(slurm, record, "head")
                record.all_job_ids.append(record.head_job_id)
                write_record(record)
                for _ in range(workers):
                    job = _submit(slurm, record, "worker")
                    record.worker_job_ids.append(job)
                    record.all_job_ids.append(job)
                write_record(record)
            say(
                f"submitted head job {record.head_job_id} and {workers} worker job(s) "
                f"{' '.join(record.worker_job_ids)}"
            )
            head = _wait_for_head(slurm, record, timeout_s, say)
            with _record_lock(name):
                current = load_record(name)  # the head may have written jobs_address meanwhile
                record.jobs_address = current.jobs_address
                record.ray_address = str(head["ray_address"])
                record.discovery_url = str(head["discovery_url"])
                record.temp_dir = str(head["temp_dir"])
                record.node = str(head["node"])
                record.ports = {k: int(v) for k, v in dict(head["ports"]).items()}
                record.num_cpus = int(num_cpus * workers)
                record.state = "up"
                write_record(record)
            say(f"ray head {record.ray_address} and etcd {record.discovery_url} on {record.node} "
                f"in {time.monotonic() - t0:.1f}s")  # fmt: skip
        except BaseException:
            say("cluster did not come up; cancelling its jobs")
            _cancel_and_wait(slurm, record, say)
            _remove_all(record)
            raise
    if workers and wait_workers_s > 0:
        _wait_for_nodes(slurm, record, 1 + workers, wait_workers_s, say)
    _wait_for_jobs_address(record, 30.0, say)
    return load_record(name)


def _cluster_alive(record: ClusterRecord, slurm: Slurm) -> bool:
    if record.kind != "slurm":
        return any(process_alive(p) for p in record.all_pids())
    queued = slurm.squeue(names=record.job_names, job_ids=record.all_job_ids)
    return queued is None or any(j.state not in _ENDED for j in queued.values())


def _wait_for_head(
    slurm: Slurm, record: ClusterRecord, timeout_s: float, say: Callable[[str], None]
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last_state = ""
    state_dir = Path(record.state_dir)
    while time.monotonic() < deadline:
        head = _read_head(state_dir)
        if head is not None and head.get("job_id") == record.head_job_id:
            return head
        queued = slurm.squeue(job_ids=[record.head_job_id])
        if queued is not None:
            job = queued.get(record.head_job_id)
            state = (
                f"{job.state} ({job.reason})"
                if job and job.reason not in ("", "None")
                else (job.state if job else "")
            )
            if job is None or job.state in _ENDED:
                raise ClusterError(
                    f"head job {record.head_job_id} ended before its Ray head came up; "
                    f"log {_job_log(record, record.head_job_id)}:\n{_log_tail(record, record.head_job_id)}"
                )
            if state != last_state:
                say(f"head job {record.head_job_id}: {state}")
                last_state = state
        time.sleep(0.2)
    raise ClusterError(
        f"head job {record.head_job_id} did not bring up a Ray head within {timeout_s:.0f}s "
        f"(last state {last_state or 'unknown'}); log {_job_log(record, record.head_job_id)}"
    )


def _wait_for_nodes(
    slurm: Slurm, record: ClusterRecord, want: int, timeout_s: float, say: Callable[[str], None]
) -> int:
    deadline = time.monotonic() + timeout_s
    t0 = time.monotonic()
    seen = -1
    while True:
        nodes = count_ray_nodes(record.ray_address) or 0
        if nodes != seen:
            say(f"ray nodes {nodes}/{want} after {time.monotonic() - t0:.1f}s")
            seen = nodes
        if nodes >= want:
            return nodes
        if time.monotonic() >= deadline:
            queued = slurm.squeue(job_ids=load_record(record.name).worker_job_ids) or {}
            pending = ", ".join(
                f"{j.job_id} {j.state}" + (f" ({j.reason})" if j.reason else "") for j in queued.values()
            )
            say(
                f"not all workers joined within {timeout_s:.0f}s ({nodes}/{want} nodes); "
                f"jobs: {pending or 'none queued'}"
            )
            return nodes
        time.sleep(0.5)


def _wait_for_jobs_address(record: ClusterRecord, timeout_s: float, say: Callable[[str], None]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if load_record(record.name).jobs_address:
            return
        time.sleep(0.2)
    say(
        f"the job manager did not announce itself within {timeout_s:.0f}s; "
        f"see {record.state_dir}/jobs/server.log"
    )


def _job_log(record: ClusterRecord, job_id: str) -> Path:
    matches = sorted(Path(record.state_dir, "logs").glob(f"*-{job_id}.out"))
    return matches[0] if matches else Path(record.state_dir, "logs", f"(no log for job {job_id})")


def _log_tail(record: ClusterRecord, job_id: str, n: int = 15) -> str:
    path = _job_log(record, job_id)
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def slurm_add_workers(name: str, count: int, *, say: Callable[[str], None] = lambda _msg: None) -> list[str]:
    """Submit ``count`` more worker jobs to the Slurm cluster ``name``; their job ids."""
    if count < 1:
        raise ConfigError(f"expected >= 1, got {count}", key="count")
    record = load_record(name)
    if record.kind != "slurm":
        raise ConfigError(
            f"cluster {name!r} is {record.kind}, not slurm: add-workers needs Slurm", key="name"
        )
    check_head_running(record)
    slurm = Slurm()
    added: list[str] = []

    def add(rec: ClusterRecord) -> bool:
        if rec.state != "up":
            raise ClusterError(f"cluster {name!r} is {rec.state}")
        for _ in range(count):
            job = _submit(slurm, rec, "worker")
            rec.worker_job_ids.append(job)
            rec.all_job_ids.append(job)
            added.append(job)
        return True

    _update_record(name, record.cluster_id, add)
    say(f"submitted worker job(s) {' '.join(added)}")
    return added


def check_head_running(record: ClusterRecord, slurm: Slurm | None = None) -> str:
    """The head job's state; :class:`HeadNotRunningError` unless it is RUNNING."""
    queued = (slurm or Slurm()).squeue(job_ids=[record.head_job_id])
    if queued is None:
        raise ClusterError(f"cluster {record.name!r}: squeue failed; cannot tell whether its head job runs")
    job = queued.get(record.head_job_id)
    state = job.state if job is not None else "gone from the queue"
    if job is None or job.state != "RUNNING":
        raise HeadNotRunningError(
            f"head job {record.head_job_id} of cluster {record.name!r} is not running (state {state}); "
            f"`agentmesh cluster down{name_flag(record.name)}` cleans up"
        )
    return state


@dataclass
class SlurmClusterStatus:
    """What ``cluster status`` reports for a Slurm cluster."""

    record: ClusterRecord
    head_state: str
    ray_up: bool
    etcd_up: bool
    ray_nodes: int | None
    workers: dict[str, str]
    """Current job of each worker slot → its state (``gone`` if not queued)."""
    problem: str = ""

    @property
    def healthy(self) -> bool:
        return self.head_state == "RUNNING" and self.ray_up and self.etcd_up

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self.record),
            "head_state": self.head_state,
            "ray_up": self.ray_up,
            "etcd_up": self.etcd_up,
            "ray_nodes": self.ray_nodes,
            "workers": self.workers,
            "problem": self.problem,
            "healthy": self.healthy,
        }


def slurm_status(name: str) -> SlurmClusterStatus:
    """The head job's state, whether its GCS and etcd answer, the Ray nodes alive, the worker jobs."""
    record = load_record(name)
    slurm = Slurm()
    queued = slurm.squeue(names=record.job_names, job_ids=[record.head_job_id, *record.worker_job_ids]) or {}
    head = queued.get(record.head_job_id)
    head_state = head.state if head is not None else "GONE"
    workers = {j: (queued[j].state if j in queued else "GONE") for j in record.worker_job_ids}
    problem = ""
    ray_nodes = count_ray_nodes(record.ray_address) if record.ray_address else None
    ray_up = ray_nodes is not None
    etcd_up = bool(record.discovery_url) and _etcd_healthy(record.discovery_url)
    if head_state != "RUNNING":
        problem = f"head job {record.head_job_id} of cluster {name!r} is not running (state {head_state})"
    elif not ray_up:
        problem = (
            f"the Ray GCS of cluster {name!r} at {record.ray_address or '(not yet known)'} is unreachable"
        )
    elif not etcd_up:
        problem = f"the etcd of cluster {name!r} at {record.discovery_url} is unreachable"
    return SlurmClusterStatus(record, head_state, ray_up, etcd_up, ray_nodes, workers, problem)


def _cancel_and_wait(
    slurm: Slurm, record: ClusterRecord, say: Callable[[str], None], timeout_s: float = 60.0
) -> None:
    ids = list(dict.fromkeys([*([record.head_job_id] if record.head_job_id else []), *record.all_job_ids]))
    # The head first: it must not resubmit the workers cancelled next (it also checks `stopping`).
    if record.head_job_id:
        slurm.scancel(job_ids=[record.head_job_id])
    slurm.scancel(job_ids=ids, names=record.job_names)
    deadline = time.monotonic() + timeout_s
    left: dict[str, JobInfo] | None = {}
    shown = ""
    while time.monotonic() < deadline:
        # Again by name: a job a head resubmitted just before it stopped is in no record yet.
        slurm.scancel(names=record.job_names)
        left = slurm.squeue(names=record.job_names, job_ids=ids)
        if left is not None and not left:
            return
        now = ", ".join(f"{j.job_id} {j.state}" for j in (left or {}).values())
        if now != shown:
            say(f"waiting for job(s) to leave the queue: {now or '(squeue failed)'}")
            shown = now
        time.sleep(0.25)
    raise ClusterError(
        f"cluster {record.name!r}: job(s) still queued after {timeout_s:.0f}s: {shown}; record kept"
    )


def _remove_all(record: ClusterRecord) -> None:
    if record.kind != "slurm":
        _remove_files(record)
        return
    if record.cluster_id:
        for path in glob.glob(f"/tmp/am-{record.cluster_id[:8]}-*"):
            shutil.rmtree(path, ignore_errors=True)
    if record.state_dir:
        shutil.rmtree(record.state_dir, ignore_errors=True)
    record.path.unlink(missing_ok=True)


def slurm_down(name: str, *, say: Callable[[str], None] = lambda _msg: None) -> ClusterRecord:
    """Cancel every job of the Slurm cluster ``name``, wait until none is queued, kill marked
    stragglers on this node, remove temp dirs, state dir and record."""
    with _name_lock(name):
        record = load_record(name)
        t0 = time.monotonic()

        def stopping(rec: ClusterRecord) -> bool:
            rec.state = "stopping"
            return True

        record = _update_record(name, record.cluster_id, stopping) or record
        slurm = Slurm()
        say(f"cancelling {len(set(record.all_job_ids))} job(s) of cluster {name!r}")
        _cancel_and_wait(slurm, record, say)
        record = load_record(name)  # a last resubmission may have landed in it
        _cancel_and_wait(slurm, record, say)
        left = marked_pids(record.cluster_id) if record.cluster_id else []
        if left:
            say(f"killing {len(left)} process(es) left by the jobs: {left}")
            left = _kill_pids(left, grace_s=2.0)
        if left:
            raise ClusterError(f"cluster {name!r}: processes {left} survived SIGKILL; record kept")
        _remove_all(record)
        say(f"cluster {name!r} down in {time.monotonic() - t0:.1f}s")
    return record


# -- entry point of the batch scripts --------------------------------------------------------------


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m agentmesh.cluster.slurm")
    sub = parser.add_subparsers(dest="role", required=True)
    for role in ("head", "worker"):
        p = sub.add_parser(role)
        p.add_argument("--state-dir", required=True)
        p.add_argument("--name", required=True)
        p.add_argument("--num-cpus", type=float, default=1.0)
        p.add_argument("--num-gpus", type=float, default=0.0)
        p.add_argument("--object-store-mb", type=int, default=256)
        if role == "worker":
            p.add_argument("--wait-head-s", type=float, default=600.0)
    ns = parser.parse_args(argv)
    try:
        return _run_head(ns) if ns.role == "head" else _run_worker(ns)
    except ClusterError as exc:
        _log(str(exc))
        return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
