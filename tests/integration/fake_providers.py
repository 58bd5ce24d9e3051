"""A test stand-in for the external LLM APIs: OpenAI, Azure OpenAI and Gemini's OpenAI-compatible
endpoint, on one loopback aiohttp server (there is no internet here).

It is not any provider's code; it speaks each one's *wire format* as documented, closely enough to
tell whether a client sends the right request and copes with the answers:

- OpenAI: ``POST /v1/chat/completions`` and ``/v1/completions``, ``Authorization: Bearer KEY``;
  errors ``{"error": {"message", "type", "param", "code"}}``.
- Azure OpenAI: ``POST /openai/deployments/DEPLOYMENT/chat/completions?api-version=V`` (and
  ``/completions``), key in the ``api-key`` header; errors ``{"error": {"code": "429", "message"}}``,
  a 429 carries ``Retry-After`` (seconds) and ``retry-after-ms``.
- Gemini: ``POST /v1beta/openai/chat/completions``, ``Authorization: Bearer KEY``, no legacy
  ``/completions``; errors are a JSON *list* ``[{"error": {"code", "message", "status"}}]`` and a bad
  key is a 400, not a 401.

Every request is recorded (:attr:`FakeProviders.requests`) before it is answered. Failures are
scripted per provider with :meth:`FakeProviders.fail`: the next N requests that pass the path and
key checks get that status (429 with an optional ``Retry-After``, 500, 503), then answers succeed.
A successful chat answer's content is ``"echo: "`` + the last message's content; ``stream: true``
answers in server-sent events (role chunk, one chunk per word, a finish chunk, a usage chunk when
``stream_options.include_usage`` is set, then ``data: [DONE]``).

Use::

    fake = FakeProviders(keys={"openai": "k1", "azure": "k2", "gemini": "k3"})
    root = await fake.start()          # http://127.0.0.1:PORT
    fake.base_url("openai")            # what to register as base_url
    ...
    await fake.close()
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["AZURE_API_VERSIONS", "FakeProviders", "RecordedRequest", "ScriptedFailure"]

PROVIDER_NAMES = ("openai", "azure", "gemini")
AZURE_API_VERSIONS = frozenset({"2024-06-01", "2024-10-21", "2025-01-01-preview"})
"""api-version values the stand-in accepts (any other is a 404, as Azure answers an unknown one)."""


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as it arrived."""

    provider: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    """Header names lowercased."""
    body: Any
    at: float
    """``time.monotonic()`` on arrival."""
    status: int = 0
    """What the stand-in answered."""


@dataclass(slots=True)
class ScriptedFailure:
    status: int
    retry_after_s: int | None = None


@dataclass(slots=True)
class _State:
    failures: list[ScriptedFailure] = field(default_factory=list)


class FakeProviders:
    """One loopback HTTP server answering as OpenAI, Azure OpenAI and Gemini (a test stand-in)."""

    def __init__(
        self,
        *,
        keys: Mapping[str, str],
        azure_deployments: Mapping[str, str] | None = None,
        stream_delay_s: float = 0.0,
    ) -> None:
        """``keys``: the key each provider accepts. ``azure_deployments``: deployment name -> the
        model it serves (the name Azure reports in answers)."""
        self.keys = dict(keys)
        self.azure_deployments = dict(azure_deployments or {"gpt-4o-mini-dep": "gpt-4o-mini"})
        self.stream_delay_s = stream_delay_s
        self.requests: list[RecordedRequest] = []
        self._state = {p: _State() for p in PROVIDER_NAMES}
        self._runner: web.AppRunner | None = None
        self.root = ""

    # -- control ---------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1") -> str:
        app = web.Application()
        app.router.add_post("/v1/{op:chat/completions|completions}", self._openai)
        app.router.add_post("/openai/deployments/{deployment}/{op:chat/completions|completions}", self._azure)
        app.router.add_post("/v1beta/openai/{op:.+}", self._gemini)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.root = f"http://{host}:{port}"
        return self.root

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def base_url(self, provider: str) -> str:
        """The ``base_url`` a client registers for ``provider`` (as its real counterpart's)."""
        suffix = {"openai": "/v1", "azure": "", "gemini": "/v1beta/openai"}[provider]
        return self.root + suffix

    def fail(self, provider: str, status: int, times: int = 1, *, retry_after_s: int | None = None) -> None:
        """Answer the next ``times`` well-formed requests to ``provider`` with ``status``."""
        self._state[provider].failures.extend(ScriptedFailure(status, retry_after_s) for _ in range(times))

    def of(self, provider: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.provider == provider]

    # -- handlers --------------------------------------------------------------------------------

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        auth_ok = request.headers.get("Authorization") == f"Bearer {self.keys.get('openai')}"
        return await self._serve(request, "openai", auth_ok, model=None)

    async def _azure(self, request: web.Request) -> web.StreamResponse:
        version = request.query.get("api-version")
        deployment = request.match_info["deployment"]
        if not version or version not in AZURE_API_VERSIONS:
            self._record(request, "azure", await _json_or_none(request), 404)
            return _error("azure", 404, "Resource not found")
        if deployment not in self.azure_deployments:
            self._record(request, "azure", await _json_or_none(request), 404)
            return _error(
                "azure",
                404,
                "The API deployment for this resource does not exist.",
                code="DeploymentNotFound",
            )
        auth_ok = request.headers.get("api-key") == self.keys.get("azure")
        return await self._serve(request, "azure", auth_ok, model=self.azure_deployments[deployment])

    async def _gemini(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["op"] != "chat/completions":
            self._record(request, "gemini", await _json_or_none(request), 404)
            return _error("gemini", 404, f"{request.path} is not found")
        auth_ok = request.headers.get("Authorization") == f"Bearer {self.keys.get('gemini')}"
        return await self._serve(request, "gemini", auth_ok, model=None)

    def _record(self, request: web.Request, provider: str, body: Any, status: int) -> None:
        self.requests.append(
            RecordedRequest(
                provider=provider,
                path=request.path,
                query=dict(request.query),
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
                at=time.monotonic(),
                status=status,
            )
        )

    async def _serve(
        self, request: web.Request, provider: str, auth_ok: bool, *, model: str | None
    ) -> web.StreamResponse:
        body = await _json_or_none(request)
        if not auth_ok:
            # Gemini answers a bad key with 400 INVALID_ARGUMENT; OpenAI and Azure with 401.
            status = 400 if provider == "gemini" else 401
            self._record(request, provider, body, status)
            return _error(provider, status, "invalid or missing API key", code="invalid_api_key")
        if not isinstance(body, dict):
            self._record(request, provider, body, 400)
            return _error(provider, 400, "the request body is not a JSON object")
        failures = self._state[provider].failures
        if failures:
            failure = failures.pop(0)
            self._record(request, provider, body, failure.status)
            return _scripted(provider, failure)
        op = request.match_info["op"]
        reply_model = model or str(body.get("model") or "")
        if provider != "azure" and not reply_model:
            self._record(request, provider, body, 400)
            return _error(provider, 400, "you must provide a model parameter")
        self._record(request, provider, body, 200)
        chat = op == "chat/completions"
        if chat and not isinstance(body.get("messages"), list):
            return _error(provider, 400, "messages: expected a list")
        text = _answer_text(body, chat)
        if body.get("stream"):
            return await self._stream(request, body, reply_model, text, chat)
        return web.json_response(_completion(reply_model, text, chat, _prompt_tokens(body)))

    async def _stream(
        self, request: web.Request, body: dict[str, Any], model: str, text: str, chat: bool
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        words = text.split(" ")
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> bytes:
            obj: dict[str, Any] = {
                "id": "fake-1",
                "object": kind,
                "created": int(time.time()),
                "model": model,
                "choices": [choice] if choice is not None else [],
            }
            if usage is not None:
                obj["usage"] = usage
            return f"data: {json.dumps(obj)}\n\n".encode()

        if chat:
            await resp.write(chunk({"index": 0, "delta": {"role": "assistant", "content": ""}}))
        for piece in pieces:
            if self.stream_delay_s:
                await asyncio.sleep(self.stream_delay_s)
            delta: dict[str, Any] = {"delta": {"content": piece}} if chat else {"text": piece}
            await resp.write(chunk({"index": 0, **delta, "finish_reason": None}))
        end: dict[str, Any] = {"delta": {}} if chat else {"text": ""}
        await resp.write(chunk({"index": 0, **end, "finish_reason": "stop"}))
        options = body.get("stream_options") or {}
        if isinstance(options, dict) and options.get("include_usage"):
            await resp.write(chunk(None, _usage(_prompt_tokens(body), len(pieces))))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


# -- answers -------------------------------------------------------------------------------------


async def _json_or_none(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        return None


def _answer_text(body: dict[str, Any], chat: bool) -> str:
    if chat:
        messages = body.get("messages") or [{}]
        last = messages[-1] if isinstance(messages[-1], dict) else {}
        return f"echo: {last.get('content', '')}"
    return f"echo: {body.get('prompt', '')}"


def _prompt_tokens(body: dict[str, Any]) -> int:
    if isinstance(body.get("messages"), list):
        return sum(len(str(m.get("content", "")).split()) for m in body["messages"] if isinstance(m, dict))
    return len(str(body.get("prompt", "")).split())


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion(model: str, text: str, chat: bool, prompt_tokens: int) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": "fake-1",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": _usage(prompt_tokens, len(text.split())),
    }


_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
_OPENAI_TYPE = {429: "requests", 500: "server_error", 503: "service_unavailable_error"}


def _error(
    provider: str,
    status: int,
    message: str,
    *,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """An error in ``provider``'s own shape."""
    payload: Any
    if provider == "gemini":
        payload = [
            {"error": {"code": status, "message": message, "status": _GOOGLE_STATUS.get(status, "UNKNOWN")}}
        ]
    elif provider == "azure":
        payload = {"error": {"code": code or str(status), "message": message}}
    else:
        kind = _OPENAI_TYPE.get(status, "invalid_request_error")
        payload = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(payload, status=status, headers=headers)


def _scripted(provider: str, failure: ScriptedFailure) -> web.Response:
    headers: dict[str, str] = {}
    if failure.retry_after_s is not None:
        headers["Retry-After"] = str(failure.retry_after_s)
        if provider == "azure":
            headers["retry-after-ms"] = str(failure.retry_after_s * 1000)
    if failure.status == 429:
        wait = f" Retry after {failure.retry_after_s} seconds." if failure.retry_after_s is not None else ""
        return _error(
            provider,
            429,
            "rate limit reached (scripted)." + wait,
            code="rate_limit_exceeded",
            headers=headers,
        )
    return _error(provider, failure.status, f"server error {failure.status} (scripted)", headers=headers)
