"""Roles of the collaborative-reasoning pipeline, and the predicate that ends its debate.

One loop turn is ``teacher → student → extractor → matcher``:

* :class:`Teacher` and :class:`Student` (LLM) answer the question with brief reasoning that ends in
  ``Answer: <letter>``. On turn 0 they answer independently; from turn 1 on, the teacher sees the
  student's previous reasoning and the student sees the teacher's reasoning of this turn, and each
  may revise its own previous answer.
* :class:`Extractor` pulls each side's letter from this turn's texts with regular expressions, and
  asks its LLM (a few tokens, constrained prompt) only when the regexes find nothing.
* :class:`Matcher` (pure Python) records agreement, the final answer and whether it is correct.
* :func:`agreed` is the routing program's ``until`` predicate.

Results written (all strings): ``teacher_answer``, ``student_answer`` (a letter or ``"?"``),
``answer_trail`` (``"B:C,B:B"``, one ``teacher:student`` pair per turn), ``agreed``
(``"true"``/``"false"``), ``final_answer``, ``correct`` (``"true"``/``"false"``/``"unknown"``),
``turns`` (completed turns).

Input row: ``{"id", "question", "options": {"A": ..., ...}, "answer": "C"}``; ``answer`` is optional.
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

from agentmesh.agent.role import Role
from agentmesh.errors import ConfigError, TaskFailed

if TYPE_CHECKING:
    from agentmesh.agent.role import RoleContext, Task

__all__ = [
    "NO_ANSWER",
    "Debater",
    "Extractor",
    "Matcher",
    "Student",
    "Teacher",
    "agreed",
    "extract_letter",
    "format_question",
    "parse_row",
]

#: What the extractor records when it cannot tell which option a text chose.
NO_ANSWER = "?"

_LETTER = re.compile(r"[A-Z]")


# --------------------------------------------------------------------------------------------------
# Input rows


def parse_row(row: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
    """The question and its options (letter → text) of a dataset row.

    A malformed row fails the task with a message naming the field; retrying cannot fix it.
    """
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise TaskFailed("invalid_input", "row field 'question': expected a non-empty string")
    options = row.get("options")
    if not isinstance(options, Mapping) or len(options) < 2:
        raise TaskFailed("invalid_input", "row field 'options': expected a mapping of >= 2 letters to texts")
    out: dict[str, str] = {}
    for letter, text in options.items():
        if not isinstance(letter, str) or not _LETTER.fullmatch(letter):
            raise TaskFailed(
                "invalid_input", f"row field 'options': key {letter!r} is not one capital letter"
            )
        out[letter] = str(text)
    return question.strip(), dict(sorted(out.items()))


def format_question(question: str, options: Mapping[str, str]) -> str:
    """The question block every prompt starts with (identical across turns, so it prefix-caches)."""
    lines = [f"Question: {question}"]
    lines += [f"{letter}) {text}" for letter, text in options.items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Answer extraction


@functools.lru_cache(maxsize=32)
def _patterns(letters: str) -> tuple[re.Pattern[str], ...]:
    """Regexes for one set of option letters, most explicit first.

    Capital letters only, except inside brackets or right after ``answer:``, because a lowercase
    ``a`` after "the answer is" is usually the English article.
    """
    up = f"[{letters}]"
    anycase = f"[{letters}{letters.lower()}]"
    end = r"(?![A-Za-z0-9])"
    sep = r"[\s*:=\-–—]*"  # noqa: RUF001 - en and em dashes are separators models really write
    return (
        # "Answer: B", "**Answer:** (B)", "the answer is option C", "Final answer = D"
        re.compile(
            rf"(?i:\banswer\b){sep}(?i:is\b)?{sep}(?i:(?:option|choice|letter)\b)?\s*[\(\[\x22']?\s*({up}){end}"
        ),
        # "Answer: b", "answer is (c)"
        re.compile(
            rf"(?i:\banswer\b)\s*[:=]\s*({anycase})\s*(?:$|[.\n])"
            rf"|(?i:\banswer\b)[^\n(\[]{{0,12}}[\(\[]({anycase})[\)\]]"
        ),
        # "I choose C", "I'd pick (B)", "I will go with D", "the correct option is A"
        re.compile(
            rf"(?i:\b(?:choose|chose|pick|picked|select|selected|go\s+with|correct\s+(?:option|choice|one)\s+is))"
            rf"\s*:?\s*(?i:(?:option|choice)\b)?\s*[\(\[]?\s*({up}){end}"
        ),
        # "The answer is indeed for D.": a capital letter that ends the sentence, a few words on
        re.compile(rf"(?i:\banswer\b)[^\n]{{0,24}}?[\s\(\[\x22']({up})[\)\]\x22']?(?=\s*(?:[.!,;]|$))"),
    )


def _lone_letter(text: str, letters: str) -> str | None:
    """A reply that is just a letter, or that starts with ``B)`` / ``(B)`` / ``B.`` / ``B:``."""
    stripped = text.strip().strip("*").strip()
    m = re.fullmatch(rf"[\(\[]?([{letters}{letters.lower()}])[\)\]]?[.:]?", stripped)
    if m:
        return m.group(1).upper()
    # a text that lists the options ("A) 30\nB) 31\n...", small models echo the question) chose none
    if len(set(re.findall(rf"(?m)^\s*[\(\[]?([{letters}])[\)\].:]", stripped))) >= 2:
        return None
    m = re.match(rf"[\(\[]?([{letters}])(?:[\)\]]|[.:](?=\s))", stripped)
    if m:
        return m.group(1)
    # a closing line made of one option label: "...\n(C)" or "...\nC)"
    last = stripped.splitlines()[-1].strip() if stripped else ""
    m = re.fullmatch(rf"[\(\[]?([{letters}])[\)\]]?[.:]?(?:\s.*)?", last) if len(last) <= 80 else None
    if m and (len(last) == 1 or last[1:2] in ")].:" or last[:1] in "(["):
        return m.group(1)
    return None


def _option_text(text: str, options: Mapping[str, str]) -> str | None:
    """The one option whose text follows the last "answer" (e.g. "The answer is Paris.")."""
    low = text.lower()
    at = low.rfind("answer")
    # only the line of the last "answer": an echoed options list further down names every option
    tail = low[at:].split("\n", 1)[0] if at >= 0 else (low if len(low) <= 80 else "")
    if not tail:
        return None
    hits = [
        letter
        for letter, opt in options.items()
        if opt.strip() and re.search(rf"(?<![\w]){re.escape(opt.strip().lower())}(?![\w])", tail)
    ]
    return hits[0] if len(hits) == 1 else None


def extract_letter(
    text: str, letters: Collection[str] = "ABCD", options: Mapping[str, str] | None = None
) -> str | None:
    """The option letter ``text`` settles on, or ``None`` when the regexes cannot tell.

    Tried in order: an explicit answer marker (the last one wins: models restate), a "choose/pick"
    phrase, a reply that is just a label (``B``, ``(B)``, ``B) Paris``), then, with ``options``, the
    single option text quoted after the last "answer".
    """
    letter_set = "".join(sorted({x for x in letters if _LETTER.fullmatch(x)}))
    if not letter_set or not text:
        return None
    for pattern in _patterns(letter_set):
        found = [next(g for g in m.groups() if g) for m in pattern.finditer(text)]
        if found:
            return found[-1].upper()
    lone = _lone_letter(text, letter_set)
    if lone:
        return lone
    if options:
        return _option_text(text, options)
    return None


# --------------------------------------------------------------------------------------------------
# Parameters


def _int_param(ctx: RoleContext, key: str, default: int, *, minimum: int) -> int:
    value = ctx.params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"expected an integer >= {minimum}, got {value!r}", key=f"roles.{ctx.name}.params.{key}"
        )
    return value


def _float_param(ctx: RoleContext, key: str, default: float, *, minimum: float) -> float:
    value = ctx.params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise ConfigError(
            f"expected a number >= {minimum}, got {value!r}", key=f"roles.{ctx.name}.params.{key}"
        )
    return float(value)


def _str_param(ctx: RoleContext, key: str, default: str) -> str:
    value = ctx.params.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"expected a non-empty string, got {value!r}", key=f"roles.{ctx.name}.params.{key}")
    return value


def _bool_param(ctx: RoleContext, key: str, default: bool) -> bool:
    value = ctx.params.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"expected true or false, got {value!r}", key=f"roles.{ctx.name}.params.{key}")
    return value


def _derive_seed(task_seed: int, role: str, turn: int) -> int:
    """A per-(task, role, turn) sampling seed: reproducible, and different for each call of a task."""
    return zlib.crc32(f"{task_seed}:{role}:{turn}".encode()) & 0x7FFFFFFF


def _clip(text: str, limit: int) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


# --------------------------------------------------------------------------------------------------
# Debaters


class Debater(Role):
    """An LLM role that answers the question, and from turn 1 on reconsiders given its peer's reasoning.

    ``params``: ``max_tokens`` (96), ``temperature`` (0.7), ``system_prompt``, ``answer_instruction``
    (closes the first turn's question), ``revise_prompt``
    (``{peer}`` is the peer's name, ``{peer_text}`` its reasoning), ``peer_role`` (the config name
    of the other debater), ``peer_max_chars`` (400: the peer's text is clipped to keep prompts short).
    """

    #: What this debater is called in turn metadata and prompts.
    speaker = "debater"
    default_peer = "peer"
    default_system = (
        "Answer the multiple-choice question. Reason in at most three short sentences, "
        "then write a last line 'Answer: <letter>'."
    )

    def __init__(self, ctx: RoleContext) -> None:
        super().__init__(ctx)
        if ctx.llm is None:
            raise ConfigError("this role needs an LLM: set `llm:` in its config", key=f"roles.{ctx.name}.llm")
        self.max_tokens = _int_param(ctx, "max_tokens", 96, minimum=1)
        self.temperature = _float_param(ctx, "temperature", 0.7, minimum=0.0)
        self.system_prompt = _str_param(ctx, "system_prompt", self.default_system)
        self.revise_prompt = _str_param(
            ctx,
            "revise_prompt",
            "The {peer} answered:\n{peer_text}\n\nCheck this reasoning. Keep or change your answer. "
            "Reason briefly, then write a last line 'Answer: <letter>'.",
        )
        self.answer_instruction = _str_param(
            ctx, "answer_instruction", "Reason briefly, then write a last line 'Answer: <letter>'."
        )
        self.peer_role = _str_param(ctx, "peer_role", self.default_peer)
        self.peer_max_chars = _int_param(ctx, "peer_max_chars", 400, minimum=20)
        try:
            self.revise_prompt.format(peer="x", peer_text="y")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"bad placeholder ({exc}); allowed: {{peer}}, {{peer_text}}",
                key=f"roles.{ctx.name}.params.revise_prompt",
            ) from None

    def peer_text_for(self, task: Task, peer_turns: list[str]) -> str | None:
        """The peer reasoning this debater sees this turn (``None``: answer independently)."""
        if task.turn < 1 or not peer_turns:
            return None
        return peer_turns[-1]

    async def build_messages(self, task: Task) -> list[dict[str, str]]:
        """System prompt, then one user message: the question, and (turn >= 1) the debate so far.

        One user message that always starts with the same question block keeps every call of a
        task on a common token prefix (prefix-cache reuse), and keeps the options next to the
        instruction, which a very small model needs.
        """
        question, options = parse_row(task.input)
        block = format_question(question, options)
        system = {"role": "system", "content": self.system_prompt}
        first = [system, {"role": "user", "content": f"{block}\n\n{self.answer_instruction}"}]
        if task.turn < 1:
            return first
        own: list[str] = []
        peer: list[str] = []
        for role, content in await task.transcript((self.ctx.name, self.peer_role)):
            (own if role == self.ctx.name else peer).append(content)
        peer_text = self.peer_text_for(task, peer)
        if peer_text is None:
            return first
        parts = [block]
        if own:
            parts.append(f"Your previous answer:\n{_clip(own[-1], self.peer_max_chars)}")
        parts.append(
            self.revise_prompt.format(peer=self.peer_role, peer_text=_clip(peer_text, self.peer_max_chars))
        )
        return [system, {"role": "user", "content": "\n\n".join(parts)}]

    async def step(self, task: Task) -> None:
        messages = await self.build_messages(task)
        result = await self.llm.chat(
            messages,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            seed=_derive_seed(task.seed, self.ctx.name, task.turn),
            session_id=task.id,  # both debaters of a task on one replica: prefix-cache reuse
        )
        task.add_turn(
            result.text,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            metadata={
                "speaker": self.speaker,
                "model": result.model,
                "turn": str(task.turn),
                "llm_replica": result.replica_id,
                "llm_calls": "1",
            },
        )


class Teacher(Debater):
    """The teacher: answers first; from turn 1 on sees the student's previous reasoning."""

    speaker = "teacher"
    default_peer = "student"
    default_system = (
        "You are a teacher. Answer the multiple-choice question. Reason in at most three short "
        "sentences, then write a last line 'Answer: <letter>'."
    )


class Student(Debater):
    """The student: from turn 1 on sees the teacher's reasoning of the same turn."""

    speaker = "student"
    default_peer = "teacher"
    default_system = (
        "You are a student. Answer the multiple-choice question. Reason in at most three short "
        "sentences, then write a last line 'Answer: <letter>'."
    )


# --------------------------------------------------------------------------------------------------
# Extractor and matcher


class Extractor(Role):
    """Pulls the teacher's and the student's letters from this turn's texts.

    ``params``: ``use_llm`` (true: ask the LLM when the regexes find nothing), ``max_tokens`` (4),
    ``teacher_role`` / ``student_role`` (config names of the debaters), ``text_max_chars`` (400:
    the tail of the text shown to the LLM).
    """

    def __init__(self, ctx: RoleContext) -> None:
        super().__init__(ctx)
        self.use_llm = _bool_param(ctx, "use_llm", True) and ctx.llm is not None
        self.max_tokens = _int_param(ctx, "max_tokens", 4, minimum=1)
        self.teacher_role = _str_param(ctx, "teacher_role", "teacher")
        self.student_role = _str_param(ctx, "student_role", "student")
        self.text_max_chars = _int_param(ctx, "text_max_chars", 400, minimum=20)

    async def _ask_llm(
        self, task: Task, text: str, options: Mapping[str, str]
    ) -> tuple[str | None, int, int]:
        letters = ", ".join(options)
        tail = text.strip()[-self.text_max_chars :]
        messages = [
            {"role": "system", "content": f"Reply with one letter: {letters}."},
            {
                "role": "user",
                "content": f"{format_question(*parse_row(task.input))}\n\nReply:\n{tail}\n\n"
                f"Which letter does this reply choose?",
            },
        ]
        result = await self.llm.chat(
            messages, max_tokens=self.max_tokens, temperature=0.0, session_id=task.id
        )
        letter = extract_letter(result.text, options.keys(), options)
        if letter is None:
            m = re.search(rf"(?<![A-Za-z])([{''.join(options)}])(?![A-Za-z])", result.text)
            letter = m.group(1) if m else None
        return letter, result.prompt_tokens, result.completion_tokens

    async def step(self, task: Task) -> None:
        _, options = parse_row(task.input)
        latest: dict[str, str] = {}
        for role, content in await task.transcript((self.teacher_role, self.student_role)):
            latest[role] = content
        answers: dict[str, str] = {}
        via: dict[str, str] = {}
        prompt_tokens = completion_tokens = llm_calls = 0
        for side, role in (("teacher", self.teacher_role), ("student", self.student_role)):
            text = latest.get(role, "")
            letter = extract_letter(text, options.keys(), options)
            via[side] = "regex" if letter else "none"
            if letter is None and self.use_llm and text.strip():
                letter, p, c = await self._ask_llm(task, text, options)
                llm_calls += 1
                prompt_tokens += p
                completion_tokens += c
                via[side] = "llm" if letter else "none"
            answers[side] = letter or NO_ANSWER
        results = task.results
        results["teacher_answer"] = answers["teacher"]
        results["student_answer"] = answers["student"]
        pair = f"{answers['teacher']}:{answers['student']}"
        trail = results.get("answer_trail", "")
        results["answer_trail"] = f"{trail},{pair}" if trail else pair
        task.add_turn(
            f"teacher={answers['teacher']} student={answers['student']}",
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            metadata={
                "turn": str(task.turn),
                "teacher_via": via["teacher"],
                "student_via": via["student"],
                "llm_calls": str(llm_calls),
            },
        )


def agreed(results: Mapping[str, str]) -> bool:
    """True when the teacher and the student chose the same valid letter (the loop's ``until``)."""
    teacher = results.get("teacher_answer", NO_ANSWER)
    student = results.get("student_answer", NO_ANSWER)
    return bool(_LETTER.fullmatch(teacher)) and teacher == student


class Matcher(Role):
    """Pure Python: records agreement, the final answer and whether it matches the row's ``answer``.

    The final answer is the agreed letter; without agreement it is the teacher's letter (the
    student's when the teacher's could not be extracted, ``"?"`` when neither could).
    """

    async def step(self, task: Task) -> None:
        results = task.results
        teacher = results.get("teacher_answer", NO_ANSWER)
        student = results.get("student_answer", NO_ANSWER)
        is_agreed = agreed(results)
        final = teacher if is_agreed or _LETTER.fullmatch(teacher) else student
        if not _LETTER.fullmatch(final):
            final = NO_ANSWER
        gold = task.input.get("answer")
        gold = gold.strip().upper() if isinstance(gold, str) else ""
        correct = "unknown" if not _LETTER.fullmatch(gold) else ("true" if final == gold else "false")
        turns = task.turn + 1  # the runtime counts this pass once the matcher (last of the body) is done
        results["agreed"] = "true" if is_agreed else "false"
        results["final_answer"] = final
        results["correct"] = correct
        results["turns"] = str(turns)
        summary = f"agreed on {final}" if is_agreed else f"no agreement (teacher={teacher} student={student})"
        task.add_turn(f"{summary}; turn {turns}; correct={correct}", metadata={"turn": str(task.turn)})
