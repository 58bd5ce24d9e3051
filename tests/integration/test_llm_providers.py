"""LlmClient against a loopback stand-in for OpenAI, Azure OpenAI and Gemini (fake_providers.py).

For each provider: the request that arrives (path, auth header, api-version, body model), 429 with
Retry-After, 5xx then success, persistent 5xx, a refused key, streaming, and a missing key.
There is no internet here; the stand-in speaks each provider's wire format on 127.0.0.1.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agentmesh.discovery.base import Endpoint, EndpointCache
from agentmesh.discovery.memory import MemoryDiscovery
from agentmesh.errors import LlmError, LlmRequestError
from agentmesh.llm_gateway.client import LlmClient, llm_service_name
from tests.integration.fake_providers import FakeProviders

pytestmark = pytest.mark.integration

PROVIDERS = ("openai", "azure", "gemini")
KEYS = {
    "openai": "sk-fake-openai-6f1d2c",
    "azure": "fake-azure-key-93b0aa",
    "gemini": "AIza-fake-gemini-51e7",
}
# openai and azure name their variable in the metadata; gemini uses its default, GEMINI_API_KEY.
KEY_ENV = {
    "openai": "AGENTMESH_TEST_OPENAI_KEY",
    "azure": "AGENTMESH_TEST_AZURE_KEY",
    "gemini": "GEMINI_API_KEY",
}
MODEL = {"openai": "gpt-4o-mini", "azure": "gpt-4o", "gemini": "gemini-2.0-flash"}
DEPLOYMENT = "gpt4o-prod"
API_VERSION = "2024-10-21"
HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture
async def fake() -> AsyncIterator[FakeProviders]:
    server = FakeProviders(keys=KEYS, azure_deployments={DEPLOYMENT: "gpt-4o-2024-08-06"})
    await server.start()
    yield server
    await server.close()


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for provider, var in KEY_ENV.items():
        monkeypatch.setenv(var, KEYS[provider])


def _endpoint(fake: FakeProviders, provider: str) -> Endpoint:
    meta = {
        "provider": provider,
        "base_url": fake.base_url(provider),
        "model": MODEL[provider],
        "probe": "none",
    }
    if provider != "gemini":
        meta["api_key_env"] = KEY_ENV[provider]
    if provider == "azure":
        meta.update(deployment=DEPLOYMENT, api_version=API_VERSION)
    host_port = fake.root.split("://", 1)[1]
    return Endpoint(llm_service_name(MODEL[provider]), f"{provider}-external", host_port, meta)


async def _client(
    memory_mesh: tuple[MemoryDiscovery, EndpointCache], fake: FakeProviders, provider: str, **kw: Any
) -> LlmClient:
    disc, endpoints = memory_mesh
    ep = _endpoint(fake, provider)
    await disc.register(ep)
    await endpoints.wait_for(ep.service, bool, timeout_s=2)
    kw.setdefault("timeout_s", 10.0)
    kw.setdefault("max_attempts", 4)
    kw.setdefault("backoff_initial_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)
    return LlmClient(MODEL[provider], endpoints, **kw)


def _check_auth(provider: str, headers: dict[str, str] | Any) -> None:
    if provider == "azure":
        assert headers.get("api-key") == KEYS["azure"]
        assert "authorization" not in headers  # Azure's key header, not a bearer token
    else:
        assert headers.get("authorization") == f"Bearer {KEYS[provider]}"
        assert "api-key" not in headers


EXPECTED_PATH = {
    "openai": "/v1/chat/completions",
    "azure": f"/openai/deployments/{DEPLOYMENT}/chat/completions",
    "gemini": "/v1beta/openai/chat/completions",
}


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_chat_sends_the_providers_request(memory_mesh: Any, fake: FakeProviders, provider: str) -> None:
    client = await _client(memory_mesh, fake, provider)
    try:
        res = await client.chat(HELLO, max_tokens=8, seed=1)
    finally:
        await client.close()
    assert res.text == "echo: hello there" and res.attempts == 1
    assert (res.prompt_tokens, res.completion_tokens) == (2, 3)
    [req] = fake.requests
    assert req.provider == provider and req.path == EXPECTED_PATH[provider] and req.status == 200
    _check_auth(provider, req.headers)
    expected_query = {"api-version": API_VERSION} if provider == "azure" else {}
    assert req.query == expected_query
    # Azure picks the model by deployment (URL); the body names the deployment too.
    assert req.body["model"] == (DEPLOYMENT if provider == "azure" else MODEL[provider])
    assert req.body["messages"] == HELLO and req.body["max_tokens"] == 8 and req.body["seed"] == 1


@pytest.mark.parametrize("provider", ["openai", "azure"])
async def test_completions_path(memory_mesh: Any, fake: FakeProviders, provider: str) -> None:
    client = await _client(memory_mesh, fake, provider)
    try:
        res = await client.complete("once upon", max_tokens=4)
    finally:
        await client.close()
    assert res.text == "echo: once upon"
    [req] = fake.requests
    expected = "/v1/completions" if provider == "openai" else f"/openai/deployments/{DEPLOYMENT}/completions"
    assert req.path == expected and req.body["prompt"] == "once upon"


async def test_gemini_completions_refused_before_sending(memory_mesh: Any, fake: FakeProviders) -> None:
    client = await _client(memory_mesh, fake, "gemini")
    try:
        with pytest.raises(LlmError, match="no legacy /completions"):
            await client.complete("once upon", max_tokens=4)
    finally:
        await client.close()
    assert fake.requests == []


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_429_waits_for_retry_after_then_succeeds(
    memory_mesh: Any, fake: FakeProviders, provider: str
) -> None:
    fake.fail(provider, 429, 1, retry_after_s=1)
    client = await _client(memory_mesh, fake, provider)
    t0 = time.monotonic()
    try:
        res = await client.chat(HELLO, max_tokens=4)
    finally:
        await client.close()
    assert res.text == "echo: hello there" and res.attempts == 2
    first, second = fake.requests
    assert (first.status, second.status) == (429, 200)
    # the only replica is held out for its Retry-After: the retry comes no sooner
    assert second.at - first.at >= 0.99, second.at - first.at
    assert time.monotonic() - t0 < 5
    _check_auth(provider, second.headers)
    errors = client.accounting.snapshot()["replicas"][0]["errors"]
    assert errors == {"rejected": 1}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("status", [500, 503])
async def test_5xx_then_success(memory_mesh: Any, fake: FakeProviders, provider: str, status: int) -> None:
    fake.fail(provider, status, 2)
    client = await _client(memory_mesh, fake, provider, max_attempts=4)
    try:
        res = await client.chat(HELLO, max_tokens=4)
    finally:
        await client.close()
    assert res.attempts == 3 and res.text == "echo: hello there"
    assert [r.status for r in fake.requests] == [status, status, 200]
    # backed off between attempts, yet well inside the call's deadline
    gaps = [b.at - a.at for a, b in zip(fake.requests, fake.requests[1:], strict=False)]
    assert all(g > 0.004 for g in gaps), gaps
    acc = client.accounting.snapshot()["replicas"][0]
    assert acc["errors"] == {"server_error": 2} and acc["ok"] == 1


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_persistent_5xx_gives_up_after_max_attempts(
    memory_mesh: Any, fake: FakeProviders, provider: str
) -> None:
    fake.fail(provider, 503, 100)
    client = await _client(memory_mesh, fake, provider, max_attempts=3)
    try:
        with pytest.raises(LlmError) as info:
            await client.chat(HELLO, max_tokens=4)
    finally:
        await client.close()
    assert not isinstance(info.value, LlmRequestError)
    assert "failed after 3 attempts" in str(info.value) and "HTTP 503" in str(info.value)
    assert len(fake.requests) == 3
    assert client.accounting.snapshot()["calls_failed"] == {MODEL[provider]: 1}


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_wrong_key_is_refused_once_and_never_shown(
    memory_mesh: Any, fake: FakeProviders, provider: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "sk-wrong-key-do-not-print-77"
    monkeypatch.setenv(KEY_ENV[provider], wrong)
    client = await _client(memory_mesh, fake, provider)
    try:
        with pytest.raises(LlmRequestError) as info:
            await client.chat(HELLO, max_tokens=4)
    finally:
        await client.close()
    # Gemini answers a bad key with 400 INVALID_ARGUMENT, the others with 401; none is retried.
    assert info.value.status == (400 if provider == "gemini" else 401)
    assert len(fake.requests) == 1
    assert wrong not in str(info.value) and wrong.encode() not in info.value.body


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_missing_key_names_the_variable_and_sends_nothing(
    memory_mesh: Any, fake: FakeProviders, provider: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV[provider])
    client = await _client(memory_mesh, fake, provider)
    try:
        with pytest.raises(LlmError, match=f"environment variable {KEY_ENV[provider]} is not set"):
            await client.chat(HELLO, max_tokens=4)
    finally:
        await client.close()
    assert fake.requests == []


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_stream_after_a_503(memory_mesh: Any, fake: FakeProviders, provider: str) -> None:
    """A 503 before the first event is retried; then the events arrive in order, with usage."""
    fake.fail(provider, 503, 1)
    client = await _client(memory_mesh, fake, provider)
    body = {"messages": HELLO, "max_tokens": 8, "stream_options": {"include_usage": True}}
    try:
        events = [e async for e in client.stream("/v1/chat/completions", body)]
    finally:
        await client.close()
    text = "".join(
        c["delta"].get("content") or "" for e in events for c in e.get("choices", []) if isinstance(c, dict)
    )
    assert text == "echo: hello there"
    assert events[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    failed, ok = fake.requests
    assert (failed.status, ok.status) == (503, 200)
    assert ok.path == EXPECTED_PATH[provider] and ok.body["stream"] is True
    _check_auth(provider, ok.headers)
    acc = client.accounting.snapshot()["replicas"][0]
    assert (acc["prompt_tokens"], acc["completion_tokens"]) == (2, 3)
    assert acc["ttft_s"]["count"] == 1


async def test_send_passes_the_body_through(memory_mesh: Any, fake: FakeProviders) -> None:
    """The gateway server's raw path: any OpenAI body, the model set per replica."""
    client = await _client(memory_mesh, fake, "azure")
    try:
        reply = await client.send(
            "/v1/chat/completions", {"messages": HELLO, "max_tokens": 3, "logprobs": True, "model": "ignored"}
        )
    finally:
        await client.close()
    assert reply.data["model"] == "gpt-4o-2024-08-06"  # Azure reports the deployment's model
    [req] = fake.requests
    assert req.body["logprobs"] is True and req.body["model"] == DEPLOYMENT
