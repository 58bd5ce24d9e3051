"""The ``agentmesh`` command line.

    agentmesh run CONFIG [KEY=VALUE ...]   run a pipeline (resumes if its output exists)

CONFIG is a YAML file (Hydra composition: ``defaults:`` lists, ``key=value`` overrides) or
``pkg://package/path.yaml`` for a config shipped inside a package.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from agentmesh import __version__
from agentmesh.cluster.cli import add_cluster_commands
from agentmesh.container_cli import add_container_commands
from agentmesh.errors import AgentMeshError, ConfigError
from agentmesh.jobs.cli import add_job_commands
from agentmesh.llm_cli import add_llm_commands
from agentmesh.metrics_cli import add_metrics_commands
from agentmesh.report_cli import add_report_commands

__all__ = ["main"]

EXAMPLES = """\
examples:
  agentmesh run examples/collab_reasoning/config.yaml
  agentmesh run examples/collab_reasoning/config.yaml dataset.limit=40 roles.teacher.replicas=3
  agentmesh run examples/collab_reasoning/sim.yaml output.dir=out/sim limits.max_in_flight=512
  agentmesh run examples/collab_reasoning/sim.yaml --cluster default   # on a cluster that is up

exit codes: 0 every task done; 1 some tasks failed (see the output's records); 2 bad config or
command line; 3 the run could not start or broke.
"""


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "--"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class ProgressPrinter:
    """One live line on a terminal; a line every ``every_s`` seconds otherwise (logs, CI)."""

    def __init__(self, *, quiet: bool = False, every_s: float = 10.0) -> None:
        self.tty = sys.stderr.isatty()
        self.quiet = quiet
        self.every_s = every_s
        self._last = 0.0

    def __call__(self, p: object) -> None:
        from agentmesh.driver import RunProgress

        assert isinstance(p, RunProgress)
        if self.quiet:
            return
        total = "?" if p.total is None else str(p.total)
        line = (
            f"done {p.done}/{total}  failed {p.failed}  in flight {p.in_flight}  "
            f"{p.tokens_per_s:7.1f} tok/s ({p.completion_tokens_per_s:.1f} generated)  "
            f"elapsed {_fmt_s(p.elapsed_s)}  ETA {_fmt_s(p.eta_s())}"
        )
        if p.recovered:
            line += f"  recovered {p.recovered}"
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + line)
            sys.stderr.flush()
        elif time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            print(line, file=sys.stderr, flush=True)

    def end(self) -> None:
        if self.tty and not self.quiet:
            sys.stderr.write("\n")


def _cmd_run(ns: argparse.Namespace) -> int:
    from agentmesh.config import load_config
    from agentmesh.launcher import run_pipeline

    overrides = list(ns.overrides)
    if ns.cluster is not None:
        from agentmesh.cluster import ClusterError, resolve_cluster

        try:
            ray_address, discovery_url = resolve_cluster(ns.cluster)
        except ClusterError as exc:
            print(f"agentmesh: --cluster: {exc}", file=sys.stderr)
            return 2
        # The cluster fills in what the command line did not say (an explicit override wins).
        given = {o.partition("=")[0].lstrip("+~") for o in overrides}
        overrides += [
            f"{key}={value}"
            for key, value in (("ray.address", ray_address), ("discovery.url", discovery_url))
            if key not in given
        ]
    try:
        cfg = load_config(ns.config, overrides)
    except ConfigError as exc:
        print(f"agentmesh: config error: {exc}", file=sys.stderr)
        return 2
    say = (
        (lambda msg: None)
        if ns.quiet
        else (lambda msg: print(f"agentmesh: {msg}", file=sys.stderr, flush=True))
    )
    printer = ProgressPrinter(quiet=ns.quiet)
    roles = ", ".join(cfg.roles)
    say(f"run {cfg.name!r}: program {cfg.routing.program!r}, roles {roles}, output {cfg.output.dir}")
    try:
        p = run_pipeline(cfg, say=say, on_progress=printer)
    except ConfigError as exc:
        printer.end()
        print(f"agentmesh: config error: {exc}", file=sys.stderr)
        return 2
    except AgentMeshError as exc:
        printer.end()
        print(f"agentmesh: run failed: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        printer.end()
        print("agentmesh: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an environment failure: one line, the traceback with -v
        printer.end()
        logging.getLogger("agentmesh").debug("run failed", exc_info=True)
        print(
            f"agentmesh: run broke: {type(exc).__name__}: {exc} (re-run with -v for the traceback)",
            file=sys.stderr,
        )
        return 3
    printer.end()
    print(
        f"agentmesh: {cfg.name}: {p.done} done, {p.failed} failed"
        + (
            f" ({', '.join(f'{k}: {v}' for k, v in sorted(p.failures_by_code.items()))})"
            if p.failures_by_code
            else ""
        )
        + (f", {p.resumed} already written" if p.resumed else "")
        + (f", {p.recovered} recovered" if p.recovered else "")
        + f" in {_fmt_s(p.elapsed_s)}; {p.prompt_tokens} prompt + {p.completion_tokens} generated tokens"
        + f" ({p.tokens_per_s:.1f} tok/s); records in {cfg.output.dir}",
        flush=True,
    )
    if not ns.quiet:
        for row in p.llm:
            print(_llm_line(row), file=sys.stderr, flush=True)
    return 1 if p.failed else 0


def _llm_line(row: dict[str, object]) -> str:
    """One line per model and LLM replica for the end of a run."""

    def sec(key: str) -> str:
        v = row.get(key)
        return "-" if not isinstance(v, int | float) else (f"<= {v:g}s" if "p50" in key else f"{v:.3f}s")

    errors = row.get("errors_by_kind") or {}
    err_text = f"{row['errors']} errors" + (
        f" ({', '.join(f'{k}: {v}' for k, v in sorted(errors.items()))})"
        if isinstance(errors, dict) and errors
        else ""
    )
    return (
        f"agentmesh:   llm {row['model']} @ {row['replica']}: {row['requests']} requests, {err_text}, "
        f"{row['prompt_tokens']} in + {row['completion_tokens']} out tokens, "
        f"latency mean {sec('latency_mean_s')} p50 {sec('latency_p50_s')}, "
        f"TTFT mean {sec('ttft_mean_s')} p50 {sec('ttft_p50_s')}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentmesh",
        description="Generate synthetic data with many LLM agents: tasks travel agent to agent over gRPC.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"agentmesh {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run a pipeline to the end (re-running the same command resumes)",
        description="Run a pipeline config: admit every dataset row as a task, write one record per task.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("config", help="YAML config file, or pkg://package/file.yaml")
    run.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. dataset.limit=40 roles.teacher.replicas=2"
    )
    run.add_argument("-q", "--quiet", action="store_true", help="no progress, only the summary line")
    run.add_argument(
        "--cluster",
        default=None,
        metavar="NAME",
        help="run on the cluster `agentmesh cluster up --name NAME` started (local or Slurm)",
    )
    run.set_defaults(func=_cmd_run)
    add_llm_commands(sub)
    add_cluster_commands(sub)
    add_container_commands(sub)
    add_job_commands(sub)
    add_metrics_commands(sub)
    add_report_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if ns.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if ns.command is None:
        parser.print_help()
        return 2
    code: int = ns.func(ns)
    return code


if __name__ == "__main__":
    sys.exit(main())
