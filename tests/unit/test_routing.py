"""Routing programs decide the next role from the message alone."""

from __future__ import annotations

import pytest

from agentmesh.agent.routing import SINK, LoopUntil, Sequential, StateMachine, build_programs
from agentmesh.errors import ConfigError, TaskFailed
from agentmesh.v1 import orchestrator_pb2 as pb


def walk(program, orch: pb.Orchestrator, on_step=None, limit: int = 50) -> list[str]:
    role = program.start(orch)
    seen = []
    while role != SINK and len(seen) < limit:
        seen.append(role)
        orch.routing.current_role = role
        if on_step:
            on_step(role, orch)
        role = program.advance(orch)
    return seen


def test_sequential_visits_each_role_once_then_sink() -> None:
    assert walk(Sequential("s", ["a", "b", "c"]), pb.Orchestrator()) == ["a", "b", "c"]


def test_loop_until_stops_on_predicate() -> None:
    def step(role: str, orch: pb.Orchestrator) -> None:
        if role == "judge":
            orch.results["agree"] = "true" if orch.routing.turn == 1 else "false"

    prog = LoopUntil(
        "l", ["a", "judge"], until=lambda r: r.get("agree") == "true", max_turns=5, then=["final"]
    )
    orch = pb.Orchestrator()
    assert walk(prog, orch, step) == ["a", "judge", "a", "judge", "final"]
    assert orch.routing.turn == 2


def test_loop_until_stops_at_turn_limit() -> None:
    prog = LoopUntil("l", ["a", "b"], until=lambda r: False, max_turns=3)
    orch = pb.Orchestrator()
    assert walk(prog, orch) == ["a", "b"] * 3
    assert orch.routing.turn == 3


def test_state_machine_follows_first_matching_transition() -> None:
    prog = StateMachine(
        "sm",
        "assistant",
        [
            ("assistant", "tools", {"action": "tool"}, None),
            ("assistant", SINK, {}, None),
            ("tools", "assistant", {}, None),
        ],
    )
    calls = {"n": 0}

    def step(role: str, orch: pb.Orchestrator) -> None:
        if role == "assistant":
            calls["n"] += 1
            orch.results["action"] = "tool" if calls["n"] < 3 else "answer"

    assert walk(prog, pb.Orchestrator(), step) == ["assistant", "tools", "assistant", "tools", "assistant"]
    assert prog.roles() == {"assistant", "tools"}


def test_state_machine_without_a_matching_transition_fails_the_task() -> None:
    prog = StateMachine("sm", "a", [("a", "b", {"go": "yes"}, None)])
    orch = pb.Orchestrator()
    orch.routing.current_role = prog.start(orch)
    with pytest.raises(TaskFailed) as info:
        prog.advance(orch)
    assert info.value.code == "routing"


def test_build_programs_from_config_dicts_and_clear_errors() -> None:
    progs = build_programs(
        {
            "seq": {"kind": "sequential", "order": ["a"]},
            "sm": {"kind": "state_machine", "start": "a", "transitions": [{"from": "a", "to": "sink"}]},
            "loop": {"kind": "loop_until", "body": ["a"], "until": "json:loads", "max_turns": 2},
        }
    )
    assert set(progs) == {"seq", "sm", "loop"}
    with pytest.raises(ConfigError, match=r"routing\.programs\.x\.kind"):
        build_programs({"x": {"kind": "teleport"}})
    with pytest.raises(ConfigError, match=r"routing\.programs\.x\.until"):
        build_programs({"x": {"kind": "loop_until", "body": ["a"], "until": "nosuchmodule_zz:f"}})
    with pytest.raises(ConfigError, match="max_turns"):
        build_programs({"x": {"kind": "loop_until", "body": ["a"], "max_turns": 0}})
