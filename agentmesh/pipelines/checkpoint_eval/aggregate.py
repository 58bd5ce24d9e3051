"""From per-task outcomes to mean ± standard error per checkpoint and benchmark, and the table.

One task evaluates one (checkpoint, benchmark, seed). A cell aggregates the seeds of one
(checkpoint, benchmark): the mean of their accuracies and the standard error of that mean, the
sample standard deviation (``ddof=1``) over ``sqrt(n)``, where ``n`` counts the seeds that produced
an accuracy. With ``n == 1`` there is no spread to estimate: the standard error is ``None`` and the
table says ``± n/a``. Seeds whose task failed are never dropped silently: the cell counts them and
keeps their errors, and the table marks the cell.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from agentmesh.text import align_columns

__all__ = ["Cell", "TaskOutcome", "aggregate", "format_cell", "format_table", "mean_stderr"]


@dataclass(frozen=True, slots=True)
class TaskOutcome:
    """What became of one task: its accuracy when it succeeded, else its state and error."""

    task: str
    checkpoint: str
    benchmark: str
    seed: int
    state: str
    """The job's task state: SUCCEEDED, FAILED, CANCELLED (or PENDING/RUNNING when cut short)."""
    accuracy: float | None = None
    error: str = ""
    attempts: int = 0
    result: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.state == "SUCCEEDED" and self.accuracy is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Cell:
    """The seeds of one (checkpoint, benchmark)."""

    checkpoint: str
    benchmark: str
    mean: float | None
    """None when no seed produced an accuracy."""
    stderr: float | None
    """None with fewer than two accuracies."""
    n: int
    """Seeds that produced an accuracy."""
    seeds: int
    """Seeds asked for (``n`` + the failed ones)."""
    accuracies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    """``"seed S: STATE: error"`` for each seed that produced no accuracy."""

    @property
    def failed(self) -> int:
        return self.seeds - self.n

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "failed": self.failed}


def mean_stderr(values: Sequence[float]) -> tuple[float | None, float | None]:
    """``(mean, standard error of the mean)``; ``(None, None)`` for no values, stderr None for one."""
    n = len(values)
    if n == 0:
        return None, None
    mean = math.fsum(values) / n
    if n == 1:
        return mean, None
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var) / math.sqrt(n)


def aggregate(
    outcomes: Iterable[TaskOutcome], checkpoints: Sequence[str], benchmarks: Sequence[str]
) -> list[Cell]:
    """One :class:`Cell` per (checkpoint, benchmark), checkpoints outer, in the given orders.

    Outcomes of a checkpoint or benchmark not listed are an error (a spec and its results that do
    not match), not something to ignore.
    """
    by_cell: dict[tuple[str, str], list[TaskOutcome]] = {(c, b): [] for c in checkpoints for b in benchmarks}
    for o in outcomes:
        key = (o.checkpoint, o.benchmark)
        if key not in by_cell:
            raise ValueError(f"outcome of task {o.task!r} is for {key}, which is not in the table")
        by_cell[key].append(o)
    cells = []
    for (ckpt, bench), group in by_cell.items():
        group.sort(key=lambda o: o.seed)
        accs = [o.accuracy for o in group if o.ok and o.accuracy is not None]
        mean, stderr = mean_stderr(accs)
        failures = [f"seed {o.seed}: {o.state}: {o.error or 'no accuracy'}" for o in group if not o.ok]
        cells.append(Cell(ckpt, bench, mean, stderr, len(accs), len(group), accs, failures))
    return cells


def format_cell(cell: Cell) -> str:
    """``0.47 ± 0.05 (n=3)``; ``± n/a`` with one seed; ``[k failed]`` appended when seeds failed;
    ``failed (0/S)`` when none produced an accuracy."""
    if cell.mean is None:
        return f"failed (0/{cell.seeds})"
    spread = "n/a" if cell.stderr is None else f"{cell.stderr:.2f}"
    text = f"{cell.mean:.2f} ± {spread} (n={cell.n})"
    if cell.failed:
        text += f" [{cell.failed} failed]"
    return text


def format_table(cells: Sequence[Cell], checkpoints: Sequence[str], benchmarks: Sequence[str]) -> str:
    """A plain-text table: a row per checkpoint, a column per benchmark."""
    lookup = {(c.checkpoint, c.benchmark): c for c in cells}
    header = ["checkpoint", *benchmarks]
    rows = [[ckpt, *(format_cell(lookup[(ckpt, b)]) for b in benchmarks)] for ckpt in checkpoints]
    rule = ["-" * max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(align_columns([header, rule, *rows]))
