"""``agentmesh job submit|status|logs|cancel|list``: the jobs API from the command line.

The manager is found with ``--jobs HOST:PORT``, else through the cluster record of ``--cluster
NAME`` (its ``jobs_address``; default cluster ``default``). Exit codes: 0 ok (``status`` and
``submit --wait``: the job succeeded, or is still going), 1 the job failed or was cancelled,
2 bad input (one line naming the file, field, job or cluster), 3 the manager could not be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from agentmesh.errors import AgentMeshError, ConfigError, InvalidArgument, RpcError, Unavailable
from agentmesh.jobs.spec import load_job_spec
from agentmesh.jobs.states import CANCELLED, FAILED, JobStatus
from agentmesh.text import align_columns

__all__ = ["add_job_commands", "main", "render_status"]


class _NoManager(AgentMeshError):
    pass


def _address(ns: argparse.Namespace) -> str:
    if ns.jobs:
        return str(ns.jobs)
    from agentmesh.cluster import load_record

    address = load_record(ns.cluster).jobs_address
    if not address:
        raise _NoManager(f"cluster {ns.cluster} has no job manager (pass --jobs HOST:PORT)")
    return address


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


def _counts(status: JobStatus) -> str:
    """``2 running, 1 succeeded``: how many tasks are in each state."""
    return ", ".join(f"{n} {s.lower()}" for s, n in sorted(status.task_counts.items()))


def render_status(status: JobStatus) -> str:
    """A job's header line and a table of its tasks (name, state, attempts, exit, duration, error)."""
    lines = [f"job {status.job_id} ({status.name}): {status.state}  [{_counts(status)}]"]
    if status.tasks:
        rows = [("TASK", "STATE", "ATTEMPTS", "EXIT", "DURATION", "ERROR")]
        for t in status.tasks:
            rows.append(
                (
                    t.name,
                    t.state,
                    str(t.attempts),
                    "-" if t.exit_code is None else str(t.exit_code),
                    _fmt_time(t.duration_s),
                    t.error.replace("\n", " ")[:80],
                )
            )
        lines += align_columns(rows)
    return "\n".join(line.rstrip() for line in lines)


def _status_dict(status: JobStatus) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(status)


def _exit_for(status: JobStatus) -> int:
    return 1 if status.state in (FAILED, CANCELLED) else 0


def _cmd_submit(ns: argparse.Namespace, client: Any) -> int:
    spec = load_job_spec(ns.file)
    job_id = client.submit(spec)
    print(job_id)
    if not ns.wait:
        return 0
    t0 = time.monotonic()

    def progress(st: JobStatus) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {st.state}: {_counts(st)}", file=sys.stderr)

    final = client.wait(job_id, timeout_s=ns.timeout, on_progress=progress)
    if ns.json:
        print(json.dumps(_status_dict(final), indent=2))
    else:
        print(render_status(final))
    return _exit_for(final)


def _cmd_status(ns: argparse.Namespace, client: Any) -> int:
    status = client.status(ns.job)
    print(json.dumps(_status_dict(status), indent=2) if ns.json else render_status(status))
    return _exit_for(status)


def _cmd_logs(ns: argparse.Namespace, client: Any) -> int:
    for line in client.logs(ns.job, ns.task, attempt=ns.attempt, follow=ns.follow):
        sys.stdout.write(line)
        if ns.follow:
            sys.stdout.flush()
    return 0


def _cmd_cancel(ns: argparse.Namespace, client: Any) -> int:
    status = client.cancel(ns.job)
    print(render_status(status))
    return 0


def _cmd_list(ns: argparse.Namespace, client: Any) -> int:
    jobs = client.list()
    if ns.json:
        print(json.dumps([_status_dict(j) for j in jobs], indent=2))
        return 0
    for j in jobs:
        total = sum(j.task_counts.values())
        done = j.task_counts.get("SUCCEEDED", 0)
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.created_unix))
        print(f"{j.job_id}  {j.state:<9}  {done}/{total} succeeded  {created}")
    return 0


def add_job_commands(sub: Any) -> None:
    """Add ``job`` and its subcommands to an argparse subparsers object."""
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--jobs", default="", metavar="HOST:PORT", help="the job manager's address")
    where.add_argument(
        "--cluster", default="default", metavar="NAME", help="find the job manager in this cluster's record"
    )
    job = sub.add_parser("job", help="submit and follow jobs (many tasks on the cluster)")
    jsub = job.add_subparsers(dest="job_command", required=True)
    p = jsub.add_parser("submit", parents=[where], help="submit a job spec (YAML or JSON)")
    p.add_argument("file")
    p.add_argument("--wait", action="store_true", help="wait for the job to end; exit 1 if it failed")
    p.add_argument("--timeout", type=float, default=None, help="with --wait: give up after this many seconds")
    p.add_argument("--json", action="store_true", help="with --wait: print the final status as JSON")
    p.set_defaults(job_fn=_cmd_submit)
    p = jsub.add_parser("status", parents=[where], help="a job's tasks; exit 1 if it failed")
    p.add_argument("job")
    p.add_argument("--json", action="store_true")
    p.set_defaults(job_fn=_cmd_status)
    p = jsub.add_parser("logs", parents=[where], help="a task's log (stdout and stderr)")
    p.add_argument("job")
    p.add_argument("task")
    p.add_argument("--attempt", type=int, default=None, help="1-based; default: the latest")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing while the attempt runs")
    p.set_defaults(job_fn=_cmd_logs)
    p = jsub.add_parser("cancel", parents=[where], help="cancel a job")
    p.add_argument("job")
    p.set_defaults(job_fn=_cmd_cancel)
    p = jsub.add_parser("list", parents=[where], help="every job of the manager")
    p.add_argument("--json", action="store_true")
    p.set_defaults(job_fn=_cmd_list)
    job.set_defaults(func=run_job_command)


def run_job_command(ns: argparse.Namespace) -> int:
    """Run a parsed ``job`` command; returns its exit code (errors are one line on stderr)."""
    from agentmesh.cluster import NoClusterError
    from agentmesh.jobs.client import JobClient

    try:
        address = _address(ns)
        with JobClient(address) as client:
            return int(ns.job_fn(ns, client))
    except (ConfigError, InvalidArgument) as exc:
        print(f"agentmesh: {exc}", file=sys.stderr)
        return 2
    except Unavailable as exc:
        print(
            f"agentmesh: the job manager at {getattr(ns, 'jobs', '') or ns.cluster} is unreachable: {exc}",
            file=sys.stderr,
        )
        return 3
    except RpcError as exc:
        if getattr(exc.code, "name", "") == "NOT_FOUND":
            print(f"agentmesh: {exc}", file=sys.stderr)
            return 2
        print(f"agentmesh: {exc}", file=sys.stderr)
        return 3
    except TimeoutError as exc:
        print(f"agentmesh: {exc}", file=sys.stderr)
        return 3
    except NoClusterError as exc:  # as every command that names a cluster: bad input
        print(f"agentmesh: {exc}", file=sys.stderr)
        return 2
    except AgentMeshError as exc:  # no job manager in the cluster's record
        print(f"agentmesh: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry: ``python -m agentmesh.jobs.cli job …`` (the same as ``agentmesh job …``)."""
    parser = argparse.ArgumentParser(prog="agentmesh")
    sub = parser.add_subparsers(dest="command", required=True)
    add_job_commands(sub)
    ns = parser.parse_args(list(argv) if argv is not None else None)
    return int(ns.func(ns))


if __name__ == "__main__":
    sys.exit(main())
