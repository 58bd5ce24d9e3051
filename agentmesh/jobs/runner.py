"""One attempt of one task, run inside a detached, named Ray actor.

The manager creates an :class:`AttemptRunner` actor per attempt (named by :func:`actor_name`, in
namespace :data:`NAMESPACE`, with the task's CPUs, GPUs and memory as its Ray resources): Ray is the
scheduler that places attempts on nodes. The actor starts the work as a subprocess in a process
group of its own — a command directly, a function through ``python -m agentmesh.jobs.run_function``
— so that timeouts, cancellation and logs work the same for both. Output (stdout and stderr
together) goes straight into the attempt's log file, which is therefore readable while it runs.

The actor *keeps* the outcome until it is killed, and the manager kills it only after the outcome
is committed to its store. Detached actors outlive the manager process, so a manager that died
re-attaches to the running attempts by name and collects outcomes that ended while it was away.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agentmesh.files import write_atomic
from agentmesh.jobs.states import AttemptOutcome

__all__ = [
    "MAX_RESULT_BYTES",
    "NAMESPACE",
    "AttemptLaunch",
    "AttemptRunner",
    "actor_name",
    "function_argv",
    "parse_actor_name",
]

NAMESPACE = "agentmesh-jobs"
"""The Ray namespace of attempt actors."""
MAX_RESULT_BYTES = 8 << 20
_KILL_GRACE_S = 2.0


def actor_name(job_id: str, task: str, attempt: int) -> str:
    """``job:<job>:<task>:<attempt>`` (job ids and task names hold no ':')."""
    return f"job:{job_id}:{task}:{attempt}"


def parse_actor_name(name: str) -> tuple[str, str, int] | None:
    """``(job, task, attempt)`` of an attempt actor's name; None for any other name."""
    parts = name.split(":")
    if len(parts) != 4 or parts[0] != "job" or not parts[3].isdigit():
        return None
    return parts[1], parts[2], int(parts[3])


@dataclass
class AttemptLaunch:
    """Everything an attempt needs, resolved by the manager (plain data: it travels to the actor)."""

    job_id: str
    task: str
    attempt: int
    argv: list[str]
    env: dict[str, str]
    cwd: str
    log_path: str
    result_path: str
    timeout_s: float = 0.0
    args_json: str | None = None
    """Function tasks: the kwargs, written to ``args_path`` before the process starts."""
    args_path: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SETPRIV = shutil.which("setpriv")


def _die_with_parent(argv: list[str], env: dict[str, str], cwd: str) -> list[str]:
    """``argv`` started so that it gets SIGKILL when its parent dies (Linux ``PR_SET_PDEATHSIG``,
    kept across exec): an actor killed with its node's raylet, or OOM-killed, takes its task's
    process along instead of leaving it running beside the retry.

    util-linux's ``setpriv --pdeathsig`` sets it and execs the command. Not a ``preexec_fn``: the
    actor is a Ray worker, with gRPC's threads, where Python code between fork and exec may
    deadlock. The program is resolved here (on the task's PATH, from its cwd), so that a missing
    one still fails to start (an error that names it) rather than as setpriv's exit code.
    """
    program = argv[0]
    if os.sep in program:
        found = os.path.join(cwd, program) if cwd else program
        if not os.path.isfile(found):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
        if not os.access(found, os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
    else:
        found = shutil.which(program, path=env.get("PATH", os.defpath))  # type: ignore[assignment]
        if found is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
    if _SETPRIV is None:
        return argv  # no util-linux: no parent-death signal
    return [_SETPRIV, "--pdeathsig", "KILL", "--", found, *argv[1:]]


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _last_line(path: str, limit: int = 300) -> str:
    """The last non-empty line of the log (what a failure most likely says), at most ``limit`` chars."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4096))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    return lines[-1][:limit] if lines else ""


class AttemptRunner:
    """Runs one attempt's process and keeps its outcome (wrap with ``ray.remote`` to use).

    Methods are called concurrently (a threaded actor): ``wait`` from the manager, ``terminate``
    on cancel.
    """

    def __init__(self, launch: dict[str, Any]) -> None:
        self.launch = AttemptLaunch(**launch)
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._outcome: AttemptOutcome | None = None
        self._terminated = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._node = socket.gethostname()
        self._started = time.time()
        self._spawned = threading.Event()
        # The process is started from the thread that then waits for it: the child's
        # parent-death signal is tied to that thread, which lives exactly as long as the child.
        threading.Thread(target=self._run, name="attempt", daemon=True).start()
        self._spawned.wait()

    def _run(self) -> None:
        cwd = self.launch.cwd
        try:
            if cwd and not os.path.isdir(cwd):
                raise NotADirectoryError(f"cwd {cwd} is not a directory on {self._node}")
            self._proc = self._spawn()
        except OSError as exc:
            reason = str(exc) if isinstance(exc, NotADirectoryError) else exc.strerror or str(exc)
            self._finish(
                AttemptOutcome(
                    ok=False,
                    error=f"cannot start {self.launch.argv[0]!r}: {reason}",
                    started_unix=self._started,
                    ended_unix=time.time(),
                    node=self._node,
                )
            )
            return
        finally:
            self._spawned.set()
        self._watch()

    def _spawn(self) -> subprocess.Popen[bytes]:
        ln = self.launch
        Path(ln.log_path).parent.mkdir(parents=True, exist_ok=True)
        Path(ln.result_path).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ln.result_path)  # a result only counts if this attempt wrote it
        if ln.args_json is not None:
            write_atomic(ln.args_path, ln.args_json)
        env = {**os.environ, **ln.env}
        argv = _die_with_parent(ln.argv, env, ln.cwd)
        with open(ln.log_path, "ab", buffering=0) as log:
            # The child writes to the file itself (no pipe through us): the log is readable while it
            # runs and keeps what was written even if this actor dies.
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ln.cwd or None,
                start_new_session=True,  # its own process group: a timeout or cancel kills all of it
            )

    def _kill_group(self) -> None:
        proc = self._proc
        if proc is None:
            return
        for sig, wait_s in ((signal.SIGTERM, _KILL_GRACE_S), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait_s)
                break

    def _watch(self) -> None:
        proc = self._proc
        assert proc is not None
        timeout = self.launch.timeout_s or None
        timed_out = False
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            self._kill_group()
            proc.wait()
        # Whatever the main process left behind in its group goes with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        code = _exit_code(proc.returncode)
        ended = time.time()
        if self._terminated:
            outcome = AttemptOutcome(False, code, self._terminated, None, self._started, ended, self._node)
        elif timed_out:
            error = f"timed out after {self.launch.timeout_s:g}s (killed)"
            outcome = AttemptOutcome(False, code, error, None, self._started, ended, self._node)
        else:
            outcome = self._judge(code, ended)
        self._finish(outcome)

    def _judge(self, code: int, ended: float) -> AttemptOutcome:
        result, problem = self._read_result()
        if code != 0:
            last = _last_line(self.launch.log_path)
            error = f"exit code {code}" + (f": {last}" if last else "")
            return AttemptOutcome(False, code, error, result, self._started, ended, self._node)
        if problem:
            return AttemptOutcome(False, code, problem, None, self._started, ended, self._node)
        return AttemptOutcome(True, code, "", result, self._started, ended, self._node)

    def _read_result(self) -> tuple[str | None, str]:
        """The result file's JSON text (None if none was written) and what is wrong with it."""
        path = self.launch.result_path
        try:
            size = os.path.getsize(path)
        except OSError:
            return None, ""
        if size > MAX_RESULT_BYTES:
            return None, f"result too large: {size} bytes (limit {MAX_RESULT_BYTES})"
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            return None, ""
        try:
            json.loads(text)
        except ValueError as exc:
            return None, f"the result in $AGENTMESH_TASK_RESULT is not valid JSON: {exc}"
        return text, ""

    def _finish(self, outcome: AttemptOutcome) -> None:
        with self._lock:
            if self._outcome is None:
                self._outcome = outcome
        self._done.set()

    # -- called by the manager -------------------------------------------------------------------
    def wait(self, timeout_s: float | None = None) -> dict[str, Any] | None:
        """The outcome once the attempt has ended (as a dict); None if still running after
        ``timeout_s`` (the manager polls in slices, so no call blocks a thread forever)."""
        if not self._done.wait(timeout_s):
            return None
        assert self._outcome is not None
        return asdict(self._outcome)

    def terminate(self, reason: str = "cancelled") -> dict[str, Any] | None:
        """Kill the attempt's process group (SIGTERM, then SIGKILL) and return the outcome."""
        self._terminated = reason
        self._kill_group()
        return self.wait(10.0)

    def info(self) -> dict[str, Any]:
        """Where and since when this attempt runs (for status and debugging)."""
        return {
            "node": self._node,
            "pid": self._proc.pid if self._proc else None,
            "started_unix": self._started,
            "done": self._done.is_set(),
        }


def function_argv(function: str) -> list[str]:
    """How a function task is started: this interpreter runs :mod:`agentmesh.jobs.run_function`."""
    return [sys.executable, "-m", "agentmesh.jobs.run_function", function]
