"""The files a checkpoint-evaluation run leaves: results JSON, the table, a bar chart.

``results.json`` holds the run's configuration, every task's outcome (accuracy or state and error)
and every cell (mean, standard error, n, failures); ``table.txt`` the printed table;
``accuracy.png`` a grouped bar chart (a group per benchmark, a bar per checkpoint, error bars of
one standard error). The chart is skipped with a note when matplotlib is missing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agentmesh.pipelines.checkpoint_eval.aggregate import Cell, TaskOutcome

__all__ = ["plot_cells", "write_report"]


def write_report(
    out: Path,
    *,
    job_id: str,
    state: str,
    config: dict[str, Any],
    outcomes: Sequence[TaskOutcome],
    cells: Sequence[Cell],
    table: str,
    wall_s: float,
    checkpoints: Sequence[str],
    benchmarks: Sequence[str],
) -> dict[str, str]:
    """Write the report into ``out``; returns ``{"results": path, "table": path, "chart": path}``
    (no ``chart`` when it could not be drawn)."""
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "job_id": job_id,
        "state": state,
        "wall_s": round(wall_s, 3),
        "config": config,
        "checkpoints": list(checkpoints),
        "benchmarks": list(benchmarks),
        "cells": [c.to_dict() for c in cells],
        "tasks": [o.to_dict() for o in outcomes],
    }
    files = {"results": str(out / "results.json"), "table": str(out / "table.txt")}
    Path(files["results"]).write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    Path(files["table"]).write_text(table + "\n", encoding="utf-8")
    chart = out / "accuracy.png"
    if plot_cells(cells, checkpoints, benchmarks, chart):
        files["chart"] = str(chart)
    return files


def plot_cells(
    cells: Sequence[Cell], checkpoints: Sequence[str], benchmarks: Sequence[str], path: Path
) -> bool:
    """Draw the grouped bar chart to ``path``; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display here
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    lookup = {(c.checkpoint, c.benchmark): c for c in cells}
    width = 0.8 / max(len(checkpoints), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(benchmarks) * max(len(checkpoints), 1) ** 0.5, 3.6))
    for i, ckpt in enumerate(checkpoints):
        cs = [lookup[(ckpt, b)] for b in benchmarks]
        xs = [j + (i - (len(checkpoints) - 1) / 2) * width for j in range(len(benchmarks))]
        means = [c.mean if c.mean is not None else 0.0 for c in cs]
        errs = [c.stderr if c.stderr is not None else 0.0 for c in cs]
        ax.bar(xs, means, width * 0.95, yerr=errs, capsize=3, label=ckpt)
    ax.set_xticks(range(len(benchmarks)), list(benchmarks))
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (mean ± s.e.)")
    ax.legend(fontsize="small", ncols=min(len(checkpoints), 4))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
