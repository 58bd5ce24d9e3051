"""agentmesh status against real pieces: canned exposition served over loopback HTTP, found in etcd."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agentmesh.discovery import connect
from agentmesh.discovery.base import Discovery, Endpoint
from agentmesh.discovery.etcd_server import EtcdServer
from agentmesh.report_cli import main
from agentmesh.status_view import METRICS_SERVICE

pytestmark = pytest.mark.integration

RUN = "live-run-42"
DRIVER = f"""\
# TYPE agentmesh_tasks_admitted_total counter
agentmesh_tasks_admitted_total{{run="{RUN}"}} 9.0
# TYPE agentmesh_tasks_in_flight gauge
agentmesh_tasks_in_flight{{run="{RUN}"}} 4.0
# TYPE agentmesh_tasks_done_total counter
agentmesh_tasks_done_total{{run="{RUN}"}} 5.0
"""
AGENT = f"""\
# TYPE agentmesh_inbox_tasks gauge
agentmesh_inbox_tasks{{replica="writer-0",role="writer",run="{RUN}"}} 7.0
# TYPE agentmesh_steps_in_progress gauge
agentmesh_steps_in_progress{{replica="writer-0",role="writer",run="{RUN}"}} 3.0
# TYPE agentmesh_steps_total counter
agentmesh_steps_total{{outcome="ok",replica="writer-0",role="writer",run="{RUN}"}} 11.0
# TYPE agentmesh_llm_requests_total counter
agentmesh_llm_requests_total{{model="tiny",replica="tiny-0"}} 11.0
"""


class _Exposition(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        code = 200 if self.path == "/metrics" else 404
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        if code == 200:
            self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def exposition_servers() -> Iterator[list[str]]:
    servers = []
    for text in (DRIVER, AGENT):
        handler = type("Handler", (_Exposition,), {"body": text.encode()})
        srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    yield [f"127.0.0.1:{s.server_address[1]}" for s in servers]
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer(fast=True) as server:
        yield server


@pytest.fixture
async def discovery(etcd: EtcdServer) -> AsyncIterator[Discovery]:
    disc = connect(etcd.url)
    yield disc
    await disc.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _register(disc: Discovery, addresses: list[str]) -> list[object]:
    regs = []
    for i, (job, address) in enumerate(
        [("driver", addresses[0]), ("agent", addresses[1]), ("agent", f"127.0.0.1:{_closed_port()}")]
    ):
        ep = Endpoint(METRICS_SERVICE, f"{job}-{i}-{time.monotonic_ns()}", address, {"job": job, "run": RUN})
        regs.append(await disc.register(ep, ttl_s=10))
    return regs


async def test_status_once_over_etcd_and_http(
    discovery: Discovery,
    etcd: EtcdServer,
    exposition_servers: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    regs = await _register(discovery, exposition_servers)
    try:
        # --discovery/--run; main() runs its own event loop, so in a thread beside this test's.
        code = await asyncio.to_thread(main, ["status", "--discovery", etcd.url, "--run", RUN, "--once"])
        out = capsys.readouterr().out
        assert code == 0, out
        assert "2/3 endpoints" in out
        assert "tasks: admitted 9  in flight 4  done 5  failed 0" in out
        writer = next(line for line in out.splitlines() if line.startswith("writer")).split()
        assert writer[1:6] == ["1", "3", "7", "11", "0"]
        assert next(line for line in out.splitlines() if line.startswith("tiny")).split()[2] == "11"
        assert "unreachable: 127.0.0.1:" in out

        # RUN_DIR with run.json, as a run writes it.
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        started = time.time() - 3
        (run_dir / "run.json").write_text(
            json.dumps({"run_id": RUN, "name": "live", "discovery_url": etcd.url, "started_unix": started})
        )
        code = await asyncio.to_thread(main, ["status", str(run_dir), "--once"])
        out = capsys.readouterr().out
        assert code == 0 and "live run live-run-42" in out and "average since the run started" in out

        # Another run id: nothing of it registered.
        code = await asyncio.to_thread(main, ["status", "--discovery", etcd.url, "--run", "nope", "--once"])
        assert code == 1 and "no /metrics endpoints of run 'nope'" in capsys.readouterr().out
    finally:
        for r in regs:
            await r.close()  # type: ignore[attr-defined]


async def test_status_of_a_run_whose_discovery_is_gone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    url = f"etcd://127.0.0.1:{_closed_port()}"
    (run_dir / "run.json").write_text(json.dumps({"run_id": RUN, "discovery_url": url, "pid": 2**22 + 12345}))
    code = await asyncio.to_thread(main, ["status", str(run_dir), "--once"])
    err = capsys.readouterr().err
    assert code == 1 and "cannot reach the run's discovery" in err and "is not running" in err
    assert err.count("\n") == 1
    # Finished: the embedded etcd went with the run, but summary.json says how it ended.
    (run_dir / "summary.json").write_text(json.dumps({"tasks": 2, "done": 2, "failed": 0, "elapsed_s": 1.0}))
    code = await asyncio.to_thread(main, ["status", str(run_dir), "--once"])
    assert code == 0 and "has finished" in capsys.readouterr().out
