"""What every ``agentmesh`` command group shares: one-line messages, exit codes, cluster flags.

Exit codes: 0 done; 2 bad command line, bad option or no such cluster; 3 the work failed; 130
interrupted. The traceback of an unexpected failure goes to the debug log (``agentmesh -v``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from agentmesh.errors import AgentMeshError, ConfigError

__all__ = ["cluster_flags", "guarded", "print_json", "say", "where"]


def say(msg: str) -> None:
    print(f"agentmesh: {msg}", file=sys.stderr, flush=True)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """One line and an exit code for every failure; the traceback only with ``-v``."""
    from agentmesh.cluster.local import NoClusterError

    def run(ns: argparse.Namespace) -> int:
        from agentmesh.launcher import RAY_ENV

        # Before anything imports Ray: it reads some of these once, at import (a loopback cluster
        # address is only left alone with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0).
        for k, v in RAY_ENV.items():
            os.environ.setdefault(k, v)
        try:
            return fn(ns)
        except (ConfigError, NoClusterError) as exc:
            print(f"agentmesh: {exc}", file=sys.stderr)
            return 2
        except AgentMeshError as exc:
            print(f"agentmesh: {exc}", file=sys.stderr)
            return 3
        except KeyboardInterrupt:
            print("agentmesh: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # a bug or an environment failure
            logging.getLogger("agentmesh").debug("command failed", exc_info=True)
            print(
                f"agentmesh: failed: {type(exc).__name__}: {exc} (re-run with -v for the traceback)",
                file=sys.stderr,
            )
            return 3

    return run


def cluster_flags(p: argparse.ArgumentParser) -> None:
    """``--cluster NAME`` or ``--ray-address`` with ``--discovery``: where a command's cluster is."""
    from agentmesh.cluster.local import DEFAULT_CLUSTER

    p.add_argument("--cluster", default=DEFAULT_CLUSTER, help=f"cluster name (default {DEFAULT_CLUSTER!r})")
    p.add_argument("--ray-address", default=None, help="Ray address (with --discovery: no record needed)")
    p.add_argument("--discovery", default=None, help="discovery URL, e.g. etcd://127.0.0.1:2379")


def where(ns: argparse.Namespace) -> tuple[str, str]:
    """The (Ray address, discovery URL) that :func:`cluster_flags` named."""
    from agentmesh.cluster import resolve_cluster

    return resolve_cluster(ns.cluster, ray_address=ns.ray_address, discovery_url=ns.discovery)
