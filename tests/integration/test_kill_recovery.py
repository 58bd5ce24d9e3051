"""Kill things mid-run; every task must still come out exactly once, and done work is not redone.

The LLM here is the vLLM-compatible simulator (fast, and it counts what it served).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest

from agentmesh.config import load_config
from agentmesh.launcher import RunHandle, run_pipeline
from agentmesh.llm_gateway.sim_profiles import get_profile
from agentmesh.llm_gateway.simulator import SimulatedReplica
from agentmesh.sink import read_records
from agentmesh.v1 import agent_pb2, agent_pb2_grpc

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SIM_CONFIG = ROOT / "examples" / "collab_reasoning" / "sim.yaml"


def _held(address: str) -> list[str]:
    with grpc.insecure_channel(address) as ch:
        reply = agent_pb2_grpc.AgentServiceStub(ch).HeldTasks(agent_pb2.HeldTasksRequest(), timeout=5)
    return list(reply.task_ids)


def _sim_run_config(tmp_path: Path, tasks: int):
    return load_config(
        SIM_CONFIG,
        [
            f"output.dir={tmp_path / 'out'}",
            f"dataset.limit={tasks}",
            "llms.smollm2.simulator_profile=fast-test",
            "+llms.smollm2.options={step_base_s: 0.01, step_per_seq_s: 0.0005}",
            "roles.teacher.replicas=2",
            "limits.recovery_interval_s=1.0",
            "discovery.ttl_s=2",
        ],
    )


def _signal_teacher_once_busy(sig: int, record: dict[str, Any]) -> Any:
    """An ``on_started`` hook: send ``sig`` to the first teacher replica's process as soon as it
    holds tasks; ``record`` gets the pid and the task ids it held."""
    import ray

    def act(handle: RunHandle) -> None:
        victim = handle.role_actors["teacher"][0]
        address = ray.get(victim.address.remote())
        pid = ray.get(victim.pid.remote())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            held = _held(address)
            if held:
                os.kill(pid, sig)
                record.update(pid=pid, held=held)
                return
            time.sleep(0.02)

    return lambda handle: threading.Thread(target=act, args=(handle,), daemon=True).start()


def test_sigkill_one_replica_mid_run_every_task_once(tmp_path: Path, ray_session: None) -> None:
    killed: dict[str, Any] = {}
    progress = run_pipeline(
        _sim_run_config(tmp_path, 30),
        say=lambda m: None,
        on_started=_signal_teacher_once_busy(signal.SIGKILL, killed),
    )
    assert killed, "the replica never held a task"
    records = list(read_records(tmp_path / "out"))
    ids = Counter(r["task_id"] for r in records)
    assert len(ids) == 30 and max(ids.values()) == 1
    assert progress.done == 30 and progress.failed == 0
    assert progress.recovered >= 1
    for task_id in killed["held"]:
        assert ids[task_id] == 1
    # Ray restarted the killed actor and it served again under a new pid
    assert progress.total == 30


async def _serve_sim() -> SimulatedReplica:
    params = get_profile("fast-test", step_base_s=0.01, step_per_seq_s=0.0005, model="sim-counted")
    sim = SimulatedReplica(params)
    await sim.start()
    return sim


def _write_config(tmp_path: Path, base_url: str) -> Path:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "defaults:\n  - sim\n  - _self_\n"
        "name: kill-whole-run\n"
        "dataset: {limit: 30}\n"
        "limits: {max_in_flight: 4}\n"
        f"llms:\n  smollm2: {{backend: openai-compatible, base_url: '{base_url}', model: sim-counted}}\n"
        f"output: {{dir: '{tmp_path / 'out'}', flush_every: 1}}\n"
    )
    # the config composes the example's sim.yaml (and through it config.yaml) from its directory
    for name in ("sim.yaml", "config.yaml"):
        (tmp_path / name).write_text((SIM_CONFIG.parent / name).read_text())
    return cfg


def _pids_with_env(mark: bytes) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if mark in (d / "environ").read_bytes().split(b"\0"):
                    found.append(int(d.name))
            except OSError:
                continue
    return found


async def _wait_gone(mark: bytes, *, timeout_s: float) -> None:
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    survivors = len(_pids_with_env(mark))
    while _pids_with_env(mark):
        assert time.monotonic() < deadline, f"processes of the killed run still alive: {_pids_with_env(mark)}"
        await asyncio.sleep(0.1)
    print(f"\n{survivors} process(es) of the killed run outlived the kill by {time.monotonic() - t0:.1f}s")


async def test_sigkill_whole_run_then_resume_exactly_once(tmp_path: Path) -> None:
    sim = await _serve_sim()
    try:
        config = _write_config(tmp_path, sim.base_url)
        cmd = [sys.executable, "-m", "agentmesh.cli", "run", str(config), "-q"]
        env = dict(os.environ, GRPC_VERBOSITY="ERROR")
        # every process of the first run (its Ray workers too) inherits this mark
        mark = f"AGENTMESH_TEST_RUN_MARK=first-{os.getpid()}-{time.monotonic_ns()}"
        first_env = dict(env, AGENTMESH_TEST_RUN_MARK=mark.partition("=")[2])
        proc = await asyncio.create_subprocess_exec(*cmd, env=first_env, start_new_session=True, cwd=tmp_path)
        out = tmp_path / "out" / "records.jsonl"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if out.exists() and sum(1 for _ in out.open()) >= 8:
                break
            assert proc.returncode is None, "the run ended before it could be killed"
            await asyncio.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        first = [r for r in read_records(tmp_path / "out")]
        assert 8 <= len(first) < 30, len(first)
        # Ray workers of the killed run are not in its process group: they outlive the kill until
        # they notice their raylet is gone, and may still send requests meanwhile. Wait for them
        # to be gone, then let the requests they left finish on the simulator, then count.
        await _wait_gone(mark.encode(), timeout_s=90)
        while sim.stats()["running"] or sim.stats()["waiting"]:
            await asyncio.sleep(0.05)
        served_before = sim.stats()["generation_tokens"]
        calls_before = sim.stats()["requests_total"]

        proc2 = await asyncio.create_subprocess_exec(*cmd, env=env, start_new_session=True, cwd=tmp_path)
        assert await asyncio.wait_for(proc2.wait(), 240) == 0
        served_after = sim.stats()["generation_tokens"]
        calls_after = sim.stats()["requests_total"]
    finally:
        await sim.stop()

    records = list(read_records(tmp_path / "out"))
    ids = Counter(r["task_id"] for r in records)
    assert len(ids) == 30, "missing task ids"
    assert max(ids.values()) == 1, "duplicate task ids"
    first_ids = {r["task_id"] for r in first}
    # finished tasks were not recomputed: the second run generated exactly the tokens of the tasks it wrote
    second = [r for r in records if r["task_id"] not in first_ids]
    assert len(second) == 30 - len(first)
    assert {r["run_id"] for r in second} != {r["run_id"] for r in first}
    generated_second = sum(h["usage"]["completion_tokens"] for r in second for h in r["history"])
    assert served_after - served_before == generated_second
    # and made exactly the LLM calls recorded in the tasks it wrote (each LLM turn says how many it made)
    calls_second = sum(int(h["metadata"].get("llm_calls", "0")) for r in second for h in r["history"])
    assert calls_after - calls_before == calls_second > 0
    # the records of the first run are untouched
    by_id = {r["task_id"]: r for r in records}
    for r in first:
        assert json.dumps(by_id[r["task_id"]], sort_keys=True) == json.dumps(r, sort_keys=True)
    # nothing of the killed run is left running (its process group is gone)
    left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True)
    assert left.stdout.strip() == "", f"processes of the killed run survive: {left.stdout}"


def test_sigterm_drains_a_replica_without_losing_tasks(tmp_path: Path, ray_session: None) -> None:
    drained: dict[str, Any] = {}
    progress = run_pipeline(
        _sim_run_config(tmp_path, 20),
        say=lambda m: None,
        on_started=_signal_teacher_once_busy(signal.SIGTERM, drained),
    )
    assert drained, "the replica never held a task"
    ids = Counter(r["task_id"] for r in read_records(tmp_path / "out"))
    assert len(ids) == 20 and max(ids.values()) == 1
    assert progress.done == 20 and progress.failed == 0
    # a drained replica finishes what it holds: nothing had to be recovered
    assert progress.recovered == 0
