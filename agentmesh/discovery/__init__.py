"""Service discovery behind one interface: etcd, Consul, or in-memory (unit tests)."""

from __future__ import annotations

from agentmesh.discovery.base import Discovery, Endpoint, EndpointCache, Registration, validate_service_name
from agentmesh.errors import DiscoveryError

__all__ = ["Discovery", "Endpoint", "EndpointCache", "Registration", "connect", "validate_service_name"]


def connect(url: str) -> Discovery:
    """Open a discovery backend from a URL.

    ``etcd://host:port[,host:port...]`` — etcd v3 (aetcd); ``consul://host:port`` — Consul HTTP API
    (py-consul); ``memory://`` — in-process, for unit tests.
    """
    scheme, sep, _rest = url.partition("://")
    if not sep:
        raise DiscoveryError(
            f"bad discovery url {url!r}: expected etcd://host:port, consul://host:port or memory://"
        )
    if scheme == "memory":
        from agentmesh.discovery.memory import MemoryDiscovery

        return MemoryDiscovery()
    if scheme == "etcd":
        from agentmesh.discovery.etcd import EtcdDiscovery

        return EtcdDiscovery.from_url(url)
    if scheme == "consul":
        from agentmesh.discovery.consul import ConsulDiscovery

        return ConsulDiscovery.from_url(url)
    raise DiscoveryError(f"unknown discovery scheme {scheme!r} in {url!r}: expected etcd, consul or memory")
