"""Providers without sockets: the URL, headers and body each one builds, and its errors.

Keys come from the environment at call time; errors name the variable and never hold its value.
"""

from __future__ import annotations

from typing import Any

import pytest

from agentmesh.discovery.base import Endpoint
from agentmesh.errors import LlmError
from agentmesh.llm_gateway.providers import (
    PROVIDERS,
    AzureProvider,
    GeminiProvider,
    OpenAIProvider,
    VllmProvider,
    provider_for,
)

SECRET = "sk-test-never-shown-0123456789"
BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "model": "client-name"}


def _ep(**meta: str) -> Endpoint:
    return Endpoint("llm.m", "r1", "example.invalid:443", meta)


@pytest.fixture(autouse=True)
def _no_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    # The developer's own keys must not leak into (or satisfy) these tests.
    for var in ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "GEMINI_API_KEY", "MY_KEY"):
        monkeypatch.delenv(var, raising=False)


def test_registry_names_every_provider() -> None:
    assert sorted(PROVIDERS) == ["azure", "gemini", "openai", "vllm"]
    assert isinstance(provider_for(_ep()), VllmProvider)
    assert isinstance(provider_for(_ep(provider="openai")), OpenAIProvider)
    assert isinstance(provider_for(_ep(provider="azure")), AzureProvider)
    assert isinstance(provider_for(_ep(provider="gemini")), GeminiProvider)


def test_unknown_provider_error_names_it_and_the_choices() -> None:
    with pytest.raises(LlmError, match=r"unknown provider 'anthropic'.*'azure', 'gemini', 'openai', 'vllm'"):
        provider_for(_ep(provider="anthropic"))


# -- OpenAI --------------------------------------------------------------------------------------


def test_openai_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    ep = _ep(provider="openai")
    p = provider_for(ep)
    assert p.url(ep, "/v1/chat/completions") == "https://api.openai.com/v1/chat/completions"
    assert p.url(ep, "/v1/completions") == "https://api.openai.com/v1/completions"
    assert p.headers(ep) == {"Authorization": f"Bearer {SECRET}"}
    assert p.body(ep, BODY)["model"] == "client-name"
    assert p.probe_url(ep) is None


def test_openai_base_url_model_and_named_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEY", SECRET)
    monkeypatch.setenv("OPENAI_API_KEY", "the-default-one")
    ep = _ep(
        provider="openai", base_url="http://10.1.2.3:9000/v1/", model="gpt-4o-mini", api_key_env="MY_KEY"
    )
    p = provider_for(ep)
    assert p.url(ep, "/v1/chat/completions") == "http://10.1.2.3:9000/v1/chat/completions"
    assert p.headers(ep) == {"Authorization": f"Bearer {SECRET}"}
    body = p.body(ep, BODY)
    assert body["model"] == "gpt-4o-mini" and body["messages"] == BODY["messages"]
    assert BODY["model"] == "client-name"  # a copy: the caller's body is untouched


def test_openai_compatible_without_auth_sends_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    ep = _ep(provider="openai", base_url="http://127.0.0.1:8000/v1", auth="none")
    assert provider_for(ep).headers(ep) == {}


# -- Azure ---------------------------------------------------------------------------------------


def _azure(**extra: str) -> Endpoint:
    meta = {
        "provider": "azure",
        "base_url": "https://myres.openai.azure.com/",
        "deployment": "gpt4o-prod",
        "api_version": "2024-10-21",
        "model": "gpt-4o",
    }
    meta.update(extra)
    return _ep(**meta)


def test_azure_url_header_and_body(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", SECRET)
    ep = _azure()
    p = provider_for(ep)
    assert (
        p.url(ep, "/v1/chat/completions")
        == "https://myres.openai.azure.com/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
    )
    assert (
        p.url(ep, "/v1/completions")
        == "https://myres.openai.azure.com/openai/deployments/gpt4o-prod/completions?api-version=2024-10-21"
    )
    # Azure authenticates with api-key, not a bearer token.
    assert p.headers(ep) == {"api-key": SECRET}
    assert p.body(ep, BODY)["model"] == "gpt4o-prod"
    assert p.probe_url(ep) is None


def test_azure_quotes_deployment_and_version(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = _azure(deployment="a b/c", api_version="2025-01-01-preview&x=1")
    url = provider_for(ep).url(ep, "/v1/chat/completions")
    assert "/openai/deployments/a%20b%2Fc/chat/completions?api-version=2025-01-01-preview%26x%3D1" in url


@pytest.mark.parametrize("missing", ["base_url", "deployment", "api_version"])
def test_azure_missing_metadata_is_named(missing: str) -> None:
    ep = _azure(**{missing: ""})
    with pytest.raises(LlmError, match=f"no {missing} in its discovery metadata"):
        provider_for(ep).url(ep, "/v1/chat/completions")


# -- Gemini --------------------------------------------------------------------------------------


def test_gemini_url_and_bearer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", SECRET)
    ep = _ep(provider="gemini", model="gemini-2.0-flash")
    p = provider_for(ep)
    assert (
        p.url(ep, "/v1/chat/completions")
        == "https://generativelanguage.googleapis.com/v1beta/openai/chat/completions"
    )
    assert p.headers(ep) == {"Authorization": f"Bearer {SECRET}"}
    assert p.body(ep, BODY)["model"] == "gemini-2.0-flash"
    assert p.probe_url(ep) is None


def test_gemini_has_no_legacy_completions() -> None:
    ep = _ep(provider="gemini")
    with pytest.raises(LlmError, match=r"/v1/completions is not available.*no legacy /completions"):
        provider_for(ep).url(ep, "/v1/completions")


# -- keys ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("meta", "var"),
    [
        ({"provider": "openai"}, "OPENAI_API_KEY"),
        ({"provider": "gemini"}, "GEMINI_API_KEY"),
        (
            {
                "provider": "azure",
                "base_url": "https://x.openai.azure.com",
                "deployment": "d",
                "api_version": "2024-10-21",
            },
            "AZURE_OPENAI_API_KEY",
        ),
        ({"provider": "openai", "api_key_env": "MY_KEY"}, "MY_KEY"),
    ],
)
def test_missing_key_names_the_variable(meta: dict[str, str], var: str) -> None:
    ep = _ep(**meta)
    with pytest.raises(LlmError, match=f"environment variable {var} is not set"):
        provider_for(ep).headers(ep)


def test_errors_and_reprs_never_hold_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key is set under a name the endpoint does not use: the error names that variable, and no
    error, repr or metadata anywhere carries the value."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    texts: list[str] = []
    for meta in (
        {"provider": "openai", "api_key_env": "MY_KEY"},
        {"provider": "gemini"},
        {
            "provider": "azure",
            "base_url": "https://x.openai.azure.com",
            "deployment": "d",
            "api_version": "v",
        },
        {"provider": "gemini", "api_key_env": "MY_KEY"},
    ):
        ep = _ep(**meta)
        p = provider_for(ep)
        with pytest.raises(LlmError) as info:
            p.headers(ep)
        texts += [str(info.value), repr(info.value), repr(p), repr(ep)]
    ok = _ep(provider="openai")
    headers: dict[str, Any] = provider_for(ok).headers(ok)
    assert headers["Authorization"].endswith(SECRET)  # it is used where it belongs...
    texts += [repr(provider_for(ok)), repr(ok)]
    assert not [t for t in texts if SECRET in t]  # ...and nowhere else


def test_key_is_read_at_request_time(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = _ep(provider="openai")
    monkeypatch.setenv("OPENAI_API_KEY", "first")
    assert provider_for(ep).headers(ep)["Authorization"] == "Bearer first"
    monkeypatch.setenv("OPENAI_API_KEY", "rotated")
    assert provider_for(ep).headers(ep)["Authorization"] == "Bearer rotated"


def test_vllm_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = Endpoint("llm.m", "r1", "10.0.0.1:8000", {"model": "served"})
    p = provider_for(ep)
    assert p.url(ep, "/v1/chat/completions") == "http://10.0.0.1:8000/v1/chat/completions"
    assert p.headers(ep) == {}
    assert p.body(ep, BODY)["model"] == "served"
    assert p.probe_url(ep) == "http://10.0.0.1:8000/metrics"
    monkeypatch.setenv("MY_KEY", SECRET)
    keyed = Endpoint("llm.m", "r1", "10.0.0.1:8000", {"api_key_env": "MY_KEY", "probe": "none"})
    assert p.headers(keyed) == {"Authorization": f"Bearer {SECRET}"}
    assert p.probe_url(keyed) is None


# -- registration by the launcher ----------------------------------------------------------------


def _run_config(llms: dict[str, dict[str, Any]]) -> Any:
    from agentmesh.config import RunConfig

    roles = {f"r{i}": {"class": "m.roles:A", "llm": name} for i, name in enumerate(llms)}
    return RunConfig.from_dict(
        {
            "name": "t",
            "dataset": {"path": "rows.jsonl"},
            "llms": llms,
            "roles": roles,
            "routing": {"program": "p", "programs": {"p": {"kind": "sequential", "order": list(roles)}}},
        }
    )


async def test_launcher_registers_external_llms_without_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    from agentmesh.discovery.memory import MemoryDiscovery
    from agentmesh.launcher import _register_external_llms
    from agentmesh.llm_gateway.client import llm_service_name

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("MY_KEY", SECRET)
    cfg = _run_config(
        {
            "gpt": {"backend": "openai", "model": "gpt-4o-mini"},
            "az": {
                "backend": "azure",
                "model": "gpt-4o",
                "base_url": "https://myres.openai.azure.com",
                "deployment": "prod",
                "api_version": "2024-10-21",
                "api_key_env": "MY_KEY",
            },
            "gem": {"backend": "gemini", "model": "gemini-2.0-flash", "api_key_env": "MY_KEY"},
            "local": {"backend": "openai-compatible", "model": "m", "base_url": "http://127.0.0.1:8123"},
        }
    )
    disc = MemoryDiscovery()
    regs = await _register_external_llms(cfg, disc)
    assert len(regs) == 4
    got = {
        ep.id: ep
        for svc in ("gpt-4o-mini", "gpt-4o", "gemini-2.0-flash", "m")
        for ep in await _eps(disc, svc)
    }
    assert got["gpt-external"].metadata == {
        "provider": "openai",
        "backend": "openai",
        "model": "gpt-4o-mini",
        "probe": "none",
        "base_url": "https://api.openai.com/v1",
        "api_key_env": "OPENAI_API_KEY",
    }
    assert got["gpt-external"].address == "api.openai.com:443"
    assert got["gpt-external"].service == llm_service_name("gpt-4o-mini")
    az = got["az-external"].metadata
    assert (az["provider"], az["deployment"], az["api_version"], az["api_key_env"]) == (
        "azure",
        "prod",
        "2024-10-21",
        "MY_KEY",
    )
    assert got["gem-external"].metadata["base_url"].startswith("https://generativelanguage.googleapis.com/")
    local = got["local-external"].metadata
    # a server root gets OpenAI's /v1; no key configured: no auth header at all
    assert (local["provider"], local["base_url"], local["auth"]) == (
        "openai",
        "http://127.0.0.1:8123/v1",
        "none",
    )
    assert "api_key_env" not in local
    assert all(SECRET not in repr(ep) for ep in got.values())


async def _eps(disc: Any, model: str) -> tuple[Endpoint, ...]:
    from agentmesh.llm_gateway.client import llm_service_name

    return tuple(await disc.snapshot(llm_service_name(model)))


async def test_launcher_refuses_a_missing_key_variable() -> None:
    from agentmesh.discovery.memory import MemoryDiscovery
    from agentmesh.errors import ConfigError
    from agentmesh.launcher import _register_external_llms

    cfg = _run_config({"gem": {"backend": "gemini", "model": "gemini-2.0-flash"}})
    with pytest.raises(
        ConfigError, match=r"llms\.gem\.api_key_env: environment variable GEMINI_API_KEY is not set"
    ):
        await _register_external_llms(cfg, MemoryDiscovery())
