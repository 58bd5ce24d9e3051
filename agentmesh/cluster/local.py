"""A local cluster that outlives one command: a Ray head, an etcd and a job manager, found
through a record.

``up`` starts a Ray head with ``ray start --head`` (every port picked free, a short temp dir of its
own, loopback only; ``num_gpus`` may declare logical GPUs on a machine without any), an etcd
(:class:`~agentmesh.discovery.etcd_server.EtcdServer`, run by a small keeper process that stops it
on SIGTERM) and the job manager (:class:`JobManagerProcess`, run and restarted by a keeper of its
own). All run in sessions of their own, detached from the command that started them. The
rendezvous record ``$AGENTMESH_HOME/clusters/NAME.json`` says where they are (Ray address,
discovery URL, job manager address, pids, temp dir), so that a later command can find them.

``down`` stops only what the record names: the job manager's keeper, every process of the Ray
head's session and their descendants (a vLLM server an actor started runs in a session of its
own), then the etcd keeper's session; then it removes the temp dir and the record. It never runs
``ray stop``, which would stop every Ray on the machine.

Many clusters can be up side by side under different names: nothing is shared but the machine.
Slurm clusters (:mod:`agentmesh.cluster.slurm`) use the same record.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agentmesh.errors import AgentMeshError, ConfigError
from agentmesh.files import write_atomic

__all__ = [
    "DEFAULT_CLUSTER",
    "ClusterError",
    "ClusterRecord",
    "ClusterStatus",
    "JobManagerProcess",
    "NoClusterError",
    "cluster_down",
    "cluster_status",
    "cluster_up",
    "clusters_dir",
    "load_record",
    "name_flag",
    "process_alive",
    "resolve_cluster",
]

DEFAULT_CLUSTER = "default"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
_RAY_START_TIMEOUT_S = 60.0
_ETCD_START_TIMEOUT_S = 30.0
_TERM_GRACE_S = 3.0  # gcs_server ignores SIGTERM for longer than anyone wants to wait


class ClusterError(AgentMeshError):
    """A cluster could not be started, found or stopped."""


class NoClusterError(ClusterError):
    """No record of the named cluster: nothing was started under that name (or it is down)."""


def clusters_dir() -> Path:
    """Where rendezvous records live: ``$AGENTMESH_HOME/clusters``."""
    from agentmesh.llm_gateway.constants import agentmesh_home

    return agentmesh_home() / "clusters"


def _check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ConfigError(
            f"expected 1-40 letters, digits, '_', '-' or '.' (starting with a letter or digit), got {name!r}",
            key="name",
        )
    return name


@dataclass
class ClusterRecord:
    """The rendezvous record of one local cluster (``clusters/NAME.json``)."""

    name: str
    ray_address: str
    discovery_url: str
    temp_dir: str
    ray_session: int
    """Session id of the Ray head's processes (the pid of the ``ray start`` that led it)."""
    ray_pids: list[int]
    etcd_pid: int
    etcd_keeper_pid: int
    num_cpus: int
    num_gpus: int
    ports: dict[str, int] = field(default_factory=dict)
    created_at: float = 0.0
    kind: str = "local"
    """``local`` (this module) or ``slurm`` (:mod:`agentmesh.cluster.slurm`)."""
    cluster_id: str = ""
    """A uuid every process of the cluster carries as ``AGENTMESH_CLUSTER_ID`` in its environment."""
    state: str = "up"
    """``starting``, ``up`` or ``stopping`` (a Slurm head resubmits vanished workers only when ``up``)."""
    jobs_address: str = ""
    """``127.0.0.1:PORT`` of the cluster's job manager; empty where none runs."""
    jobs_keeper_pid: int = 0
    """Local: the process (in a session of its own) that runs and restarts the job manager."""
    # Slurm only: the jobs of the cluster and where its shared state lives.
    head_job_id: str = ""
    worker_job_ids: list[str] = field(default_factory=list)
    """The current job of each worker slot (a resubmitted worker replaces its slot's id)."""
    all_job_ids: list[str] = field(default_factory=list)
    """Every job ever submitted for the cluster, in order (``down`` cancels them all)."""
    job_names: list[str] = field(default_factory=list)
    node: str = ""
    """The node the head runs on."""
    state_dir: str = ""
    """``$AGENTMESH_HOME/clusters/NAME/``: scripts, job logs, the head's ready file, job manager state."""
    slurm_options: dict[str, str] = field(default_factory=dict)
    worker_cpus: float = 0.0
    """Ray CPUs each worker offers."""
    resubmitted: int = 0
    """How many worker jobs the head resubmitted after they vanished."""

    @property
    def path(self) -> Path:
        return clusters_dir() / f"{self.name}.json"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ClusterRecord:
        data = json.loads(text)
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def all_pids(self) -> list[int]:
        return sorted({*self.ray_pids, self.etcd_pid, self.etcd_keeper_pid, self.jobs_keeper_pid} - {0})


def load_record(name: str = DEFAULT_CLUSTER) -> ClusterRecord:
    """The record of cluster ``name``; :class:`NoClusterError` if there is none."""
    path = clusters_dir() / f"{_check_name(name)}.json"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise NoClusterError(
            f"no cluster {name!r}: start one with `agentmesh cluster up"
            + ("" if name == DEFAULT_CLUSTER else f" --name {name}")
            + "`"
        ) from None
    try:
        return ClusterRecord.from_json(text)
    except (ValueError, TypeError) as exc:
        raise ClusterError(f"the record {path} is damaged ({exc}); remove it by hand") from None


def resolve_cluster(
    name: str = DEFAULT_CLUSTER, *, ray_address: str | None = None, discovery_url: str | None = None
) -> tuple[str, str]:
    """``(ray_address, discovery_url)``: the flags where both are given, else from the record."""
    if ray_address and discovery_url:
        return ray_address, discovery_url
    record = load_record(name)
    if record.kind == "slurm":
        # A record outlives a head that Slurm ended: say so here rather than time out on its address.
        from agentmesh.cluster.slurm import check_head_running

        check_head_running(record)
    return ray_address or record.ray_address, discovery_url or record.discovery_url


def name_flag(name: str) -> str:
    """``" --name NAME"`` to repeat in a suggested command; empty for the default cluster."""
    return "" if name == DEFAULT_CLUSTER else f" --name {name}"


def write_record(record: ClusterRecord) -> None:
    write_atomic(record.path, record.to_json())


# -- processes -------------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, ppid, session id)`` of a live process, None if there is none (or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    state = fields[0]
    if state in ("Z", "X"):
        return None
    return state, int(fields[1]), int(fields[3])


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie, waiting to be reaped, counts as gone)."""
    return _stat(pid) is not None


def _all_pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def pids_with_env(*entries: str) -> list[int]:
    """Live processes (not this one) whose environment holds every ``NAME=value`` of ``entries``:
    how a cluster finds what it started even after it left the process tree."""
    want = {e.encode() for e in entries}
    found = []
    for pid in _all_pids():
        if pid == os.getpid():
            continue
        try:
            environ = set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if want <= environ and process_alive(pid):
            found.append(pid)
    return sorted(found)


def _session_tree(session: int) -> list[int]:
    """Live processes of ``session`` and all their descendants, whatever their session."""
    stats = {pid: st for pid in _all_pids() if (st := _stat(pid)) is not None}
    found = {pid for pid, (_s, _pp, sid) in stats.items() if sid == session}
    grew = True
    while grew:
        children = {pid for pid, (_s, ppid, _sid) in stats.items() if ppid in found and pid not in found}
        found |= children
        grew = bool(children)
    return sorted(found)


def terminate_pids(
    live_pids: Callable[[], list[int]], *, grace_s: float, kill_wait_s: float = 5.0
) -> list[int]:
    """SIGTERM what ``live_pids()`` names, SIGKILL what it names after ``grace_s``; return what is
    still alive after that. ``live_pids`` is asked again each round, so a tree that grew is caught."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, kill_wait_s)):
        pids = live_pids()
        if not pids:
            return []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(process_alive(p) for p in pids):
            time.sleep(0.05)
    return [p for p in live_pids() if process_alive(p)]


def _kill_tree(session: int, *, grace_s: float = _TERM_GRACE_S) -> list[int]:
    """SIGTERM the session's tree, SIGKILL what is left after ``grace_s``; return what survived."""
    return terminate_pids(lambda: _session_tree(session), grace_s=grace_s)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int, timeout_s: float = 1.0) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=timeout_s):
        return True
    return False


@contextlib.contextmanager
def _clusters_lock(filename: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``clusters_dir()/filename`` while the block runs."""
    directory = clusters_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / filename, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _name_lock(name: str) -> contextlib.AbstractContextManager[None]:
    # Two `up`s (or an `up` and a `down`) of one name at once must not interleave.
    return _clusters_lock(f".{name}.lock")


# -- Ray head --------------------------------------------------------------------------------------

_RAY_PORT_FLAGS = (
    "--port",
    "--ray-client-server-port",
    "--node-manager-port",
    "--object-manager-port",
    "--metrics-export-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
)


def ray_env(temp_dir: Path) -> dict[str, str]:
    """The environment of a cluster's Ray processes: the project's Ray settings, TMPDIR too (parts
    of Ray put files there whatever --temp-dir says)."""
    from agentmesh.launcher import RAY_ENV

    return {**os.environ, **RAY_ENV, "TMPDIR": str(temp_dir)}


def _start_ray_head(temp_dir: Path, num_cpus: int, num_gpus: int) -> tuple[int, dict[str, int], list[int]]:
    """``ray start --head`` in a session of its own: (session id, ports, pids). Retries on port clashes."""
    ray_tmp = temp_dir / "ray"
    log_path = temp_dir / "ray-start.log"
    last = ""
    for _attempt in range(3):
        ports = {flag.lstrip("-").replace("-", "_"): _free_port() for flag in _RAY_PORT_FLAGS}
        cmd = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
            "--node-ip-address", "127.0.0.1",
            "--temp-dir", str(ray_tmp),
            "--num-cpus", str(num_cpus),
            "--num-gpus", str(num_gpus),
            "--include-dashboard", "false",
            "--disable-usage-stats",
            # 0/0: workers bind ports the OS picks, so clusters side by side never compete for a range.
            "--min-worker-port", "0", "--max-worker-port", "0",
        ]  # fmt: skip
        for flag in _RAY_PORT_FLAGS:
            cmd += [flag, str(ports[flag.lstrip("-").replace("-", "_")])]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=ray_env(temp_dir),
                cwd=str(temp_dir),
                start_new_session=True,  # its session id names every process of this Ray
            )
        try:
            code = proc.wait(_RAY_START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        session = proc.pid
        if code == 0 and _port_open(ports["port"]):
            return session, ports, _session_tree(session)
        _kill_tree(session, grace_s=1.0)
        last = f"`ray start` {'timed out' if code is None else f'exited with code {code}'}"
        if code is None or code == 2:  # a hang or a usage error: other ports will not help
            break
    tail = log_path.read_text(errors="replace").splitlines()[-20:] if log_path.exists() else []
    raise ClusterError(f"could not start the Ray head: {last}; log {log_path}:\n" + "\n".join(tail))


# -- etcd keeper -----------------------------------------------------------------------------------


def _run_etcd_keeper(data_dir: str, ready_file: str) -> int:
    """The detached process that owns the cluster's etcd: start it, report, stop it on SIGTERM."""
    from agentmesh.discovery.etcd_server import EtcdServer

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    server = EtcdServer(Path(data_dir))
    server.start()
    write_atomic(ready_file, json.dumps({"url": server.url, "pid": server.pid}))
    try:
        while not stop.wait(1.0):
            if server.pid is None or not process_alive(server.pid):
                print("etcd exited; the keeper exits too", file=sys.stderr, flush=True)
                return 1
    finally:
        server.stop()
    return 0


def _start_keeper(
    temp_dir: Path, role: str, args: list[str], *, what: str, log_to_show: Path | None = None
) -> tuple[dict[str, Any], int]:
    """Start ``python -m agentmesh.cluster.local ROLE ARGS... READY_FILE`` in a session of its own and
    wait for its ready file; (what the file says, keeper pid). ClusterError with a log tail if the
    keeper exits or stays silent."""
    ready = temp_dir / f"{role.removesuffix('-keeper')}.ready"
    log_path = temp_dir / f"{role}.log"
    with open(log_path, "ab") as log:
        keeper = subprocess.Popen(
            [sys.executable, "-m", "agentmesh.cluster.local", role, *args, str(ready)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=str(temp_dir),
            start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + _ETCD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if ready.exists():
            return dict(json.loads(ready.read_text())), keeper.pid
        if keeper.poll() is not None:
            break
        time.sleep(0.05)
    _kill_tree(keeper.pid, grace_s=1.0)
    shown = log_to_show or log_path
    tail = shown.read_text(errors="replace").splitlines()[-20:] if shown.exists() else []
    raise ClusterError(f"could not start {what}; log {shown}:\n" + "\n".join(tail))


def _start_etcd(temp_dir: Path) -> tuple[str, int, int]:
    """Start the etcd keeper in a session of its own; return (discovery url, etcd pid, keeper pid)."""
    info, keeper_pid = _start_keeper(temp_dir, "etcd-keeper", [str(temp_dir / "etcd")], what="etcd")
    return str(info["url"]), int(info["pid"]), keeper_pid


# -- job manager -----------------------------------------------------------------------------------

_JOBS_RESTART_GAP_S = 1.0
"""A job manager that keeps exiting is restarted at most this often."""


class JobManagerProcess:
    """The cluster's job manager (``python -m agentmesh.jobs.server``) as a child process, started
    again whenever it exits: it keeps all its state under ``state_dir``, so a restart loses nothing,
    and it listens on the port it had, so the address in the cluster's record stays good.
    Run by the local cluster's jobs keeper and by a Slurm cluster's head job."""

    def __init__(
        self,
        state_dir: Path,
        ray_address: str,
        discovery_url: str,
        *,
        env: dict[str, str] | None = None,
        log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True),
    ) -> None:
        self.state_dir = state_dir
        self.argv = [
            sys.executable, "-m", "agentmesh.jobs.server", "--state-dir", str(state_dir),
            "--ray-address", ray_address, "--discovery", discovery_url,
            "--ready-file", str(state_dir / "ready.json"),
        ]  # fmt: skip
        self.env = env
        self.log = log
        self.ready = state_dir / "ready.json"
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.restarts = 0
        self._started_at = 0.0
        self._port = 0
        """The port the manager announced; the next start asks for it again."""

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.ready.unlink(missing_ok=True)
        self.address = ""
        self._started_at = time.monotonic()
        argv = [*self.argv, "--port", str(self._port)]
        with open(self.state_dir / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )

    def poll(self) -> str | None:
        """The manager's address when it has just (re)announced one, else None; starts a manager
        that exited again (at most once per second)."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            if not self.address:
                self._port = 0  # it never served on that port (taken meanwhile?): take any
            if time.monotonic() - self._started_at >= _JOBS_RESTART_GAP_S:
                self.restarts += 1
                self.log(f"job manager exited with code {self.proc.returncode}; restart {self.restarts}")
                self.start()
            return None
        if not self.address and self.ready.exists():
            with contextlib.suppress(ValueError, OSError, KeyError):
                self.address = str(json.loads(self.ready.read_text())["address"])
                self._port = int(self.address.rsplit(":", 1)[1])
                return self.address
        return None

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM (running attempts outlive it), SIGKILL after ``grace_s``."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _run_jobs_keeper(state_dir: str, ray_address: str, discovery_url: str, ready_file: str) -> int:
    """The detached process that runs the cluster's job manager, restarts it when it exits, and
    stops it on SIGTERM; it writes the manager's address to ``ready_file`` whenever one is announced."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    manager = JobManagerProcess(Path(state_dir), ray_address, discovery_url)
    manager.start()
    try:
        while True:
            address = manager.poll()
            if address and manager.proc is not None:
                write_atomic(ready_file, json.dumps({"address": address, "pid": manager.proc.pid}))
            if stop.wait(0.5):
                break
    finally:
        manager.stop()
    return 0


def _start_jobs(temp_dir: Path, ray_address: str, discovery_url: str) -> tuple[str, int]:
    """Start the job manager's keeper in a session of its own; (manager address, keeper pid)."""
    state_dir = temp_dir / "jobs"
    info, keeper_pid = _start_keeper(
        temp_dir,
        "jobs-keeper",
        [str(state_dir), ray_address, discovery_url],
        what="the job manager",
        log_to_show=state_dir / "server.log",
    )
    return str(info["address"]), keeper_pid


# -- up / status / down ----------------------------------------------------------------------------


def cluster_up(
    name: str = DEFAULT_CLUSTER,
    *,
    num_cpus: int | None = None,
    num_gpus: int = 0,
    say: Callable[[str], None] = lambda _msg: None,
) -> ClusterRecord:
    """Start a local cluster named ``name`` and write its record. Raises if it is already up.

    A record whose processes are all gone (the machine rebooted, someone killed them) is replaced.
    """
    _check_name(name)
    if num_gpus < 0:
        raise ConfigError(f"expected >= 0, got {num_gpus}", key="num_gpus")
    cpus = num_cpus if num_cpus is not None else (os.cpu_count() or 2)
    if cpus < 1:
        raise ConfigError(f"expected >= 1, got {num_cpus}", key="num_cpus")
    with _name_lock(name):
        with contextlib.suppress(NoClusterError):
            old = load_record(name)
            if any(process_alive(p) for p in old.all_pids()):
                raise ClusterError(
                    f"cluster {name!r} is already up (ray {old.ray_address}, discovery {old.discovery_url}); "
                    f"`agentmesh cluster down{name_flag(name)}` first"
                )
            say(f"cluster {name!r}: its record names no live process; replacing it")
            _remove_files(old)
        # Short: Ray's socket paths under it must stay within the 107-byte limit of a unix socket.
        temp_dir = Path(tempfile.mkdtemp(prefix=f"am-{name[:12]}-", dir="/tmp"))
        t0 = time.monotonic()
        try:
            session, ports, ray_pids = _start_ray_head(temp_dir, cpus, num_gpus)
        except BaseException:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        say(
            f"ray head on 127.0.0.1:{ports['port']} ({cpus} CPUs, {num_gpus} GPUs)"
            f" in {time.monotonic() - t0:.1f}s"
        )
        keeper_pid = jobs_keeper_pid = 0
        try:
            t0 = time.monotonic()
            discovery_url, etcd_pid, keeper_pid = _start_etcd(temp_dir)
            say(f"etcd at {discovery_url} in {time.monotonic() - t0:.1f}s")
            t0 = time.monotonic()
            jobs_address, jobs_keeper_pid = _start_jobs(temp_dir, f"127.0.0.1:{ports['port']}", discovery_url)
            say(f"job manager at {jobs_address} in {time.monotonic() - t0:.1f}s")
            record = ClusterRecord(
                name=name,
                ray_address=f"127.0.0.1:{ports['port']}",
                discovery_url=discovery_url,
                temp_dir=str(temp_dir),
                ray_session=session,
                ray_pids=ray_pids,
                etcd_pid=etcd_pid,
                etcd_keeper_pid=keeper_pid,
                num_cpus=cpus,
                num_gpus=num_gpus,
                ports=ports,
                created_at=time.time(),
                jobs_address=jobs_address,
                jobs_keeper_pid=jobs_keeper_pid,
            )
            write_record(record)
        except BaseException:
            for started in (jobs_keeper_pid, session, keeper_pid):
                if started:
                    _kill_tree(started, grace_s=1.0)
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
    return record


@dataclass
class ClusterStatus:
    """What ``cluster status`` reports."""

    record: ClusterRecord
    ray_up: bool
    etcd_up: bool
    live_pids: list[int]

    @property
    def healthy(self) -> bool:
        return self.ray_up and self.etcd_up

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self.record),
            "ray_up": self.ray_up,
            "etcd_up": self.etcd_up,
            "live_pids": self.live_pids,
        }


def _etcd_healthy(discovery_url: str) -> bool:
    endpoint = discovery_url.partition("://")[2].split(",")[0]
    try:
        with urllib.request.urlopen(f"http://{endpoint}/health", timeout=2.0) as resp:
            return str(json.loads(resp.read() or b"{}").get("health")) == "true"
    except (OSError, ValueError):
        return False


def cluster_status(name: str = DEFAULT_CLUSTER) -> ClusterStatus:
    """Whether the named cluster's Ray head and etcd answer, and which of its processes live."""
    record = load_record(name)
    live = _session_tree(record.ray_session)
    gcs_port = int(record.ray_address.rsplit(":", 1)[1])
    ray_up = bool(live) and _port_open(gcs_port)
    etcd_up = process_alive(record.etcd_pid) and _etcd_healthy(record.discovery_url)
    live += [p for p in (record.etcd_keeper_pid, record.etcd_pid) if process_alive(p)]
    return ClusterStatus(record, ray_up, etcd_up, sorted(set(live)))


def _remove_files(record: ClusterRecord) -> None:
    shutil.rmtree(record.temp_dir, ignore_errors=True)
    record.path.unlink(missing_ok=True)


def cluster_down(
    name: str = DEFAULT_CLUSTER, *, say: Callable[[str], None] = lambda _msg: None
) -> ClusterRecord:
    """Stop every process of the named cluster, remove its temp dir and record; return the record.

    Raises :class:`ClusterError` (keeping the record) if a process survives SIGKILL.
    """
    with _name_lock(name):
        record = load_record(name)
        t0 = time.monotonic()
        # The job manager first: it must not see Ray vanish under running tasks and retry them.
        survivors = _kill_tree(record.jobs_keeper_pid) if record.jobs_keeper_pid else []
        survivors += _kill_tree(record.ray_session)
        # The keeper stops etcd on SIGTERM; its session is swept after that anyway.
        survivors += _kill_tree(record.etcd_keeper_pid)
        survivors += [p for p in record.all_pids() if process_alive(p) and p not in survivors]
        if survivors:
            raise ClusterError(f"cluster {name!r}: processes {survivors} survived SIGKILL; record kept")
        _remove_files(record)
        say(f"cluster {name!r} down in {time.monotonic() - t0:.1f}s")
    return record


def _main(argv: list[str]) -> int:
    # Internal entry point: `python -m agentmesh.cluster.local etcd-keeper DATA_DIR READY_FILE`.
    if len(argv) == 3 and argv[0] == "etcd-keeper":
        return _run_etcd_keeper(argv[1], argv[2])
    if len(argv) == 5 and argv[0] == "jobs-keeper":
        return _run_jobs_keeper(argv[1], argv[2], argv[3], argv[4])
    print(
        "usage: python -m agentmesh.cluster.local etcd-keeper DATA_DIR READY_FILE\n"
        "       python -m agentmesh.cluster.local jobs-keeper STATE_DIR RAY_ADDRESS DISCOVERY_URL READY_FILE",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
