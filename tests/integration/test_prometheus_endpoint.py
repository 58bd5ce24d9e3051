"""serve_metrics: one exposition server per process, discovery entries per label set, closing."""

from __future__ import annotations

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from agentmesh.discovery.memory import MemoryDiscovery
from agentmesh.metrics import METRICS_SERVICE, RunMetrics, serve_metrics

pytestmark = pytest.mark.integration


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        return r.status, await r.text()


async def test_one_server_many_entries() -> None:
    reg = CollectorRegistry()
    RunMetrics("run-e", registry=reg).admitted(3)
    disc = MemoryDiscovery()
    a = await serve_metrics(job="driver", labels={"run": "run-e"}, discovery=disc, registry=reg)
    try:
        assert a.url == f"http://{a.address}/metrics" and a.address.startswith("127.0.0.1:")
        status, text = await get(a.url)
        assert status == 200 and 'agentmesh_tasks_admitted_total{run="run-e"} 3.0' in text
        entries = await disc.snapshot(METRICS_SERVICE)
        assert [(e.address, dict(e.metadata)) for e in entries] == [
            (a.address, {"job": "driver", "run": "run-e"})
        ]

        # Same process: the same server; same labels: no second entry; other labels: one more.
        b = await serve_metrics(job="driver", labels={"run": "run-e"}, discovery=disc)
        c = await serve_metrics(job="agent", labels={"run": "run-e", "role": "x"}, discovery=disc)
        assert b.address == c.address == a.address
        assert len(await disc.snapshot(METRICS_SERVICE)) == 2
        await c.close()
        assert len(await disc.snapshot(METRICS_SERVICE)) == 1
        await a.close()
        assert len(await disc.snapshot(METRICS_SERVICE)) == 1  # b still holds the driver entry
        assert (await get(b.url))[0] == 200
        await b.close()
        assert await disc.snapshot(METRICS_SERVICE) == []
        # The last handle stopped the server; a new call starts another.
        with pytest.raises(aiohttp.ClientConnectionError):
            await get(b.url)
        d = await serve_metrics(job="x", labels={}, registry=reg)
        assert (await get(d.url))[0] == 200
        await d.close()
    finally:
        for h in (a,):
            await h.close()


async def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="job"):
        await serve_metrics(job="", labels={})
    with pytest.raises(ValueError, match="'job'"):
        await serve_metrics(job="a", labels={"job": "b"})


async def test_gateway_registers_its_metrics() -> None:
    from agentmesh.llm_gateway.server import GatewayServer

    disc = MemoryDiscovery()
    gw = GatewayServer(disc)
    await gw.start()
    try:
        [entry] = await disc.snapshot(METRICS_SERVICE)
        assert entry.metadata == {"job": "llm-gateway"}
        assert f"http://{entry.address}" == gw.http_url
        status, text = await get(gw.http_url + "/metrics")
        assert status == 200 and "# TYPE agentmesh_llm_requests_total counter" in text
    finally:
        await gw.stop()
    assert await disc.snapshot(METRICS_SERVICE) == []
