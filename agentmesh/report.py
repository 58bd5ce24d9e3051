"""The run report: what a finished (or stopped) run recorded, as Markdown or HTML with PNG plots.

``agentmesh report RUN_DIR`` (:mod:`agentmesh.report_cli`) reads the run's output directory — the
records (through :func:`agentmesh.sink.read_records`, so JSONL, zstd or Parquet), ``summary.json``
and ``run.json`` when present — and writes ``report.md`` (or a self-contained ``report.html``, the
plots inlined) next to one PNG per plot.

Where time went. A task's wall time, from admission to the sink, is cut into consecutive pieces by
its recorded turns (each with ``started_unix_ns``/``finished_unix_ns``): the time inside a role's
step, and the time *before* it — from the previous step's end (or admission) to its start, i.e. the
hop and the wait in that role's inbox. What is left after the last step is the hop to the sink. The
pieces of one task add up to its duration exactly (overlapping steps are counted once, for the
earlier), so the shares over all tasks add up to 100% and the headline can say "62% of task time
was spent in teacher's steps; waiting before student took 20%".

Cost. One pass over the records keeps a few numbers per task and per step in flat arrays
(:mod:`array`, then :mod:`numpy`), never the records; 100k records cost what parsing them costs.
Records without timings (written before turns carried them) still count in the totals, tokens and
failures; they are left out of the time plots, and the report says how many were.
"""

from __future__ import annotations

import base64
import html
import json
import math
from array import array
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agentmesh.errors import AgentMeshError
from agentmesh.sink import JSONL_NAME, PARQUET_DIR, ZSTD_NAME, SinkCorruptError, read_records

__all__ = [
    "PLOT_NAMES",
    "ReportError",
    "RoleStats",
    "RunData",
    "TimeShare",
    "in_flight_series",
    "load_run",
    "throughput_series",
    "time_breakdown",
    "write_report",
]

ReportFormat = Literal["md", "html"]

PLOT_NAMES = (
    "throughput.png",
    "in_flight.png",
    "step_latency.png",
    "time_by_role.png",
    "tokens_per_task.png",
    "failures.png",
)
"""The plots a report may hold (failures.png only when some task failed)."""

_DPI = 100
_DONE_COLOR = "#2a7ab9"
_FAILED_COLOR = "#d1495b"
_STEP_COLOR = "#2a7ab9"
_WAIT_COLOR = "#f0a202"
_SINK_LABEL = "after the last step (to the sink)"


class ReportError(AgentMeshError):
    """The run directory cannot be reported on; the message names the file or directory."""


# --------------------------------------------------------------------------------------------
# Reading a run


@dataclass
class RunData:
    """What the report is computed from: a few numbers per task and per step, in numpy arrays.

    Task arrays (``admitted_ns``, ``finished_ns``, ``task_ok``) cover the tasks with timings only;
    token arrays and counts cover every record. Step arrays (``step_role``, ``step_s``) hold one
    entry per recorded turn with both timestamps. ``step_wall_s``/``wait_s`` are the wall-time
    attribution described in the module docstring, summed per role; ``failing_s`` is, per role, the
    time failed tasks spent after their last recorded step until they failed in that role (the
    failing step is not in the history: hop, queue and the step itself); ``tail_s`` is the time after
    each task's last step, summed.
    """

    run_dir: Path
    run_info: dict[str, Any] | None
    summary: dict[str, Any] | None
    records_file: Path
    tasks: int = 0
    done: int = 0
    failed: int = 0
    untimed_tasks: int = 0
    untimed_steps: int = 0
    roles: list[str] = field(default_factory=list)
    admitted_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    finished_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    task_ok: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    prompt_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    completion_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    step_role: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    step_s: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    step_wall_s: dict[str, float] = field(default_factory=dict)
    wait_s: dict[str, float] = field(default_factory=dict)
    failing_s: dict[str, float] = field(default_factory=dict)
    tail_s: float = 0.0
    role_tokens: dict[str, list[int]] = field(default_factory=dict)
    failures: Counter[str] = field(default_factory=Counter)
    failures_by_role: Counter[str] = field(default_factory=Counter)
    failure_example: dict[str, str] = field(default_factory=dict)

    @property
    def task_s(self) -> np.ndarray:
        """Each timed task's duration, admission to sink, in seconds."""
        return (self.finished_ns - self.admitted_ns) / 1e9

    @property
    def wall_s(self) -> float:
        """First admission to last finish (0 without timed tasks)."""
        if not len(self.admitted_ns):
            return 0.0
        return float(self.finished_ns.max() - self.admitted_ns.min()) / 1e9


def _records_file(run_dir: Path) -> Path:
    for name in (JSONL_NAME, ZSTD_NAME):
        if (run_dir / name).is_file():
            return run_dir / name
    parts = run_dir / PARQUET_DIR
    if parts.is_dir() and any(parts.glob("part-*.parquet")):
        return parts
    raise ReportError(
        f"{run_dir}: no records ({JSONL_NAME}, {ZSTD_NAME} or {PARQUET_DIR}/part-*.parquet); "
        "is this a run's output directory?"
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: not readable JSON: {exc}") from exc
    return value if isinstance(value, dict) else None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _tokens(record: Mapping[str, Any], history: Sequence[Any]) -> tuple[int, int]:
    tokens = record.get("tokens")
    if isinstance(tokens, Mapping):
        return int(tokens.get("prompt_tokens") or 0), int(tokens.get("completion_tokens") or 0)
    # Older records: only the turns' usage.
    prompt = completion = 0
    for turn in history:
        usage = turn.get("usage") if isinstance(turn, Mapping) else None
        if isinstance(usage, Mapping):
            prompt += int(usage.get("prompt_tokens") or 0)
            completion += int(usage.get("completion_tokens") or 0)
    return prompt, completion


def load_run(run_dir: str | Path) -> RunData:
    """Read a run's output directory in one streaming pass.

    Raises :class:`ReportError` when it holds no records file, or a file is damaged.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a directory")
    records_file = _records_file(run_dir)
    data = RunData(
        run_dir=run_dir,
        run_info=_read_json(run_dir / "run.json"),
        summary=_read_json(run_dir / "summary.json"),
        records_file=records_file,
    )
    role_index: dict[str, int] = {}
    admitted, finished, ok = array("q"), array("q"), array("b")
    prompts, completions = array("q"), array("q")
    step_role, step_s = array("i"), array("d")
    step_wall: list[float] = []
    wait: list[float] = []
    failing: list[float] = []
    tail = 0.0

    def index(role: str) -> int:
        idx = role_index.get(role)
        if idx is None:
            idx = role_index[role] = len(role_index)
            step_wall.append(0.0)
            wait.append(0.0)
            failing.append(0.0)
            data.role_tokens[role] = [0, 0]
        return idx

    try:
        for record in read_records(run_dir):
            data.tasks += 1
            is_ok = record.get("status") == "done"
            if is_ok:
                data.done += 1
            else:
                data.failed += 1
                error = _mapping(record.get("error"))
                code = str(error.get("code") or "unknown")
                data.failures[code] += 1
                data.failures_by_role[str(error.get("role") or "-")] += 1
                if code not in data.failure_example and error.get("message"):
                    data.failure_example[code] = str(error["message"])
            history = record.get("history") or []
            prompt, completion = _tokens(record, history)
            prompts.append(prompt)
            completions.append(completion)

            timings = _mapping(record.get("timings"))
            t_adm, t_fin = _int(timings.get("admitted_unix_ns")), _int(timings.get("finished_unix_ns"))
            if t_adm is not None and t_fin is not None and t_fin >= t_adm:
                admitted.append(t_adm)
                finished.append(t_fin)
                ok.append(is_ok)
            else:
                t_adm = t_fin = None
                data.untimed_tasks += 1
            # Steps sorted by start; ``cursor`` is the end of the wall time accounted so far.
            turns: list[tuple[int, int, int]] = []
            for turn in history:
                if not isinstance(turn, Mapping):
                    continue
                role = str(turn.get("role") or "?")
                idx = index(role)
                usage = turn.get("usage")
                if isinstance(usage, Mapping):
                    data.role_tokens[role][0] += int(usage.get("prompt_tokens") or 0)
                    data.role_tokens[role][1] += int(usage.get("completion_tokens") or 0)
                t0, t1 = _int(turn.get("started_unix_ns")), _int(turn.get("finished_unix_ns"))
                if t0 is None or t1 is None or t1 < t0:
                    data.untimed_steps += 1
                    continue
                step_role.append(idx)
                step_s.append((t1 - t0) / 1e9)
                turns.append((t0, t1, idx))
            if t_adm is None or t_fin is None:
                continue
            turns.sort()
            cursor = t_adm
            for t0, t1, idx in turns:
                start = min(max(t0, cursor), t_fin)
                end = min(max(t1, cursor), t_fin)
                wait[idx] += (start - cursor) / 1e9
                step_wall[idx] += (end - start) / 1e9
                cursor = end
            failed_in = _mapping(record.get("error")).get("role") if not is_ok else None
            if failed_in:
                failing[index(str(failed_in))] += (t_fin - cursor) / 1e9
            else:
                tail += (t_fin - cursor) / 1e9
    except SinkCorruptError as exc:
        raise ReportError(str(exc)) from exc
    except (OSError, ValueError) as exc:
        raise ReportError(f"{records_file}: cannot read records: {exc}") from exc

    data.roles = list(role_index)
    data.admitted_ns = np.frombuffer(admitted, dtype=np.int64).copy()
    data.finished_ns = np.frombuffer(finished, dtype=np.int64).copy()
    data.task_ok = np.frombuffer(ok, dtype=np.int8).astype(bool)
    data.prompt_tokens = np.frombuffer(prompts, dtype=np.int64).copy()
    data.completion_tokens = np.frombuffer(completions, dtype=np.int64).copy()
    data.step_role = np.frombuffer(step_role, dtype=np.int32).copy()
    data.step_s = np.frombuffer(step_s, dtype=np.float64).copy()
    data.step_wall_s = {r: step_wall[i] for r, i in role_index.items()}
    data.wait_s = {r: wait[i] for r, i in role_index.items()}
    data.failing_s = {r: failing[i] for r, i in role_index.items()}
    data.tail_s = tail
    return data


# --------------------------------------------------------------------------------------------
# Numbers


@dataclass(frozen=True)
class TimeShare:
    """One piece of the task time: a role's steps, the wait before a role, or the hop to the sink."""

    label: str
    role: str | None
    kind: Literal["step", "wait", "failing", "sink"]
    seconds: float
    share: float  # of all tasks' time, 0..1


def time_breakdown(data: RunData) -> list[TimeShare]:
    """Every piece of the timed tasks' time, largest first; the shares add up to 1 (or are empty)."""
    total = float(data.task_s.sum()) if len(data.admitted_ns) else 0.0
    if total <= 0:
        return []
    pieces = []
    for role in data.roles:
        pieces.append(TimeShare(f"{role} steps", role, "step", data.step_wall_s[role], 0.0))
        pieces.append(TimeShare(f"waiting before {role}", role, "wait", data.wait_s[role], 0.0))
        if data.failing_s.get(role):
            label = f"in {role} until the task failed there"
            pieces.append(TimeShare(label, role, "failing", data.failing_s[role], 0.0))
    pieces.append(TimeShare(_SINK_LABEL, None, "sink", data.tail_s, 0.0))
    out = [TimeShare(p.label, p.role, p.kind, p.seconds, p.seconds / total) for p in pieces]
    return sorted(out, key=lambda p: -p.seconds)


@dataclass(frozen=True)
class RoleStats:
    """One role's steps: count, duration percentiles (seconds) and tokens."""

    role: str
    steps: int
    p50_s: float
    p95_s: float
    max_s: float
    mean_s: float
    prompt_tokens: int
    completion_tokens: int


def role_stats(data: RunData) -> list[RoleStats]:
    """Per role, in the order roles first appear in the histories."""
    out = []
    for i, role in enumerate(data.roles):
        s = data.step_s[data.step_role == i]
        p50, p95 = np.percentile(s, [50, 95]) if len(s) else (math.nan, math.nan)
        tokens = data.role_tokens.get(role, [0, 0])
        out.append(
            RoleStats(
                role=role,
                steps=len(s),
                p50_s=float(p50),
                p95_s=float(p95),
                max_s=float(s.max()) if len(s) else math.nan,
                mean_s=float(s.mean()) if len(s) else math.nan,
                prompt_tokens=tokens[0],
                completion_tokens=tokens[1],
            )
        )
    return out


def headline(data: RunData) -> dict[str, Any]:
    """The headline numbers: tasks, done, failed, wall time, rates, task latency, slowest role."""
    wall = data.wall_s
    if wall <= 0 and data.summary and isinstance(data.summary.get("elapsed_s"), int | float):
        wall = float(data.summary["elapsed_s"])
    tokens = int(data.prompt_tokens.sum() + data.completion_tokens.sum())
    task_s = data.task_s
    p50, p95 = np.percentile(task_s, [50, 95]) if len(task_s) else (math.nan, math.nan)
    stats = [s for s in role_stats(data) if s.steps]
    slowest = max(stats, key=lambda s: s.p50_s) if stats else None
    return {
        "tasks": data.tasks,
        "done": data.done,
        "failed": data.failed,
        "wall_s": wall,
        "tasks_per_s": data.tasks / wall if wall > 0 else math.nan,
        "tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else math.nan,
        "task_p50_s": float(p50),
        "task_p95_s": float(p95),
        "slowest_role": slowest.role if slowest else None,
        "slowest_role_p50_s": slowest.p50_s if slowest else math.nan,
    }


def _llm_bound(data: RunData, roles: Sequence[str]) -> str:
    """'mostly LLM calls, mean 24 s each' when summary.json's one model explains those steps."""
    rows = [r for r in (data.summary or {}).get("llm") or [] if isinstance(r, Mapping)]
    means = [float(r["latency_mean_s"]) for r in rows if isinstance(r.get("latency_mean_s"), int | float)]
    if len(means) != 1 or means[0] <= 0:
        return ""
    stats = {s.role: s for s in role_stats(data)}
    llm_roles = [r for r in roles if r in stats and (stats[r].prompt_tokens or stats[r].completion_tokens)]
    # Only when the LLM call is most of each of those roles' mean step.
    if not llm_roles or any(means[0] < 0.8 * stats[r].mean_s for r in llm_roles):
        return ""
    return f"mostly LLM calls, mean {fmt_s(means[0])} each"


def key_sentence(data: RunData) -> str:
    """One or two sentences that say where the time went."""
    if data.tasks == 0:
        return "The run recorded no tasks."
    head = f"{data.tasks} tasks: {data.done} done, {data.failed} failed."
    if data.failed and not data.done:
        head = f"All {data.tasks} tasks failed" + (
            f", most with {data.failures.most_common(1)[0][0]}." if data.failures else "."
        )
    pieces = time_breakdown(data)
    if not pieces:
        return head + " No task carries timings, so there is no breakdown of where time went."
    steps = [p for p in pieces if p.kind == "step" and p.share >= 0.005]
    waits = [p for p in pieces if p.kind == "wait"]
    wait_total = sum(p.share for p in waits)
    parts = []
    if steps:
        top = steps[:3]
        said = [f"{_pct(top[0].share)} of task time was spent in {top[0].role}'s steps"]
        said += [f"{_pct(p.share)} in {p.role}'s" for p in top[1:]]
        llm_note = _llm_bound(data, [p.role for p in top if p.role])
        parts.append(", ".join(said) + (f" ({llm_note})" if llm_note else ""))
    if waits and wait_total >= 0.01:
        worst = waits[0]
        parts.append(
            f"waiting between steps (queue + hop) took {_pct(wait_total)}, "
            f"most of it before {worst.role} ({_pct(worst.share)})"
        )
    elif waits:
        share = _pct(wait_total)
        share = f"less than {share[1:]}" if share.startswith("<") else f"only {share}"
        parts.append(f"waiting between steps (queue + hop) took {share}")
    failing = [p for p in pieces if p.kind == "failing" and p.share >= 0.01]
    if failing:
        parts.append(
            f"{_pct(sum(p.share for p in failing))} went to steps that failed the task "
            f"(not in the records), most in {failing[0].role} ({_pct(failing[0].share)})"
        )
    sink = next(p for p in pieces if p.kind == "sink")
    if sink.share >= 0.05:
        parts.append(f"{_pct(sink.share)} went after the last step, on the way to the sink")
    sentence = "; ".join(parts) + "." if parts else ""
    return f"{head} {sentence[0].upper() + sentence[1:]}" if sentence else head


# --------------------------------------------------------------------------------------------
# Formatting


def _pct(share: float) -> str:
    if share == 0 or share >= 0.01:
        return f"{share * 100:.0f}%"
    return f"{share * 100:.1f}%" if share >= 0.001 else "<0.1%"


def fmt_s(seconds: float) -> str:
    """A duration for people: 850 µs, 12 ms, 3.4 s, 2m05s, 1h02m; '-' for NaN."""
    if seconds is None or math.isnan(seconds):
        return "-"
    if seconds == 0:
        return "0 s"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _rate(x: float) -> str:
    return "-" if math.isnan(x) else (f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 1000 else f"{x:.0f}")


# --------------------------------------------------------------------------------------------
# Plots (matplotlib's object API on the Agg canvas: no pyplot state, no display needed)


def _figure(width: float = 7.5, height: float = 3.6) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=_DPI)
    return path


def _nice_bin(wall_s: float, max_bins: int = 90) -> float:
    for width in (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600):
        if wall_s / width <= max_bins:
            return float(width)
    return float(math.ceil(wall_s / max_bins / 3600) * 3600)


def _time_axis(data: RunData) -> tuple[float, str, float]:
    """(t0 in ns, axis label, divisor) so plots read in seconds, minutes or hours since start."""
    wall = data.wall_s
    t0 = float(data.admitted_ns.min()) if len(data.admitted_ns) else 0.0
    if wall > 2 * 3600:
        return t0, "hours since the first admission", 3600.0
    if wall > 600:
        return t0, "minutes since the first admission", 60.0
    return t0, "seconds since the first admission", 1.0


def throughput_series(data: RunData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bin edges in seconds since the first admission, done per bin, failed per bin)."""
    wall = max(data.wall_s, 1e-3)
    # Few tasks in fine bins make a comb of 0/1 spikes; aim at ~3 tasks per bin, 12 to 90 bins.
    width = _nice_bin(wall, max_bins=int(min(90, max(12, len(data.finished_ns) / 3))))
    # The last bin ends at the last finish (a bin reaching past it would understate its rate);
    # a sliver of a last bin joins the one before.
    edges = np.arange(0, wall, width)
    edges = edges[:-1] if len(edges) > 1 and wall - edges[-1] < width / 2 else edges
    edges = np.append(edges, wall)
    t0 = data.admitted_ns.min() if len(data.admitted_ns) else 0
    fin = (data.finished_ns - t0) / 1e9
    done, _ = np.histogram(fin[data.task_ok], bins=edges)
    failed, _ = np.histogram(fin[~data.task_ok], bins=edges)
    return edges, done, failed


def plot_throughput(data: RunData, path: Path) -> Path:
    """Tasks finished per second over time, done and failed; the running total on a second axis."""
    fig = _figure()
    ax = fig.add_subplot()
    t0, label, div = _time_axis(data)
    edges, done_counts, failed_counts = throughput_series(data)
    width = float(edges[1] - edges[0])
    widths = np.diff(edges)
    fin = (data.finished_ns - t0) / 1e9
    x = edges / div
    ax.stairs(done_counts / widths, x, color=_DONE_COLOR, fill=True, alpha=0.3)
    ax.stairs(done_counts / widths, x, color=_DONE_COLOR, lw=1.5, label=f"done ({int(data.task_ok.sum())})")
    if failed_counts.any():
        n_failed = int((~data.task_ok).sum())
        ax.stairs(failed_counts / widths, x, color=_FAILED_COLOR, lw=1.5, label=f"failed ({n_failed})")
    total = np.sort(fin)
    ax2 = ax.twinx()
    ax2.step(
        np.concatenate([[0.0], total / div]),
        np.arange(len(total) + 1),
        where="post",
        color="grey",
        ls="--",
        lw=1,
        label="finished so far (right axis)",
    )
    ax2.set_ylabel("tasks finished so far")
    ax2.set_ylim(bottom=0)
    ax.set_xlabel(label)
    ax.set_ylabel(f"tasks / s ({fmt_s(width)} bins)")
    ax.set_title("Throughput: tasks reaching the sink")
    ax.set_xlim(0, x[-1])
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left", fontsize=9)
    return _save(fig, path)


def in_flight_series(data: RunData, bins: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """(bin edges in seconds since the first admission, mean tasks in flight over each bin).

    The mean is time-weighted, so a slot that a finish frees and an admission refills a moment
    later does not show as a dip; and the plot stays the same size for 100k tasks.
    """
    if not len(data.admitted_ns):
        return np.zeros(1), np.zeros(0)
    t0 = data.admitted_ns.min()
    times = np.concatenate([data.admitted_ns - t0, data.finished_ns - t0]).astype(np.float64) / 1e9
    steps = np.concatenate([np.ones(len(data.admitted_ns)), -np.ones(len(data.finished_ns))])
    order = np.argsort(times, kind="stable")
    times, level = times[order], np.cumsum(steps[order])
    # Area under the level curve at each event time; it is linear between events, so np.interp
    # gives the exact area at the bin edges.
    area = np.concatenate([[0.0], np.cumsum(level[:-1] * np.diff(times))])
    wall = max(float(times[-1]), 1e-9)
    edges = np.linspace(0.0, wall, bins + 1)
    mean = np.diff(np.interp(edges, times, area)) / np.diff(edges)
    return edges, mean


def plot_in_flight(data: RunData, path: Path) -> Path:
    """Tasks admitted but not yet at the sink, over time (time-weighted mean per bin)."""
    fig = _figure()
    ax = fig.add_subplot()
    _, label, div = _time_axis(data)
    edges, mean = in_flight_series(data)
    ax.stairs(mean, edges / div, color=_DONE_COLOR, fill=True, alpha=0.3)
    ax.stairs(mean, edges / div, color=_DONE_COLOR, lw=1.5)
    limit = ((data.run_info or {}).get("config") or {}).get("limits", {}).get("max_in_flight")
    if isinstance(limit, int) and limit > 0:
        ax.axhline(limit, color="grey", ls="--", lw=1, label=f"limits.max_in_flight = {limit}")
        ax.legend(loc="lower left", fontsize=9)
    ax.set_xlabel(label)
    ax.set_ylabel("tasks in flight")
    ax.set_title("Tasks in flight (admitted, not yet at the sink)")
    ax.set_xlim(0, edges[-1] / div)
    ax.set_ylim(
        0, max(float(mean.max(initial=0)), float(limit) if isinstance(limit, int) else 0) * 1.12 + 0.5
    )
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_step_latency(data: RunData, stats: Sequence[RoleStats], path: Path) -> Path:
    """Step duration per role: box (quartiles), whiskers 5th-95th percentile, p50 written above."""
    roles = [s for s in stats if s.steps]
    fig = _figure(width=max(5.0, 1.3 * len(roles) + 2.5))
    ax = fig.add_subplot()
    samples = [data.step_s[data.step_role == data.roles.index(s.role)] for s in roles]
    # Zero-length steps would break a log axis; a microsecond is below anything that matters here.
    samples = [np.maximum(s, 1e-6) for s in samples]
    ax.boxplot(
        samples,
        tick_labels=[s.role for s in roles],
        whis=(5, 95),
        showfliers=False,
        patch_artist=True,
        boxprops={"facecolor": "#cfe3f3", "edgecolor": _STEP_COLOR},
        medianprops={"color": "black"},
    )
    lo = min(float(s.min()) for s in samples)
    hi = max(float(np.percentile(s, 95)) for s in samples)
    if hi / max(lo, 1e-6) > 50:
        ax.set_yscale("log")
    for i, s in enumerate(roles, start=1):
        ax.annotate(
            f"p50 {fmt_s(s.p50_s)}\np95 {fmt_s(s.p95_s)}",
            (i, np.percentile(samples[i - 1], 95)),
            xytext=(0, 4),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_ylabel("step duration (s)")
    ax.set_title("Step latency per role (box: quartiles, whiskers: p5-p95)")
    ax.margins(y=0.25)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_time_by_role(data: RunData, path: Path) -> Path:
    """Per role, share of all task time in its steps and waiting before them; plus the sink hop."""
    total = float(data.task_s.sum())
    labels = [*data.roles, "to sink"]
    steps = np.array([data.step_wall_s[r] for r in data.roles] + [0.0]) / total * 100
    waits = np.array([data.wait_s[r] for r in data.roles] + [data.tail_s]) / total * 100
    failing = np.array([data.failing_s.get(r, 0.0) for r in data.roles] + [0.0]) / total * 100
    fig = _figure(height=max(2.4, 0.55 * len(labels) + 1.2))
    ax = fig.add_subplot()
    y = np.arange(len(labels))
    ax.barh(y, steps, color=_STEP_COLOR, label="in the role's step")
    ax.barh(y, waits, left=steps, color=_WAIT_COLOR, label="waiting before it")
    if failing.any():
        ax.barh(y, failing, left=steps + waits, color=_FAILED_COLOR, label="until the task failed there")
    ends = steps + waits + failing
    for yi, end in enumerate(ends):
        ax.text(end + 0.6, yi, _pct(end / 100), va="center", fontsize=9)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlim(0, max(float(ends.max()) * 1.15, 5))
    ax.set_xlabel("% of all tasks' time (admission to sink)")
    ax.set_title("Where task time went (waiting = queue + hop)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def plot_tokens(data: RunData, path: Path) -> Path:
    """Histogram of tokens per task, prompt and completion."""
    fig = _figure()
    ax = fig.add_subplot()
    top = int(max(data.prompt_tokens.max(initial=0), data.completion_tokens.max(initial=0)))
    bins = np.linspace(0, max(top, 1), 41)
    for values, name, color in (
        (data.prompt_tokens, "prompt", _DONE_COLOR),
        (data.completion_tokens, "completion", _WAIT_COLOR),
    ):
        ax.hist(
            values,
            bins=bins,
            histtype="stepfilled",
            alpha=0.45,
            color=color,
            edgecolor=color,
            label=f"{name} (median {np.median(values):.0f})",
        )
    ax.set_xlabel("tokens per task (all its steps)")
    ax.set_ylabel("tasks")
    ax.set_title("Tokens per task")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_failures(data: RunData, path: Path) -> Path:
    """Failed tasks per error code."""
    codes = data.failures.most_common()
    fig = _figure(height=max(2.2, 0.45 * len(codes) + 1.2))
    ax = fig.add_subplot()
    y = np.arange(len(codes))
    ax.barh(y, [n for _, n in codes], color=_FAILED_COLOR, height=0.6)
    for yi, (_, n) in enumerate(codes):
        ax.text(n, yi, f" {n}", va="center", fontsize=9)
    ax.set_yticks(y, [c for c, _ in codes])
    ax.invert_yaxis()
    ax.set_xlabel("failed tasks")
    ax.set_title("Failures by cause (error code)")
    ax.margins(x=0.12)
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# The document: a list of blocks, rendered as Markdown or HTML


@dataclass
class _Doc:
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        self.blocks.append(("table", (list(header), [[str(c) for c in r] for r in rows])))

    def img(self, path: Path, alt: str) -> None:
        self.blocks.append(("img", (path, alt)))


def _markdown(doc: _Doc) -> str:
    out: list[str] = []
    for kind, value in doc.blocks:
        if kind == "h":
            out.append("#" * value[0] + " " + value[1])
        elif kind == "p":
            out.append(value)
        elif kind == "table":
            header, rows = value
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "|".join("---" if i == 0 else "--:" for i in range(len(header))) + "|")
            out.extend("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows)
        elif kind == "img":
            out.append(f"![{value[1]}]({value[0].name})")
        out.append("")
    return "\n".join(out)


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em}"
    "td:not(:first-child){text-align:right}th{background:#f3f3f3}img{max-width:100%}"
    ".key{font-size:1.15em;background:#f5f9fc;border-left:4px solid #2a7ab9;padding:.6em 1em}"
)


def _html(doc: _Doc, title: str) -> str:
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        f'<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>',
        f"<style>{_CSS}</style></head><body>",
    ]
    first_p = True
    for kind, value in doc.blocks:
        if kind == "h":
            out.append(f"<h{value[0]}>{esc(value[1])}</h{value[0]}>")
        elif kind == "p":
            text = esc(value).replace("**", "")
            out.append(f'<p class="key">{text}</p>' if first_p else f"<p>{text}</p>")
            first_p = False
        elif kind == "table":
            header, rows = value
            out.append("<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in header) + "</tr>")
            out.extend("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
            out.append("</table>")
        elif kind == "img":
            b64 = base64.b64encode(value[0].read_bytes()).decode("ascii")
            out.append(f'<p><img alt="{esc(value[1])}" src="data:image/png;base64,{b64}"></p>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _build(data: RunData, out_dir: Path) -> tuple[_Doc, str]:
    info = data.run_info or {}
    name = str(info.get("name") or (data.summary or {}).get("run_id") or data.run_dir.name)
    run_id = info.get("run_id") or (data.summary or {}).get("run_id")
    title = f"Run report: {name}"
    doc = _Doc()
    doc.h(1, title)
    doc.p("**" + key_sentence(data) + "**")
    head = headline(data)
    slow = (
        f"{head['slowest_role']} (p50 {fmt_s(head['slowest_role_p50_s'])})" if head["slowest_role"] else "-"
    )
    doc.table(
        ["headline", ""],
        [
            ["run", f"{name}" + (f" ({run_id})" if run_id and run_id != name else "")],
            ["tasks", head["tasks"]],
            ["done", head["done"]],
            ["failed", head["failed"]],
            ["wall time (first admission to last finish)", fmt_s(head["wall_s"])],
            ["tasks / s", _rate(head["tasks_per_s"])],
            ["tokens / s (prompt + completion)", _rate(head["tokens_per_s"])],
            ["task latency p50 / p95", f"{fmt_s(head['task_p50_s'])} / {fmt_s(head['task_p95_s'])}"],
            ["slowest role (step p50)", slow],
        ],
    )
    notes = []
    if data.untimed_tasks:
        notes.append(
            f"{data.untimed_tasks} of {data.tasks} records carry no task timings (older records?); "
            "they count in the totals, tokens and failures but not in the time plots."
        )
    if data.untimed_steps:
        notes.append(f"{data.untimed_steps} recorded steps carry no start/finish time and are left out.")
    if data.summary and data.summary.get("resumed"):
        notes.append(
            f"This run resumed an earlier one ({data.summary['resumed']} records were already written); "
            "the records of both are reported, so the time axis may have a gap."
        )
    for note in notes:
        doc.p("Note: " + note)

    timed = len(data.admitted_ns) > 0
    stats = role_stats(data)
    if timed:
        doc.h(2, "Throughput and tasks in flight")
        doc.img(plot_throughput(data, out_dir / "throughput.png"), "throughput over time")
        doc.img(plot_in_flight(data, out_dir / "in_flight.png"), "tasks in flight over time")
        doc.h(2, "Where time went")
        doc.img(plot_time_by_role(data, out_dir / "time_by_role.png"), "share of task time per role")
        doc.table(
            ["part of task time", "total", "share"],
            [[p.label, fmt_s(p.seconds), _pct(p.share)] for p in time_breakdown(data) if p.seconds > 0],
        )
    if any(s.steps for s in stats):
        doc.h(2, "Step latency per role")
        doc.img(plot_step_latency(data, stats, out_dir / "step_latency.png"), "step latency per role")
    if stats:
        doc.table(
            ["role", "steps", "p50", "p95", "max", "mean", "prompt tokens", "completion tokens"],
            [
                [
                    s.role,
                    s.steps,
                    fmt_s(s.p50_s),
                    fmt_s(s.p95_s),
                    fmt_s(s.max_s),
                    fmt_s(s.mean_s),
                    s.prompt_tokens,
                    s.completion_tokens,
                ]
                for s in stats
            ],
        )
    doc.h(2, "Tokens per task")
    doc.img(plot_tokens(data, out_dir / "tokens_per_task.png"), "tokens per task")
    doc.p(
        f"Prompt tokens: {int(data.prompt_tokens.sum())} in all, median {np.median(data.prompt_tokens):.0f} "
        f"per task; completion tokens: {int(data.completion_tokens.sum())} in all, median "
        f"{np.median(data.completion_tokens):.0f} per task."
    )
    doc.h(2, "Failures")
    if data.failures:
        doc.img(plot_failures(data, out_dir / "failures.png"), "failures by cause")
        doc.table(
            ["error code", "tasks", "example message"],
            [[c, n, _clip(data.failure_example.get(c, ""))] for c, n in data.failures.most_common()],
        )
        doc.table(
            ["failed in role", "tasks"],
            [[r, n] for r, n in data.failures_by_role.most_common()],
        )
    else:
        doc.p("No task failed.")
    llm = (data.summary or {}).get("llm") or []
    if isinstance(llm, list) and llm:
        doc.h(2, "LLM calls (from summary.json)")
        doc.table(
            [
                "model",
                "replica",
                "requests",
                "errors",
                "prompt tokens",
                "completion tokens",
                "latency mean",
                "TTFT mean",
            ],
            [
                [
                    r.get("model", "?"),
                    r.get("replica", "?"),
                    r.get("requests", "-"),
                    r.get("errors", "-"),
                    r.get("prompt_tokens", "-"),
                    r.get("completion_tokens", "-"),
                    fmt_s(float(r["latency_mean_s"]))
                    if isinstance(r.get("latency_mean_s"), int | float)
                    else "-",
                    fmt_s(float(r["ttft_mean_s"])) if isinstance(r.get("ttft_mean_s"), int | float) else "-",
                ]
                for r in llm
                if isinstance(r, Mapping)
            ],
        )
        means = [
            r for r in llm if isinstance(r, Mapping) and isinstance(r.get("latency_mean_s"), int | float)
        ]
        llm_roles = [s for s in stats if s.steps and (s.prompt_tokens or s.completion_tokens)]
        if len(means) == 1 and llm_roles:
            row = means[0]
            ttft = row.get("ttft_mean_s")
            doc.p(
                f"Mean LLM call latency {fmt_s(float(row['latency_mean_s']))}"
                + (f" (time to first token {fmt_s(float(ttft))})" if isinstance(ttft, int | float) else "")
                + "; mean step of the roles that spent tokens: "
                + ", ".join(f"{s.role} {fmt_s(s.mean_s)}" for s in llm_roles)
                + ". Where the two are close, those steps are LLM time."
            )
    _pipeline_section(doc, info)
    source = data.records_file.name + ("/" if data.records_file.is_dir() else "")
    doc.p(f"Generated by `agentmesh report` from the run's {source} ({data.tasks} records).")
    return doc, title


def _pipeline_section(doc: _Doc, info: Mapping[str, Any]) -> None:
    """What ran, from run.json's config: roles, LLMs, the admission limit."""
    cfg = info.get("config")
    if not isinstance(cfg, Mapping):
        return
    doc.h(2, "What ran (from run.json)")
    source = cfg.get("source_file")
    program = _mapping(cfg.get("routing")).get("program")
    limits = _mapping(cfg.get("limits"))
    said = [
        f"config `{Path(str(source)).name}`" if source else None,
        f"program `{program}`" if program else None,
    ]
    if limits.get("max_in_flight"):
        said.append(f"at most {limits['max_in_flight']} tasks in flight")
    doc.p("; ".join(x for x in said if x) + ".")
    roles = _mapping(cfg.get("roles"))
    if roles:
        doc.table(
            ["role", "replicas", "concurrency", "llm"],
            [
                [name, r.get("replicas", "-"), r.get("concurrency", "-"), r.get("llm") or "-"]
                for name, r in roles.items()
                if isinstance(r, Mapping)
            ],
        )
    llms = _mapping(cfg.get("llms"))
    if llms:
        doc.table(
            ["llm", "backend", "model", "replicas", "max_num_seqs"],
            [
                [
                    name,
                    str(m.get("backend", "-"))
                    + (f" ({m['simulator_profile']})" if m.get("simulator_profile") else ""),
                    m.get("model", "-"),
                    m.get("replicas", "-"),
                    m.get("max_num_seqs", "-"),
                ]
                for name, m in llms.items()
                if isinstance(m, Mapping)
            ],
        )


def _clip(text: str, n: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def write_report(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    fmt: ReportFormat = "md",
    data: RunData | None = None,
) -> Path:
    """Write the report of ``run_dir`` into ``out_dir`` (default ``RUN_DIR/report``); return its path.

    ``report.md`` refers to the PNGs beside it; ``report.html`` carries them inline (the PNGs are
    written too). Raises :class:`ReportError` when the run directory holds no records.
    """
    if fmt not in ("md", "html"):
        raise ReportError(f"format: expected md or html, got {fmt!r}")
    data = data if data is not None else load_run(run_dir)
    if data.tasks == 0:
        raise ReportError(f"{data.records_file}: holds no records yet; nothing to report")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in PLOT_NAMES:  # a re-run must not leave a stale plot behind
            (out / name).unlink(missing_ok=True)
        doc, title = _build(data, out)
        path = out / f"report.{fmt}"
        path.write_text(_markdown(doc) if fmt == "md" else _html(doc, title), encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"{out}: cannot write the report: {exc}") from exc
    return path
