"""Per-hop cost of the mesh against its floor, a bare grpc.aio echo of the same size.

    python bench/hop.py [--seconds 6] [--in-flight 32] [--quick]

Workload: a chain of three no-op roles (a → b → c → sink), one replica each, every replica a real
grpc.aio server on loopback, all in this one process (so "per core" = per CPU-second of this
process). Each task carries a history of 2 KB or 200 KB. The floor: a grpc.aio unary echo server
and client in one process, same payload size, same concurrency.

Reported per size: forwarding latency p50/p99 (from the end of one step to the start of the next:
send + receive + inbox), hops/s, hops per CPU-second, the same for the echo, and the ratio; for
200 KB also with payload offloading on (the big turn travels as a reference): bytes per hop and
throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_seconds, percentile, print_table, write_json

from agentmesh.agent import Role, Task
from agentmesh.agent.local import LocalMesh, LocalRole
from agentmesh.agent.payload import MemoryPayloadStore
from agentmesh.agent.replica import ReplicaLimits
from agentmesh.agent.routing import Sequential
from agentmesh.discovery.memory import MemoryDiscovery
from agentmesh.driver import RunDriver

HOP_GAPS: list[float] = []
BYTES_SEEN: list[int] = []
_last_step_end: dict[str, float] = {}


class Seed(Role):
    """First role: puts the history of the requested size in the task, then stamps the time."""

    async def step(self, task: Task) -> None:
        size = int(task.input["size"])
        task.add_turn("h" * size)
        _last_step_end[task.id] = time.perf_counter()


class Relay(Role):
    async def step(self, task: Task) -> None:
        now = time.perf_counter()
        prev = _last_step_end.get(task.id)
        if prev is not None:
            HOP_GAPS.append(now - prev)
        BYTES_SEEN.append(task.orchestrator.ByteSize())
        _last_step_end[task.id] = time.perf_counter()


class NullWriter:
    """The sink's writer without disk I/O: the benchmark is about hops."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, record: dict[str, Any]) -> bool:
        self.n += 1
        return True

    def maybe_flush(self) -> None:
        pass

    def flush(self) -> None:
        pass


async def mesh_run(size: int, seconds: float, in_flight: int, offload: bool) -> dict[str, Any]:
    HOP_GAPS.clear()
    BYTES_SEEN.clear()
    _last_step_end.clear()
    disc = MemoryDiscovery()
    prog = Sequential("chain", ["a", "b", "c"])
    limits = ReplicaLimits(
        concurrency=in_flight, inbox=4 * in_flight, offload_threshold_bytes=65536 if offload else 0
    )
    store = MemoryPayloadStore() if offload else None
    roles = {
        "a": LocalRole(Seed, limits=limits),
        "b": LocalRole(Relay, limits=limits),
        "c": LocalRole(Relay, limits=limits),
    }
    mesh = LocalMesh(run_id="hop", roles=roles, programs={"chain": prog}, discovery=disc, payloads=store)
    await mesh.start()
    stop_at = [float("inf")]

    def tasks():
        i = 0
        while time.perf_counter() < stop_at[0]:
            yield f"t{i}", 0, {"size": size}
            i += 1

    writer = NullWriter()
    driver = RunDriver(
        run_id="hop",
        program=prog,
        discovery=disc,
        writer=writer,
        tasks=tasks(),
        roles=prog.roles(),
        max_in_flight=in_flight,
        payloads=store,
        recovery_interval_s=0,
    )
    await driver.start()
    # warm up for 1 s, then measure
    stop_at[0] = time.perf_counter() + 1.0 + seconds
    run = asyncio.create_task(driver.run())
    await asyncio.sleep(1.0)
    HOP_GAPS.clear()
    BYTES_SEEN.clear()
    done0, cpu0, t0 = writer.n, cpu_seconds(), time.perf_counter()
    await asyncio.sleep(seconds)
    done1, cpu1, t1 = writer.n, cpu_seconds(), time.perf_counter()
    await run
    await driver.stop()
    await mesh.stop()
    hops = (done1 - done0) * 4  # source→a, a→b, b→c, c→sink
    wall, cpu = t1 - t0, cpu1 - cpu0
    return {
        "size": size,
        "offload": offload,
        "tasks_per_s": (done1 - done0) / wall,
        "hops_per_s": hops / wall,
        "hops_per_cpu_s": hops / cpu,
        "cpu_util": cpu / wall,
        "hop_p50_ms": percentile(HOP_GAPS, 50) * 1e3,
        "hop_p99_ms": percentile(HOP_GAPS, 99) * 1e3,
        "bytes_per_hop": sum(BYTES_SEEN) / max(len(BYTES_SEEN), 1),
    }


async def echo_run(size: int, seconds: float, in_flight: int) -> dict[str, Any]:
    async def echo(request: bytes, context: Any) -> bytes:
        return request

    opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    server = grpc.aio.server(options=opts)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    payload = b"h" * size
    lat: list[float] = []
    count = [0]
    measuring = [False]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts) as ch:
        call = ch.unary_unary("/bench.Echo/Echo")
        stop_at = time.perf_counter() + 1.0 + seconds

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                await call(payload)
                if measuring[0]:
                    lat.append(time.perf_counter() - t)
                    count[0] += 1

        workers = [asyncio.create_task(worker()) for _ in range(in_flight)]
        await asyncio.sleep(1.0)
        measuring[0] = True
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        await asyncio.sleep(seconds)
        cpu1, t1 = cpu_seconds(), time.perf_counter()
        n = count[0]
        measuring[0] = False
        await asyncio.gather(*workers)
    await server.stop(0)
    wall, cpu = t1 - t0, cpu1 - cpu0
    return {
        "size": size,
        "calls_per_s": n / wall,
        "calls_per_cpu_s": n / cpu,
        "cpu_util": cpu / wall,
        "p50_ms": percentile(lat, 50) * 1e3,
        "p99_ms": percentile(lat, 99) * 1e3,
    }


async def stream_echo_run(size: int, seconds: float, in_flight: int) -> dict[str, Any]:
    """One bidirectional stream, ``in_flight`` messages outstanding: what a streaming Deliver
    between two peers could reach, against the unary echo above."""

    async def echo(requests: Any, context: Any) -> Any:
        async for r in requests:
            yield r

    opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    server = grpc.aio.server(options=opts)
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Stream": grpc.stream_stream_rpc_method_handler(echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    payload = b"h" * size
    window = asyncio.Semaphore(in_flight)
    count = [0]
    stop = [False]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts) as ch:
        call = ch.stream_stream("/bench.Echo/Stream")()

        async def writer() -> None:
            while not stop[0]:
                await window.acquire()
                await call.write(payload)
            await call.done_writing()

        async def reader() -> None:
            async for _ in call:
                count[0] += 1
                window.release()

        tasks = [asyncio.create_task(writer()), asyncio.create_task(reader())]
        await asyncio.sleep(1.0)
        n0, cpu0, t0 = count[0], cpu_seconds(), time.perf_counter()
        await asyncio.sleep(seconds)
        n1, cpu1, t1 = count[0], cpu_seconds(), time.perf_counter()
        stop[0] = True
        await asyncio.wait(tasks, timeout=5)
        for t in tasks:
            t.cancel()
    await server.stop(0)
    return {"size": size, "msgs_per_s": (n1 - n0) / (t1 - t0), "msgs_per_cpu_s": (n1 - n0) / (cpu1 - cpu0)}


async def main_async(ns: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"params": vars(ns), "cases": []}
    rows = []
    for size in (2_048, 200_000):
        echo = await echo_run(size, ns.seconds, ns.in_flight)
        variants = [False, True] if size > 65536 else [False]
        for offload in variants:
            mesh = await mesh_run(size, ns.seconds, ns.in_flight, offload)
            ratio = mesh["hops_per_cpu_s"] / echo["calls_per_cpu_s"]
            results["cases"].append({"echo": echo, "mesh": mesh, "ratio_per_cpu": ratio})
            rows.append(
                [
                    f"{size // 1000} KB" + (" +offload" if offload else ""),
                    mesh["hop_p50_ms"],
                    mesh["hop_p99_ms"],
                    mesh["hops_per_s"],
                    mesh["hops_per_cpu_s"],
                    echo["p50_ms"],
                    echo["p99_ms"],
                    echo["calls_per_s"],
                    echo["calls_per_cpu_s"],
                    f"{ratio:.2f}",
                    f"{mesh['bytes_per_hop'] / 1000:.1f} KB",
                ]
            )
    print_table(
        f"bench/hop.py: 3-role chain, {ns.in_flight} in flight, {ns.seconds:.0f}s per case, one process",
        [
            "history",
            "hop p50 ms",
            "hop p99 ms",
            "hops/s",
            "hops/cpu-s",
            "echo p50 ms",
            "echo p99 ms",
            "echo/s",
            "echo/cpu-s",
            "mesh/echo",
            "bytes/hop",
        ],
        rows,
    )
    big = [c for c in results["cases"] if c["mesh"]["size"] == 200_000]
    if len(big) == 2:
        cut = 1 - big[1]["mesh"]["bytes_per_hop"] / big[0]["mesh"]["bytes_per_hop"]
        results["offload_bytes_cut"] = cut
        print(f"offloading cuts bytes per hop on 200 KB histories by {cut:.1%}")
    stream_rows = []
    for case in [c for c in results["cases"] if not c["mesh"]["offload"]]:
        st = await stream_echo_run(case["echo"]["size"], ns.seconds, ns.in_flight)
        case["stream_echo"] = st
        stream_rows.append(
            [
                f"{st['size'] // 1000} KB",
                case["echo"]["calls_per_cpu_s"],
                st["msgs_per_cpu_s"],
                f"{st['msgs_per_cpu_s'] / case['echo']['calls_per_cpu_s']:.2f}",
            ]
        )
    print_table(
        "is a stream between peers worth it? bare grpc.aio echo, per CPU-second",
        ["size", "unary echo/cpu-s", "bidi-stream msgs/cpu-s", "stream/unary"],
        stream_rows,
    )
    worst = min(c["ratio_per_cpu"] for c in results["cases"] if not c["mesh"]["offload"])
    results["worst_ratio_per_cpu"] = worst
    print(f"mesh throughput per CPU-second vs grpc.aio echo (worst case): {worst:.0%} (goal >= 60%)")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="2 s per case")
    ns = parser.parse_args()
    if ns.quick:
        ns.seconds = 2.0
    results = asyncio.run(main_async(ns))
    write_json("hop", results)


if __name__ == "__main__":
    main()
