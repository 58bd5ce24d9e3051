"""A stand-in agentmesh process for the Prometheus test: serves /metrics registered in discovery and
counts a given number of tasks, as the driver (``--job driver``) or one replica (``--job agent``).

  python tests/integration/prometheus_worker.py --discovery etcd://... --run r1 --job driver \
      --done 7 --failed 2
  python tests/integration/prometheus_worker.py --discovery etcd://... --run r1 --job agent \
      --role solver --replica solver-0 --steps 5

Prints ``READY <metrics url>`` once served and registered, then stays up until stdin closes or
SIGTERM (the test holds the pipe).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from agentmesh.discovery import connect
from agentmesh.llm_gateway.accounting import LlmAccounting
from agentmesh.metrics import ReplicaMetrics, RunMetrics, register_llm_accounting, serve_metrics


async def main(ns: argparse.Namespace) -> int:
    disc = connect(ns.discovery)
    keep: list[object] = []
    if ns.job == "driver":
        run = RunMetrics(ns.run)
        run.admitted(ns.done + ns.failed + ns.in_flight)
        for _ in range(ns.done):
            run.finished(ok=True)
        for _ in range(ns.failed):
            run.finished(ok=False, code="judged_bad")
        labels = {"run": ns.run}
        keep.append(run)
    else:
        rm = ReplicaMetrics(ns.run, ns.role, ns.replica, queued=lambda: ns.queued, in_progress=lambda: 1)
        for i in range(ns.steps):
            rm.step_done(0.05 * (i + 1), ok=True)
            rm.queue_wait(0.01)
            rm.tokens(100, 10)
            rm.hop("next", 0.002, ok=True)
        acc = LlmAccounting()
        for _ in range(ns.steps):
            acc.record_ok("sim-model", "llm-0", prompt_tokens=100, completion_tokens=10, latency_s=0.05)
        register_llm_accounting(acc)
        labels = {"run": ns.run, "role": ns.role, "replica": ns.replica}
        keep += [rm, acc]
    endpoint = await serve_metrics(job=ns.job, labels=labels, discovery=disc, ttl_s=2.0)
    print(f"READY {endpoint.url}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.buffer.read1(1) else None)
    await stop.wait()
    await endpoint.close()
    await disc.close()
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--discovery", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--job", choices=("driver", "agent"), required=True)
    p.add_argument("--role", default="")
    p.add_argument("--replica", default="")
    p.add_argument("--done", type=int, default=0)
    p.add_argument("--failed", type=int, default=0)
    p.add_argument("--in-flight", type=int, default=0)
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--queued", type=int, default=0)
    sys.exit(asyncio.run(main(p.parse_args())))
