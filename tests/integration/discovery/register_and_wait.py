"""Register one endpoint, print ``registered``, then keep it alive until killed.

Run by the discovery tests as a separate process, so that a SIGKILL is a real death: no
deregistration, no revoke, only the lease or TTL check running out.
Usage: ``register_and_wait.py URL SERVICE ID TTL_S [DEREGISTER_AFTER_S]``.
"""

from __future__ import annotations

import asyncio
import sys

from agentmesh.discovery import Endpoint, connect
from agentmesh.discovery.consul import ConsulDiscovery


async def main(argv: list[str]) -> None:
    url, service, endpoint_id, ttl_s = argv[:4]
    if len(argv) > 4:
        discovery = ConsulDiscovery.from_url(url, deregister_after_s=float(argv[4]))
    else:
        discovery = connect(url)
    await discovery.register(Endpoint(service, endpoint_id, "127.0.0.1:9", {"pid": "x"}), ttl_s=float(ttl_s))
    print("registered", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
