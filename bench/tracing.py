"""What tracing costs a real run: throughput with tracing off, sampled at 10%, at 100% (and tail).

    python bench/tracing.py [--workload mesh|llm] [--rounds 3] [--trials N] [--modes always,tail]

Workload: the collaborative-reasoning pipeline (teacher, student, extractor, matcher; up to 3
debate turns of 4 steps) over the vLLM simulator, every question of the set ``trials`` times;
``--workload`` picks how fast the simulated LLM is (see WORKLOADS: ``mesh``, the default, makes
the mesh the bottleneck, the worst case for tracing; ``llm`` is the example as shipped, LLM-bound,
written to results/tracing-llm.json). Deployed the way
`agentmesh run` deploys it: one local Ray (started once, shared by every run), an embedded etcd,
every role replica a Ray actor in its own process, the driver in this process. Spans therefore
come from several processes and really leave them: every traced mode exports over OTLP/gRPC to
bench/otlp_sink.py, a receiver in a process of its own that counts spans and traces.

Modes, all in the same run, interleaved (each round runs every mode once, the order rotated from
round to round so no mode always goes first or last): ``off`` (sampling off: no spans, no
interceptors), ``ratio 10%`` (head sampling), ``always`` (every task), ``tail 10%`` (every span
recorded and carried with its task; the sink exports failed/slow tasks plus 10% of the rest).
Timed: the task phase of each run (the driver's elapsed time, admission of the first task to the
sink of the last), not the start of actors. Reported per mode: median tasks/s, its ratio to
``off``, the cost (1 - ratio), spans and traces received per task. Goal: <= 3% cost at 100%.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_seconds, print_table, write_json

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "collab_reasoning" / "sim.yaml"
SINK = Path(__file__).resolve().parent / "otlp_sink.py"
ROLES = ("teacher", "student", "extractor", "matcher")
# Two ends of the range. ``mesh``: an LLM so fast (a 1 ms decode step, 8-token answers, batch 256)
# that the mesh itself (gRPC, etcd-free hops, the driver, the role processes) fills both cores:
# every span's CPU comes straight out of throughput, the worst case for tracing. ``llm``: the
# example as shipped (the simulator calibrated for SmolLM2-135M on vLLM CPU, 80-token answers,
# 32 in flight): the LLM is the bottleneck, as in a real run on this machine.
WORKLOADS: dict[str, dict[str, Any]] = {
    "mesh": {
        "trials": 100,
        "overrides": [
            "llms.smollm2.simulator_profile=fast-test",
            "llms.smollm2.max_num_seqs=256",
            "+llms.smollm2.options={step_base_s: 0.001, step_per_seq_s: 0.000002}",
            "limits.max_in_flight=256",
            *(f"roles.{r}.concurrency=64" for r in ROLES),
            "roles.teacher.params.max_tokens=8",
            "roles.student.params.max_tokens=8",
        ],
    },
    "llm": {"trials": 1, "overrides": []},
}
GOAL_COST = 0.03  # at 100%: the goal


@dataclass(frozen=True)
class Mode:
    name: str
    sampling: str  # tracing.sampling
    ratio: float = 1.0  # tracing.sample_ratio

    @property
    def exports(self) -> bool:
        return self.sampling != "off"

    def overrides(self, endpoint: str) -> list[str]:
        """The run-config overrides of this mode."""
        out = [f"tracing.sampling={self.sampling}"]
        if self.exports:
            out += [f"tracing.otlp_endpoint='{endpoint}'", f"tracing.sample_ratio={self.ratio}"]
        return out


def modes(available: Sequence[str]) -> list[Mode]:
    """The modes to measure; ``tail`` only where this tree's tracing offers it."""
    out = [Mode("off", "off"), Mode("ratio 10%", "ratio", 0.1), Mode("always 100%", "always", 1.0)]
    if "tail" in available:
        out.append(Mode("tail 10%", "tail", 0.1))
    return out


def workload_overrides(workload: str, trials: int | None = None) -> list[str]:
    """The run-config overrides of a workload (every question of the set, ``trials`` times)."""
    w = WORKLOADS[workload]
    return ["dataset.limit=null", f"dataset.trials={trials or w['trials']}", *w["overrides"]]


def schedule(names: Sequence[str], rounds: int) -> list[list[str]]:
    """Every name once per round, the order rotated by one each round."""
    n = len(names)
    return [[names[(r + i) % n] for i in range(n)] for r in range(rounds)]


def summarize(runs: Mapping[str, Sequence[Mapping[str, Any]]], baseline: str = "off") -> dict[str, Any]:
    """Per mode: median tasks/s, ratio and cost vs ``baseline``, spans/traces per task.

    Each run is ``{"tasks", "tasks_per_s", "spans", "traces", "roots", ...}``. The paired ratio is
    the median over rounds of (mode / baseline of the same round): less sensitive to drift of
    the machine than the ratio of medians, so both are given.
    """
    base_runs = runs[baseline]
    base = statistics.median(r["tasks_per_s"] for r in base_runs)
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        tps = [r["tasks_per_s"] for r in rs]
        med = statistics.median(tps)
        paired = [r["tasks_per_s"] / b["tasks_per_s"] for r, b in zip(rs, base_runs, strict=False)]
        tasks = sum(r["tasks"] for r in rs)
        out[name] = {
            "runs": len(rs),
            "tasks_per_s_median": med,
            "tasks_per_s_min": min(tps),
            "tasks_per_s_max": max(tps),
            "ratio": med / base,
            "cost": 1.0 - med / base,
            "paired_ratio_median": statistics.median(paired) if paired else float("nan"),
            "spans_per_task": sum(r["spans"] for r in rs) / tasks if tasks else 0.0,
            "traces_per_task": sum(r["traces"] for r in rs) / tasks if tasks else 0.0,
            "roots_per_task": sum(r["roots"] for r in rs) / tasks if tasks else 0.0,
        }
    return out


def verdict(cost: float, goal: float = GOAL_COST) -> str:
    return "PASS" if cost <= goal else "MISS"


def markdown(summary: Mapping[str, Mapping[str, Any]], params: Mapping[str, Any]) -> str:
    """The block for docs/benchmarks.md."""
    lines = [
        "### Tracing cost (`bench/tracing.py`)",
        "",
        f"collab-reasoning over the simulator, workload `{params['workload']}`, {params['tasks']} tasks "
        "a run, real deployment (local Ray, etcd, a replica per process); "
        f"{params['rounds']} interleaved rounds per mode, median; spans exported over OTLP/gRPC to a "
        "counting receiver in its own process.",
        "",
        "| mode | tasks/s (median) | range | vs off | cost | spans/task | traces/task |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['tasks_per_s_median']:.1f} "
            f"| {s['tasks_per_s_min']:.1f}-{s['tasks_per_s_max']:.1f} "
            f"| {s['ratio']:.3f} | {100 * s['cost']:+.1f}% | {s['spans_per_task']:.1f} "
            f"| {s['traces_per_task']:.2f} |"
        )
    full = next((s for n, s in summary.items() if n.startswith("always")), None)
    if full is not None:
        lines += [
            "",
            f"Goal <= {100 * GOAL_COST:.0f}% cost at 100%: **{verdict(full['cost'])}** "
            f"({100 * full['cost']:+.1f}%).",
        ]
    return "\n".join(lines)


class SinkProcess:
    """bench/otlp_sink.py in a child process, driven over its stdin/stdout."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SINK)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.port = int(json.loads(self._line())["port"])
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the OTLP sink exited ({self.proc.poll()})")
        return line

    def _ask(self, cmd: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return dict(json.loads(self._line()))

    def snapshot(self) -> dict[str, Any]:
        return self._ask("snapshot")

    def reset(self) -> None:
        self._ask("reset")

    def settled(self, quiet_s: float = 1.0, timeout_s: float = 20.0) -> dict[str, Any]:
        """The counts once no span arrived for ``quiet_s`` (exporters still draining)."""
        last = self.snapshot()
        quiet_since = time.monotonic()
        deadline = quiet_since + timeout_s
        while time.monotonic() - quiet_since < quiet_s and time.monotonic() < deadline:
            time.sleep(0.2)
            now = self.snapshot()
            if now["spans"] != last["spans"]:
                last, quiet_since = now, time.monotonic()
        return last

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def one_run(mode: Mode, ns: argparse.Namespace, sink: SinkProcess, work: Path, i: int) -> dict[str, Any]:
    from agentmesh.config import load_config
    from agentmesh.launcher import run_pipeline
    from agentmesh.sink import read_records
    from agentmesh.tracing import force_flush

    out = work / f"run{i}"
    cfg = load_config(
        CONFIG,
        [
            f"output.dir={out}",
            "output.formats=[jsonl]",
            *workload_overrides(ns.workload, ns.trials),
            *mode.overrides(sink.endpoint),
        ],
    )
    sink.reset()
    cpu0 = cpu_seconds(sink.proc.pid)
    p = run_pipeline(cfg, say=lambda _: None)
    force_flush()  # this process's spans (task roots, source hops); replicas flush before they stop
    got = sink.settled()
    records = list(read_records(out))
    turns = [sum(1 for h in r["history"] if h["role"] == "teacher") for r in records]
    return {
        "mode": mode.name,
        "tasks": p.done,
        "failed": p.failed,
        "elapsed_s": p.elapsed_s,
        "tasks_per_s": p.done / p.elapsed_s,
        "debate_turns_mean": sum(turns) / len(turns) if turns else 0.0,
        "spans": got["spans"],
        "traces": got["traces"],
        "roots": got["roots"],
        "spans_by_kind": got["by_kind"],
        "spans_by_service": got["by_service"],
        "sink_cpu_s": cpu_seconds(sink.proc.pid) - cpu0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="mesh")
    parser.add_argument("--trials", type=int, default=None, help="dataset trials, 48 tasks each")
    parser.add_argument("--modes", default="", help="comma-separated subset (default: all)")
    ns = parser.parse_args()

    from agentmesh.config import SAMPLING_MODES
    from agentmesh.launcher import init_ray
    from agentmesh.tracing import configure_tracing

    all_modes = modes(SAMPLING_MODES)
    if ns.modes:
        wanted = {m.strip() for m in ns.modes.split(",")}
        all_modes = [m for m in all_modes if m.name in wanted or m.sampling in wanted or m.name == "off"]
    by_name = {m.name: m for m in all_modes}
    plan = schedule([m.name for m in all_modes], ns.rounds)

    sink = SinkProcess()
    shutdown = init_ray(None, num_cpus=2)  # one Ray for every run: run_pipeline joins it
    runs: dict[str, list[dict[str, Any]]] = {m.name: [] for m in all_modes}
    try:
        with tempfile.TemporaryDirectory(prefix="am-trace-bench-") as tmp:
            i = 0
            for r, order in enumerate(plan):
                for name in order:
                    res = one_run(by_name[name], ns, sink, Path(tmp), i)
                    configure_tracing("bench", sampling="off")  # the next run configures its own
                    i += 1
                    runs[name].append(res)
                    print(
                        f"  round {r + 1} {name:12s} {res['tasks']} tasks in {res['elapsed_s']:.1f}s "
                        f"= {res['tasks_per_s']:.1f}/s, {res['spans']} spans, {res['traces']} traces",
                        flush=True,
                    )
    finally:
        shutdown()
        sink.close()
    tasks = runs["off"][0]["tasks"] if runs["off"] else 0
    params = {**vars(ns), "tasks": tasks}
    summary = summarize(runs)
    print_table(
        f"bench/tracing.py: collab-reasoning over the simulator, workload {ns.workload!r}, "
        f"{tasks} tasks a run, {ns.rounds} interleaved rounds, median",
        ["mode", "tasks/s", "min-max", "vs off", "cost", "paired", "spans/task", "traces/task"],
        [
            [
                name,
                s["tasks_per_s_median"],
                f"{s['tasks_per_s_min']:.1f}-{s['tasks_per_s_max']:.1f}",
                f"{s['ratio']:.3f}",
                f"{100 * s['cost']:+.1f}%",
                f"{s['paired_ratio_median']:.3f}",
                s["spans_per_task"],
                f"{s['traces_per_task']:.2f}",
            ]
            for name, s in summary.items()
        ],
    )
    full = next((s for n, s in summary.items() if n.startswith("always")), None)
    if full is not None:
        print(
            f"goal <= {100 * GOAL_COST:.0f}% cost at 100%: "
            f"{verdict(full['cost'])} ({100 * full['cost']:+.1f}%)"
        )
    md = markdown(summary, params)
    print("\n--- for docs/benchmarks.md ---\n" + md)
    write_json(
        f"tracing-{ns.workload}" if ns.workload != "mesh" else "tracing",
        {"params": params, "summary": summary, "runs": runs, "markdown": md},
    )


if __name__ == "__main__":
    main()
