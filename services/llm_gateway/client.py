"""The LLM gateway as a client library: call a model's replicas directly, balanced on the client.

An agent holds one :class:`LlmClient` per model; there is no proxy hop. Replicas of model ``M``
register in discovery as service ``llm.<M sanitized>`` (:func:`llm_service_name`); the client's
:class:`~agentmesh.llm_gateway.balancer.ReplicaBalancer` holds their states, fed by the discovery
watch of an :class:`~agentmesh.discovery.EndpointCache` (nothing goes to the discovery store per
request). Each call:

1. takes a replica from the balancer: power of two random choices on in-flight counts (plus the
   replica's own reported queue while fresh), avoiding replicas it already tried, or the session's
   replica under affinity; it waits in the client, in arrival order, if none can take it now;
2. sends the OpenAI-compatible request the replica's :mod:`~agentmesh.llm_gateway.providers`
   entry describes (vLLM, the simulator, OpenAI, Azure OpenAI, Gemini);
3. on a refused connection (replica dead), a broken one or a timeout (unavailable), 429 or 5xx
   (held out of the choice for its ``Retry-After`` or a backoff) retries on another replica, up
   to ``max_attempts`` and within the call's deadline;
4. raises :class:`~agentmesh.errors.LlmError` when it gives up, and
   :class:`~agentmesh.errors.LlmRequestError` at once on another 4xx (a bad request fails the
   same way everywhere).

Calls: :meth:`LlmClient.chat` / :meth:`~LlmClient.complete` (typed, for roles),
:meth:`~LlmClient.send` / :meth:`~LlmClient.stream` (raw OpenAI bodies, for the gateway server).
A stream is retried only until its first event; after that a failure raises.

Every attempt is accounted (:class:`~agentmesh.llm_gateway.accounting.LlmAccounting`: tokens in and
out, latency, time to first token, errors by kind, per replica). Every call is an OpenTelemetry
span (``llm.chat`` / ``llm.complete`` / ``llm.send`` / ``llm.stream``) in the caller's trace, and the
W3C trace context goes to the replica in HTTP headers.

The HTTP transport is injectable (:class:`LlmTransport`): production uses :class:`AiohttpTransport`
(one pooled session per client), unit tests a fake with no sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from opentelemetry import propagate, trace

from agentmesh.discovery.base import Endpoint, EndpointCache
from agentmesh.errors import AgentMeshError, DiscoveryError, LlmError, LlmRequestError
from agentmesh.llm_gateway.accounting import LlmAccounting
from agentmesh.llm_gateway.balancer import (
    Policy,
    ProbeFailed,
    ProbeResult,
    ReplicaBalancer,
    ReplicaGone,
    ReplicaState,
)
from agentmesh.llm_gateway.constants import (
    LLM_BACKOFF_INITIAL_S,
    LLM_BACKOFF_MAX_S,
    LLM_CONNECT_TIMEOUT_S,
    LLM_CONNECTOR_LIMIT,
    LLM_ENDPOINT_WAIT_S,
    LLM_KEEPALIVE_S,
    LLM_MAX_ATTEMPTS,
    LLM_SERVICE_PREFIX,
    LLM_TIMEOUT_S,
)
from agentmesh.llm_gateway.providers import provider_for

__all__ = [
    "AiohttpTransport",
    "AttemptTimeout",
    "ChatResult",
    "LlmClient",
    "LlmTransport",
    "RawReply",
    "ReplicaStats",
    "ReplicaUnreachable",
    "StreamReply",
    "TransportError",
    "TransportResponse",
    "llm_service_name",
    "parse_queue_metrics",
]

log = logging.getLogger(__name__)

_SANITIZE_RE = re.compile(r"[^a-z0-9._-]+")
_REJECT_STATUSES = frozenset({408, 429})
_RETRY_AFTER_MAX_S = 60.0


def llm_service_name(model: str) -> str:
    """The discovery service of ``model``'s replicas: ``llm.`` + the name lowercased, with every
    run of characters outside ``[a-z0-9._-]`` replaced by ``-`` (``Org/Model-7B`` -> ``llm.org-model-7b``).
    """
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model: expected a non-empty model name, got {model!r}")
    name = _SANITIZE_RE.sub("-", model.strip().lower()).strip("-._")
    if not name:
        raise ValueError(f"model: {model!r} has no characters usable in a service name")
    return LLM_SERVICE_PREFIX + name[:190]


# -- transport ---------------------------------------------------------------------------------


class TransportError(AgentMeshError):
    """A replica did not answer (the connection broke). The client retries it elsewhere; callers
    of :class:`LlmClient` only ever see :class:`LlmError`."""


class ReplicaUnreachable(TransportError):
    """No connection could be made (refused, no route): nothing serves at that address."""


class AttemptTimeout(TransportError):
    """No (complete) answer within the attempt's time."""


@dataclass(frozen=True, slots=True)
class TransportResponse:
    """An HTTP answer: status, raw body, headers (names lowercased)."""

    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


class StreamReply(Protocol):
    """An HTTP answer being received: status and headers now, the body line by line."""

    status: int
    headers: Mapping[str, str]

    async def read(self) -> bytes: ...

    def lines(self) -> AsyncIterator[bytes]: ...

    async def close(self) -> None: ...


class LlmTransport(Protocol):
    """Sends requests. Raises :class:`TransportError` (or a subclass) when no HTTP answer came back."""

    async def post_json(
        self, url: str, payload: Mapping[str, Any], *, headers: Mapping[str, str], timeout_s: float
    ) -> TransportResponse: ...

    async def get(self, url: str, *, timeout_s: float) -> TransportResponse: ...

    async def open_stream(
        self, url: str, payload: Mapping[str, Any], *, headers: Mapping[str, str], timeout_s: float
    ) -> StreamReply: ...

    async def close(self) -> None: ...


def _transport_error(exc: BaseException) -> TransportError:
    if isinstance(exc, TimeoutError):
        return AttemptTimeout(f"no answer in time ({type(exc).__name__})")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ReplicaUnreachable(f"{type(exc).__name__}: {exc}")
    return TransportError(f"{type(exc).__name__}: {exc}")


class _AiohttpStream:
    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers: Mapping[str, str] = {k.lower(): v for k, v in resp.headers.items()}

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _transport_error(exc) from exc

    async def lines(self) -> AsyncIterator[bytes]:
        try:
            async for line in self._resp.content:
                yield line
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _transport_error(exc) from exc

    async def close(self) -> None:
        self._resp.release()


class AiohttpTransport:
    """One pooled :class:`aiohttp.ClientSession`, created on first use (it needs a running loop)."""

    def __init__(
        self,
        *,
        connector_limit: int = LLM_CONNECTOR_LIMIT,
        connect_timeout_s: float = LLM_CONNECT_TIMEOUT_S,
        keepalive_s: float = LLM_KEEPALIVE_S,
    ) -> None:
        self._connector_limit = connector_limit
        self._connect_timeout_s = connect_timeout_s
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None
        self._fresh_session: aiohttp.ClientSession | None = None  # never pools: resends only

    def _get_session(self, *, fresh: bool = False) -> aiohttp.ClientSession:
        if fresh:
            if self._fresh_session is None or self._fresh_session.closed:
                connector = aiohttp.TCPConnector(limit=self._connector_limit, force_close=True)
                self._fresh_session = aiohttp.ClientSession(connector=connector)
            return self._fresh_session
        if self._session is None or self._session.closed:
            # limit_per_host=0: all replicas of a model may sit on one host (CPU tests, simulators).
            connector = aiohttp.TCPConnector(
                limit=self._connector_limit, limit_per_host=0, keepalive_timeout=self._keepalive_s
            )
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def _post(
        self, url: str, data: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> aiohttp.ClientResponse:
        """POST and wait for the answer's status and headers.

        A pooled connection the server closes just as we reuse it (its keep-alive timer fired: vLLM's
        uvicorn closes after 5 s idle) fails the request with "server disconnected" or "connection
        reset" before any answer began, so the server never ran it: it is sent once more, on a new
        connection (not another pooled one: those went idle together and may be closing too). aiohttp
        does this itself only for idempotent methods; a completion POST is safe to resend. A replica
        that died fails the second try too (refused: :class:`ReplicaUnreachable`).
        """
        try:
            return await self._get_session().post(
                url, data=data, headers=headers, timeout=self._timeout(timeout_s)
            )
        except aiohttp.ClientConnectorError:
            raise
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            log.debug("resending to %s on a new connection: %s: %s", url, type(exc).__name__, exc)
        return await self._get_session(fresh=True).post(
            url, data=data, headers=headers, timeout=self._timeout(timeout_s)
        )

    def _timeout(self, timeout_s: float) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(self._connect_timeout_s, timeout_s))

    async def post_json(
        self, url: str, payload: Mapping[str, Any], *, headers: Mapping[str, str], timeout_s: float
    ) -> TransportResponse:
        data = json.dumps(payload).encode()
        hdrs = {"Content-Type": "application/json", **headers}
        try:
            async with await self._post(url, data, hdrs, timeout_s) as resp:
                body = await resp.read()
                return TransportResponse(resp.status, body, {k.lower(): v for k, v in resp.headers.items()})
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _transport_error(exc) from exc

    async def get(self, url: str, *, timeout_s: float) -> TransportResponse:
        try:
            async with self._get_session().get(url, timeout=self._timeout(timeout_s)) as resp:
                body = await resp.read()
                return TransportResponse(resp.status, body, {k.lower(): v for k, v in resp.headers.items()})
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _transport_error(exc) from exc

    async def open_stream(
        self, url: str, payload: Mapping[str, Any], *, headers: Mapping[str, str], timeout_s: float
    ) -> StreamReply:
        data = json.dumps(payload).encode()
        hdrs = {"Content-Type": "application/json", "Accept": "text/event-stream", **headers}
        try:
            resp = await self._post(url, data, hdrs, timeout_s)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _transport_error(exc) from exc
        return _AiohttpStream(resp)

    async def close(self) -> None:
        for session in (self._session, self._fresh_session):
            if session is not None:
                await session.close()
        self._session = self._fresh_session = None


# -- results and per-replica state ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChatResult:
    """The answer of one :meth:`LlmClient.chat` / :meth:`LlmClient.complete` call."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    replica_id: str
    """The discovery id of the replica that answered."""
    latency_s: float
    """Wall time of the whole call, retries included."""
    model: str
    finish_reason: str | None = None
    attempts: int = 1
    ttft_s: float | None = None
    """Time to the first token of the answering attempt (streamed calls only)."""


@dataclass(frozen=True, slots=True)
class RawReply:
    """The answer of one :meth:`LlmClient.send`: the replica's JSON object, as it came."""

    data: dict[str, Any]
    replica_id: str
    latency_s: float
    attempts: int


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    """What this client knows about one replica (a copy, for metrics and tests)."""

    in_flight: int
    completed: int
    failures: int
    consecutive_failures: int
    last_failure_at: float | None
    dead: bool
    held_until: float
    reported_running: int | None
    reported_waiting: int | None


class _Retryable(Exception):
    """An attempt failed in a way worth retrying on another replica."""

    def __init__(self, message: str, kind: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after_s = retry_after_s


_QUEUE_RE = re.compile(rb"^vllm:num_requests_(running|waiting)(?:\{[^}]*\})?\s+([0-9.eE+-]+)", re.MULTILINE)


def parse_queue_metrics(text: bytes) -> ProbeResult:
    """Running and waiting requests from a vLLM-style ``/metrics`` body (summed over label sets)."""
    running = waiting = 0.0
    found = False
    for m in _QUEUE_RE.finditer(text):
        found = True
        value = float(m.group(2))
        if m.group(1) == b"running":
            running += value
        else:
            waiting += value
    if not found:
        raise ProbeFailed("no vllm:num_requests_running/waiting in the replica's /metrics")
    return ProbeResult(int(running), int(waiting))


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        value = when.timestamp() - time.time()
    return min(max(0.0, value), _RETRY_AFTER_MAX_S)


# -- the client ----------------------------------------------------------------------------------


class LlmClient:
    """Client-side load-balanced calls to the replicas of one model.

    ``endpoints`` is the process's shared :class:`EndpointCache`; the client subscribes to the
    model's service on first use. Use as ``async with LlmClient(...) as client`` or call
    :meth:`close`. Not thread-safe: use it from one event loop.

    ``policy`` is ``"p2c"`` (power of two choices, the default) or ``"random"`` (the baseline);
    ``max_in_flight_per_replica`` makes calls wait in the client beyond that many outstanding
    requests per replica (None: the replicas queue). ``measure_ttft`` makes :meth:`chat` and
    :meth:`complete` stream internally so that time to first token is measured and accounted.
    ``accounting`` may be shared by many clients (one per process is typical).
    """

    def __init__(
        self,
        model: str,
        endpoints: EndpointCache,
        *,
        timeout_s: float = LLM_TIMEOUT_S,
        max_attempts: int = LLM_MAX_ATTEMPTS,
        backoff_initial_s: float = LLM_BACKOFF_INITIAL_S,
        backoff_max_s: float = LLM_BACKOFF_MAX_S,
        endpoint_wait_s: float = LLM_ENDPOINT_WAIT_S,
        policy: Policy = "p2c",
        max_in_flight_per_replica: int | None = None,
        measure_ttft: bool = False,
        probe_load: bool = True,
        accounting: LlmAccounting | None = None,
        transport: LlmTransport | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        tracer_provider: trace.TracerProvider | None = None,
        balancer_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.service = llm_service_name(model)
        if not timeout_s > 0:
            raise ValueError(f"timeout_s: expected > 0, got {timeout_s!r}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts: expected >= 1, got {max_attempts!r}")
        self.model = model
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.endpoint_wait_s = endpoint_wait_s
        self.measure_ttft = measure_ttft
        self.accounting = accounting if accounting is not None else LlmAccounting()
        self._endpoints = endpoints
        self._transport: LlmTransport = transport if transport is not None else AiohttpTransport()
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self._balancer = ReplicaBalancer(
            policy=policy,
            max_in_flight_per_replica=max_in_flight_per_replica,
            probe=self._probe if probe_load else None,
            can_probe=lambda ep: provider_for(ep).probe_url(ep) is not None,
            rng=self._rng,
            clock=clock,
            **dict(balancer_options or {}),
        )
        self._subscribed = False
        self._closed = False
        # None: the global provider, looked up lazily (set it before or after building the client).
        self._tracer = trace.get_tracer("agentmesh", tracer_provider=tracer_provider)
        endpoints.add_listener(self._on_endpoints)
        current = endpoints.get(self.service)
        if current:
            self._balancer.set_endpoints(current)

    async def __aenter__(self) -> LlmClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._endpoints.remove_listener(self._on_endpoints)
        await self._balancer.close()
        await self._transport.close()

    @property
    def policy(self) -> Policy:
        return self._balancer.policy

    # -- typed calls -----------------------------------------------------------------------------

    async def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        session_id: str | None = None,
        timeout_s: float | None = None,
    ) -> ChatResult:
        """One chat completion. ``messages`` are OpenAI-style ``{"role": ..., "content": ...}``.

        ``session_id`` (optional) sends the calls of one conversation to the same replica while it
        is usable (prefix-cache reuse); retries still go elsewhere.
        """
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages: expected a non-empty list of {'role', 'content'} dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}]: expected a dict with 'role' and 'content', got {m!r}")
        body = self._sampling_body(max_tokens, temperature, seed, stop)
        body["messages"] = messages
        return await self._typed("llm.chat", "/v1/chat/completions", body, session_id, timeout_s)

    async def complete(
        self,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        session_id: str | None = None,
        timeout_s: float | None = None,
    ) -> ChatResult:
        """One plain text completion of ``prompt``."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt: expected a string, got {type(prompt).__name__}")
        body = self._sampling_body(max_tokens, temperature, seed, stop)
        body["prompt"] = prompt
        return await self._typed("llm.complete", "/v1/completions", body, session_id, timeout_s)

    async def _typed(
        self, span: str, path: str, body: dict[str, Any], session_id: str | None, timeout_s: float | None
    ) -> ChatResult:
        chat = path.endswith("/chat/completions")
        t0 = self._clock()
        if not self.measure_ttft:
            reply = await self._send(span, path, body, session_id, timeout_s)
            # _send has checked that the reply has a first choice.
            text, finish = _chat_text(reply.data) if chat else _completion_text(reply.data)
            usage = reply.data.get("usage") or {}
            return ChatResult(
                text=text,
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                replica_id=reply.replica_id,
                latency_s=reply.latency_s,
                model=str(reply.data.get("model") or self.model),
                finish_reason=finish,
                attempts=reply.attempts,
            )
        parts: list[str] = []
        finish = None
        model = self.model
        info: dict[str, Any] = {}
        async for event in self._stream(span, path, body, session_id, timeout_s, info=info):
            model = str(event.get("model") or model)
            for choice in event.get("choices") or ():
                if not isinstance(choice, dict):
                    continue
                piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                if piece:
                    parts.append(str(piece))
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
        usage = info.get("usage") or {}
        return ChatResult(
            text="".join(parts),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            replica_id=str(info.get("replica_id", "")),
            latency_s=self._clock() - t0,
            model=model,
            finish_reason=finish,
            attempts=int(info.get("attempts", 1)),
            ttft_s=info.get("ttft_s"),
        )

    # -- raw calls -------------------------------------------------------------------------------

    async def send(
        self,
        path: str,
        body: Mapping[str, Any],
        *,
        session_id: str | None = None,
        timeout_s: float | None = None,
    ) -> RawReply:
        """Send an OpenAI request body as is (the model name set per replica); return the JSON."""
        return await self._send("llm.send", path, dict(body), session_id, timeout_s)

    def stream(
        self,
        path: str,
        body: Mapping[str, Any],
        *,
        session_id: str | None = None,
        timeout_s: float | None = None,
        info: dict[str, Any] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Send an OpenAI request body with ``stream: true``; yield each event's JSON object.

        Retried on another replica only until the first event arrived. The replica is asked for
        usage (``stream_options.include_usage``) for the accounting; the usage-only event is
        passed on only if the caller asked for it too. ``info`` (optional) is filled in as the
        stream goes: ``replica_id`` and ``ttft_s`` once the first event arrived, then ``attempts``
        and ``usage`` at the end.
        """
        return self._stream(
            "llm.stream", path, dict(body), session_id, timeout_s, info=info if info is not None else {}
        )

    def stats(self) -> dict[str, ReplicaStats]:
        """What the client knows per replica, by replica id."""
        return {
            rid: ReplicaStats(
                in_flight=st.in_flight,
                completed=st.completed,
                failures=st.failures,
                consecutive_failures=st.consecutive_failures,
                last_failure_at=st.last_failure_at,
                dead=st.dead,
                held_until=st.held_until,
                reported_running=st.reported.running if st.reported else None,
                reported_waiting=st.reported.waiting if st.reported else None,
            )
            for rid, st in self._balancer.states().items()
        }

    # -- internals -------------------------------------------------------------------------------

    @staticmethod
    def _sampling_body(
        max_tokens: int, temperature: float, seed: int | None, stop: str | Sequence[str] | None
    ) -> dict[str, Any]:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"max_tokens: expected an integer >= 1, got {max_tokens!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature: expected >= 0, got {temperature!r}")
        body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}
        if seed is not None:
            body["seed"] = int(seed)
        if stop is not None:
            body["stop"] = [stop] if isinstance(stop, str) else list(stop)
        return body

    def _on_endpoints(self, service: str, eps: tuple[Endpoint, ...]) -> None:
        if service == self.service:
            self._balancer.set_endpoints(eps)

    def _start_call(self, timeout_s: float | None) -> tuple[float, float]:
        """``(now, deadline)`` of a new call; refuses calls on a closed client."""
        if self._closed:
            raise LlmError(f"{self.model}: client is closed")
        t0 = self._clock()
        limit = self.timeout_s if timeout_s is None else timeout_s
        if not limit > 0:
            raise ValueError(f"timeout_s: expected > 0, got {timeout_s!r}")
        return t0, t0 + limit

    def _no_replica(self) -> LlmError:
        return LlmError(f"{self.model}: no replica registered in discovery as {self.service!r}")

    async def _ensure_replicas(self, deadline: float) -> None:
        if not self._subscribed:
            try:
                eps = await self._endpoints.subscribe(
                    self.service, timeout_s=max(0.001, deadline - self._clock())
                )
            except DiscoveryError as exc:
                raise LlmError(f"{self.model}: discovery has no answer for {self.service!r}: {exc}") from exc
            self._subscribed = True
            if eps and not len(self._balancer):
                self._balancer.set_endpoints(eps)
        if len(self._balancer):
            return
        wait = min(self.endpoint_wait_s, deadline - self._clock())
        if wait > 0:
            with contextlib.suppress(DiscoveryError):
                eps = await self._endpoints.wait_for(self.service, bool, timeout_s=wait)
                if not len(self._balancer):
                    self._balancer.set_endpoints(eps)
                return
        raise self._no_replica()

    async def _probe(self, ep: Endpoint, timeout_s: float) -> ProbeResult:
        url = provider_for(ep).probe_url(ep)
        if url is None:
            raise ProbeFailed("no probe for this provider")
        try:
            resp = await self._transport.get(url, timeout_s=timeout_s)
        except ReplicaUnreachable as exc:
            raise ReplicaGone(str(exc)) from exc
        except AttemptTimeout as exc:
            raise ProbeFailed(str(exc), timed_out=True) from exc
        except TransportError as exc:
            raise ProbeFailed(str(exc)) from exc
        if resp.status != 200:
            raise ProbeFailed(f"HTTP {resp.status} from {url}")
        return parse_queue_metrics(resp.body)

    def _backoff_s(self, retry: int) -> float:
        cap = min(self.backoff_max_s, self.backoff_initial_s * (2 ** max(0, retry - 1)))
        return self._rng.uniform(cap / 2, cap)

    def _on_failure(self, st: ReplicaState, exc: _Retryable | TransportError) -> str:
        """Mark the replica according to how it failed; account the error; return its kind."""
        if isinstance(exc, ReplicaUnreachable):
            kind = "unreachable"
            self._balancer.mark_dead(st)
        elif isinstance(exc, TransportError):
            kind = "timeout" if isinstance(exc, AttemptTimeout) else "transport"
            # One failure counted once: the backoff grows with the failures before this one + 1.
            self._balancer.mark_unavailable(st, hold_s=self._backoff_s(st.consecutive_failures + 1))
        else:
            kind = exc.kind
            pause = exc.retry_after_s
            if pause is None:
                pause = self._backoff_s(st.consecutive_failures + 1)
            self._balancer.hold(st, pause)
        self.accounting.record_error(self.model, st.id, kind)
        return kind

    def _classify(self, ep: Endpoint, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        """Raise for a non-200 answer: :class:`_Retryable` or :class:`LlmRequestError`."""
        if status in _REJECT_STATUSES:
            raise _Retryable(
                f"HTTP {status}: {_snippet(body)}", "rejected", retry_after_s=_retry_after_s(headers)
            )
        if status >= 500:
            raise _Retryable(
                f"HTTP {status}: {_snippet(body)}", "server_error", retry_after_s=_retry_after_s(headers)
            )
        raise LlmRequestError(
            f"{self.model}: replica {ep.id} refused the request: HTTP {status}: {_snippet(body)}",
            status=status,
            body=body,
        )

    def _request_parts(
        self, ep: Endpoint, path: str, body: Mapping[str, Any], trace_headers: Mapping[str, str]
    ) -> tuple[str, dict[str, Any], dict[str, str]]:
        provider = provider_for(ep)
        url = provider.url(ep, path)
        # The replica may serve the model under its own name (metadata "model"); send that one.
        payload = provider.body(ep, dict(body, model=self.model))
        return url, payload, {**trace_headers, **provider.headers(ep)}

    def _gave_up(self, errors: list[str], deadline: float) -> LlmError:
        timed_out = self._clock() >= deadline
        why = f"timed out after {self.timeout_s}s" if timed_out else f"failed after {len(errors)} attempts"
        err = LlmError(f"{self.model}: call {why}: " + ("; ".join(errors) or "no attempt finished"))
        err.timed_out = timed_out
        self.accounting.record_call_failed(self.model)
        return err

    async def _acquire(
        self, arrival: float, deadline: float, tried: set[str], session_id: str | None
    ) -> ReplicaState:
        await self._ensure_replicas(deadline)
        try:
            return await self._balancer.acquire(
                arrival=arrival,
                deadline=deadline,
                tried=tried,
                session_id=session_id,
                no_replica=self._no_replica,
            )
        except LlmError as exc:
            if exc.timed_out:
                self.accounting.record_call_failed(self.model)
            if str(exc).startswith(f"{self.model}:"):
                raise
            err = LlmError(f"{self.model}: {exc}")
            err.timed_out = exc.timed_out
            raise err from None

    async def _send(
        self, span_name: str, path: str, body: dict[str, Any], session_id: str | None, timeout_s: float | None
    ) -> RawReply:
        t0, deadline = self._start_call(timeout_s)
        # The span's context manager records an escaping LlmError and marks the span as failed.
        with self._tracer.start_as_current_span(span_name, kind=trace.SpanKind.CLIENT) as span:
            span.set_attribute("llm.model", self.model)
            if "max_tokens" in body:
                span.set_attribute("llm.max_tokens", body["max_tokens"])
            trace_headers: dict[str, str] = {}
            propagate.inject(trace_headers)  # the replica's own spans (if it traces) join this trace
            tried: set[str] = set()
            errors: list[str] = []
            for attempt in range(1, self.max_attempts + 1):
                if self._clock() >= deadline:
                    break
                st = await self._acquire(t0, deadline, tried, session_id)
                ep = st.endpoint
                tried.add(ep.id)
                a0 = self._clock()
                try:
                    url, payload, headers = self._request_parts(ep, path, body, trace_headers)
                    remaining = deadline - a0
                    try:
                        # Enforced here as well as by the transport, so no transport overruns it.
                        async with asyncio.timeout(remaining):
                            resp = await self._transport.post_json(
                                url, payload, headers=headers, timeout_s=remaining
                            )
                    except TimeoutError:
                        raise AttemptTimeout(f"no answer within {remaining:.3f}s") from None
                    if resp.status != 200:
                        self._classify(ep, resp.status, resp.body, resp.headers)
                    data = _json_object(resp.body)
                    if path.endswith("/completions"):
                        _first_choice(data)
                except (TransportError, _Retryable) as exc:
                    kind = self._on_failure(st, exc)
                    errors.append(f"{ep.id}@{ep.address}: {kind}: {exc}")
                    log.debug("%s attempt %d on %s failed: %s", self.model, attempt, ep.id, exc)
                    continue
                except LlmRequestError:
                    self.accounting.record_error(self.model, ep.id, "refused")
                    raise
                finally:
                    self._balancer.release(st)
                self._balancer.succeeded(st)
                now = self._clock()
                usage = data.get("usage") or {}
                prompt_tokens = int(usage.get("prompt_tokens") or 0)
                completion_tokens = int(usage.get("completion_tokens") or 0)
                self.accounting.record_ok(
                    self.model,
                    ep.id,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    latency_s=now - a0,
                )
                latency = now - t0
                span.set_attribute("llm.replica", ep.id)
                span.set_attribute("llm.prompt_tokens", prompt_tokens)
                span.set_attribute("llm.completion_tokens", completion_tokens)
                span.set_attribute("llm.latency_s", latency)
                span.set_attribute("llm.attempts", attempt)
                return RawReply(data=data, replica_id=ep.id, latency_s=latency, attempts=attempt)
            span.set_attribute("llm.attempts", len(errors))
            raise self._gave_up(errors, deadline)

    async def _stream(
        self,
        span_name: str,
        path: str,
        body: dict[str, Any],
        session_id: str | None,
        timeout_s: float | None,
        *,
        info: dict[str, Any],
    ) -> AsyncIterator[dict[str, Any]]:
        t0, deadline = self._start_call(timeout_s)
        options = dict(body.get("stream_options") or {})
        caller_wants_usage = bool(options.get("include_usage"))
        body = dict(body, stream=True, stream_options={**options, "include_usage": True})
        # Not start_as_current_span: a generator's context cannot be attached across yields.
        span = self._tracer.start_span(span_name, kind=trace.SpanKind.CLIENT)
        span.set_attribute("llm.model", self.model)
        trace_headers: dict[str, str] = {}
        propagate.inject(trace_headers, context=trace.set_span_in_context(span))
        tried: set[str] = set()
        errors: list[str] = []
        try:
            for attempt in range(1, self.max_attempts + 1):
                if self._clock() >= deadline:
                    break
                st = await self._acquire(t0, deadline, tried, session_id)
                ep = st.endpoint
                tried.add(ep.id)
                a0 = self._clock()
                started = False
                usage: dict[str, Any] = {}
                reply: StreamReply | None = None
                try:
                    url, payload, headers = self._request_parts(ep, path, body, trace_headers)
                    async with asyncio.timeout(deadline - a0):
                        reply = await self._transport.open_stream(
                            url, payload, headers=headers, timeout_s=deadline - a0
                        )
                        if reply.status != 200:
                            self._classify(ep, reply.status, await reply.read(), reply.headers)
                        async for event in _sse_events(reply.lines()):
                            if not started:
                                started = True
                                info["ttft_s"] = self._clock() - a0
                                info["replica_id"] = ep.id
                            if isinstance(event.get("usage"), dict):
                                usage = event["usage"]
                            if not caller_wants_usage and not event.get("choices") and event.get("usage"):
                                continue  # the usage-only event we asked for ourselves
                            yield event
                except TimeoutError:
                    exc2: TransportError | _Retryable = AttemptTimeout(
                        f"no answer within {deadline - a0:.3f}s"
                    )
                    if started:
                        self._on_failure(st, exc2)
                        raise self._stream_broken(ep, exc2) from None
                    kind = self._on_failure(st, exc2)
                    errors.append(f"{ep.id}@{ep.address}: {kind}: {exc2}")
                    continue
                except (TransportError, _Retryable) as exc:
                    kind = self._on_failure(st, exc)
                    if started:
                        raise self._stream_broken(ep, exc) from None
                    errors.append(f"{ep.id}@{ep.address}: {kind}: {exc}")
                    continue
                except LlmRequestError:
                    self.accounting.record_error(self.model, ep.id, "refused")
                    raise
                finally:
                    if reply is not None:
                        with contextlib.suppress(Exception):
                            await reply.close()
                    self._balancer.release(st)
                self._balancer.succeeded(st)
                self.accounting.record_ok(
                    self.model,
                    ep.id,
                    prompt_tokens=int(usage.get("prompt_tokens") or 0),
                    completion_tokens=int(usage.get("completion_tokens") or 0),
                    latency_s=self._clock() - a0,
                    ttft_s=info.get("ttft_s"),
                )
                info.update(replica_id=ep.id, attempts=attempt, usage=usage)
                span.set_attribute("llm.replica", ep.id)
                span.set_attribute("llm.prompt_tokens", int(usage.get("prompt_tokens") or 0))
                span.set_attribute("llm.completion_tokens", int(usage.get("completion_tokens") or 0))
                span.set_attribute("llm.attempts", attempt)
                if info.get("ttft_s") is not None:
                    span.set_attribute("llm.ttft_s", info["ttft_s"])
                return
            span.set_attribute("llm.attempts", len(errors))
            raise self._gave_up(errors, deadline)
        except BaseException as exc:
            if isinstance(exc, Exception):
                span.record_exception(exc)
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
            raise
        finally:
            span.end()

    def _stream_broken(self, ep: Endpoint, exc: Exception) -> LlmError:
        self.accounting.record_call_failed(self.model)
        return LlmError(f"{self.model}: the stream from replica {ep.id} broke after it started: {exc}")


async def _sse_events(lines: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a server-sent event stream, until ``data: [DONE]``."""
    async for raw in lines:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue  # blank separators, comments, "event:" lines
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError:
            raise _Retryable(f"stream event is not JSON: {_snippet(data)}", "bad_reply") from None
        if not isinstance(event, dict):
            raise _Retryable(f"stream event is a JSON {type(event).__name__}", "bad_reply")
        if "error" in event and not event.get("choices"):
            raise _Retryable(f"stream reported an error: {_snippet(data)}", "server_error")
        yield event


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        raise _Retryable(f"HTTP 200 with a body that is not JSON: {_snippet(body)}", "bad_reply") from None
    if not isinstance(data, dict):
        raise _Retryable(f"HTTP 200 with a JSON {type(data).__name__}, expected an object", "bad_reply")
    return data


def _snippet(body: bytes, limit: int = 300) -> str:
    text = body.decode(errors="replace").strip()
    return text if len(text) <= limit else text[:limit] + "..."


def _first_choice(data: dict[str, Any]) -> dict[str, Any]:
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _Retryable(f"reply has no choices: {_snippet(json.dumps(data).encode())}", "bad_reply")
    return choices[0]


def _chat_text(data: dict[str, Any]) -> tuple[str, str | None]:
    choice = _first_choice(data)
    message = choice.get("message") or {}
    return str(message.get("content") or ""), choice.get("finish_reason")


def _completion_text(data: dict[str, Any]) -> tuple[str, str | None]:
    choice = _first_choice(data)
    return str(choice.get("text") or ""), choice.get("finish_reason")
