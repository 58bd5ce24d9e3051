"""Checkpoint evaluation on the jobs API: N checkpoints x M benchmarks x S seeds, mean ± s.e.

Each task of the job (:func:`~agentmesh.pipelines.checkpoint_eval.task.evaluate`) serves one
checkpoint through ``agentmesh llm deploy``, runs one bundled benchmark
(:mod:`~agentmesh.pipelines.checkpoint_eval.benchmarks`) with one seed and removes the deployment;
:func:`run_checkpoint_eval` submits the job, follows it and aggregates the accuracies
(:mod:`~agentmesh.pipelines.checkpoint_eval.aggregate`) into a table and a report. Command line:
``python -m agentmesh.pipelines.checkpoint_eval --help``; walkthrough: examples/checkpoint_eval/.
"""

from __future__ import annotations

from agentmesh.pipelines.checkpoint_eval.aggregate import (
    Cell,
    TaskOutcome,
    aggregate,
    format_table,
    mean_stderr,
)
from agentmesh.pipelines.checkpoint_eval.benchmarks import BENCHMARKS, Benchmark, load_benchmark
from agentmesh.pipelines.checkpoint_eval.job import (
    Checkpoint,
    EvalConfig,
    EvalResult,
    build_job_spec,
    main,
    make_checkpoints,
    run_checkpoint_eval,
)

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "Cell",
    "Checkpoint",
    "EvalConfig",
    "EvalResult",
    "TaskOutcome",
    "aggregate",
    "build_job_spec",
    "format_table",
    "load_benchmark",
    "main",
    "make_checkpoints",
    "mean_stderr",
    "run_checkpoint_eval",
]
