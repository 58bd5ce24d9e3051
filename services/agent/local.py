"""Run a whole mesh inside one event loop: every replica a real gRPC server on loopback.

Used by tests and benchmarks (and handy for debugging a pipeline): the same replicas and the same
wire as a Ray deployment, without Ray. ``LocalMesh.start()`` brings the replicas up and registers
them in the given discovery; ``stop()`` drains them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agentmesh.agent.payload import PayloadStore
from agentmesh.agent.replica import AgentReplica, ReplicaLimits
from agentmesh.agent.role import Role, RoleContext
from agentmesh.agent.routing import RoutingProgram
from agentmesh.discovery import Discovery

__all__ = ["LocalMesh", "LocalRole"]


@dataclass
class LocalRole:
    factory: Callable[[RoleContext], Role]
    replicas: int = 1
    limits: ReplicaLimits = field(default_factory=ReplicaLimits)
    params: Mapping[str, Any] = field(default_factory=dict)
    llm: Any = None


class LocalMesh:
    def __init__(
        self,
        *,
        run_id: str,
        roles: Mapping[str, LocalRole],
        programs: Mapping[str, RoutingProgram],
        discovery: Discovery,
        payloads: PayloadStore | None = None,
        discovery_ttl_s: float = 5.0,
    ) -> None:
        self.run_id = run_id
        self._roles = roles
        self._programs = programs
        self._discovery = discovery
        self._payloads = payloads
        self._ttl_s = discovery_ttl_s
        self.replicas: dict[str, list[AgentReplica]] = {}

    async def start(self) -> None:
        for name, spec in self._roles.items():
            for i in range(spec.replicas):
                rep = AgentReplica(
                    role_name=name,
                    role_factory=spec.factory,
                    run_id=self.run_id,
                    programs=self._programs,
                    discovery=self._discovery,
                    limits=spec.limits,
                    params=spec.params,
                    payloads=self._payloads,
                    llm=spec.llm,
                    replica_id=f"{name}-{i}",
                    discovery_ttl_s=self._ttl_s,
                )
                await rep.start()
                self.replicas.setdefault(name, []).append(rep)

    def all(self) -> list[AgentReplica]:
        return [r for reps in self.replicas.values() for r in reps]

    async def stop(self) -> None:
        for rep in self.all():
            await rep.stop()
        self.replicas.clear()
