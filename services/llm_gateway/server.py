"""The standalone LLM gateway server: the client library's balancing behind OpenAI HTTP and gRPC.

For clients that cannot embed :class:`~agentmesh.llm_gateway.client.LlmClient` (other languages, the
``openai`` Python client, curl). One :class:`GatewayServer` process holds one ``LlmClient`` per model
(created on the first request for it) over one shared discovery cache, and serves:

* OpenAI-compatible HTTP (aiohttp): ``POST /v1/chat/completions`` and ``POST /v1/completions`` (with
  ``"stream": true`` the replica's server-sent events are passed through, ending in
  ``data: [DONE]``), ``GET /v1/models``, ``GET /health`` (503 while draining), ``GET /metrics``
  (Prometheus text: the clients' per-replica accounting as ``agentmesh_llm_*``, the same families
  :mod:`agentmesh.metrics` defines, plus the server's request counters). The ``/metrics`` address
  is registered in discovery under ``agentmesh-metrics`` with job ``llm-gateway``, so that
  ``agentmesh metrics sd`` hands it to Prometheus.
* gRPC ``agentmesh.v1.LlmGateway`` (``protos/agentmesh/v1/llm_gateway.proto``) with the standard
  health service and reflection.

The request body is checked here before anything is sent (a bad field is a 400 naming it); the body
is then forwarded as is (the client sets the model name per replica). Two fields are the gateway's
own and never forwarded: ``session_id`` (or the ``X-Session-Id`` header) keeps a conversation on one
replica; the ``X-Request-Timeout`` header (seconds) bounds the call. Errors are OpenAI-shaped
(``{"error": {"message", "type", "param", "code"}}``) with these statuses, and the same on gRPC:

====================================  ========  =====================
cause                                 HTTP      gRPC
====================================  ========  =====================
a bad body (the field is named)       400       INVALID_ARGUMENT
no replica of that model is known     404       NOT_FOUND
the replica refused the request       its 4xx   mapped from that 4xx
no replica answered / the gateway     503       UNAVAILABLE
is draining
the call's deadline passed            504       DEADLINE_EXCEEDED
====================================  ========  =====================

Models are the configured list (``models=``) when one is given; otherwise any model whose discovery
service (``llm.<model>``) has replicas registered when it is first asked for. Discovery has no call
that lists services, so ``/v1/models`` lists the configured models and those asked for so far.

Graceful drain (SIGTERM under :func:`main`): health goes NOT_SERVING on both protocols, new requests
get 503 / UNAVAILABLE, requests in flight (streams included) finish, then both servers stop.

Run: ``python -m agentmesh.llm_gateway.server --discovery etcd://127.0.0.1:2379 --http-port 8000
--grpc-port 50061``; it prints ``GATEWAY_READY http=http://HOST:PORT grpc=HOST:PORT`` when serving.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agentmesh.discovery import connect
from agentmesh.discovery.base import Discovery, Endpoint, EndpointCache, Registration
from agentmesh.errors import AgentMeshError, DiscoveryError, LlmError, LlmRequestError
from agentmesh.llm_gateway.accounting import LlmAccounting
from agentmesh.llm_gateway.client import LlmClient, llm_service_name
from agentmesh.llm_gateway.constants import LLM_TIMEOUT_S
from agentmesh.tracing import server_interceptors
from agentmesh.v1 import llm_gateway_pb2 as pb
from agentmesh.v1 import llm_gateway_pb2_grpc as pb_grpc
from agentmesh.v1 import orchestrator_pb2 as opb

__all__ = [
    "GRPC_SERVICE_NAME",
    "ClientFactory",
    "GatewayError",
    "GatewayServer",
    "Kind",
    "add_arguments",
    "grpc_request_body",
    "main",
    "serve",
    "validate_body",
]

log = logging.getLogger(__name__)

GRPC_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LlmGateway"].full_name
Kind = Literal["chat", "completion"]
ClientFactory = Callable[[str, EndpointCache, LlmAccounting], LlmClient]
"""Builds the client of one model: ``(model, shared cache, shared accounting) -> LlmClient``."""

_PATHS: dict[Kind, str] = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}
_SESSION_HEADER = "X-Session-Id"
_TIMEOUT_HEADER = "X-Request-Timeout"
_REPLICA_HEADER = "X-Agentmesh-Replica"
# Fields of the gRPC request that are typed there: extra_json may not set them a second time.
_STRUCTURAL = ("model", "messages", "prompt", "stream", "session_id")
# A safety margin over the client's own deadline, so that a stuck call still ends as a 504.
_DEADLINE_SLACK_S = 1.0
_MAX_BODY_BYTES = 64 * 1024 * 1024

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}
_GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


# -- errors --------------------------------------------------------------------------------------


class GatewayError(AgentMeshError):
    """An answer the gateway gives instead of a completion: an HTTP status and an OpenAI error.

    ``error`` is the OpenAI error object (``message``, ``type``, ``param``, ``code``); a replica's
    own refusal keeps the replica's object. :attr:`grpc_code` is the matching gRPC status.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error: Mapping[str, Any] | None = None,
    ) -> None:
        self.status = status
        self.message = message
        if error is None:
            error = {
                "message": message,
                "type": _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error"),
                "param": param,
                "code": code,
            }
        self.error = dict(error)
        super().__init__(message)

    @property
    def grpc_code(self) -> grpc.StatusCode:
        default = grpc.StatusCode.INVALID_ARGUMENT if self.status < 500 else grpc.StatusCode.INTERNAL
        return _GRPC_CODES.get(self.status, default)

    def to_json(self) -> dict[str, Any]:
        return {"error": self.error}

    @classmethod
    def bad_field(cls, field: str, message: str) -> GatewayError:
        return cls(400, f"{field}: {message}", param=field, code="invalid_value")

    @classmethod
    def from_exception(cls, exc: BaseException, model: str) -> GatewayError:
        """Map what a client call raised to the answer the caller gets."""
        if isinstance(exc, GatewayError):
            return exc
        if isinstance(exc, LlmRequestError):
            return cls._relayed(exc)
        if isinstance(exc, LlmError):
            if exc.timed_out:
                return cls(504, f"model {model!r}: {exc}", code="deadline_exceeded")
            return cls(503, f"model {model!r}: {exc}", code="no_replica_available")
        if isinstance(exc, TimeoutError):
            return cls(504, f"model {model!r}: the call ran past its deadline", code="deadline_exceeded")
        if isinstance(exc, ValueError):  # the client's own argument checks
            field, sep, _ = str(exc).partition(": ")
            return cls(400, str(exc), param=field if sep and " " not in field else None, code="invalid_value")
        return cls(
            500, f"model {model!r}: internal error: {type(exc).__name__}: {exc}", code="internal_error"
        )

    @classmethod
    def _relayed(cls, exc: LlmRequestError) -> GatewayError:
        """A replica's 4xx, with the replica's OpenAI error object when its body has one."""
        status = exc.status if 400 <= exc.status < 500 else 400
        error: dict[str, Any] | None = None
        try:
            data = json.loads(exc.body) if exc.body else None
        except ValueError:
            data = None
        if isinstance(data, dict):
            inner = data.get("error")
            if isinstance(inner, dict):
                error = inner
            elif isinstance(data.get("message"), str):  # vLLM's flat {"object": "error", "message", ...}
                error = {k: data.get(k) for k in ("message", "type", "param", "code")}
        if error is None or not isinstance(error.get("message"), str):
            text = exc.body.decode(errors="replace").strip()[:1000] if exc.body else str(exc)
            error = {
                "message": text,
                "type": _ERROR_TYPES.get(status, "invalid_request_error"),
                "param": None,
            }
            error["code"] = status
        return cls(
            status, f"the replica refused the request (HTTP {exc.status}): {error['message']}", error=error
        )


# -- request checks ------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool)) and math.isfinite(v)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise GatewayError.bad_field("messages", "expected a non-empty array of {role, content} objects")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise GatewayError.bad_field(where, f"expected an object, got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise GatewayError.bad_field(f"{where}.role", "expected a non-empty string")
        content = m.get("content")
        if content is not None and not isinstance(content, str | list):
            raise GatewayError.bad_field(
                f"{where}.content", f"expected a string or an array of parts, got {type(content).__name__}"
            )


def _check_prompt(prompt: Any) -> None:
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | int | list) for p in prompt):
        return
    raise GatewayError.bad_field("prompt", "expected a string or a non-empty array of strings or token ids")


def _check_sampling(body: Mapping[str, Any]) -> None:
    for name in ("max_tokens", "max_completion_tokens", "n"):
        v = body.get(name)
        if v is not None and (not _is_int(v) or v < 1):
            raise GatewayError.bad_field(name, f"expected an integer >= 1, got {v!r}")
    v = body.get("temperature")
    if v is not None and (not _is_number(v) or v < 0):
        raise GatewayError.bad_field("temperature", f"expected a number >= 0, got {v!r}")
    v = body.get("top_p")
    if v is not None and (not _is_number(v) or not 0 < v <= 1):
        raise GatewayError.bad_field("top_p", f"expected a number in (0, 1], got {v!r}")
    v = body.get("seed")
    if v is not None and not _is_int(v):
        raise GatewayError.bad_field("seed", f"expected an integer, got {v!r}")
    v = body.get("stop")
    if v is not None and not (
        isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))
    ):
        raise GatewayError.bad_field("stop", "expected a string or an array of strings")
    v = body.get("stream")
    if v is not None and not isinstance(v, bool):
        raise GatewayError.bad_field("stream", f"expected a boolean, got {v!r}")
    v = body.get("stream_options")
    if v is not None and not isinstance(v, dict):
        raise GatewayError.bad_field("stream_options", "expected an object")


def validate_body(kind: Kind, body: Any) -> tuple[str, dict[str, Any], str | None]:
    """Check an OpenAI request body; return ``(model, body to forward, session_id)``.

    The forwarded body is a copy without ``model`` (the client sets it per replica) and without
    ``session_id`` (the gateway's own field). Raises :class:`GatewayError` (400) naming the field.
    """
    if not isinstance(body, dict):
        raise GatewayError(400, "request body: expected a JSON object", code="invalid_body")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise GatewayError.bad_field("model", "expected a non-empty model name")
    try:
        llm_service_name(model)
    except ValueError as exc:
        raise GatewayError.bad_field("model", str(exc).partition(": ")[2]) from None
    if kind == "chat":
        _check_messages(body.get("messages"))
    else:
        if "prompt" not in body:
            raise GatewayError.bad_field("prompt", "required")
        _check_prompt(body["prompt"])
    _check_sampling(body)
    session_id = body.get("session_id")
    if session_id is not None and not isinstance(session_id, str):
        raise GatewayError.bad_field("session_id", "expected a string")
    forward = {k: v for k, v in body.items() if k not in ("model", "session_id")}
    return model, forward, session_id or None


def grpc_request_body(kind: Kind, request: pb.ChatRequest | pb.CompleteRequest) -> dict[str, Any]:
    """The OpenAI body of a gRPC request (checked afterwards by :func:`validate_body`)."""
    opts = request.options
    body: dict[str, Any] = {}
    if opts.extra_json:
        try:
            extra = json.loads(opts.extra_json)
        except ValueError as exc:
            raise GatewayError.bad_field("options.extra_json", f"not valid JSON: {exc}") from None
        if not isinstance(extra, dict):
            raise GatewayError.bad_field("options.extra_json", "expected a JSON object")
        for key in _STRUCTURAL:
            if key in extra:
                raise GatewayError.bad_field(
                    f"options.extra_json.{key}", "set by the request's own fields, not in extra_json"
                )
        body.update(extra)
    body["model"] = request.model
    if isinstance(request, pb.ChatRequest):
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
    else:
        body["prompt"] = request.prompt
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        if opts.HasField(name):
            body[name] = getattr(opts, name)
    if opts.stop:
        body["stop"] = list(opts.stop)
    if opts.session_id:
        body["session_id"] = opts.session_id
    return body


def _first_choice(data: Mapping[str, Any]) -> Mapping[str, Any]:
    choices = data.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    return {}


def _usage(data: Mapping[str, Any]) -> opb.TokenUsage | None:
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None
    return opb.TokenUsage(
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
    )


def _reply_text(kind: Kind, choice: Mapping[str, Any], *, delta: bool) -> str:
    if kind == "completion":
        return str(choice.get("text") or "")
    message = choice.get("delta" if delta else "message")
    return str(message.get("content") or "") if isinstance(message, dict) else ""


def _dumps(data: Any) -> str:
    # One serialisation for both protocols, so gRPC's raw_json equals the HTTP body byte for byte.
    return json.dumps(data, ensure_ascii=False)


# -- the server ----------------------------------------------------------------------------------


class GatewayServer:
    """OpenAI HTTP + gRPC in front of one :class:`LlmClient` per model.

    ``discovery`` is a :class:`Discovery` (not closed by the server) or a URL for
    :func:`agentmesh.discovery.connect` (opened and closed by the server). Port 0 picks a free port;
    after :meth:`start`, :attr:`http_port`, :attr:`grpc_port`, :attr:`http_url` and
    :attr:`grpc_address` say where the server listens. ``models`` fixes the served models (else any
    model with replicas in discovery). ``timeout_s`` is the default deadline of a call.
    """

    def __init__(
        self,
        discovery: Discovery | str,
        *,
        http_host: str = "127.0.0.1",
        http_port: int = 0,
        grpc_host: str | None = None,
        grpc_port: int = 0,
        models: Sequence[str] | None = None,
        timeout_s: float = LLM_TIMEOUT_S,
        discovery_timeout_s: float = 5.0,
        client_factory: ClientFactory | None = None,
        accounting: LlmAccounting | None = None,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s: expected > 0, got {timeout_s!r}")
        for m in models or ():
            llm_service_name(m)  # a clear error for a model name no service can hold
        self._discovery_arg = discovery
        self._discovery: Discovery | None = None
        self._cache: EndpointCache | None = None
        if not isinstance(discovery, str):
            # Usable without start() as well: the shared logic (call, call_stream) needs no sockets.
            self._discovery = discovery
            self._cache = EndpointCache(discovery)
        self.http_host = http_host
        self.http_port = http_port
        self.grpc_host = grpc_host if grpc_host is not None else http_host
        self.grpc_port = grpc_port
        self.models: tuple[str, ...] | None = tuple(models) if models else None
        self.timeout_s = timeout_s
        self.discovery_timeout_s = discovery_timeout_s
        self.accounting = accounting if accounting is not None else LlmAccounting()
        self._client_factory = client_factory or self._default_client
        self._clients: dict[str, LlmClient] = {}
        self._runner: web.AppRunner | None = None
        self._grpc: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopped = asyncio.Event()
        self._created = int(time.time())
        self._metrics_registration: Registration | None = None
        self.counts: Counter[tuple[str, str, str]] = Counter()
        """Answered requests by (protocol, route, status): ``("http", "chat", "200")``."""

    # -- properties --------------------------------------------------------------------------

    @property
    def http_url(self) -> str:
        host = f"[{self.http_host}]" if ":" in self.http_host else self.http_host
        return f"http://{host}:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        host = f"[{self.grpc_host}]" if ":" in self.grpc_host else self.grpc_host
        return f"{host}:{self.grpc_port}"

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _default_client(self, model: str, cache: EndpointCache, accounting: LlmAccounting) -> LlmClient:
        return LlmClient(model, cache, timeout_s=self.timeout_s, accounting=accounting)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to discovery and serve HTTP and gRPC. On failure everything started is stopped."""
        if self._runner is not None:
            return
        try:
            if self._discovery is None:
                self._discovery = connect(str(self._discovery_arg))
            if self._cache is None:
                self._cache = EndpointCache(self._discovery)
            await self._start_http()
            await self._start_grpc()
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
            await self._register_metrics()
            for model in self.models or ():
                # Watch the configured models now, so that /v1/models counts their replicas.
                with contextlib.suppress(DiscoveryError):
                    await self._cache.subscribe(llm_service_name(model), timeout_s=self.discovery_timeout_s)
        except BaseException:
            await self.stop()
            raise
        log.info("LLM gateway serving HTTP on %s and gRPC on %s", self.http_url, self.grpc_address)

    async def _start_http(self) -> None:
        app = web.Application(client_max_size=_MAX_BODY_BYTES, middlewares=[self._json_errors])
        app.router.add_post("/v1/chat/completions", self._http_chat)
        app.router.add_post("/v1/completions", self._http_completion)
        app.router.add_get("/v1/models", self._http_models)
        app.router.add_get("/health", self._http_health)
        app.router.add_get("/metrics", self._http_metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, self.http_host, self.http_port, backlog=4096, reuse_address=True)
        await site.start()
        self.http_port = int(runner.addresses[0][1])

    async def _register_metrics(self) -> None:
        """Put ``/metrics`` in discovery for Prometheus (a store that refuses only costs the entry)."""
        from agentmesh.metrics import METRICS_SERVICE

        assert self._discovery is not None
        address = self.http_url.removeprefix("http://")
        try:
            self._metrics_registration = await self._discovery.register(
                Endpoint(
                    METRICS_SERVICE,
                    f"llm-gateway-{address}".replace(":", "-").replace("[", "").replace("]", "").lower(),
                    address,
                    {"job": "llm-gateway"},
                )
            )
        except DiscoveryError as exc:
            log.warning("LLM gateway: /metrics not registered in discovery: %s", exc)

    async def _start_grpc(self) -> None:
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", _MAX_BODY_BYTES),
                ("grpc.max_send_message_length", _MAX_BODY_BYTES),
            ],
            interceptors=server_interceptors(),
        )
        pb_grpc.add_LlmGatewayServicer_to_server(_Servicer(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                GRPC_SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        port = server.add_insecure_port(f"{self.grpc_address.rsplit(':', 1)[0]}:{self.grpc_port}")
        if port == 0:
            raise AgentMeshError(f"gRPC: cannot listen on {self.grpc_address}")
        self._grpc = server
        await server.start()
        self.grpc_port = port

    async def _set_health(self, status: int) -> None:
        for name in ("", GRPC_SERVICE_NAME):
            await self._health.set(name, status)

    async def drain(self, grace_s: float = 30.0) -> None:
        """Stop taking requests (health NOT_SERVING, 503/UNAVAILABLE), let those in flight finish
        within ``grace_s``, then stop."""
        if not self._draining:
            self._draining = True
            log.info("LLM gateway draining (%d requests in flight)", self._in_flight)
            await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = time.monotonic() + grace_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace_s)
        await self.stop(grace_s=max(0.0, deadline - time.monotonic()))

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop both servers (requests still running get ``grace_s``), close clients. Idempotent."""
        self._draining = True
        registration, self._metrics_registration = self._metrics_registration, None
        if registration is not None:
            with contextlib.suppress(Exception):
                await registration.close()
        grpc_server, self._grpc = self._grpc, None
        if grpc_server is not None:
            await grpc_server.stop(grace_s)
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
        cache, self._cache = self._cache, None
        if cache is not None:
            await cache.close()
        if self._discovery is not None and isinstance(self._discovery_arg, str):
            with contextlib.suppress(Exception):
                await self._discovery.close()
        self._discovery = None
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def __aenter__(self) -> GatewayServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the shared logic --------------------------------------------------------------------

    @contextlib.contextmanager
    def _admit(self) -> Iterator[None]:
        """Count a request in flight for the drain; refuse it while draining."""
        if self._draining:
            raise GatewayError(503, "the gateway is draining; retry on another one", code="draining")
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _client(self, model: str) -> LlmClient:
        client = self._clients.get(model)
        if client is not None:
            return client
        if self._discovery is None or self._cache is None:
            raise GatewayError(503, "the gateway is not running", code="not_running")
        service = llm_service_name(model)
        if self.models is not None:
            if model not in self.models:
                raise GatewayError(
                    404,
                    f"model {model!r} is not served here (models: {list(self.models)})",
                    param="model",
                    code="model_not_found",
                )
        else:
            # One read, no watch: a caller naming random models must not leave a watch per name.
            try:
                eps = await asyncio.wait_for(self._discovery.snapshot(service), self.discovery_timeout_s)
            except (DiscoveryError, TimeoutError) as exc:
                raise GatewayError(
                    503, f"model {model!r}: discovery has no answer: {exc}", code="discovery_unavailable"
                ) from None
            if not eps:
                raise GatewayError(
                    404,
                    f"model {model!r} has no replica registered (discovery service {service!r})",
                    param="model",
                    code="model_not_found",
                )
        client = self._clients.get(model)  # another request may have made it during the await
        if client is None:
            client = self._clients[model] = self._client_factory(model, self._cache, self.accounting)
        return client

    def _timeout(self, *limits: float | None) -> float:
        """The call's deadline in seconds: the default, shortened by the caller's limits."""
        timeout = min([self.timeout_s, *(x for x in limits if x is not None)])
        if timeout <= 0:
            raise GatewayError(504, "the request's deadline has already passed", code="deadline_exceeded")
        return timeout

    async def call(
        self, kind: Kind, body: Any, *, session_id: str | None = None, timeout_s: float | None = None
    ) -> tuple[dict[str, Any], str]:
        """Check ``body``, send it to a replica; return ``(the replica's JSON, replica id)``.
        Raises :class:`GatewayError` for every failure."""
        model, forward, body_session = validate_body(kind, body)
        forward.pop("stream", None)
        forward.pop("stream_options", None)
        timeout = self._timeout(timeout_s)
        try:
            client = await self._client(model)
            async with asyncio.timeout(timeout + _DEADLINE_SLACK_S):
                reply = await client.send(
                    _PATHS[kind], forward, session_id=session_id or body_session, timeout_s=timeout
                )
        except Exception as exc:
            raise GatewayError.from_exception(exc, model) from exc
        return reply.data, reply.replica_id

    async def call_stream(
        self,
        kind: Kind,
        body: Any,
        *,
        session_id: str | None = None,
        timeout_s: float | None = None,
        info: dict[str, Any] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Like :meth:`call` with ``stream: true``: the events' JSON objects. The first is awaited
        here, so that a call that fails before anything was streamed raises :class:`GatewayError`
        from this coroutine (and the caller can still answer with a status). ``info`` receives
        ``replica_id`` once the first event is in (see :meth:`LlmClient.stream`)."""
        model, forward, body_session = validate_body(kind, body)
        forward["stream"] = True
        timeout = self._timeout(timeout_s)
        deadline = asyncio.get_running_loop().time() + timeout + _DEADLINE_SLACK_S
        try:
            client = await self._client(model)
            events = client.stream(
                _PATHS[kind], forward, session_id=session_id or body_session, timeout_s=timeout, info=info
            )
            async with asyncio.timeout_at(deadline):
                first = await anext(events)
        except StopAsyncIteration:
            return _empty()
        except Exception as exc:
            raise GatewayError.from_exception(exc, model) from exc
        return self._rest(events, first, model, deadline)

    @staticmethod
    async def _rest(
        events: AsyncIterator[dict[str, Any]], first: dict[str, Any], model: str, deadline: float
    ) -> AsyncIterator[dict[str, Any]]:
        try:
            yield first
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        event = await anext(events)
                except StopAsyncIteration:
                    return
                except Exception as exc:
                    raise GatewayError.from_exception(exc, model) from exc
                yield event
        finally:
            await _aclose(events)

    def models_payload(self) -> dict[str, Any]:
        """The ``/v1/models`` list: configured models, or those asked for so far, with live replicas."""
        names = sorted(set(self.models or ()) | set(self._clients))
        cache = self._cache
        data = []
        for name in names:
            replicas = len(cache.get(llm_service_name(name))) if cache is not None else 0
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": self._created,
                    "owned_by": "agentmesh",
                    "replicas": replicas,
                }
            )
        return {"object": "list", "data": data}

    def metrics_text(self) -> str:
        """Prometheus text: the clients' per-replica accounting, then the server's own counters."""
        out = [self.accounting.prometheus_text().rstrip("\n")]
        out.append("# HELP agentmesh_gateway_requests_total Requests answered by the gateway server.")
        out.append("# TYPE agentmesh_gateway_requests_total counter")
        for (proto, route, status), n in sorted(self.counts.items()):
            labels = f'protocol="{proto}",route="{route}",status="{status}"'
            out.append(f"agentmesh_gateway_requests_total{{{labels}}} {n}")
        out.append("# HELP agentmesh_gateway_in_flight Requests being served now.")
        out.append("# TYPE agentmesh_gateway_in_flight gauge")
        out.append(f"agentmesh_gateway_in_flight {self._in_flight}")
        out.append("# HELP agentmesh_gateway_draining 1 while the gateway drains.")
        out.append("# TYPE agentmesh_gateway_draining gauge")
        out.append(f"agentmesh_gateway_draining {int(self._draining)}")
        return "\n".join(out) + "\n"

    # -- HTTP --------------------------------------------------------------------------------

    @web.middleware
    async def _json_errors(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        """Every error answer is OpenAI-shaped JSON, aiohttp's own (404 route, 405, 413) included."""
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except GatewayError as exc:
            return self._http_error(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return self._http_error(
                GatewayError(exc.status, f"{request.method} {request.path}: {exc.reason}")
            )
        except Exception as exc:
            log.exception("LLM gateway: unexpected error on %s %s", request.method, request.path)
            return self._http_error(GatewayError(500, f"internal error: {type(exc).__name__}: {exc}"))

    @staticmethod
    def _http_error(err: GatewayError) -> web.Response:
        headers = {"Retry-After": "1"} if err.status == 503 else None
        return web.json_response(err.to_json(), status=err.status, headers=headers, dumps=_dumps)

    async def _http_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._http_generate(request, "chat")

    async def _http_completion(self, request: web.Request) -> web.StreamResponse:
        return await self._http_generate(request, "completion")

    async def _http_generate(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        status = "500"
        try:
            with self._admit():
                try:
                    body = await request.json()
                except (ValueError, UnicodeDecodeError):
                    raise GatewayError(400, "request body: not valid JSON", code="invalid_json") from None
                session_id = request.headers.get(_SESSION_HEADER) or None
                timeout_s = _header_timeout(request)
                if isinstance(body, dict) and body.get("stream") is True:
                    info: dict[str, Any] = {}
                    events = await self.call_stream(
                        kind, body, session_id=session_id, timeout_s=timeout_s, info=info
                    )
                    status = "200"
                    return await self._http_sse(request, events, str(info.get("replica_id", "")))
                data, replica_id = await self.call(kind, body, session_id=session_id, timeout_s=timeout_s)
                status = "200"
                return web.Response(
                    text=_dumps(data), content_type="application/json", headers={_REPLICA_HEADER: replica_id}
                )
        except GatewayError as exc:
            status = str(exc.status)
            raise
        finally:
            self.counts[("http", kind, status)] += 1

    async def _http_sse(
        self, request: web.Request, events: AsyncIterator[dict[str, Any]], replica_id: str = ""
    ) -> web.StreamResponse:
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        if replica_id:
            headers[_REPLICA_HEADER] = replica_id
        resp = web.StreamResponse(status=200, headers=headers)
        await resp.prepare(request)
        try:
            async for event in events:
                await resp.write(f"data: {_dumps(event)}\n\n".encode())
        except GatewayError as exc:
            # Headers are gone: the failure goes in the stream, as OpenAI's servers do it.
            await resp.write(f"data: {_dumps(exc.to_json())}\n\n".encode())
            await resp.write_eof()
            return resp
        except ConnectionResetError:
            return resp  # the caller left; closing the events stops the replica's stream
        finally:
            await _aclose(events)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _http_models(self, request: web.Request) -> web.Response:
        self.counts[("http", "models", "200")] += 1
        return web.Response(text=_dumps(self.models_payload()), content_type="application/json")

    async def _http_health(self, request: web.Request) -> web.Response:
        if self._draining:
            return web.json_response({"status": "draining"}, status=503)
        return web.json_response({"status": "ok"})

    async def _http_metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics_text(), content_type="text/plain", charset="utf-8")

    # -- gRPC --------------------------------------------------------------------------------

    def _grpc_timeout(self, request: pb.ChatRequest | pb.CompleteRequest, context: Any) -> float | None:
        limits: list[float] = []
        remaining = context.time_remaining()
        if remaining is not None:
            limits.append(remaining)
        if request.options.deadline_unix_ms:
            limits.append(request.options.deadline_unix_ms / 1000 - time.time())
        return min(limits) if limits else None

    async def grpc_unary(
        self, kind: Kind, request: pb.ChatRequest | pb.CompleteRequest, context: grpc.aio.ServicerContext
    ) -> pb.LlmReply:
        try:
            with self._admit():
                body = grpc_request_body(kind, request)
                data, replica_id = await self.call(kind, body, timeout_s=self._grpc_timeout(request, context))
        except GatewayError as exc:
            self.counts[("grpc", kind, exc.grpc_code.name)] += 1
            await context.abort(exc.grpc_code, exc.message)
            raise  # abort raises; this line only tells type checkers so
        self.counts[("grpc", kind, "OK")] += 1
        choice = _first_choice(data)
        return pb.LlmReply(
            text=_reply_text(kind, choice, delta=False),
            finish_reason=str(choice.get("finish_reason") or ""),
            usage=_usage(data),
            replica_id=replica_id,
            model=str(data.get("model") or request.model),
            raw_json=_dumps(data),
        )

    async def grpc_stream(
        self, kind: Kind, request: pb.ChatRequest | pb.CompleteRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.LlmChunk]:
        error: GatewayError | None = None
        try:
            with self._admit():
                body = grpc_request_body(kind, request)
                info: dict[str, Any] = {}
                events = await self.call_stream(
                    kind, body, timeout_s=self._grpc_timeout(request, context), info=info
                )
                try:
                    async for event in events:
                        choice = _first_choice(event)
                        yield pb.LlmChunk(
                            text=_reply_text(kind, choice, delta=True),
                            finish_reason=str(choice.get("finish_reason") or ""),
                            usage=_usage(event),
                            replica_id=str(info.get("replica_id", "")),
                            raw_json=_dumps(event),
                        )
                finally:
                    await _aclose(events)
        except GatewayError as exc:
            error = exc
        if error is not None:
            self.counts[("grpc", f"{kind}_stream", error.grpc_code.name)] += 1
            await context.abort(error.grpc_code, error.message)
        self.counts[("grpc", f"{kind}_stream", "OK")] += 1

    async def grpc_models(self) -> pb.ListModelsReply:
        payload = self.models_payload()
        self.counts[("grpc", "models", "OK")] += 1
        return pb.ListModelsReply(
            models=[pb.ModelInfo(id=m["id"], replicas=m["replicas"]) for m in payload["data"]],
            raw_json=_dumps(payload),
        )


async def _aclose(events: AsyncIterator[Any]) -> None:
    """Close an event iterator early (the caller left): the client then drops the replica's stream."""
    close = getattr(events, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


async def _empty() -> AsyncIterator[dict[str, Any]]:
    return
    yield  # an async generator that yields nothing


def _header_timeout(request: web.Request) -> float | None:
    raw = request.headers.get(_TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value > 0 or not math.isfinite(value):
        raise GatewayError(
            400,
            f"{_TIMEOUT_HEADER}: expected a positive number of seconds, got {raw!r}",
            param=_TIMEOUT_HEADER,
            code="invalid_value",
        )
    return value


class _Servicer(pb_grpc.LlmGatewayServicer):
    """The gRPC service: each method hands over to the server's shared logic."""

    def __init__(self, server: GatewayServer) -> None:
        self._server = server

    async def Chat(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext) -> pb.LlmReply:
        return await self._server.grpc_unary("chat", request, context)

    async def Complete(self, request: pb.CompleteRequest, context: grpc.aio.ServicerContext) -> pb.LlmReply:
        return await self._server.grpc_unary("completion", request, context)

    async def ChatStream(
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.LlmChunk]:
        async for chunk in self._server.grpc_stream("chat", request, context):
            yield chunk

    async def CompleteStream(
        self, request: pb.CompleteRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.LlmChunk]:
        async for chunk in self._server.grpc_stream("completion", request, context):
            yield chunk

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsReply:
        return await self._server.grpc_models()


# -- command line --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, *, with_discovery: bool = True) -> None:
    """The gateway's options (shared with ``agentmesh llm gateway``, which adds its own
    ``--discovery`` defaulting to the cluster's: ``with_discovery=False``)."""
    if with_discovery:
        parser.add_argument(
            "--discovery", required=True, help="discovery URL: etcd://HOST:PORT, consul://HOST:PORT"
        )
    parser.add_argument("--http-host", default="127.0.0.1", help="HTTP bind address (default %(default)s)")
    parser.add_argument(
        "--http-port", type=int, default=8000, help="HTTP port, 0 for any (default %(default)s)"
    )
    parser.add_argument("--grpc-host", default=None, help="gRPC bind address (default: the HTTP one)")
    parser.add_argument(
        "--grpc-port", type=int, default=50061, help="gRPC port, 0 for any (default %(default)s)"
    )
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        default=None,
        help="serve only this model (repeatable); default: any model with replicas in discovery",
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=LLM_TIMEOUT_S,
        help="default deadline of a call (default %(default)s)",
    )
    parser.add_argument(
        "--drain-grace-s",
        type=float,
        default=30.0,
        help="on SIGTERM, how long requests in flight may take to finish (default %(default)s)",
    )


async def serve(ns: argparse.Namespace, *, ready: Callable[[GatewayServer], None] | None = None) -> int:
    """Run a gateway from parsed :func:`add_arguments` options until SIGTERM/SIGINT, then drain."""
    server = GatewayServer(
        ns.discovery,
        http_host=ns.http_host,
        http_port=ns.http_port,
        grpc_host=ns.grpc_host,
        grpc_port=ns.grpc_port,
        models=ns.models,
        timeout_s=ns.timeout_s,
    )
    await server.start()
    loop = asyncio.get_running_loop()
    drains: list[asyncio.Task[None]] = []

    def on_signal() -> None:
        if not drains:
            drains.append(loop.create_task(server.drain(ns.drain_grace_s)))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        if ready is not None:
            ready(server)
        else:
            print(f"GATEWAY_READY http={server.http_url} grpc={server.grpc_address}", flush=True)
        await server.wait_stopped()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agentmesh.llm_gateway.server",
        description="The agentmesh LLM gateway server: OpenAI-compatible HTTP and gRPC over the replicas "
        "of each model found in discovery.",
    )
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if ns.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return asyncio.run(serve(ns))
    except (AgentMeshError, ValueError, OSError) as exc:
        print(f"llm gateway: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
