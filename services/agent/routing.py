"""Routing programs: which role acts next, decided by each replica from the message itself.

The program is declared in the run config and known by name to every replica of the run; the
Orchestrator carries its name and its state (`RoutingState`: position, turn, hops). After a
step, the replica asks the program for the next role and forwards the task there directly.

Three kinds:

* ``sequential`` — ``order: [a, b, c]`` then the sink.
* ``loop_until`` — repeat ``body`` until ``until(results)`` holds or ``max_turns`` passes are done,
  then ``then`` (optional), then the sink.
* ``state_machine`` — from the role that just acted, the first transition whose condition holds
  (``when`` equalities on results, or a ``when_fn`` predicate) names the next role.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from agentmesh.errors import ConfigError, TaskFailed
from agentmesh.loader import load_object
from agentmesh.v1 import orchestrator_pb2 as pb

__all__ = ["SINK", "LoopUntil", "RoutingProgram", "Sequential", "StateMachine", "build_programs"]

SINK = "sink"

Predicate = Callable[[Mapping[str, str]], bool]


class RoutingProgram(abc.ABC):
    """Decides the first role and, after each step, the next one. Mutates ``orch.routing``."""

    name: str

    @abc.abstractmethod
    def roles(self) -> set[str]:
        """Every role this program may route to (the sink excluded)."""

    @abc.abstractmethod
    def start(self, orch: pb.Orchestrator) -> str:
        """Initialise the routing state of a new task; return the first role."""

    @abc.abstractmethod
    def advance(self, orch: pb.Orchestrator) -> str:
        """After ``orch.routing.current_role`` did its step: update the state, return the next role."""


class Sequential(RoutingProgram):
    def __init__(self, name: str, order: Iterable[str]) -> None:
        self.name = name
        self.order = tuple(order)
        if not self.order:
            raise ConfigError(
                "a sequential program needs a non-empty `order`", key=f"routing.programs.{name}.order"
            )

    def roles(self) -> set[str]:
        return set(self.order)

    def start(self, orch: pb.Orchestrator) -> str:
        orch.routing.program = self.name
        orch.routing.position = 0
        return self.order[0]

    def advance(self, orch: pb.Orchestrator) -> str:
        pos = orch.routing.position + 1
        orch.routing.position = pos
        return self.order[pos] if pos < len(self.order) else SINK


class LoopUntil(RoutingProgram):
    def __init__(
        self,
        name: str,
        body: Iterable[str],
        *,
        until: Predicate | None,
        max_turns: int,
        then: Iterable[str] = (),
    ) -> None:
        self.name = name
        self.body = tuple(body)
        self.then = tuple(then)
        self.until = until
        self.max_turns = max_turns
        if not self.body:
            raise ConfigError(
                "a loop_until program needs a non-empty `body`", key=f"routing.programs.{name}.body"
            )
        if max_turns < 1:
            raise ConfigError(
                f"expected max_turns >= 1, got {max_turns}", key=f"routing.programs.{name}.max_turns"
            )

    def roles(self) -> set[str]:
        return set(self.body) | set(self.then)

    def start(self, orch: pb.Orchestrator) -> str:
        orch.routing.program = self.name
        orch.routing.position = 0
        orch.routing.turn = 0
        return self.body[0]

    def advance(self, orch: pb.Orchestrator) -> str:
        r = orch.routing
        pos = r.position + 1
        n = len(self.body)
        if pos < n:
            r.position = pos
            return self.body[pos]
        if pos == n:  # a full pass of the body is done
            r.turn += 1
            stop = r.turn >= self.max_turns or (self.until is not None and bool(self.until(orch.results)))
            if not stop:
                r.position = 0
                return self.body[0]
        # after the loop: the `then` roles, addressed past the body
        k = pos - n
        r.position = pos
        return self.then[k] if k < len(self.then) else SINK


class StateMachine(RoutingProgram):
    def __init__(
        self, name: str, start: str, transitions: Iterable[tuple[str, str, Mapping[str, str], Any]]
    ) -> None:
        self.name = name
        self.start_role = start
        self.table: dict[str, list[tuple[str, dict[str, str], Predicate | None]]] = {}
        for src, dst, when, when_fn in transitions:
            self.table.setdefault(src, []).append((dst, dict(when), when_fn))

    def roles(self) -> set[str]:
        out = {self.start_role} | set(self.table)
        for edges in self.table.values():
            out |= {dst for dst, _, _ in edges}
        out.discard(SINK)
        return out

    def start(self, orch: pb.Orchestrator) -> str:
        orch.routing.program = self.name
        orch.routing.position = 0
        return self.start_role

    def advance(self, orch: pb.Orchestrator) -> str:
        src = orch.routing.current_role
        results = orch.results
        orch.routing.position += 1
        for dst, when, when_fn in self.table.get(src, ()):
            if all(results.get(k) == v for k, v in when.items()) and (when_fn is None or when_fn(results)):
                return dst
        raise TaskFailed(
            "routing", f"state machine {self.name!r}: no transition from {src!r} matches the results"
        )


def build_programs(programs: Mapping[str, Any]) -> dict[str, RoutingProgram]:
    """Build routing programs from ``RoutingConfig.programs`` (ProgramConfig objects or dicts)."""
    out: dict[str, RoutingProgram] = {}
    for name, p in programs.items():
        get = p.get if isinstance(p, Mapping) else (lambda k, d=None, _p=p: getattr(_p, k, d))
        kind = get("kind")
        key = f"routing.programs.{name}"
        if kind == "sequential":
            out[name] = Sequential(name, get("order") or ())
        elif kind == "loop_until":
            until_spec = get("until")
            until = load_object(until_spec, key=f"{key}.until") if until_spec else None
            out[name] = LoopUntil(
                name,
                get("body") or (),
                until=until,
                max_turns=int(get("max_turns", 3)),
                then=get("then") or (),
            )
        elif kind == "state_machine":
            transitions: list[tuple[str, str, Mapping[str, str], Any]] = []
            for t in get("transitions") or ():
                tget = t.get if isinstance(t, Mapping) else (lambda k, d=None, _t=t: getattr(_t, k, d))
                src = tget("src") if tget("src") is not None else tget("from")
                dst = tget("dst") if tget("dst") is not None else tget("to")
                fn_spec = tget("when_fn")
                fn = load_object(fn_spec, key=f"{key}.transitions.when_fn") if fn_spec else None
                transitions.append((str(src), str(dst), tget("when") or {}, fn))
            start = get("start")
            if not start:
                raise ConfigError("a state_machine program needs `start`", key=f"{key}.start")
            out[name] = StateMachine(name, start, transitions)
        else:
            raise ConfigError(
                f"expected kind sequential, loop_until or state_machine, got {kind!r}", key=f"{key}.kind"
            )
    return out
