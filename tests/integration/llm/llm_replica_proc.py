"""One simulated LLM replica in a process of its own, registered in etcd (for SIGKILL tests).

    python llm_replica_proc.py ETCD_URL MODEL REPLICA_ID [simulator overrides as JSON]

Prints ``READY <host:port> <pid>`` once serving and registered, then runs until killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from agentmesh.llm_gateway.replica import LlmReplica


async def main() -> None:
    etcd_url, model, replica_id = sys.argv[1:4]
    overrides = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    replica = LlmReplica(
        model,
        discovery=etcd_url,
        backend="simulator",
        replica_id=replica_id,
        simulator_profile="fast-test",
        simulator_overrides=overrides,
        ttl_s=5.0,
    )
    ep = await replica.start()
    print(f"READY {ep.address} {os.getpid()}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
