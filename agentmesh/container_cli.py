"""``agentmesh container …``: run a sandbox registry or holder as a process, and look at pools.

  agentmesh container registry --name prod --pool bubblewrap:default=16   # serve a registry
  agentmesh container holder --name prod --capacity 256                    # serve a holder
  agentmesh container status --name prod                                   # pools and leases
  agentmesh container run --name prod -- python3 -c 'print(1)'             # acquire, exec, release

Both services find each other (and clients find the registry) in the discovery store: the local
cluster's etcd by default (``agentmesh cluster up``), or ``--discovery URL``. Each also serves
Prometheus ``/metrics`` (``--metrics-port``, 0 = any free port, -1 = none), registered in discovery
under ``agentmesh-metrics`` with job ``registry`` or ``holder`` (see ``agentmesh metrics sd``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from typing import Any

from agentmesh.errors import ConfigError

__all__ = ["add_container_commands", "parse_pools"]


def parse_pools(items: list[str]) -> dict[tuple[str, str], int]:
    """``backend:image=N`` (or ``backend=N``) → {(backend, image): N}."""
    out: dict[tuple[str, str], int] = {}
    for item in items:
        spec, sep, n = item.rpartition("=")
        backend, _, image = spec.partition(":")
        if not sep or not backend or not n.isdigit():
            raise ConfigError(f"expected BACKEND[:IMAGE]=N, got {item!r}", key="--pool")
        out[(backend, image or "default")] = int(n)
    return out


def _discovery_url(ns: argparse.Namespace) -> str:
    from agentmesh.cli_common import where as _where

    if ns.discovery:
        return str(ns.discovery)
    return _where(ns)[1]


async def _serve_until_signal(
    start: Any, stop: Any, *, ns: argparse.Namespace, disc: Any, job: str, labels: dict[str, str]
) -> int:
    from agentmesh.metrics import serve_metrics

    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    address = await start()
    line = {"address": address}
    endpoint = None
    if ns.metrics_port >= 0:
        endpoint = await serve_metrics(
            job=job, labels=labels, discovery=disc, host=ns.host, port=ns.metrics_port
        )
        line["metrics"] = endpoint.url
    print(json.dumps(line), flush=True)
    await done.wait()
    if endpoint is not None:
        await endpoint.close()
    await stop()
    return 0


def _registry(ns: argparse.Namespace) -> int:
    from agentmesh.container.sandbox import Limits
    from agentmesh.discovery import connect
    from agentmesh.registry.registry import ContainerRegistry

    url = _discovery_url(ns)
    pools = parse_pools(ns.pool)

    async def main() -> int:
        disc = connect(url)
        reg = ContainerRegistry(
            name=ns.name,
            discovery=disc,
            pools=pools,
            default_backend=ns.backend,
            default_lease_s=ns.lease_s,
            default_limits=Limits(),
            host=ns.host,
            port=ns.port,
        )

        async def stop() -> None:
            await reg.stop(destroy_warm=False)
            await disc.close()

        return await _serve_until_signal(
            reg.start, stop, ns=ns, disc=disc, job="registry", labels={"registry": ns.name}
        )

    return asyncio.run(main())


def _holder(ns: argparse.Namespace) -> int:
    from agentmesh.container.holder import SandboxHolder
    from agentmesh.discovery import connect

    url = _discovery_url(ns)

    async def main() -> int:
        disc = connect(url)
        holder = SandboxHolder(
            registry_name=ns.name,
            discovery=disc,
            capacity=ns.capacity,
            root=ns.root,
            host=ns.host,
            holder_id=ns.id,
        )

        async def stop() -> None:
            await holder.stop()
            await disc.close()

        return await _serve_until_signal(
            holder.start,
            stop,
            ns=ns,
            disc=disc,
            job="holder",
            labels={"registry": ns.name, "holder": holder.holder_id},
        )

    return asyncio.run(main())


def _client(ns: argparse.Namespace, client_id: str) -> Any:
    from agentmesh.container.client import ContainerClient
    from agentmesh.discovery import EndpointCache, connect

    disc = connect(_discovery_url(ns))
    cache = EndpointCache(disc)
    client = ContainerClient(client_id, endpoints=cache, registry_name=ns.name, timeout_s=10.0)

    async def close() -> None:
        await client.close()
        await cache.close()
        await disc.close()

    return client, close


def _status(ns: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    async def main() -> int:
        client, close = _client(ns, "agentmesh-cli")
        try:
            pools = MessageToDict(await client.pools(), always_print_fields_with_no_presence=True)
            leases = [MessageToDict(x) for x in await client.leases(everyone=True)]
        finally:
            await close()
        print(json.dumps({"pools": pools, "leases": leases}, indent=2))
        return 0

    return asyncio.run(main())


def _run(ns: argparse.Namespace) -> int:
    argv = [a for a in ns.argv if a != "--"] if ns.argv[:1] == ["--"] else ns.argv
    if not argv:
        raise ConfigError("nothing to run: give the command after --", key="argv")

    async def main() -> int:
        client, close = _client(ns, f"agentmesh-cli-{id(ns):x}")
        try:
            ref = await client.acquire(backend=ns.backend)
            try:
                r = await client.exec(ref, argv, stdin=sys.stdin.buffer.read() if ns.stdin else b"")
            finally:
                with contextlib.suppress(Exception):
                    await client.release(ref)
        finally:
            await close()
        sys.stdout.buffer.write(r.stdout)
        sys.stderr.buffer.write(r.stderr)
        if r.killed:
            print(f"agentmesh: killed: {r.killed} limit", file=sys.stderr)
        if r.truncated:
            print("agentmesh: output truncated at its limit", file=sys.stderr)
        return r.exit_code if 0 <= r.exit_code < 256 else 1

    return asyncio.run(main())


def add_container_commands(subparsers: Any) -> None:
    from agentmesh.cli_common import cluster_flags as _cluster_flags
    from agentmesh.cli_common import guarded as _guarded

    container = subparsers.add_parser(
        "container",
        help="sandbox registry and holders: serve them, see pools and leases, run a command",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = container.add_subparsers(dest="container_command", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        _cluster_flags(p)
        p.add_argument("--name", default="default", help="registry name (default 'default')")
        return p

    reg = common(sub.add_parser("registry", help="serve a container registry until SIGTERM"))
    reg.add_argument("--pool", action="append", default=[], help="warm pool BACKEND[:IMAGE]=N (repeatable)")
    reg.add_argument("--backend", default="bubblewrap", help="default sandbox backend")
    reg.add_argument("--lease-s", type=float, default=60.0, help="default lease in seconds")
    reg.add_argument("--host", default="127.0.0.1")
    reg.add_argument("--port", type=int, default=0)
    reg.add_argument(
        "--metrics-port", type=int, default=0, help="Prometheus /metrics port (0: any free one, -1: none)"
    )
    reg.set_defaults(func=_guarded(_registry))

    hold = common(sub.add_parser("holder", help="serve a sandbox holder until SIGTERM"))
    hold.add_argument("--capacity", type=int, default=128, help="sandboxes it keeps at most")
    hold.add_argument("--root", default=None, help="where sandboxes' scratch lives")
    hold.add_argument("--id", default=None, help="holder id (default: random)")
    hold.add_argument("--host", default="127.0.0.1")
    hold.add_argument(
        "--metrics-port", type=int, default=0, help="Prometheus /metrics port (0: any free one, -1: none)"
    )
    hold.set_defaults(func=_guarded(_holder))

    st = common(sub.add_parser("status", help="pools, capacity and leases of a registry (JSON)"))
    st.set_defaults(func=_guarded(_status))

    run = common(sub.add_parser("run", help="acquire a sandbox, run one command in it, release it"))
    run.add_argument("--backend", default="", help="sandbox backend (default: the registry's)")
    run.add_argument("--stdin", action="store_true", help="pass this command's stdin to the sandbox")
    run.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    run.set_defaults(func=_guarded(_run))
    logging.getLogger("agentmesh.container").setLevel(logging.INFO)
