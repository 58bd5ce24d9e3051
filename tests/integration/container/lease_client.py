"""A client process for the lease test: acquire sandboxes, use each once, print their ids, then hang
(until the test SIGKILLs it, so it never releases anything)."""

from __future__ import annotations

import asyncio
import json
import sys

from agentmesh.container.client import ContainerClient
from agentmesh.discovery import EndpointCache, connect


async def main(url: str, name: str, n: int, lease_s: float) -> None:
    disc = connect(url)
    client = ContainerClient("doomed-client", endpoints=EndpointCache(disc), registry_name=name)
    refs = [await client.acquire(lease_s=lease_s) for _ in range(n)]
    for r in refs:
        result = await client.exec(r, ["sh", "-c", "echo mine > /work/x"])
        assert result.ok, result
    print(json.dumps([r.id for r in refs]), flush=True)
    await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
