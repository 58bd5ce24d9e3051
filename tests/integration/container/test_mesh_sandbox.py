"""Sandboxes in the mesh: a task acquires its sandbox at its first tool step, carries it (a
HeldResource) through roles on other replicas, and the sink releases it when the task ends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from agentmesh.config import load_config
from agentmesh.launcher import run_pipeline
from agentmesh.sink import read_records

pytestmark = pytest.mark.integration

TASKS = 12


def test_each_task_keeps_its_own_sandbox_across_roles(tmp_path: Path, ray_session: None) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text(
        "".join(json.dumps({"id": f"r{i}", "secret": f"s3cret-{i}"}) + "\n" for i in range(TASKS))
    )
    roles = "tests.integration.container.mesh_roles"
    cfg = {
        "name": "sandbox-mesh",
        "dataset": {"path": str(data)},
        "roles": {
            "ask_write": {"class": f"{roles}:AskWrite"},
            "run_write": {
                "class": "agentmesh.container.roles:ToolExecutor",
                "container": True,
                "replicas": 2,
            },
            "ask_read": {"class": f"{roles}:AskRead"},
            "run_read": {"class": "agentmesh.container.roles:ToolExecutor", "container": True},
        },
        "routing": {
            "program": "p",
            "programs": {
                "p": {"kind": "sequential", "order": ["ask_write", "run_write", "ask_read", "run_read"]}
            },
        },
        "containers": {"pool": 4, "lease_s": 60, "limits": {"wall_time_s": 10}},
        "output": {"dir": str(tmp_path / "out"), "formats": ["jsonl"]},
        "limits": {"max_in_flight": 6},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    progress = run_pipeline(load_config(path), say=lambda _: None)
    assert progress.done == TASKS and progress.failed == 0
    records = {r["task_id"]: r for r in read_records(tmp_path / "out")}
    uids = set()
    for i in range(TASKS):
        rec = records[f"r{i}"]
        res = json.loads(rec["results"]["tool_result"])
        secret, uid = res["stdout"].split()
        assert secret == f"s3cret-{i}"  # its own file, written by another role's replica
        assert uid == rec["results"]["writer_uid"]  # the same sandbox (same uid) both times
        uids.add(uid)
    assert len(uids) >= 2  # different tasks, different sandboxes
    # every sandbox went back: by the sink as each task ended, none left for the end-of-run sweep
    assert progress.sandboxes_released == TASKS
    assert progress.sandboxes["released_at_end"] == 0
    assert int(progress.sandboxes["acquired"]) == 0
