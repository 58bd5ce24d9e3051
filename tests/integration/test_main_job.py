"""The README's main job, for real: the collaborative-reasoning pipeline on the embedded default
(local Ray, local etcd, SmolLM2-135M on vLLM CPU). Same command and config as ``scripts/demo``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from agentmesh.llm_gateway.constants import vllm_python
from agentmesh.sink import read_records

pytestmark = [
    pytest.mark.integration,
    pytest.mark.vllm,
    pytest.mark.skipif(not vllm_python().exists(), reason="no vLLM CPU venv: run scripts/setup"),
    pytest.mark.timeout(900),
]

ROOT = Path(__file__).resolve().parents[2]


def test_main_job_produces_debates_from_the_real_cpu_model(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "agentmesh.cli",
        "run",
        "examples/collab_reasoning/config.yaml",
        f"output.dir={out}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=840)
    print(proc.stderr[-3000:])
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = list(read_records(out))
    ids = Counter(r["task_id"] for r in records)
    assert len(records) >= 20 and max(ids.values()) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == len(records) and summary["failed"] == 0
    # LLM accounting, per replica: the same tokens the records carry, TTFT from the real model
    llm = summary["llm"]
    assert llm and all(row["model"] == "smollm2-135m-instruct" and row["errors"] == 0 for row in llm)
    # >=: a step retried after its LLM call was made counts that call once more in the accounting
    assert sum(row["completion_tokens"] for row in llm) >= summary["completion_tokens"] > 0
    for row in llm:
        assert row["ttft_mean_s"] is not None and 0 < row["ttft_mean_s"] < row["latency_mean_s"]
    assert "agentmesh:   llm smollm2-135m-instruct @ " in proc.stderr
    for r in records:
        assert r["status"] == "done"
        roles = [h["role"] for h in r["history"]]
        assert roles[:4] == ["teacher", "student", "extractor", "matcher"]
        assert len(roles) % 4 == 0 and 1 <= len(roles) // 4 <= 3  # whole debate turns, at most K = 3
        for h in r["history"]:
            if h["role"] in ("teacher", "student"):
                # a real model's answer, with the model's own token counts and timestamps
                assert h["content"].strip()
                assert h["usage"]["prompt_tokens"] > 0 and h["usage"]["completion_tokens"] > 0
                assert h["metadata"]["model"] == "smollm2-135m-instruct"
            assert h["finished_unix_ns"] >= h["started_unix_ns"] > 0
        assert r["results"]["agreed"] in ("true", "false")
        assert r["results"]["final_answer"]
    # the Parquet copy holds the same tasks
    import pyarrow.parquet as pq

    table = pq.read_table(out / "records")
    assert sorted(table.column("task_id").to_pylist()) == sorted(ids)
