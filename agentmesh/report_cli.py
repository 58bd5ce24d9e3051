"""``agentmesh report`` and ``agentmesh status``: a finished run's report, a running run's live view.

  agentmesh report out/collab_reasoning_sim                  # → out/collab_reasoning_sim/report/report.md
  agentmesh report out/collab_reasoning_sim --format html --out /tmp/rep
  agentmesh status out/collab_reasoning_sim                  # refreshes every 2 s; Ctrl-C to leave
  agentmesh status --discovery etcd://127.0.0.1:2379 --run RUN_ID --once

Exit codes: 0 done; 1 (status) no endpoint of the run found; 2 bad command line, or nothing to
report on (the message names the file).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys

from agentmesh.errors import AgentMeshError

__all__ = ["add_report_commands", "main"]

log = logging.getLogger(__name__)


def _cmd_report(ns: argparse.Namespace) -> int:
    from agentmesh.report import write_report

    try:
        path = write_report(ns.run_dir, ns.out, fmt=ns.format)
    except AgentMeshError as exc:
        print(f"agentmesh report: {exc}", file=sys.stderr)
        return 2
    print(f"agentmesh report: wrote {path}")
    return 0


def _cmd_status(ns: argparse.Namespace) -> int:
    from agentmesh.status_view import RunInfo, read_run_dir, watch

    try:
        if ns.run_dir:
            if ns.discovery or ns.run:
                print("agentmesh status: give RUN_DIR or --discovery with --run, not both", file=sys.stderr)
                return 2
            try:
                info = read_run_dir(ns.run_dir)
            except AgentMeshError as exc:
                print(f"agentmesh status: {exc}", file=sys.stderr)
                return 2
        elif ns.discovery and ns.run:
            info = RunInfo(run_id=ns.run, discovery_url=ns.discovery)
        else:
            print("agentmesh status: give RUN_DIR, or --discovery URL and --run RUN_ID", file=sys.stderr)
            return 2
        if ns.interval <= 0:
            print("agentmesh status: --interval must be > 0", file=sys.stderr)
            return 2
        with contextlib.suppress(KeyboardInterrupt):
            return asyncio.run(watch(info, interval_s=ns.interval, once=ns.once))
        return 0  # Ctrl-C: leaving the view is not an error
    except AgentMeshError as exc:
        print(f"agentmesh status: {exc}", file=sys.stderr)
        return 1


def add_report_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``report`` and ``status`` to the ``agentmesh`` command line."""
    report = sub.add_parser(
        "report",
        help="write a run's report (Markdown or HTML, with PNG plots) from its records",
        description=(
            "Read a run's output directory (records, summary.json, run.json) and write a report: "
            "headline numbers, where task time went per role, throughput, tasks in flight, step "
            "latency per role, tokens per task, failures by cause."
        ),
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="the run's output directory (output.dir)")
    report.add_argument("--out", metavar="DIR", help="where to write the report (default RUN_DIR/report)")
    report.add_argument(
        "--format",
        choices=("md", "html"),
        default="md",
        help="md: report.md beside the PNGs (default); html: one self-contained report.html",
    )
    report.set_defaults(func=_cmd_report)

    status = sub.add_parser(
        "status",
        help="live view of a running run: per role in progress, queued, done, failed, tokens/s",
        description=(
            "Find a run's /metrics endpoints in its discovery store, scrape them and show the run's "
            "progress per role and per LLM model, refreshed in place."
        ),
    )
    status.add_argument(
        "run_dir", metavar="RUN_DIR", nargs="?", help="the run's output directory (has run.json)"
    )
    status.add_argument("--discovery", metavar="URL", help="discovery store, e.g. etcd://127.0.0.1:2379")
    status.add_argument("--run", metavar="RUN_ID", help="the run id (with --discovery)")
    status.add_argument("--interval", type=float, default=2.0, metavar="S", help="seconds between refreshes")
    status.add_argument("--once", action="store_true", help="print one snapshot and exit")
    status.set_defaults(func=_cmd_status)


def main(argv: list[str] | None = None) -> int:
    """``python -m agentmesh.report_cli report|status …`` without the rest of the command line."""
    parser = argparse.ArgumentParser(prog="agentmesh", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_report_commands(sub)
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if ns.command is None:
        parser.print_help()
        return 2
    code: int = ns.func(ns)
    return code


if __name__ == "__main__":
    sys.exit(main())
