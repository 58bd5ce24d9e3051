"""``agentmesh metrics sd``: Prometheus service discovery from the discovery store.

Every process that serves ``/metrics`` registers it under ``agentmesh-metrics``
(:func:`agentmesh.metrics.serve_metrics`); this command turns those entries into Prometheus's
target-group JSON, ``[{"targets": ["host:port"], "labels": {"job": ..., "run": ..., ...}}]``:

  agentmesh metrics sd --discovery etcd://127.0.0.1:2379 --file /tmp/agentmesh-targets.json
      # rewrites the file (atomically: temp file + rename) whenever the targets change;
      # point a file_sd_configs entry at it
  agentmesh metrics sd --discovery etcd://127.0.0.1:2379 --http 127.0.0.1:9801
      # serves the same JSON at http://127.0.0.1:9801/targets for http_sd_configs
  agentmesh metrics sd --discovery etcd://127.0.0.1:2379 --once
      # prints it once (with --file: writes it once) and exits

An entry's metadata become the target's labels (names Prometheus cannot take are left out). Two
entries on one address (one process, two label sets) are one target — Prometheus would otherwise
scrape it twice and every sum would count it twice — with the labels the entries agree on.
A store that cannot be reached at start is one line on stderr and exit status 1; later outages keep
the last targets (Prometheus keeps scraping them) and are retried every interval.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from agentmesh.discovery import Discovery, Endpoint, connect
from agentmesh.errors import AgentMeshError
from agentmesh.metrics import METRICS_SERVICE

__all__ = [
    "add_metrics_commands",
    "main",
    "serve_targets",
    "target_groups",
    "targets_json",
    "write_targets",
    "write_targets_loop",
]

log = logging.getLogger(__name__)

_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_FIRST_SNAPSHOT_TIMEOUT_S = 15.0


def target_groups(endpoints: Iterable[Endpoint]) -> list[dict[str, Any]]:
    """Prometheus target groups of the ``agentmesh-metrics`` entries: one per address, sorted."""
    by_address: dict[str, list[dict[str, str]]] = {}
    for ep in endpoints:
        labels = {k: v for k, v in ep.metadata.items() if _LABEL_RE.match(k) and not k.startswith("__")}
        by_address.setdefault(ep.address, []).append(labels)
    groups = []
    for address in sorted(by_address):
        label_sets = by_address[address]
        common = dict(label_sets[0])
        for other in label_sets[1:]:
            common = {k: v for k, v in common.items() if other.get(k) == v}
        if "job" not in common:  # entries of different jobs share a process: name it by one of them
            jobs = sorted(ls["job"] for ls in label_sets if "job" in ls)
            if jobs:
                common["job"] = jobs[0]
        groups.append({"targets": [address], "labels": dict(sorted(common.items()))})
    return groups


def targets_json(groups: list[dict[str, Any]]) -> str:
    return json.dumps(groups, indent=2) + "\n"


def write_targets(path: str | Path, groups: list[dict[str, Any]]) -> bool:
    """Write ``groups`` to ``path`` atomically (Prometheus never reads half a file); False if the
    file already held exactly this."""
    path = Path(path)
    text = targets_json(groups)
    with contextlib.suppress(OSError):
        if path.read_text() == text:
            return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # Prometheus may run as another user
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True


async def _groups(discovery: Discovery, timeout_s: float) -> list[dict[str, Any]]:
    return target_groups(await asyncio.wait_for(discovery.snapshot(METRICS_SERVICE), timeout_s))


async def write_targets_loop(
    discovery: Discovery, path: str | Path, *, interval_s: float, stop: asyncio.Event
) -> None:
    """Rewrite ``path`` every ``interval_s`` when the targets changed, until ``stop`` is set. The first
    read's error propagates; later ones are logged and the file is left as it was."""
    write_targets(path, await _groups(discovery, _FIRST_SNAPSHOT_TIMEOUT_S))
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
        if stop.is_set():
            return
        try:
            groups = await _groups(discovery, max(interval_s, 5.0))
        except (AgentMeshError, TimeoutError) as exc:
            log.warning("metrics sd: reading %s failed (keeping the last targets): %s", METRICS_SERVICE, exc)
            continue
        if write_targets(path, groups):
            log.info("metrics sd: %d target(s) written to %s", len(groups), path)


async def serve_targets(discovery: Discovery, host: str, port: int) -> Any:
    """An aiohttp site answering ``GET /targets`` (and ``/``) with the target groups, read from the
    store on each request (Prometheus asks every ``refresh_interval``). Returns the runner; its
    address is ``runner.addresses[0]``."""
    from aiohttp import web

    async def handle(_request: web.Request) -> web.Response:
        try:
            groups = await _groups(discovery, 5.0)
        except (AgentMeshError, TimeoutError) as exc:
            # Prometheus keeps the last good answer when a refresh fails.
            return web.json_response({"error": f"discovery store: {exc}"}, status=503)
        return web.Response(text=targets_json(groups), content_type="application/json")

    app = web.Application()
    app.router.add_get("/targets", handle)
    app.router.add_get("/", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


async def _sd(ns: argparse.Namespace) -> int:
    try:
        discovery = connect(ns.discovery)
    except AgentMeshError as exc:
        print(f"agentmesh metrics sd: --discovery: {exc}", file=sys.stderr)
        return 2
    try:
        try:
            first = await _groups(discovery, _FIRST_SNAPSHOT_TIMEOUT_S)
        except (AgentMeshError, TimeoutError, OSError) as exc:
            print(
                f"agentmesh metrics sd: cannot read the discovery store {ns.discovery}: "
                f"{exc or type(exc).__name__}",
                file=sys.stderr,
            )
            return 1
        if ns.once or (ns.file is None and ns.http is None):
            if ns.file is not None:
                write_targets(ns.file, first)
            else:
                sys.stdout.write(targets_json(first))
            return 0
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if ns.file is not None:
            print(f"METRICS_SD_READY file={ns.file}", flush=True)
            await write_targets_loop(discovery, ns.file, interval_s=ns.interval, stop=stop)
            return 0
        host, port = ns.http
        try:
            runner = await serve_targets(discovery, host, port)
        except OSError as exc:
            print(f"agentmesh metrics sd: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
            return 1
        addr = runner.addresses[0]
        print(f"METRICS_SD_READY url=http://{addr[0]}:{addr[1]}/targets", flush=True)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
        return 0
    finally:
        with contextlib.suppress(Exception):
            await discovery.close()


def _run(ns: argparse.Namespace) -> int:
    if ns.http is not None and ns.once:
        print("agentmesh metrics sd: --once goes with --file (or neither, to print)", file=sys.stderr)
        return 2
    if ns.interval <= 0:
        print(f"agentmesh metrics sd: --interval must be > 0, got {ns.interval}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_sd(ns))
    except KeyboardInterrupt:
        return 130


def _add_sd_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sd = sub.add_parser(
        "sd",
        help="Prometheus targets (file_sd / http_sd) from the discovery store",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sd.add_argument("--discovery", required=True, help="discovery store URL, e.g. etcd://127.0.0.1:2379")
    where = sd.add_mutually_exclusive_group()
    where.add_argument("--file", type=Path, default=None, help="write file_sd JSON here (atomically)")
    where.add_argument(
        "--http", type=_host_port, default=None, metavar="HOST:PORT", help="serve http_sd JSON"
    )
    sd.add_argument("--interval", type=float, default=2.0, help="seconds between re-reads with --file")
    sd.add_argument("--once", action="store_true", help="write (or print) the targets once and exit")
    sd.set_defaults(func=_run)


def add_metrics_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``metrics`` (with ``sd``) to the ``agentmesh`` command's subparsers."""
    metrics = sub.add_parser(
        "metrics", help="Prometheus metrics: service discovery of the /metrics endpoints"
    )
    msub = metrics.add_subparsers(dest="metrics_command", metavar="ACTION", required=True)
    _add_sd_parser(msub)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m agentmesh.metrics_cli sd ...`` (the same as ``agentmesh metrics sd ...``)."""
    parser = argparse.ArgumentParser(prog="agentmesh metrics", description=__doc__)
    sub = parser.add_subparsers(dest="metrics_command", metavar="ACTION", required=True)
    _add_sd_parser(sub)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    ns = parser.parse_args(argv)
    return int(ns.func(ns))


if __name__ == "__main__":
    sys.exit(main())
