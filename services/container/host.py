"""Ray actors that host a sandbox holder or a container registry (one asyncio loop of their own).

Ray places them (fractional CPUs), restarts a holder whose process died (its sandboxes are gone;
the registry notices the new incarnation and drops what the old one held), and gives the run one
handle to stop them. The service itself is the same class a plain process runs
(``agentmesh container holder|registry``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

__all__ = ["ServiceHost", "service_actor_class"]


class ServiceHost:
    """Body of the actor: ``kind`` is ``holder`` or ``registry``; ``options`` go to its constructor."""

    def __init__(self, kind: str, discovery_url: str, options: dict[str, Any]) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"agentmesh-{kind}", daemon=True)
        self._thread.start()
        self._kind = kind
        self._service: Any = None
        self._discovery: Any = None
        self._metrics_ep: Any = None
        self._address = asyncio.run_coroutine_threadsafe(
            self._start(discovery_url, dict(options)), self._loop
        ).result(timeout=120)

    async def _start(self, url: str, options: dict[str, Any]) -> str:
        import logging

        from agentmesh.discovery import connect

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._discovery = connect(url)
        if self._kind == "holder":
            from agentmesh.container.holder import SandboxHolder

            self._service = SandboxHolder(discovery=self._discovery, **options)
        elif self._kind == "registry":
            from agentmesh.container.sandbox import Limits
            from agentmesh.registry.registry import ContainerRegistry

            limits = Limits.from_mapping(options.pop("limits", None) or {})
            pools = {tuple(k.split(":", 1)): int(v) for k, v in (options.pop("pools", None) or {}).items()}
            self._service = ContainerRegistry(
                discovery=self._discovery, default_limits=limits, pools=pools, **options
            )
        else:
            raise ValueError(f"unknown service kind {self._kind!r}")
        address = str(await self._service.start())
        from agentmesh.metrics import serve_metrics

        # the registry's pools and leases, the holder's exec latency: scraped like the run's replicas
        # (a run's registry is named after the run)
        name = str(options.get("registry_name") or options.get("name") or "")
        self._metrics_ep = await serve_metrics(
            job=self._kind, labels={"registry": name, "run": name} if name else {}, discovery=self._discovery
        )
        return address

    def address(self) -> str:
        return str(self._address)

    def stats(self) -> dict[str, int]:
        return dict(self._service.stats)

    def stop(self) -> None:
        async def _stop() -> None:
            if self._metrics_ep is not None:
                with contextlib.suppress(Exception):
                    await self._metrics_ep.close()
            with contextlib.suppress(Exception):
                await self._service.stop()
            with contextlib.suppress(Exception):
                await self._discovery.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(timeout=60)


def service_actor_class() -> Any:
    import ray

    return ray.remote(ServiceHost)
