"""Unit tests of the collaborative-reasoning pipeline: roles driven over fake LLMs, no sockets."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from agentmesh.agent.role import Role, RoleContext, Task
from agentmesh.errors import ConfigError, TaskFailed
from agentmesh.pipelines.collab_reasoning import QUESTIONS_PATH
from agentmesh.pipelines.collab_reasoning.roles import (
    Extractor,
    Matcher,
    Student,
    Teacher,
    agreed,
    extract_letter,
)
from agentmesh.v1 import orchestrator_pb2 as pb

ROW: dict[str, Any] = {
    "id": "q-test",
    "question": "What is the capital of France?",
    "options": {"A": "Madrid", "B": "Paris", "C": "Rome", "D": "Berlin"},
    "answer": "B",
}
OPTIONS = ROW["options"]


@dataclass
class FakeChatResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    replica_id: str = "fake-0"
    latency_s: float = 0.01
    model: str = "fake-model"


@dataclass
class FakeLlm:
    """Answers from a script: ``reply(messages, call_index) -> text``; records every call."""

    reply: Callable[[list[dict[str, str]], int], str]
    calls: list[dict[str, Any]] = field(default_factory=list)

    async def chat(self, messages: list[dict[str, str]], *, max_tokens: int, **kw: Any) -> FakeChatResult:
        self.calls.append({"messages": messages, "max_tokens": max_tokens, **kw})
        text = self.reply(messages, len(self.calls) - 1)
        return FakeChatResult(
            text, prompt_tokens=sum(len(m["content"]) for m in messages) // 4, completion_tokens=7
        )


def new_orchestrator(row: Mapping[str, Any] = ROW, seed: int = 5) -> pb.Orchestrator:
    return pb.Orchestrator(
        task_id=str(row.get("id", "t")), run_id="run", seed=seed, input_json=json.dumps(row)
    )


def ctx(name: str, llm: FakeLlm | None = None, **params: Any) -> RoleContext:
    return RoleContext(name=name, replica_id=f"{name}-0", run_id="run", params=params, llm=llm)  # type: ignore[arg-type]


def turn_of(orch: pb.Orchestrator, role: str, text: str, *, turn: int = 0) -> None:
    """Record a past turn of ``role`` directly in the message."""
    orch.routing.turn = turn
    Task(orch, role=role, replica_id=f"{role}-0").add_turn(text)


async def run_step(role: Role, orch: pb.Orchestrator) -> Task:
    task = Task(orch, role=role.ctx.name, replica_id=role.ctx.replica_id)
    await role.step(task)
    return task


# --------------------------------------------------------------------------------------------------
# extract_letter


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Paris is the capital.\nAnswer: B", "B"),
        ("The answer is (C).", "C"),
        ("**Answer:** D", "D"),
        ("I think the answer is option A because it is right.", "A"),
        ("Final answer = D", "D"),
        ("answer: c", "C"),
        ("the answer is (b)", "B"),
        ("Answer:B.", "B"),
        ("Answer: B\nHmm, no. The answer is C.", "C"),  # the last statement wins
        ("So the answer is: B) Paris", "B"),
        ("I choose C.", "C"),
        ("The correct option is A.", "A"),
        ("B)", "B"),
        ("B", "B"),
        ("(d)", "D"),
        ("B) Paris", "B"),
        ("Let me think about it.\n(C)", "C"),
        ("It is in France, so the answer is Paris.", "B"),  # by option text
        ("Answer: Paris", "B"),
        ("The answer is a city.", None),  # "a" is the article, not option A
        ("I pick a number.", None),
        ("Madrid, Rome and Berlin are wrong, so I am unsure.", None),
        ("", None),
        ("Answer: E", None),  # not one of the options
        ('The answer is "D".', "D"),
        ("The answer is indeed for D.", "D"),
        # small models echo the question: a list of options chooses none of them
        ("Question: What is 20?\nA) 30\nB) 31\nC) 32\nD) 34", None),
        ("The answer is:\nQuestion: Which city?\nA) Madrid\nB) Paris", None),
        ("A) Madrid\nE) Lyon", "A"),  # E is not an option: one label only
    ],
)
def test_extract_letter(text: str, expected: str | None) -> None:
    assert extract_letter(text, "ABCD", OPTIONS) == expected


def test_extract_letter_respects_the_letter_set() -> None:
    assert extract_letter("Answer: E", "ABCDE") == "E"
    assert extract_letter("Answer: E", "ABCD") is None


# --------------------------------------------------------------------------------------------------
# agreed and the matcher


@pytest.mark.parametrize(
    ("teacher", "student", "expected"),
    [("B", "B", True), ("B", "C", False), ("?", "?", False), ("", "", False), ("b", "b", False)],
)
def test_agreed(teacher: str, student: str, expected: bool) -> None:
    assert agreed({"teacher_answer": teacher, "student_answer": student}) is expected


def test_agreed_without_answers_is_false() -> None:
    assert agreed({}) is False


@pytest.mark.parametrize(
    ("teacher", "student", "gold", "turn", "want"),
    [
        ("B", "B", "B", 0, {"agreed": "true", "final_answer": "B", "correct": "true", "turns": "1"}),
        ("C", "C", "B", 1, {"agreed": "true", "final_answer": "C", "correct": "false", "turns": "2"}),
        ("A", "B", "B", 2, {"agreed": "false", "final_answer": "A", "correct": "false", "turns": "3"}),
        ("?", "B", "B", 2, {"agreed": "false", "final_answer": "B", "correct": "true", "turns": "3"}),
        ("?", "?", "B", 0, {"agreed": "false", "final_answer": "?", "correct": "false", "turns": "1"}),
        ("D", "D", None, 0, {"agreed": "true", "final_answer": "D", "correct": "unknown", "turns": "1"}),
    ],
)
async def test_matcher(teacher: str, student: str, gold: str | None, turn: int, want: dict[str, str]) -> None:
    row = {k: v for k, v in ROW.items() if k != "answer"} | ({"answer": gold} if gold else {})
    orch = new_orchestrator(row)
    orch.routing.turn = turn
    orch.results.update({"teacher_answer": teacher, "student_answer": student})
    await run_step(Matcher(ctx("matcher")), orch)
    assert {k: orch.results[k] for k in want} == want
    assert orch.history[-1].role == "matcher"
    assert orch.history[-1].usage.prompt_tokens == 0


# --------------------------------------------------------------------------------------------------
# debaters


async def test_teacher_first_turn_is_the_question_alone() -> None:
    llm = FakeLlm(lambda m, i: "Paris is in France.\nAnswer: B")
    orch = new_orchestrator()
    await run_step(Teacher(ctx("teacher", llm, max_tokens=50, temperature=0.3)), orch)
    (call,) = llm.calls
    assert [m["role"] for m in call["messages"]] == ["system", "user"]
    user = call["messages"][1]["content"]
    assert "What is the capital of France?" in user and "B) Paris" in user and "D) Berlin" in user
    assert call["max_tokens"] == 50 and call["temperature"] == 0.3
    assert call["session_id"] == "q-test"
    turn = orch.history[-1]
    assert (turn.role, turn.content) == ("teacher", "Paris is in France.\nAnswer: B")
    assert turn.usage.completion_tokens == 7 and turn.usage.prompt_tokens > 0
    assert dict(turn.metadata) == {
        "speaker": "teacher",
        "model": "fake-model",
        "turn": "0",
        "llm_replica": "fake-0",
        "llm_calls": "1",
    }


async def test_teacher_sees_the_students_previous_reasoning() -> None:
    orch = new_orchestrator()
    turn_of(orch, "teacher", "Madrid is big.\nAnswer: A")
    turn_of(orch, "student", "France's capital is Paris, the seat of government.\nAnswer: B")
    turn_of(orch, "extractor", "teacher=A student=B")
    orch.routing.turn = 1
    llm = FakeLlm(lambda m, i: "The student is right.\nAnswer: B")
    await run_step(Teacher(ctx("teacher", llm)), orch)
    messages = llm.calls[0]["messages"]
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    # the same question block first (a shared prefix), then its own answer, then the student's
    assert user.startswith("Question: What is the capital of France?\nA) Madrid")
    own_at = user.index("Your previous answer:\nMadrid is big.\nAnswer: A")
    peer_at = user.index("The student answered:\nFrance's capital is Paris, the seat of government.")
    assert own_at < peer_at
    assert orch.history[-1].metadata["turn"] == "1"


async def test_student_sees_the_teachers_reasoning_of_this_turn_only_from_turn_one() -> None:
    orch = new_orchestrator()
    turn_of(orch, "teacher", "Teacher turn zero.\nAnswer: A")
    llm = FakeLlm(lambda m, i: "Answer: C")
    await run_step(Student(ctx("student", llm)), orch)
    assert "Teacher turn zero" not in json.dumps(llm.calls[0]["messages"])  # independent on turn 0

    turn_of(orch, "teacher", "Teacher turn one.\nAnswer: B", turn=1)
    await run_step(Student(ctx("student", llm)), orch)
    user = llm.calls[1]["messages"][-1]["content"]
    assert "Your previous answer:\nAnswer: C" in user
    assert "The teacher answered:\nTeacher turn one." in user and "Teacher turn zero" not in user


async def test_peer_text_is_clipped_and_seeds_differ_per_turn_and_role() -> None:
    orch = new_orchestrator()
    turn_of(orch, "student", "x" * 5000)
    orch.routing.turn = 1
    llm = FakeLlm(lambda m, i: "Answer: B")
    teacher = Teacher(ctx("teacher", llm, peer_max_chars=100))
    await run_step(teacher, orch)
    assert len(llm.calls[0]["messages"][-1]["content"]) < 400
    orch.routing.turn = 2
    await run_step(teacher, orch)
    await run_step(Student(ctx("student", llm)), orch)
    seeds = [c["seed"] for c in llm.calls]
    assert len(set(seeds)) == 3
    # reproducible: the same task, role and turn give the same seed
    again = FakeLlm(lambda m, i: "Answer: B")
    orch2 = new_orchestrator()
    orch2.routing.turn = 2
    await run_step(Teacher(ctx("teacher", again)), orch2)
    assert again.calls[0]["seed"] == seeds[1]


def test_debater_config_errors_name_the_key() -> None:
    llm = FakeLlm(lambda m, i: "")
    with pytest.raises(ConfigError, match=r"roles\.teacher\.params\.max_tokens"):
        Teacher(ctx("teacher", llm, max_tokens=0))
    with pytest.raises(ConfigError, match=r"roles\.student\.params\.temperature"):
        Student(ctx("student", llm, temperature="hot"))
    with pytest.raises(ConfigError, match=r"roles\.teacher\.llm"):
        Teacher(ctx("teacher", None))
    with pytest.raises(ConfigError, match=r"revise_prompt"):
        Teacher(ctx("teacher", llm, revise_prompt="{nope}"))
    with pytest.raises(ConfigError, match=r"roles\.extractor\.params\.use_llm"):
        Extractor(ctx("extractor", llm, use_llm="yes"))


async def test_bad_row_fails_the_task_naming_the_field() -> None:
    llm = FakeLlm(lambda m, i: "")
    orch = new_orchestrator({"id": "bad", "question": "Q?", "options": ["x", "y"]})
    with pytest.raises(TaskFailed, match="'options'"):
        await run_step(Teacher(ctx("teacher", llm)), orch)
    assert llm.calls == []


# --------------------------------------------------------------------------------------------------
# extractor


async def test_extractor_uses_regex_first_and_llm_only_when_needed() -> None:
    orch = new_orchestrator()
    turn_of(orch, "teacher", "Old teacher text. Answer: D")
    turn_of(orch, "teacher", "Paris.\nAnswer: B")
    turn_of(orch, "student", "Hmm, hard to say which one.")
    llm = FakeLlm(lambda m, i: "C")
    await run_step(Extractor(ctx("extractor", llm)), orch)
    assert (orch.results["teacher_answer"], orch.results["student_answer"]) == ("B", "C")
    assert len(llm.calls) == 1  # only the student's text needed the LLM
    call = llm.calls[0]
    assert call["max_tokens"] == 4 and call["temperature"] == 0.0
    assert "Hmm, hard to say which one." in call["messages"][-1]["content"]
    turn = orch.history[-1]
    assert turn.content == "teacher=B student=C"
    assert turn.usage.completion_tokens == 7
    assert (turn.metadata["teacher_via"], turn.metadata["student_via"]) == ("regex", "llm")
    assert orch.results["answer_trail"] == "B:C"


async def test_extractor_records_unknown_when_nothing_is_found() -> None:
    orch = new_orchestrator()
    turn_of(orch, "teacher", "I do not know.")
    turn_of(orch, "student", "Answer: A")
    llm = FakeLlm(lambda m, i: "The reply")
    await run_step(Extractor(ctx("extractor", llm)), orch)
    assert (orch.results["teacher_answer"], orch.results["student_answer"]) == ("?", "A")
    assert orch.history[-1].metadata["teacher_via"] == "none"

    orch2 = new_orchestrator()
    turn_of(orch2, "teacher", "I do not know.")
    turn_of(orch2, "student", "No idea.")
    silent = FakeLlm(lambda m, i: "B")
    await run_step(Extractor(ctx("extractor", silent, use_llm=False)), orch2)
    assert silent.calls == []
    assert (orch2.results["teacher_answer"], orch2.results["student_answer"]) == ("?", "?")
    assert orch2.history[-1].usage.prompt_tokens == 0


# --------------------------------------------------------------------------------------------------
# the whole debate, driven by the real loop_until routing program


def scripted_debater(answers: Mapping[str, list[str]]) -> FakeLlm:
    """An LLM whose answer depends on who asks (the system prompt) and on how many times they asked."""
    asked: dict[str, int] = {}

    def reply(messages: list[dict[str, str]], _: int) -> str:
        system = messages[0]["content"]
        who = "teacher" if "teacher" in system else "student" if "student" in system else "extractor"
        n = asked.get(who, 0)
        asked[who] = n + 1
        script = answers[who]
        return script[min(n, len(script) - 1)]

    return FakeLlm(reply)


async def run_debate(llm: FakeLlm, *, max_turns: int = 3, row: Mapping[str, Any] = ROW) -> pb.Orchestrator:
    """Drive one task through the configured loop the way the runtime does (same program, same roles)."""
    from agentmesh.agent.routing import SINK, build_programs

    program = build_programs(
        {
            "debate": {
                "kind": "loop_until",
                "body": ["teacher", "student", "extractor", "matcher"],
                "until": "agentmesh.pipelines.collab_reasoning.roles:agreed",
                "max_turns": max_turns,
            }
        }
    )["debate"]
    roles: dict[str, Role] = {
        "teacher": Teacher(ctx("teacher", llm)),
        "student": Student(ctx("student", llm)),
        "extractor": Extractor(ctx("extractor", llm)),
        "matcher": Matcher(ctx("matcher")),
    }
    orch = new_orchestrator(row)
    current = program.start(orch)
    for _ in range(100):
        if current == SINK:
            return orch
        orch.routing.current_role = current
        await run_step(roles[current], orch)
        current = program.advance(orch)
    raise AssertionError("the debate never reached the sink")


async def test_debate_stops_on_agreement() -> None:
    llm = scripted_debater(
        {
            "teacher": ["It is Paris.\nAnswer: B", "Still Paris.\nAnswer: B"],
            "student": ["Rome is old.\nAnswer: C", "The teacher convinced me.\nAnswer: B"],
            "extractor": ["?"],
        }
    )
    orch = await run_debate(llm)
    assert dict(orch.results) | {} == {
        "teacher_answer": "B",
        "student_answer": "B",
        "answer_trail": "B:C,B:B",
        "agreed": "true",
        "final_answer": "B",
        "correct": "true",
        "turns": "2",
    }
    assert [t.role for t in orch.history] == ["teacher", "student", "extractor", "matcher"] * 2
    # turn 1: the student saw the teacher's turn-1 reasoning
    student_turn1 = llm.calls[3]["messages"]
    assert "Still Paris." in student_turn1[-1]["content"]


async def test_debate_without_agreement_stops_after_max_turns() -> None:
    llm = scripted_debater(
        {
            "teacher": ["Answer: A"],
            "student": ["I am not sure at all."],  # the regex finds nothing: the extractor asks the LLM
            "extractor": ["D"],
        }
    )
    orch = await run_debate(llm, max_turns=3)
    assert orch.results["agreed"] == "false"
    assert orch.results["turns"] == "3"
    assert orch.results["final_answer"] == "A"
    assert orch.results["correct"] == "false"
    assert orch.results["answer_trail"] == "A:D,A:D,A:D"
    assert len(orch.history) == 12
    assert sum(t.usage.completion_tokens for t in orch.history if t.role == "extractor") == 3 * 7


async def test_debate_agreeing_at_once_takes_one_turn() -> None:
    llm = scripted_debater({"teacher": ["Answer: B"], "student": ["(B)"], "extractor": ["?"]})
    orch = await run_debate(llm)
    assert (orch.results["turns"], orch.results["agreed"], orch.results["correct"]) == ("1", "true", "true")
    assert len(llm.calls) == 2  # no extractor LLM call: both letters came from the regexes


# --------------------------------------------------------------------------------------------------
# the bundled question set


def test_questions_file_is_valid() -> None:
    rows = [json.loads(line) for line in QUESTIONS_PATH.read_text().splitlines() if line.strip()]
    assert len(rows) >= 40
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)
    for r in rows:
        assert isinstance(r["question"], str) and r["question"].strip(), r["id"]
        assert sorted(r["options"]) == ["A", "B", "C", "D"], r["id"]
        assert len({v.strip().lower() for v in r["options"].values()}) == 4, r["id"]
        assert r["answer"] in r["options"], r["id"]
        assert r["topic"] in {"arithmetic", "science", "geography", "logic", "language"}, r["id"]
    assert len({r["topic"] for r in rows}) == 5
    # balanced answer letters: always answering "A" must not score well
    counts = {letter: sum(r["answer"] == letter for r in rows) for letter in "ABCD"}
    assert max(counts.values()) <= len(rows) // 4 + 2


# --------------------------------------------------------------------------------------------------
# the shipped example configs


@pytest.mark.parametrize(
    ("file", "backend", "rows"), [("config.yaml", "vllm-cpu", 24), ("sim.yaml", "simulator", 48)]
)
def test_example_configs_load(file: str, backend: str, rows: int) -> None:
    from pathlib import Path

    from agentmesh.config import iter_dataset, load_config
    from agentmesh.loader import load_object

    path = Path(__file__).resolve().parents[2] / "examples" / "collab_reasoning" / file
    cfg = load_config(path)
    assert cfg.llms["smollm2"].backend == backend
    assert sum(1 for _ in iter_dataset(cfg.dataset)) == rows
    program = cfg.routing.programs[cfg.routing.program]
    assert list(program.body) == ["teacher", "student", "extractor", "matcher"]
    assert load_object(program.until) is agreed
    for role in cfg.roles.values():  # every role builds from its config params
        llm = FakeLlm(lambda m, i: "") if role.llm else None
        load_object(role.cls)(ctx(role.name, llm, **role.params))
