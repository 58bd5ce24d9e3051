"""What a user writes: a role is a class with one async step function.

A :class:`Role` receives a :class:`Task` (a view over the Orchestrator message), does its step
(an LLM call, a tool call, a check), and records what it did. The runtime does everything else:
inbox, concurrency, retries, routing, forwarding, tracing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agentmesh.v1 import orchestrator_pb2 as pb

if TYPE_CHECKING:
    from agentmesh.container.client import ContainerClient, SandboxRef
    from agentmesh.llm_gateway.client import LlmClient

__all__ = ["CONTAINER_RESOURCE", "Role", "RoleContext", "Task"]

#: ``HeldResource.kind`` of a sandbox a task holds
CONTAINER_RESOURCE = "container"

PayloadFetcher = Callable[[pb.PayloadRef], Awaitable[str]]


@dataclass
class RoleContext:
    """What a role instance knows about where it runs."""

    name: str
    replica_id: str
    run_id: str
    params: Mapping[str, Any] = field(default_factory=dict)
    llm: LlmClient | None = None
    containers: ContainerClient | None = None


class Role:
    """Base class of every role. Override :meth:`step`; :meth:`setup`/:meth:`teardown` are optional."""

    def __init__(self, ctx: RoleContext) -> None:
        self.ctx = ctx

    @property
    def llm(self) -> LlmClient:
        if self.ctx.llm is None:
            raise RuntimeError(f"role {self.ctx.name!r} has no `llm` in its config")
        return self.ctx.llm

    @property
    def containers(self) -> ContainerClient:
        if self.ctx.containers is None:
            raise RuntimeError(
                f"role {self.ctx.name!r} has no sandboxes: set `container: true` in its config"
            )
        return self.ctx.containers

    async def sandbox(self, task: Task, *, image: str = "default") -> SandboxRef:
        """The task's sandbox: the one it already holds, or a new one it holds from now on.

        The sandbox travels with the task as a ``HeldResource`` (its id and holder), so every role
        after this one finds the same sandbox, and the sink releases it when the task ends.
        """
        from agentmesh.container.client import SandboxRef

        for res in task.orchestrator.resources:
            if res.kind == CONTAINER_RESOURCE:
                self.containers.remember(res.id, res.holder)
                return SandboxRef(res.id, res.holder)
        ref = await self.containers.acquire(image)
        task.orchestrator.resources.add(kind=CONTAINER_RESOURCE, id=ref.id, holder=ref.holder_address)
        return ref

    async def setup(self) -> None:
        """Called once per replica before the first step."""

    async def step(self, task: Task) -> None:
        raise NotImplementedError

    async def teardown(self) -> None:
        """Called once per replica when it drains."""


class Task:
    """A role's view of one Orchestrator: input, results, history, and a way to add a turn."""

    __slots__ = ("_fetch", "_input", "_role", "_step_started_ns", "orchestrator", "replica_id")

    def __init__(
        self,
        orchestrator: pb.Orchestrator,
        *,
        role: str,
        replica_id: str,
        fetch: PayloadFetcher | None = None,
    ) -> None:
        self.orchestrator = orchestrator
        self.replica_id = replica_id
        self._role = role
        self._fetch = fetch
        self._input: dict[str, Any] | None = None
        self._step_started_ns = time.time_ns()

    @property
    def id(self) -> str:
        return self.orchestrator.task_id

    @property
    def seed(self) -> int:
        return self.orchestrator.seed

    @property
    def turn(self) -> int:
        """Completed loop iterations of a loop-until program (0 on the first pass)."""
        return self.orchestrator.routing.turn

    @property
    def input(self) -> dict[str, Any]:
        if self._input is None:
            raw = self.orchestrator.input_json
            self._input = json.loads(raw) if raw else {}
        return self._input

    @property
    def results(self) -> MutableMapping[str, str]:
        return self.orchestrator.results  # type: ignore[return-value]

    @property
    def history(self) -> Any:
        return self.orchestrator.history

    async def content(self, index: int) -> str:
        """The content of history entry ``index``, fetched if it was offloaded."""
        turn = self.orchestrator.history[index]
        if turn.WhichOneof("body") == "payload":
            if self._fetch is None:
                raise RuntimeError("this task has offloaded content but no payload store to fetch it from")
            return await self._fetch(turn.payload)
        return turn.content

    async def transcript(self, roles: Collection[str] | None = None) -> list[tuple[str, str]]:
        """(role, content) of past turns, oldest first; offloaded content is fetched."""
        out: list[tuple[str, str]] = []
        for i, turn in enumerate(self.orchestrator.history):
            if roles is None or turn.role in roles:
                out.append((turn.role, await self.content(i)))
        return out

    def add_turn(
        self,
        content: str,
        *,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        turn = self.orchestrator.history.add()
        turn.role = self._role
        turn.replica_id = self.replica_id
        turn.content = content
        turn.usage.prompt_tokens = prompt_tokens
        turn.usage.completion_tokens = completion_tokens
        turn.started_unix_ns = self._step_started_ns
        turn.finished_unix_ns = time.time_ns()
        turn.attempt = self.orchestrator.attempt + 1
        if metadata:
            turn.metadata.update(metadata)
