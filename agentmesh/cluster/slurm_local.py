"""A single-node Slurm on loopback, for tests and for trying ``agentmesh cluster up --slurm`` here.

Everything lives under one directory of its own: a munge key and socket (``munged`` runs as user
``munge``), ``slurm.conf`` rendered from ``deploy/slurm/slurm.conf.in`` (free ports, own state and
spool dirs, a scheduler tuned so a job starts in well under a second), pid files and logs. Clients
find it through ``SLURM_CONF`` (see :meth:`LocalSlurm.env`). ``down`` cancels the instance's jobs,
waits until ``squeue`` is empty, then stops the daemons through their pid files; it never touches
another Slurm or munge on the machine.

Needs root and Debian's ``slurm-wlm`` and ``munge`` (``deploy/install_slurm.sh``). Command line::

    python -m agentmesh.cluster.slurm_local up DIR      # prints `export SLURM_CONF=...`
    python -m agentmesh.cluster.slurm_local down DIR
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from agentmesh.cluster.local import _free_port, pids_with_env, process_alive
from agentmesh.cluster.templates import render_file
from agentmesh.errors import AgentMeshError

__all__ = ["LocalSlurm", "SlurmSetupError", "slurm_installed"]

_BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "scancel", "sinfo")


class SlurmSetupError(AgentMeshError):
    """The local Slurm could not be started or stopped."""


def slurm_installed() -> bool:
    """Whether the Slurm daemons, clients and munged are on PATH (or in /usr/sbin)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return all(shutil.which(b, path=path) for b in _BINARIES)


def _which(binary: str) -> str:
    found = shutil.which(binary, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if not found:
        raise SlurmSetupError(f"{binary} not found: run deploy/install_slurm.sh (apt slurm-wlm munge)")
    return found


def _real_memory_mb() -> int:
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"RealMemory=(\d+)", out)
    # A little below what slurmd measures: a node configured above it is drained as invalid.
    return max(256, int(m.group(1)) - 256) if m else 1024


class LocalSlurm:
    """One single-node Slurm instance under ``directory`` (created if needed)."""

    def __init__(self, directory: Path, *, oversubscribe: int = 32, kill_wait_s: int = 5) -> None:
        self.dir = Path(directory).resolve()
        self.oversubscribe = oversubscribe
        self.kill_wait_s = kill_wait_s
        self.host = socket.gethostname()
        self.conf = self.dir / "slurm.conf"
        self.munge_socket = self.dir / "munge" / "munge.socket"
        self.timings: dict[str, float] = {}

    # -- environment --------------------------------------------------------------------------

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: ``os.environ``) with ``SLURM_CONF`` pointing at this instance."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def _run(self, *cmd: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(cmd), capture_output=True, text=True, env=self.env(), timeout=timeout_s, check=False
        )

    # -- up -----------------------------------------------------------------------------------

    def up(self, *, timeout_s: float = 30.0) -> LocalSlurm:
        """Start munged, slurmctld and slurmd; return once the node takes jobs."""
        if os.geteuid() != 0:
            raise SlurmSetupError("the local Slurm needs root (munged runs as munge, slurmd as root)")
        t0 = time.monotonic()
        for sub in ("state", "spool", "run", "log", "munge"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        cpus = os.cpu_count() or 1
        values = {
            "CLUSTER_NAME": "am" + uuid.uuid4().hex[:8],
            "HOST": self.host,
            "CTLD_PORT": str(_free_port()),
            "SLURMD_PORT": str(_free_port()),
            "MUNGE_SOCKET": str(self.munge_socket),
            "DIR": str(self.dir),
            "KILL_WAIT": str(self.kill_wait_s),
            "CPUS": str(cpus),
            "REAL_MEMORY": str(_real_memory_mb()),
            "PARTITION": "debug",
            "OVERSUBSCRIBE": str(self.oversubscribe),
        }
        self.conf.write_text(render_file("slurm.conf.in", values))
        # The Debian default plugstack.conf pulls in whatever sits in /etc; this instance wants none.
        (self.dir / "plugstack.conf").write_text("")
        env = self.env()
        env["AGENTMESH_LOCAL_SLURM"] = str(self.dir)  # marks the daemons and every job step they start
        for daemon in ("slurmctld", "slurmd"):
            # -i: ignore state an earlier instance in this dir may have left; both daemons fork.
            log = self.dir / "log" / f"{daemon}.start.log"
            with open(log, "ab") as out:
                done = subprocess.run(
                    [_which(daemon), "-f", str(self.conf), *(["-i"] if daemon == "slurmctld" else [])],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    timeout=30,
                    check=False,
                )
            if done.returncode != 0:
                raise SlurmSetupError(f"{daemon} exited with code {done.returncode}: {self._tail(daemon)}")
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            state = self._run("sinfo", "-h", "-N", "-o", "%T").stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                self.timings["cold_start_s"] = time.monotonic() - t0
                return self
            time.sleep(0.1)
        raise SlurmSetupError(
            f"the node did not come up within {timeout_s}s (state {state!r}): {self._tail()}"
        )

    def _start_munge(self) -> None:
        munge_dir = self.dir / "munge"
        pid_file = munge_dir / "munged.pid"
        if pid_file.exists() and process_alive(int(pid_file.read_text().strip() or 0)):
            return
        user = pwd.getpwnam("munge")
        key = munge_dir / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        # munged (user munge) must reach the dir; it refuses keys and dirs others could write.
        self.dir.chmod(0o755)
        os.chown(munge_dir, user.pw_uid, user.pw_gid)
        munge_dir.chmod(0o755)
        os.chown(key, user.pw_uid, user.pw_gid)
        key.chmod(0o400)
        cmd = [
            "runuser", "-u", "munge", "--", _which("munged"),
            f"--socket={self.munge_socket}",
            f"--key-file={key}",
            f"--pid-file={pid_file}",
            f"--log-file={munge_dir / 'munged.log'}",
            f"--seed-file={munge_dir / 'munged.seed'}",
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        if done.returncode != 0:
            raise SlurmSetupError(f"munged failed: {(done.stderr or done.stdout).strip()}")

    def _tail(self, daemon: str = "slurmctld", n: int = 10) -> str:
        lines: list[str] = []
        for name in (f"{daemon}.start.log", f"{daemon}.log"):
            path = self.dir / "log" / name
            if path.exists():
                lines += path.read_text(errors="replace").splitlines()[-n:]
        return " | ".join(lines[-n:])

    # -- measuring ----------------------------------------------------------------------------

    def job_start_latency(self, *, timeout_s: float = 30.0) -> float:
        """Seconds from ``sbatch`` to the job's script running (a file it writes appears)."""
        marker = self.dir / f"latency-{uuid.uuid4().hex[:8]}"
        t0 = time.monotonic()
        done = self._run(
            "sbatch", "--parsable", "-J", "am-latency", "-o", "/dev/null", "--wrap", f"touch {marker}"
        )
        if done.returncode != 0:
            raise SlurmSetupError(f"sbatch failed: {done.stderr.strip()}")
        deadline = t0 + timeout_s
        while time.monotonic() < deadline:
            if marker.exists():
                latency = time.monotonic() - t0
                marker.unlink()
                return latency
            time.sleep(0.01)
        raise SlurmSetupError(f"job {done.stdout.strip()} did not start within {timeout_s}s")

    # -- down ---------------------------------------------------------------------------------

    def _pids(self) -> dict[str, int]:
        found = {}
        for name, path in (
            ("slurmd", self.dir / "run" / "slurmd.pid"),
            ("slurmctld", self.dir / "run" / "slurmctld.pid"),
            ("munged", self.dir / "munge" / "munged.pid"),
        ):
            with contextlib.suppress(FileNotFoundError, ValueError):
                pid = int(path.read_text().strip())
                if process_alive(pid):
                    found[name] = pid
        return found

    def down(self, *, timeout_s: float = 30.0) -> None:
        """Cancel every job, stop slurmd, slurmctld and munged; kill what is left of their jobs."""
        t0 = time.monotonic()
        daemons = self._pids()
        if "slurmctld" in daemons:
            self._run("scancel", "--full", "--user", "root", "--partition", "debug")
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                out = self._run("squeue", "-h", "-o", "%i")
                if out.returncode != 0 or not out.stdout.strip():
                    break
                time.sleep(0.2)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = daemons.get(name)
            if pid is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and process_alive(pid):
                time.sleep(0.05)
            if process_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        # Processes started by this instance's daemons (job steps and what they left behind).
        for pid in pids_with_env(f"AGENTMESH_LOCAL_SLURM={self.dir}"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.timings["down_s"] = time.monotonic() - t0


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("up", "down", "latency"):
        print("usage: python -m agentmesh.cluster.slurm_local up|down|latency DIR", file=sys.stderr)
        return 2
    slurm = LocalSlurm(Path(argv[1]))
    try:
        if argv[0] == "up":
            slurm.up()
            print(f"export SLURM_CONF={slurm.conf}")
            print(f"# up in {slurm.timings['cold_start_s']:.2f}s", file=sys.stderr)
        elif argv[0] == "latency":
            samples = [slurm.job_start_latency() for _ in range(5)]
            print(json.dumps({"job_start_latency_s": samples}))
        else:
            slurm.down()
            print(f"# down in {slurm.timings['down_s']:.2f}s", file=sys.stderr)
    except (AgentMeshError, OSError, subprocess.SubprocessError) as exc:
        print(f"local-slurm: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
