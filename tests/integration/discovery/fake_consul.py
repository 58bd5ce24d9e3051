"""A stand-in for a Consul agent, for the Consul discovery tests.

No Consul server can be installed on these machines (no package, no registry ships the binary),
so this small aiohttp server implements exactly the part of Consul's documented HTTP API that
:mod:`agentmesh.discovery.consul` uses, with Consul's documented behaviour:

- ``PUT /v1/agent/service/register``: body keys are case-insensitive (``py-consul`` sends lower
  case); ``Check`` or ``Checks``; a check without ``CheckID`` gets ``service:<service-id>`` (or
  ``service:<service-id>:<n>`` when several); a TTL check starts ``critical`` unless ``Status``
  says otherwise; registering an existing ID replaces it.
- ``PUT /v1/agent/service/deregister/<id>``; ``PUT /v1/agent/check/pass/<check-id>`` (404 for an
  unknown check, 500 for a check that has no TTL).
- ``GET /v1/health/service/<name>`` with ``passing`` (every check of the instance, node check
  included, must pass) and blocking queries: ``index`` + ``wait`` (default 5 min, at most 10 min)
  hold the request until the index moves past ``index`` or the wait ends; ``X-Consul-Index``
  is always set. Like Consul, the index is shared, so a query may return with nothing changed.
- A TTL check not passed within its TTL turns ``critical``; a service whose check stays critical
  for ``DeregisterCriticalServiceAfter`` is removed (Consul's floor of one minute is
  ``min_deregister_s``, lowered in tests).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["FakeConsulAgent", "parse_go_duration"]

_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
NODE_NAME = "fake-consul"


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration string such as ``1m30s`` or ``1500ms`` (what Consul accepts)."""
    text = text.strip()
    if text in ("0", ""):
        return 0.0
    pos, total = 0, 0.0
    for m in _DURATION_RE.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_S[m.group(2)]
        pos = m.end()
    if pos != len(text):
        raise ValueError(f"invalid duration {text!r}")
    return total


def _lower_keys(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k).lower(): v for k, v in obj.items()}
    return obj


@dataclass
class _Check:
    check_id: str
    name: str
    service_id: str
    service_name: str
    ttl_s: float | None
    deregister_after_s: float | None
    status: str
    deadline: float = 0.0
    critical_since: float | None = None
    output: str = ""

    def to_json(self, service_tags: list[str]) -> dict[str, Any]:
        return {
            "Node": NODE_NAME,
            "CheckID": self.check_id,
            "Name": self.name,
            "Status": self.status,
            "Notes": "",
            "Output": self.output,
            "ServiceID": self.service_id,
            "ServiceName": self.service_name,
            "ServiceTags": service_tags,
            "Type": "ttl" if self.ttl_s is not None else "",
        }


@dataclass
class _Service:
    id: str
    name: str
    address: str
    port: int
    tags: list[str]
    meta: dict[str, str]
    checks: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Service": self.name,
            "Tags": self.tags,
            "Address": self.address,
            "Meta": self.meta,
            "Port": self.port,
            "Weights": {"Passing": 1, "Warning": 1},
            "EnableTagOverride": False,
        }


class FakeConsulAgent:
    """One fake agent (and its catalog) on 127.0.0.1, started on the running event loop."""

    def __init__(self, *, min_deregister_s: float = 60.0, tick_s: float = 0.02) -> None:
        self.min_deregister_s = min_deregister_s
        self._tick_s = tick_s
        self._services: dict[str, _Service] = {}
        self._checks: dict[str, _Check] = {}
        self._index = 1
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._node_id = str(uuid.uuid4())
        self._stopping = False
        self.port = 0
        self.requests: list[tuple[str, str]] = []
        self._kv: dict[str, tuple[int, bytes]] = {}  # key -> (ModifyIndex, value)

    @property
    def url(self) -> str:
        return f"consul://127.0.0.1:{self.port}"

    @property
    def index(self) -> int:
        return self._index

    async def start(self) -> None:
        app = web.Application()
        app.router.add_put("/v1/agent/service/register", self._register)
        app.router.add_put("/v1/agent/service/deregister/{service_id:.+}", self._deregister)
        app.router.add_put("/v1/agent/check/pass/{check_id:.+}", self._check_pass)
        app.router.add_get("/v1/health/service/{name}", self._health_service)
        app.router.add_put("/v1/kv/{key:.+}", self._kv_put)
        app.router.add_get("/v1/kv/{key:.+}", self._kv_get)
        app.router.add_delete("/v1/kv/{key:.+}", self._kv_delete)
        # Like Consul, give up a blocking query whose client hung up.
        self._runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]
        self._reaper = asyncio.create_task(self._reap())

    async def stop(self) -> None:
        self._stopping = True
        self._changed.set()
        if self._reaper is not None:
            self._reaper.cancel()
            try:
                await self._reaper
            except asyncio.CancelledError:
                pass
        if self._runner is not None:
            # Blocking queries in flight are cut off, as when an agent goes away.
            await self._runner.cleanup()

    def service_ids(self) -> set[str]:
        return set(self._services)

    def forget_all(self) -> None:
        """Drop every service and check, as an agent restarted without its state would."""
        self._services.clear()
        self._checks.clear()
        self._bump()

    async def wait_until(self, predicate: Callable[[FakeConsulAgent], bool], timeout_s: float) -> None:
        """Wait (on state changes, not by polling) until ``predicate(self)`` holds."""
        deadline = time.monotonic() + timeout_s
        while not predicate(self):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"fake consul: condition not met within {timeout_s}s")
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                continue

    # -- state --------------------------------------------------------------------------------

    def _bump(self) -> None:
        self._index += 1
        self._changed.set()
        self._changed = asyncio.Event()

    def _remove_service(self, service_id: str) -> bool:
        svc = self._services.pop(service_id, None)
        if svc is None:
            return False
        for cid in svc.checks:
            self._checks.pop(cid, None)
        self._bump()
        return True

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(self._tick_s)
            now = time.monotonic()
            changed = False
            for check in list(self._checks.values()):
                if check.ttl_s is not None and check.status != "critical" and now >= check.deadline:
                    check.status = "critical"
                    check.output = "TTL expired"
                    check.critical_since = now
                    changed = True
                if (
                    check.status == "critical"
                    and check.deregister_after_s is not None
                    and check.critical_since is not None
                    and now - check.critical_since >= check.deregister_after_s
                ):
                    self._remove_service(check.service_id)
            if changed:
                self._bump()

    # -- handlers -----------------------------------------------------------------------------

    async def _register(self, request: web.Request) -> web.Response:
        self.requests.append(("register", request.path_qs))
        try:
            body = _lower_keys(json.loads(await request.text()))
        except ValueError:
            return web.Response(status=400, text="Request decode failed: invalid JSON")
        if not isinstance(body, dict) or not body.get("name"):
            return web.Response(status=400, text="Missing service name")
        name = str(body["name"])
        service_id = str(body.get("id") or name)
        raw_checks: list[Any] = []
        if body.get("check"):
            raw_checks.append(body["check"])
        raw_checks.extend(body.get("checks") or [])
        checks: list[_Check] = []
        now = time.monotonic()
        for n, raw in enumerate(raw_checks, start=1):
            c = _lower_keys(raw)
            if not isinstance(c, dict):
                return web.Response(status=400, text="Invalid check")
            check_id = str(c.get("checkid") or c.get("id") or "")
            if not check_id:
                check_id = f"service:{service_id}" if len(raw_checks) == 1 else f"service:{service_id}:{n}"
            try:
                ttl_s = parse_go_duration(str(c["ttl"])) if c.get("ttl") else None
                dereg = c.get("deregistercriticalserviceafter")
                dereg_s = max(parse_go_duration(str(dereg)), self.min_deregister_s) if dereg else None
            except ValueError as exc:
                return web.Response(status=400, text=f"Invalid check: {exc}")
            status = str(c.get("status") or "critical")
            if status not in ("passing", "warning", "critical"):
                return web.Response(status=400, text=f"Invalid check status {status!r}")
            checks.append(
                _Check(
                    check_id=check_id,
                    name=str(c.get("name") or f"Service '{name}' check"),
                    service_id=service_id,
                    service_name=name,
                    ttl_s=ttl_s,
                    deregister_after_s=dereg_s,
                    status=status,
                    deadline=now + (ttl_s or 0.0),
                    critical_since=now if status == "critical" else None,
                )
            )
        try:
            port = int(body.get("port") or 0)
        except (TypeError, ValueError):
            return web.Response(status=400, text="Invalid port")
        old = self._services.pop(service_id, None)
        if old is not None:
            for cid in old.checks:
                self._checks.pop(cid, None)
        meta = body.get("meta") or {}
        self._services[service_id] = _Service(
            id=service_id,
            name=name,
            address=str(body.get("address") or ""),
            port=port,
            tags=[str(t) for t in body.get("tags") or []],
            meta={str(k): str(v) for k, v in meta.items()},
            checks=[c.check_id for c in checks],
        )
        for c in checks:
            self._checks[c.check_id] = c
        self._bump()
        return web.Response(status=200)

    async def _deregister(self, request: web.Request) -> web.Response:
        service_id = request.match_info["service_id"]
        self.requests.append(("deregister", service_id))
        if not self._remove_service(service_id):
            return web.Response(status=404, text=f'Unknown service ID "{service_id}"')
        return web.Response(status=200)

    async def _check_pass(self, request: web.Request) -> web.Response:
        check_id = request.match_info["check_id"]
        self.requests.append(("pass", check_id))
        check = self._checks.get(check_id)
        if check is None:
            return web.Response(status=404, text=f'Unknown check ID "{check_id}"')
        if check.ttl_s is None:
            return web.Response(status=500, text=f'CheckID "{check_id}" does not have associated TTL')
        check.deadline = time.monotonic() + check.ttl_s
        check.output = request.query.get("note", "")
        if check.status != "passing":
            check.status = "passing"
            check.critical_since = None
            self._bump()
        return web.Response(status=200)

    def _entries(self, name: str, passing: bool) -> list[dict[str, Any]]:
        node_check = {
            "Node": NODE_NAME,
            "CheckID": "serfHealth",
            "Name": "Serf Health Status",
            "Status": "passing",
            "Notes": "",
            "Output": "Agent alive and reachable",
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Type": "",
        }
        out = []
        for svc in sorted(self._services.values(), key=lambda s: s.id):
            if svc.name != name:
                continue
            checks = [self._checks[cid] for cid in svc.checks if cid in self._checks]
            if passing and any(c.status != "passing" for c in checks):
                continue
            out.append(
                {
                    "Node": {
                        "ID": self._node_id,
                        "Node": NODE_NAME,
                        "Address": "127.0.0.1",
                        "Datacenter": "dc1",
                        "TaggedAddresses": {"lan": "127.0.0.1", "wan": "127.0.0.1"},
                        "Meta": {},
                    },
                    "Service": svc.to_json(),
                    "Checks": [node_check, *(c.to_json(svc.tags) for c in checks)],
                }
            )
        return out

    async def _health_service(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.requests.append(("health", request.path_qs))
        q = request.query
        passing = "passing" in q and q["passing"].lower() not in ("0", "false")
        if "index" in q:
            try:
                index = int(q["index"])
                wait_s = min(parse_go_duration(q["wait"]), 600.0) if "wait" in q else 300.0
            except ValueError as exc:
                return web.Response(status=400, text=f"Invalid blocking query: {exc}")
            deadline = time.monotonic() + wait_s
            while self._index <= index and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except TimeoutError:
                    break
        headers = {
            "X-Consul-Index": str(self._index),
            "X-Consul-KnownLeader": "true",
            "X-Consul-LastContact": "0",
            "Content-Type": "application/json",
        }
        return web.Response(status=200, text=json.dumps(self._entries(name, passing)), headers=headers)

    # -- KV store (https://developer.hashicorp.com/consul/api-docs/kv) -----------------------------

    async def _kv_put(self, request: web.Request) -> web.Response:
        self.requests.append(("PUT", request.path))
        self._bump()
        self._kv[request.match_info["key"]] = (self._index, await request.read())
        return web.json_response(True)

    async def _kv_get(self, request: web.Request) -> web.Response:
        self.requests.append(("GET", request.path))
        key = request.match_info["key"]
        recurse = "recurse" in request.query
        hits = sorted(k for k in self._kv if (k.startswith(key) if recurse else k == key))
        if not hits:
            return web.Response(status=404, headers={"X-Consul-Index": str(self._index)})
        body = [
            {
                "Key": k,
                "Value": base64.b64encode(self._kv[k][1]).decode() if self._kv[k][1] else None,
                "Flags": 0,
                "CreateIndex": self._kv[k][0],
                "ModifyIndex": self._kv[k][0],
                "LockIndex": 0,
            }
            for k in hits
        ]
        return web.json_response(body, headers={"X-Consul-Index": str(self._index)})

    async def _kv_delete(self, request: web.Request) -> web.Response:
        self.requests.append(("DELETE", request.path))
        if self._kv.pop(request.match_info["key"], None) is not None:
            self._bump()
        return web.json_response(True)
