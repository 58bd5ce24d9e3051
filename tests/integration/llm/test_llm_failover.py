"""Failover of the client-side gateway: 4 simulated replicas (each its own process, registered in a
real etcd) under steady load; one is SIGKILLed per trial.

Acceptance (issue 3): zero failed client requests, and the dead replica receives no new request
after <= 2 s; the p99 over the trials is printed (run with ``-s`` to see it).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from agentmesh.discovery.base import EndpointCache
from agentmesh.discovery.etcd_server import EtcdServer
from agentmesh.llm_gateway.client import AiohttpTransport, LlmClient, TransportResponse, llm_service_name

pytestmark = pytest.mark.integration

MODEL = "sim/failover"
SERVICE = llm_service_name(MODEL)
REPLICA_SCRIPT = Path(__file__).with_name("llm_replica_proc.py")
# ~8 decode steps of 5 ms: each call takes tens of milliseconds, so many are in flight at a kill.
SIM = {"step_base_s": 0.005, "max_num_seqs": 8, "default_max_tokens": 8}
TRIALS = 5
WORKERS = 16


class RecordingTransport(AiohttpTransport):
    """Notes when each request was sent to which address (probes are not requests)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[float, str]] = []

    async def post_json(
        self, url: str, payload: Mapping[str, Any], *, headers: Mapping[str, str], timeout_s: float
    ) -> TransportResponse:
        self.sent.append((time.monotonic(), url.split("://", 1)[1].split("/", 1)[0]))
        return await super().post_json(url, payload, headers=headers, timeout_s=timeout_s)


class ReplicaProc:
    def __init__(self, etcd_url: str, replica_id: str) -> None:
        self.id = replica_id
        self.proc = subprocess.Popen(
            [sys.executable, str(REPLICA_SCRIPT), etcd_url, MODEL, replica_id, json.dumps(SIM)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        assert line and line[0] == "READY", f"replica {replica_id} did not start: {line}"
        self.address = line[1]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def replicas(etcd: EtcdServer) -> Iterator[list[ReplicaProc]]:
    procs: list[ReplicaProc] = []
    try:
        yield procs
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.kill()


async def test_sigkill_one_of_four_replicas_under_load(
    etcd: EtcdServer, replicas: list[ReplicaProc], cache: EndpointCache
) -> None:
    def start(n: int) -> ReplicaProc:
        p = ReplicaProc(etcd.url, f"r{n}")
        replicas.append(p)
        return p

    live = [start(n) for n in range(4)]
    await cache.wait_for(SERVICE, lambda eps: len(eps) == 4, timeout_s=15)
    transport = RecordingTransport()
    client = LlmClient(MODEL, cache, transport=transport, timeout_s=20)
    failures: list[BaseException] = []
    done = 0
    stop = asyncio.Event()

    async def worker(w: int) -> None:
        nonlocal done
        i = 0
        while not stop.is_set():
            i += 1
            try:
                await client.chat([{"role": "user", "content": f"worker {w} call {i}"}], max_tokens=8)
                done += 1
            except Exception as exc:  # counted: the acceptance is zero
                failures.append(exc)

    workers = [asyncio.create_task(worker(w)) for w in range(WORKERS)]
    quiet_after: list[float] = []  # per trial: seconds from SIGKILL to the last request it received
    in_flight_at_kill: list[int] = []
    try:
        next_id = 4
        for _trial in range(TRIALS):
            await asyncio.sleep(0.7)  # steady state, all four replicas in use
            victim = live.pop(0)
            in_flight_at_kill.append(client.stats()[victim.id].in_flight)
            killed_at = time.monotonic()
            victim.kill()
            await asyncio.sleep(2.5)
            last = max((t for t, addr in transport.sent if addr == victim.address), default=killed_at)
            quiet_after.append(max(0.0, last - killed_at))
            live.append(start(next_id))  # a replacement joins through discovery
            next_id += 1
            want = {p.id for p in live}
            await cache.wait_for(SERVICE, lambda eps, want=want: want <= {e.id for e in eps}, timeout_s=15)
        await asyncio.sleep(0.5)  # the last replacement takes load too
    finally:
        stop.set()
        await asyncio.gather(*workers)
        await client.close()

    ordered = sorted(quiet_after)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    print(
        f"\nfailover: {TRIALS} trials, {WORKERS} callers, {done} calls ok, {len(failures)} failed; "
        f"requests in flight on the victim at SIGKILL: {in_flight_at_kill}; "
        f"last request to the dead replica after SIGKILL (s): {[round(q, 4) for q in quiet_after]}; "
        f"p99 {p99:.4f} s, max {ordered[-1]:.4f} s"
    )
    assert not failures, f"{len(failures)} client calls failed, first: {failures[0]!r}"
    assert done > 200
    assert sum(in_flight_at_kill) > 0, "the kills should have caught requests in flight"
    assert p99 <= 2.0 and ordered[-1] <= 2.0, quiet_after
    # Load returned to the replacements: the last replica started got requests too.
    assert any(addr == live[-1].address for _, addr in transport.sent)
