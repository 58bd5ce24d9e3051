"""The jobs API end to end: a real job manager process on a real (local) Ray cluster."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from agentmesh.cluster import ClusterRecord
from agentmesh.errors import InvalidArgument, RpcError
from agentmesh.jobs.cli import main as job_cli
from agentmesh.jobs.client import JobClient

from .helpers import REPO, ManagerProcess, alive, wait_until

pytestmark = pytest.mark.integration

SMALL = {"cpus": 0.1}  # 2 cores: attempts must not queue behind whole-CPU reservations


def _job(name: str, tasks: list[dict[str, Any]], **over: Any) -> dict[str, Any]:
    return {"name": name, "resources": SMALL, "cwd": str(REPO), "tasks": tasks, **over}


def test_thirty_tasks_with_concurrency_four(client: JobClient) -> None:
    record_times = (
        "s=$(date +%s.%N); sleep 0.3; e=$(date +%s.%N); "
        'printf \'{"start": %s, "end": %s}\' "$s" "$e" > "$AGENTMESH_TASK_RESULT"'
    )
    tasks = [{"name": f"t{i:02d}", "command": record_times} for i in range(30)]
    job_id = client.submit(_job("thirty", tasks, concurrency=4))
    status = client.wait(job_id, timeout_s=90)
    assert status.state == "SUCCEEDED", [(t.name, t.state, t.error) for t in status.tasks]
    assert status.task_counts == {"SUCCEEDED": 30}
    assert all(t.attempts == 1 and t.exit_code == 0 for t in status.tasks)
    # overlap from the tasks' own clocks: +1 at each start, -1 at each end (ends first on ties)
    events = sorted(
        [(t.result["start"], 1) for t in status.tasks] + [(t.result["end"], -1) for t in status.tasks],
        key=lambda e: (e[0], e[1]),
    )
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert 1 < peak <= 4, f"peak overlap {peak}"
    assert status.ended_unix >= status.started_unix > 0
    print(f"\n30 tasks at concurrency 4: peak overlap {peak}, {status.ended_unix - status.started_unix:.1f}s")


def test_failing_task_is_retried_with_backoff_then_failed_with_its_log(client: JobClient) -> None:
    cmd = 'date +%s.%N; echo "failing on purpose ($AGENTMESH_TASK_ATTEMPT)" >&2; exit 4'
    job_id = client.submit(
        _job("retry", [{"name": "bad", "command": cmd}], retries=2, backoff_s=0.3, backoff_max_s=10)
    )
    status = client.wait(job_id, timeout_s=60)
    bad = status.task("bad")
    assert status.state == "FAILED"
    assert (bad.state, bad.attempts, bad.exit_code) == ("FAILED", 3, 4)
    assert bad.error == "exit code 4: failing on purpose (3)"
    starts = []
    for k in (1, 2, 3):
        text = "".join(client.logs(job_id, "bad", attempt=k))
        first, second = text.splitlines()
        starts.append(float(first))
        assert second == f"failing on purpose ({k})"
    assert starts[1] - starts[0] >= 0.3  # retry 1 waits backoff_s
    assert starts[2] - starts[1] >= 0.6  # retry 2 waits 2 * backoff_s
    assert "".join(client.logs(job_id, "bad")).endswith("failing on purpose (3)\n")  # latest attempt


def test_logs_are_readable_while_the_task_runs(client: JobClient) -> None:
    cmd = "for i in 1 2 3 4 5 6 7 8; do echo tick $i; sleep 0.25; done"
    job_id = client.submit(_job("follow", [{"name": "ticker", "command": cmd}]))
    arrivals: list[tuple[float, str]] = []
    for line in client.logs(job_id, "ticker", follow=True):
        arrivals.append((time.time(), line))
    assert [line for _, line in arrivals] == [f"tick {i}\n" for i in range(1, 9)]
    status = client.wait(job_id, timeout_s=30)
    ticker = status.task("ticker")
    assert ticker.state == "SUCCEEDED"
    # the first line reached us well before the task ended; the stream ended after it did
    assert arrivals[0][0] < ticker.ended_unix - 1.0
    assert arrivals[-1][0] >= ticker.started_unix


def test_timeout_kills_a_sleeping_task(client: JobClient) -> None:
    t0 = time.monotonic()
    job_id = client.submit(
        _job("timeout", [{"name": "sleepy", "command": ["sleep", "30"], "timeout_s": 0.5}])
    )
    status = client.wait(job_id, timeout_s=30)
    sleepy = status.task("sleepy")
    assert (status.state, sleepy.state, sleepy.attempts) == ("FAILED", "FAILED", 1)
    assert sleepy.error == "timed out after 0.5s (killed)"
    assert sleepy.exit_code == 128 + 15
    assert time.monotonic() - t0 < 15


def test_cancel_stops_running_attempts(client: JobClient, tmp_path: Path) -> None:
    cmd = f"echo $$ > {tmp_path}/pid.$AGENTMESH_TASK_NAME; exec sleep 30"
    tasks = [{"name": f"c{i}", "command": cmd} for i in range(3)]
    job_id = client.submit(_job("cancel", tasks, concurrency=2))
    # A pid file exists (the shell's redirection) a moment before its pid is written into it.
    pids = wait_until(
        lambda: (
            p
            if len(p := [int(t) for f in tmp_path.glob("pid.*") if (t := f.read_text().strip())]) == 2
            else None
        )
    )
    status = client.cancel(job_id)
    assert status.state == "CANCELLED"
    assert [(t.name, t.state) for t in status.tasks] == [
        ("c0", "CANCELLED"),
        ("c1", "CANCELLED"),
        ("c2", "CANCELLED"),
    ]
    assert status.task("c2").attempts == 0
    wait_until(lambda: not any(Path(f"/proc/{p}").exists() for p in pids), 15, "cancelled processes gone")
    assert client.status(job_id).state == "CANCELLED"
    assert client.cancel(job_id).state == "CANCELLED"  # cancelling again is harmless


def test_function_task_returns_a_result(client: JobClient) -> None:
    job_id = client.submit(
        _job(
            "function",
            [
                {"name": "add", "function": "tests.integration.jobs.funcs:add", "args": {"a": 2, "b": 3.5}},
                {
                    "name": "fail",
                    "function": "tests.integration.jobs.funcs:fail",
                    "args": {"message": "nope"},
                },
            ],
            concurrency=2,
        )
    )
    status = client.wait(job_id, timeout_s=60)
    add, fail = status.task("add"), status.task("fail")
    assert add.state == "SUCCEEDED" and add.result == {"sum": 5.5, "job": job_id, "attempt": "1"}
    assert "".join(client.logs(job_id, "add")) == "adding 2 and 3.5\n"
    assert fail.state == "FAILED" and "fail raised RuntimeError: nope" in fail.error
    assert "RuntimeError: nope" in "".join(client.logs(job_id, "fail"))
    assert status.state == "FAILED"
    assert job_id in {j.job_id for j in client.list()}


def test_bad_input_names_the_field(client: JobClient) -> None:
    with pytest.raises(InvalidArgument, match=r"tasks\[0\]\.resources\.cpus: expected a number >= 0, got -1"):
        client.submit(_job("bad", [{"name": "a", "command": "true", "resources": {"cpus": -1}}]))
    with pytest.raises(InvalidArgument, match=r"tasks\[1\]\.name: duplicate"):
        client.submit(_job("bad", [{"name": "a", "command": "true"}, {"name": "a", "command": "true"}]))
    with pytest.raises(InvalidArgument, match=r"tasks\[0\]\.resources\.gpus: 1 requested"):
        client.submit(_job("bad", [{"name": "a", "command": "true", "resources": {"gpus": 1}}]))
    with pytest.raises(RpcError) as info:
        client.status("no-such-job")
    assert info.value.code.name == "NOT_FOUND" and "job_id" in str(info.value)
    job_id = client.submit(_job("quick", [{"name": "a", "command": "true"}]))
    with pytest.raises(RpcError, match=r"task: .*no task 'zzz'"):
        list(client.logs(job_id, "zzz"))


async def test_registered_in_discovery(manager: ManagerProcess, jobs_cluster: ClusterRecord) -> None:
    from agentmesh.discovery import connect

    discovery = connect(jobs_cluster.discovery_url)
    try:
        endpoints = await discovery.snapshot("agentmesh-jobs")
    finally:
        await discovery.close()
    assert manager.address in {e.address for e in endpoints}


def test_cli_exit_codes(
    manager: ManagerProcess,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    jobs_home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    good, bad, broken = tmp_path / "good.yaml", tmp_path / "bad.json", tmp_path / "broken.yaml"
    good.write_text("name: good\nresources: {cpus: 0.1}\ntasks:\n  - {name: a, command: 'echo hello'}\n")
    bad.write_text(json.dumps(_job("bad", [{"name": "a", "command": "exit 1"}])))
    broken.write_text("name: broken\ntasks:\n  - {name: a, command: 'true', timeout_s: -1}\n")
    addr = ["--jobs", manager.address]

    assert job_cli(["job", "submit", str(good), "--wait", *addr]) == 0
    out = capsys.readouterr().out
    job_id = out.splitlines()[0]
    assert "SUCCEEDED" in out and "TASK" in out
    assert job_cli(["job", "status", job_id, *addr]) == 0
    assert job_cli(["job", "logs", job_id, "a", *addr]) == 0
    assert capsys.readouterr().out.endswith("hello\n")
    assert job_cli(["job", "status", job_id, "--json", *addr]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"][0]["state"] == "SUCCEEDED"

    assert job_cli(["job", "submit", str(bad), "--wait", *addr]) == 1
    failed_id = capsys.readouterr().out.splitlines()[0]
    assert job_cli(["job", "status", failed_id, *addr]) == 1

    assert job_cli(["job", "submit", str(broken), *addr]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"agentmesh: {broken}: tasks[0].timeout_s: expected a number >= 0, got -1"
    assert job_cli(["job", "status", "nope", *addr]) == 2
    assert job_cli(["job", "list", *addr]) == 0
    assert job_id in capsys.readouterr().out
    assert job_cli(["job", "list", "--jobs", "127.0.0.1:1"]) == 3

    monkeypatch.setenv("AGENTMESH_HOME", str(jobs_home))
    assert job_cli(["job", "list", "--cluster", "no-such-cluster"]) == 2
    assert "no cluster 'no-such-cluster'" in capsys.readouterr().err
    from agentmesh.cluster import load_record

    if getattr(load_record("jobs-it"), "jobs_address", ""):  # cluster up starts a manager (lead's wiring)
        assert job_cli(["job", "list", "--cluster", "jobs-it"]) == 0
    else:
        assert job_cli(["job", "list", "--cluster", "jobs-it"]) == 3
        assert "cluster jobs-it has no job manager" in capsys.readouterr().err


def test_an_attempt_whose_actor_dies_is_retried(client: JobClient, tmp_path: Path) -> None:
    # Attempt 1's actor process dies (as with its node, or an OOM kill): the task's process dies
    # with it (parent-death signal) and the attempt is retried.
    cmd = (
        f'if [ "$AGENTMESH_TASK_ATTEMPT" = 1 ]; then echo $$ $PPID > {tmp_path}/pids; exec sleep 30; fi; '
        "echo second attempt"
    )
    job_id = client.submit(_job("lost", [{"name": "n", "command": cmd, "retries": 1, "backoff_s": 0.1}]))
    pids = wait_until(lambda: (tmp_path / "pids").exists() and (tmp_path / "pids").read_text().split())
    task_pid, actor_pid = (int(p) for p in pids)
    os.kill(actor_pid, signal.SIGKILL)
    wait_until(lambda: not alive(task_pid), 10, "the task's process gone with its actor")
    status = client.wait(job_id, timeout_s=60)
    n = status.task("n")
    assert (status.state, n.state, n.attempts) == ("SUCCEEDED", "SUCCEEDED", 2)
    assert "".join(client.logs(job_id, "n")) == "second attempt\n"
