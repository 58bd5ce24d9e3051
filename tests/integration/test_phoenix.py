"""A real trace backend receives a run's traces: Arize Phoenix, read back by task id.

Phoenix runs from its own venv (``deploy/install_phoenix.sh``) on loopback ports of its own, with
a throwaway working dir (its SQLite database). A collaborative-reasoning run over the simulator
(local Ray, etcd, gRPC between role replicas in their own processes) exports over OTLP/gRPC to
it; the test then asks Phoenix's REST API (``GET /v1/projects/{project}/spans``) for the spans of
each task by the ``agentmesh.task_id`` attribute and checks each is one whole trace: the root is
``task <id>``, every step of every turn and every hop between them is in it, and every span's
parent is in it too.

Without the venv the test is skipped, unless ``AGENTMESH_REQUIRE_PHOENIX=1`` (CI), which makes a
missing install a failure.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agentmesh.config import load_config
from agentmesh.launcher import run_pipeline
from agentmesh.sink import read_records
from agentmesh.tracing import configure_tracing, force_flush

pytestmark = [pytest.mark.integration, pytest.mark.phoenix]

PHOENIX_VENV = (
    Path(os.environ.get("AGENTMESH_HOME", str(Path.home() / ".cache" / "agentmesh"))) / "phoenix-venv"
)
SIM_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "collab_reasoning" / "sim.yaml"
ROLES = ("teacher", "student", "extractor", "matcher")  # the debate's body, in order
TASKS = 4
START_TIMEOUT_S = 90.0
READ_TIMEOUT_S = 60.0
PROJECT = "default"  # spans without an openinference project name land here


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


@dataclass
class Phoenix:
    url: str  # HTTP UI and REST API
    otlp: str  # OTLP/gRPC endpoint
    start_s: float

    def spans(self, **filters: str | list[str]) -> list[dict[str, Any]]:
        """Every span of the project matching ``filters`` (REST query params), all pages."""
        out: list[dict[str, Any]] = []
        params: list[tuple[str, str]] = [("limit", "1000")]
        for k, v in filters.items():
            params += [(k, x) for x in ([v] if isinstance(v, str) else v)]
        cursor = None
        while True:
            q = params + ([("cursor", cursor)] if cursor else [])
            page = _get_json(f"{self.url}/v1/projects/{PROJECT}/spans?{urllib.parse.urlencode(q)}")
            out += page["data"]
            cursor = page.get("next_cursor")
            if not cursor:
                return out


@pytest.fixture(scope="module")
def phoenix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Phoenix]:
    exe = PHOENIX_VENV / "bin" / "phoenix"
    if not exe.exists():
        if os.environ.get("AGENTMESH_REQUIRE_PHOENIX") == "1":
            pytest.fail(f"AGENTMESH_REQUIRE_PHOENIX=1 but there is no Phoenix at {exe}")
        pytest.skip(f"no Arize Phoenix at {exe} (run deploy/install_phoenix.sh)")
    work = tmp_path_factory.mktemp("phoenix")
    http_port, grpc_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "PHOENIX_HOST": "127.0.0.1",
        "PHOENIX_PORT": str(http_port),
        "PHOENIX_GRPC_PORT": str(grpc_port),
        "PHOENIX_WORKING_DIR": str(work),  # its SQLite database lives here
        "PHOENIX_TELEMETRY_ENABLED": "false",
    }
    log = (work / "phoenix.log").open("wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [str(exe), "serve"], env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        url = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Phoenix exited with {proc.returncode}:\n{_tail(work / 'phoenix.log')}")
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                    pass
                with socket.create_connection(("127.0.0.1", grpc_port), timeout=2):
                    break  # both the API and the OTLP receiver answer
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"Phoenix did not answer in {START_TIMEOUT_S:.0f}s:\n{_tail(work / 'phoenix.log')}"
                    )
                time.sleep(0.1)
        start_s = time.monotonic() - t0
        print(f"\nPhoenix up in {start_s:.1f}s ({url}, OTLP :{grpc_port})")
        yield Phoenix(url, f"http://127.0.0.1:{grpc_port}", start_s)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def _check_trace(task_id: str, record: dict[str, Any], spans: list[dict[str, Any]]) -> str:
    """Assert ``spans`` (all of one task's trace) form it whole; returns the trace id."""
    roots = [s for s in spans if s["parent_id"] is None]
    assert [s["name"] for s in roots] == [f"task {task_id}"], (task_id, [s["name"] for s in roots])
    root = roots[0]
    trace_id = root["context"]["trace_id"]
    assert {s["context"]["trace_id"] for s in spans} == {trace_id}, task_id
    ids = {s["context"]["span_id"] for s in spans}
    orphans = [s["name"] for s in spans if s["parent_id"] is not None and s["parent_id"] not in ids]
    assert not orphans, (task_id, orphans)  # every parent made it to the backend too
    names = Counter(s["name"] for s in spans)
    # one step span per step the record's history shows, role by role; every turn of the debate
    # runs the whole body once
    steps = Counter(h["role"] for h in record["history"])
    assert {n: c for n, c in names.items() if n.startswith("step ")} == {
        f"step {r}": c for r, c in steps.items()
    }, (task_id, names, steps)
    turns = steps[ROLES[0]]
    assert turns >= 1 and all(steps[r] == turns for r in ROLES), (task_id, steps)
    # the source hands the task to the first role, each step forwards it once: to the next role,
    # back to the first (another turn), or to the sink after the last turn
    expected_hops = Counter({f"hop source -> {ROLES[0]}": 1, f"hop {ROLES[-1]} -> sink": 1})
    for a, b in itertools.pairwise(ROLES):
        expected_hops[f"hop {a} -> {b}"] = turns
    expected_hops[f"hop {ROLES[-1]} -> {ROLES[0]}"] += turns - 1
    hops = Counter({n: c for n, c in names.items() if n.startswith("hop ")})
    assert hops == +expected_hops, (task_id, hops, expected_hops)
    # steps hang off the root; the LLM calls of the LLM roles sit under their steps
    by_id = {s["context"]["span_id"]: s for s in spans}
    for s in spans:
        if s["name"].startswith("step "):
            assert s["parent_id"] == root["context"]["span_id"], (task_id, s["name"])
            assert s["attributes"].get("agentmesh.task_id") == task_id, (task_id, s["attributes"])
    llm_parents = {by_id[s["parent_id"]]["name"] for s in spans if s["name"].startswith("llm.")}
    assert {"step teacher", "step student"} <= llm_parents, (task_id, llm_parents)
    return str(trace_id)


def test_phoenix_receives_every_task_as_one_trace(
    phoenix: Phoenix, tmp_path: Path, ray_session: None
) -> None:
    out = tmp_path / "out"
    cfg = load_config(
        SIM_CONFIG,
        [
            f"output.dir={out}",
            f"dataset.limit={TASKS}",
            "llms.smollm2.simulator_profile=fast-test",
            "roles.teacher.replicas=1",
            "roles.student.replicas=1",
            f"tracing.otlp_endpoint='{phoenix.otlp}'",
            "tracing.sample_ratio=1.0",
        ],
    )
    try:
        progress = run_pipeline(cfg, say=lambda _: None)
        force_flush()  # the driver's own spans (replicas flush theirs before they stop)
    finally:
        configure_tracing("agentmesh-test", sampling="off")  # the next test's process is untraced
    records = {r["task_id"]: r for r in read_records(out)}
    assert progress.done == TASKS == len(records) and progress.failed == 0

    # Phoenix writes what it receives in batches: poll until every task's trace is whole
    t0 = time.monotonic()
    deadline = t0 + READ_TIMEOUT_S
    traces: dict[str, str] = {}
    last_error: AssertionError | None = None
    while len(traces) < len(records):
        for task_id, record in records.items():
            if task_id in traces:
                continue
            try:
                mine = phoenix.spans(attribute=f'agentmesh.task_id:"{task_id}"')
                assert mine, f"no span of {task_id} yet"
                trace_ids = {s["context"]["trace_id"] for s in mine}
                assert len(trace_ids) == 1, (task_id, trace_ids)  # one trace per task
                whole = phoenix.spans(trace_id=trace_ids.pop())
                traces[task_id] = _check_trace(task_id, record, whole)
            except AssertionError as exc:
                last_error = exc
        if len(traces) < len(records):
            if time.monotonic() > deadline:
                raise AssertionError(f"traces incomplete after {READ_TIMEOUT_S:.0f}s") from last_error
            time.sleep(0.5)
    read_s = time.monotonic() - t0
    print(f"Phoenix start {phoenix.start_s:.1f}s; {len(traces)} traces read back whole in {read_s:.1f}s")
    assert len(set(traces.values())) == len(records)  # distinct traces, one per task
