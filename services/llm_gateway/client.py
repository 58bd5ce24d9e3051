"""The LLM gateway as a client library: call a model's replicas directly, balanced on the client.

An agent holds one :class:`LlmClient` per model. Replicas of model ``M`` register in discovery as
service ``llm.<M sanitized>`` (see :func:`llm_service_name`); the client reads the current set from
an :class:`~agentmesh.discovery.EndpointCache` (a dict lookup, fed by a watch), so nothing goes to
the discovery store per request. Each call:

1. picks a replica by *power of two random choices* on this client's own in-flight count per
   replica (two distinct replicas at random, the less loaded wins);
2. sends an OpenAI-compatible request (``/v1/chat/completions`` or ``/v1/completions``);
3. on a connection error, a timeout of the attempt, 5xx or 429, retries on *another* replica after
   a jittered exponential backoff, up to ``max_attempts`` and within one deadline for the call;
4. raises :class:`~agentmesh.errors.LlmError` when it gives up (or at once on another 4xx: a bad
   request fails the same way everywhere).

Every call is an OpenTelemetry span (``llm.chat`` / ``llm.complete``) in the caller's trace, and the
W3C trace context is forwarded to the replica in HTTP headers.

The HTTP transport is injectable (:class:`LlmTransport`): production uses :class:`AiohttpTransport`
(one pooled session per client), unit tests a fake with no sockets. Per-replica state lives in
:class:`ReplicaStats` so that load probing and staleness can be added without changing callers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from opentelemetry import propagate, trace

from agentmesh.discovery.base import Endpoint, EndpointCache
from agentmesh.errors import AgentMeshError, DiscoveryError, LlmError
from agentmesh.llm_gateway.constants import (
    LLM_BACKOFF_INITIAL_S,
    LLM_BACKOFF_MAX_S,
    LLM_CONNECT_TIMEOUT_S,
    LLM_CONNECTOR_LIMIT,
    LLM_ENDPOINT_WAIT_S,
    LLM_MAX_ATTEMPTS,
    LLM_SERVICE_PREFIX,
    LLM_TIMEOUT_S,
)
from agentmesh.llm_gateway.providers import provider_for

__all__ = [
    "AiohttpTransport",
    "ChatResult",
    "LlmClient",
    "LlmTransport",
    "ReplicaStats",
    "TransportError",
    "TransportResponse",
    "llm_service_name",
]

log = logging.getLogger(__name__)

_SANITIZE_RE = re.compile(r"[^a-z0-9._-]+")
_RETRY_STATUSES = frozenset({408, 429})


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
    """A replica could not be reached or did not answer in time. The client retries it elsewhere;
    callers of :class:`LlmClient` only ever see :class:`LlmError`."""


@dataclass(frozen=True, slots=True)
class TransportResponse:
    """An HTTP answer: status, raw body, headers (names lowercased)."""

    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


class LlmTransport(Protocol):
    """Sends one JSON POST. Raises :class:`TransportError` when no HTTP answer came back."""

    async def post_json(
        self, url: str, payload: Mapping[str, Any], *, headers: Mapping[str, str], timeout_s: float
    ) -> TransportResponse: ...

    async def close(self) -> None: ...


class AiohttpTransport:
    """One pooled :class:`aiohttp.ClientSession`, created on first use (it needs a running loop)."""

    def __init__(
        self, *, connector_limit: int = LLM_CONNECTOR_LIMIT, connect_timeout_s: float = LLM_CONNECT_TIMEOUT_S
    ) -> None:
        self._connector_limit = connector_limit
        self._connect_timeout_s = connect_timeout_s
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # limit_per_host=0: all replicas of a model may sit on one host (CPU tests, simulators).
            connector = aiohttp.TCPConnector(limit=self._connector_limit, limit_per_host=0)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def post_json(
        self, url: str, payload: Mapping[str, Any], *, headers: Mapping[str, str], timeout_s: float
    ) -> TransportResponse:
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(self._connect_timeout_s, timeout_s))
        data = json.dumps(payload).encode()
        hdrs = {"Content-Type": "application/json", **headers}
        try:
            async with self._get_session().post(url, data=data, headers=hdrs, timeout=timeout) as resp:
                body = await resp.read()
                return TransportResponse(resp.status, body, {k.lower(): v for k, v in resp.headers.items()})
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# -- results and per-replica state ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChatResult:
    """The answer of one call."""

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


@dataclass(slots=True)
class ReplicaStats:
    """What this client knows about one replica. Pruned when the replica leaves discovery."""

    in_flight: int = 0
    """Requests this client has outstanding on the replica: the load signal of the choice."""
    completed: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_failure_at: float | None = None


class _RetryableReply(Exception):
    """An HTTP answer worth retrying on another replica (429, 5xx, or a garbled body)."""


# -- the client ----------------------------------------------------------------------------------


class LlmClient:
    """Client-side load-balanced calls to the replicas of one model.

    ``endpoints`` is the process's shared :class:`EndpointCache`; the client subscribes to the
    model's service on first use. Use as ``async with LlmClient(...) as client`` or call
    :meth:`close`. Not thread-safe: use it from one event loop.
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
        transport: LlmTransport | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        tracer_provider: trace.TracerProvider | None = None,
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
        self._endpoints = endpoints
        self._transport: LlmTransport = transport if transport is not None else AiohttpTransport()
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self._stats: dict[str, ReplicaStats] = {}
        self._subscribed = False
        self._closed = False
        # None: the global provider, looked up lazily (set it before or after building the client).
        self._tracer = trace.get_tracer("agentmesh", tracer_provider=tracer_provider)
        endpoints.add_listener(self._on_endpoints)

    async def __aenter__(self) -> LlmClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        await self._transport.close()

    # -- public calls ----------------------------------------------------------------------------

    async def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        session_id: str | None = None,
    ) -> ChatResult:
        """One chat completion. ``messages`` are OpenAI-style ``{"role": ..., "content": ...}``.

        ``session_id`` (optional) sends the calls of one conversation to the same replica while it
        is there (prefix-cache reuse); retries still go elsewhere.
        """
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages: expected a non-empty list of {'role', 'content'} dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}]: expected a dict with 'role' and 'content', got {m!r}")
        body = self._sampling_body(max_tokens, temperature, seed, stop)
        body["messages"] = messages
        return await self._call("llm.chat", "/v1/chat/completions", body, session_id, _chat_text)

    async def complete(
        self,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        session_id: str | None = None,
    ) -> ChatResult:
        """One plain text completion of ``prompt``."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt: expected a string, got {type(prompt).__name__}")
        body = self._sampling_body(max_tokens, temperature, seed, stop)
        body["prompt"] = prompt
        return await self._call("llm.complete", "/v1/completions", body, session_id, _completion_text)

    def stats(self) -> dict[str, ReplicaStats]:
        """A copy of the per-replica state, by replica id (for metrics and tests)."""
        return {k: dataclasses.replace(v) for k, v in self._stats.items()}

    # -- internals -------------------------------------------------------------------------------

    @staticmethod
    def _sampling_body(
        max_tokens: int, temperature: float, seed: int | None, stop: str | Sequence[str] | None
    ) -> dict[str, Any]:
        if not isinstance(max_tokens, int) or max_tokens < 1:
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
        if service != self.service:
            return
        live = {e.id for e in eps}
        for rid in [r for r in self._stats if r not in live]:
            # In-flight requests to a vanished replica finish (or fail) on their own; their
            # decrement is a no-op once the entry is gone.
            del self._stats[rid]

    async def _replicas(self, deadline: float) -> tuple[Endpoint, ...]:
        if not self._subscribed:
            try:
                await self._endpoints.subscribe(self.service, timeout_s=max(0.001, deadline - self._clock()))
            except DiscoveryError as exc:
                raise LlmError(f"{self.model}: discovery has no answer for {self.service!r}: {exc}") from exc
            self._subscribed = True
        eps = self._endpoints.get(self.service)
        if eps:
            return eps
        wait = min(self.endpoint_wait_s, deadline - self._clock())
        if wait > 0:
            try:
                return await self._endpoints.wait_for(self.service, bool, timeout_s=wait)
            except DiscoveryError:
                pass
        raise LlmError(f"{self.model}: no replica registered in discovery as {self.service!r}")

    def _choose(self, eps: Sequence[Endpoint], tried: set[str], session_id: str | None) -> Endpoint:
        """Power of two random choices on in-flight count, avoiding replicas already tried."""
        fresh = [e for e in eps if e.id not in tried]
        candidates = fresh or list(eps)  # every replica failed once: try again where it is least bad
        if len(candidates) == 1:
            return candidates[0]
        if session_id is not None and not tried:
            # Rendezvous hashing: a conversation stays on its replica while the set barely changes.
            return max(candidates, key=lambda e: hashlib.blake2b(f"{session_id}|{e.id}".encode()).digest())
        a, b = self._rng.sample(candidates, 2)
        load_a = self._stat(a.id).in_flight
        load_b = self._stat(b.id).in_flight
        return b if load_b < load_a else a

    def _stat(self, replica_id: str) -> ReplicaStats:
        st = self._stats.get(replica_id)
        if st is None:
            st = self._stats[replica_id] = ReplicaStats()
        return st

    def _backoff_s(self, retry: int) -> float:
        cap = min(self.backoff_max_s, self.backoff_initial_s * (2 ** (retry - 1)))
        return self._rng.uniform(cap / 2, cap)

    async def _call(
        self,
        span_name: str,
        path: str,
        body: dict[str, Any],
        session_id: str | None,
        extract: Callable[[dict[str, Any]], tuple[str, str | None]],
    ) -> ChatResult:
        if self._closed:
            raise LlmError(f"{self.model}: client is closed")
        t0 = self._clock()
        deadline = t0 + self.timeout_s
        # The span's context manager records an escaping LlmError and marks the span as failed.
        with self._tracer.start_as_current_span(span_name, kind=trace.SpanKind.CLIENT) as span:
            span.set_attribute("llm.model", self.model)
            span.set_attribute("llm.max_tokens", body["max_tokens"])
            headers: dict[str, str] = {}
            propagate.inject(headers)  # the replica's own spans (if it traces) join this trace
            tried: set[str] = set()
            errors: list[str] = []
            for attempt in range(1, self.max_attempts + 1):
                eps = await self._replicas(deadline)
                ep = self._choose(eps, tried, session_id)
                tried.add(ep.id)
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                st = self._stat(ep.id)
                st.in_flight += 1
                try:
                    data = await self._attempt(ep, path, body, headers, remaining)
                    text, finish = extract(data)
                    usage = data.get("usage") or {}
                    prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    completion_tokens = int(usage.get("completion_tokens") or 0)
                except (TransportError, _RetryableReply) as exc:
                    self._record_failure(ep.id)
                    errors.append(f"{ep.id}@{ep.address}: {exc}")
                    log.debug("%s attempt %d on %s failed: %s", self.model, attempt, ep.id, exc)
                    if attempt < self.max_attempts:
                        pause = min(self._backoff_s(attempt), deadline - self._clock())
                        if pause > 0:
                            await asyncio.sleep(pause)
                    continue
                finally:
                    cur = self._stats.get(ep.id)
                    if cur is st:
                        st.in_flight -= 1
                st.completed += 1
                st.consecutive_failures = 0
                latency = self._clock() - t0
                span.set_attribute("llm.replica", ep.id)
                span.set_attribute("llm.prompt_tokens", prompt_tokens)
                span.set_attribute("llm.completion_tokens", completion_tokens)
                span.set_attribute("llm.latency_s", latency)
                span.set_attribute("llm.attempts", attempt)
                return ChatResult(
                    text=text,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    replica_id=ep.id,
                    latency_s=latency,
                    model=str(data.get("model") or self.model),
                    finish_reason=finish,
                    attempts=attempt,
                )
            timed_out = self._clock() >= deadline
            why = (
                f"timed out after {self.timeout_s}s" if timed_out else f"failed after {len(errors)} attempts"
            )
            err = LlmError(f"{self.model}: call {why}: " + ("; ".join(errors) or "no attempt finished"))
            span.set_attribute("llm.attempts", len(errors))
            raise err

    def _record_failure(self, replica_id: str) -> None:
        st = self._stats.get(replica_id)
        if st is not None:
            st.failures += 1
            st.consecutive_failures += 1
            st.last_failure_at = self._clock()

    async def _attempt(
        self, ep: Endpoint, path: str, body: dict[str, Any], headers: Mapping[str, str], timeout_s: float
    ) -> dict[str, Any]:
        provider = provider_for(ep)
        url = provider.url(ep, path)
        # The replica may serve the model under its own name (metadata "model"); send that one.
        payload = provider.body(ep, dict(body, model=self.model))
        headers = {**headers, **provider.headers(ep)}
        try:
            # Enforced here as well as by the transport, so no transport can overrun the deadline.
            async with asyncio.timeout(timeout_s):
                resp = await self._transport.post_json(url, payload, headers=headers, timeout_s=timeout_s)
        except TimeoutError:
            raise TransportError(f"no answer within {timeout_s:.3f}s") from None
        if resp.status >= 500 or resp.status in _RETRY_STATUSES:
            raise _RetryableReply(f"HTTP {resp.status}: {_snippet(resp.body)}")
        if resp.status != 200:
            raise LlmError(
                f"{self.model}: replica {ep.id} refused the request: "
                f"HTTP {resp.status}: {_snippet(resp.body)}"
            )
        try:
            data = json.loads(resp.body)
        except ValueError:
            raise _RetryableReply(f"HTTP 200 with a body that is not JSON: {_snippet(resp.body)}") from None
        if not isinstance(data, dict):
            raise _RetryableReply(f"HTTP 200 with a JSON {type(data).__name__}, expected an object")
        return data


def _snippet(body: bytes, limit: int = 300) -> str:
    text = body.decode(errors="replace").strip()
    return text if len(text) <= limit else text[:limit] + "..."


def _first_choice(data: dict[str, Any]) -> dict[str, Any]:
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _RetryableReply(f"reply has no choices: {_snippet(json.dumps(data).encode())}")
    return choices[0]


def _chat_text(data: dict[str, Any]) -> tuple[str, str | None]:
    choice = _first_choice(data)
    message = choice.get("message") or {}
    return str(message.get("content") or ""), choice.get("finish_reason")


def _completion_text(data: dict[str, Any]) -> tuple[str, str | None]:
    choice = _first_choice(data)
    return str(choice.get("text") or ""), choice.get("finish_reason")
