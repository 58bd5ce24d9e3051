"""The customer-support pipeline end to end on the embedded default (local Ray, etcd, sandboxes
through the run's own registry and holder), with the LLMs simulated.

* With the oracle agent (the task's expected actions, through the real tools in each task's
  sandbox) every reward is 1.0: the tools, the sandbox path and the reward agree.
* With the simulated agent (placeholder text, never a tool call) the store never changes: only the
  tasks where the right answer is a refusal score 1.0 — the reward tells doing nothing apart.
Either way every sandbox is given back when its task ends.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from agentmesh.config import load_config
from agentmesh.launcher import run_pipeline
from agentmesh.pipelines.customer_support import load_tasks
from agentmesh.sink import read_records

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "customer_support"
FAST = ["llms.smollm2.simulator_profile=fast-test", "+llms.smollm2.options={step_base_s: 0.005}"]


def _run(config: str, tmp_path: Path, *overrides: str) -> tuple[object, list[dict]]:  # type: ignore[type-arg]
    cfg = load_config(EXAMPLES / config, [f"output.dir={tmp_path / 'out'}", *FAST, *overrides])
    progress = run_pipeline(cfg, say=lambda _: None)
    return progress, list(read_records(tmp_path / "out"))


def test_oracle_agent_scores_every_task(tmp_path: Path, ray_session: None) -> None:
    progress, records = _run("oracle.yaml", tmp_path)
    tasks = load_tasks()
    assert len(records) == len(tasks) >= 20
    assert progress.failed == 0  # type: ignore[attr-defined]
    rewards = {r["task_id"]: r["results"]["reward"] for r in records}
    assert set(rewards.values()) == {"1.0"}, {k: v for k, v in rewards.items() if v != "1.0"}
    writes = [r for r in records if int(r["results"].get("tool_calls", "0")) > 0]
    assert len(writes) == sum(1 for t in tasks if t.get("expected_actions"))
    assert progress.sandboxes_released == len(tasks)  # type: ignore[attr-defined]
    assert int(progress.sandboxes["acquired"]) == 0  # type: ignore[attr-defined]


def test_simulated_agent_changes_nothing_and_scores_only_refusals(tmp_path: Path, ray_session: None) -> None:
    progress, records = _run("sim.yaml", tmp_path, "dataset.limit=12")
    assert len(records) == 12 and progress.failed == 0  # type: ignore[attr-defined]
    kinds = {t["id"]: t["kind"] for t in load_tasks()}
    for r in records:
        res = r["results"]
        assert res["reward"] in ("0.0", "1.0")
        assert res["reward"] == ("1.0" if kinds[r["task_id"]] == "refuse" else "0.0"), (r["task_id"], res)
        roles = Counter(t["role"] for t in r["history"])
        assert roles["user"] >= 2 and roles["assistant"] >= 1  # a conversation happened
    assert progress.sandboxes_released == 12  # type: ignore[attr-defined]
