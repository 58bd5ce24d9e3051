"""The attempt runner without Ray (the actor class is a plain class): outcomes, logs, results,
timeouts that kill the whole process group, and function tasks through run_function."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from agentmesh.jobs.runner import AttemptLaunch, AttemptRunner, actor_name, function_argv, parse_actor_name


def _launch(tmp_path: Path, argv: list[str], **kw: Any) -> dict[str, Any]:
    env = {"AGENTMESH_TASK_RESULT": str(tmp_path / "r.json"), **kw.pop("env", {})}
    return AttemptLaunch(
        job_id="j-1",
        task="t",
        attempt=1,
        argv=argv,
        env=env,
        cwd=str(tmp_path),
        log_path=str(tmp_path / "logs" / "t.1.log"),
        result_path=str(tmp_path / "r.json"),
        **kw,
    ).to_dict()


def test_actor_names_round_trip() -> None:
    assert parse_actor_name(actor_name("job-1a", "eval.0", 3)) == ("job-1a", "eval.0", 3)
    assert parse_actor_name("llm:x:0") is None


def test_command_result_and_log(tmp_path: Path) -> None:
    r = AttemptRunner(
        _launch(
            tmp_path, ["sh", "-c", 'echo out; echo err >&2; echo \'{"n": 2}\' > "$AGENTMESH_TASK_RESULT"']
        )
    )
    out = r.wait(10)
    assert out is not None and out["ok"] and out["exit_code"] == 0
    assert json.loads(out["result_json"]) == {"n": 2}
    assert out["started_unix"] <= out["ended_unix"] and out["node"]
    assert (tmp_path / "logs" / "t.1.log").read_text() == "out\nerr\n"


def test_failure_carries_exit_code_and_last_log_line(tmp_path: Path) -> None:
    out = AttemptRunner(_launch(tmp_path, ["sh", "-c", "echo first >&2; echo 'it broke' >&2; exit 7"])).wait(
        10
    )
    assert out is not None and not out["ok"]
    assert out["exit_code"] == 7 and out["error"] == "exit code 7: it broke"


def test_bad_result_json_fails_the_attempt(tmp_path: Path) -> None:
    out = AttemptRunner(_launch(tmp_path, ["sh", "-c", 'echo "{nope" > "$AGENTMESH_TASK_RESULT"'])).wait(10)
    assert out is not None and not out["ok"] and "not valid JSON" in out["error"]


def test_missing_program(tmp_path: Path) -> None:
    out = AttemptRunner(_launch(tmp_path, ["/no/such/program"])).wait(10)
    assert out is not None and not out["ok"] and out["exit_code"] is None
    assert "cannot start '/no/such/program'" in out["error"]


def test_missing_cwd(tmp_path: Path) -> None:
    launch = _launch(tmp_path, ["true"])
    launch["cwd"] = str(tmp_path / "gone")
    out = AttemptRunner(launch).wait(10)
    assert out is not None and not out["ok"]
    assert out["error"].startswith(f"cannot start 'true': cwd {tmp_path / 'gone'} is not a directory on ")


def test_timeout_kills_the_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    t0 = time.monotonic()
    r = AttemptRunner(_launch(tmp_path, ["sh", "-c", f"sleep 30 & echo $! > {pidfile}; wait"], timeout_s=1.0))
    out = r.wait(10)
    assert out is not None and not out["ok"]
    assert out["error"] == "timed out after 1s (killed)"
    assert time.monotonic() - t0 < 6
    child = int(pidfile.read_text())  # written long before the timeout
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.05)
    assert not _alive(child), "the background child of a timed-out task survived"


def _alive(pid: int) -> bool:
    """A live process (a zombie, killed and waiting for its parent, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(") ", 1)[1][0] not in "ZX"


def test_terminate(tmp_path: Path) -> None:
    r = AttemptRunner(_launch(tmp_path, ["sleep", "30"]))
    assert r.wait(0.2) is None
    out = r.terminate("cancelled")
    assert out is not None and not out["ok"] and out["error"] == "cancelled"


def test_function_task(tmp_path: Path) -> None:
    (tmp_path / "jobfuncs_unit.py").write_text(
        "import os\n"
        "def add(a, b):\n"
        "    print('adding', flush=True)\n"
        "    return {'sum': a + b, 'attempt': os.environ.get('AGENTMESH_TASK_ATTEMPT')}\n"
        "def boom():\n"
        "    raise ValueError('no good')\n"
    )
    args = str(tmp_path / "args.json")
    launch = _launch(
        tmp_path,
        function_argv("jobfuncs_unit:add"),
        args_json=json.dumps({"a": 2, "b": 3}),
        args_path=args,
        env={
            "AGENTMESH_TASK_ARGS": args,
            "AGENTMESH_TASK_ATTEMPT": "1",
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        },
    )
    out = AttemptRunner(launch).wait(30)
    assert out is not None and out["ok"], out
    assert json.loads(out["result_json"]) == {"sum": 5, "attempt": "1"}
    launch = _launch(
        tmp_path,
        function_argv("jobfuncs_unit:boom"),
        args_json="{}",
        args_path=args,
        env={"AGENTMESH_TASK_ARGS": args},
    )
    out = AttemptRunner(launch).wait(30)
    assert out is not None and not out["ok"] and out["exit_code"] == 1
    assert "boom raised ValueError: no good" in out["error"]


def test_program_not_executable(tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    out = AttemptRunner(_launch(tmp_path, ["./script.sh"])).wait(10)
    assert (
        out is not None and not out["ok"] and out["error"] == "cannot start './script.sh': Permission denied"
    )
    script.chmod(0o755)  # relative to the task's cwd, and found there once it may run
    out = AttemptRunner(_launch(tmp_path, ["./script.sh"])).wait(10)
    assert out is not None and out["ok"], out
    assert (tmp_path / "logs" / "t.1.log").read_text().endswith("hi\n")


def test_the_task_process_gets_a_parent_death_signal(tmp_path: Path) -> None:
    # It dies with the actor that started it: the task reads its own PR_GET_PDEATHSIG (prctl 2).
    code = "import ctypes; s = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(s)); print(s.value)"
    out = AttemptRunner(_launch(tmp_path, ["python3", "-c", code])).wait(10)
    assert out is not None and out["ok"], out
    assert (tmp_path / "logs" / "t.1.log").read_text().strip() == str(int(signal.SIGKILL))
