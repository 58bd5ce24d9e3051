"""The small benchmarks bundled with the checkpoint-evaluation example, and their scorers.

Each benchmark is a JSONL file next to this module (one ``{"id", "prompt", "answer"}`` object a
line; ``answer`` is a string or a list of accepted strings) plus a deterministic scorer chosen by
the benchmark's kind:

- ``number`` (``arith``): the integer the reply gives — after the last ``=`` when there is one,
  else the first integer in the reply — equals the answer.
- ``text`` (``capitals``): an accepted answer, normalised (case, accents, punctuation, spaces),
  appears as whole words in the normalised reply.
- ``letter`` (``choice``): the option letter the reply picks (a reply that starts with the letter,
  ``answer is X``, ``(X)`` or ``X)``) equals the answer.

The prompts are short on purpose: the local model is SmolLM2-135M-Instruct on two CPU cores.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Literal

from agentmesh.errors import ConfigError

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "BenchmarkInfo",
    "Item",
    "load_benchmark",
    "parse_benchmark_names",
    "score",
    "score_letter",
    "score_number",
    "score_text",
]

ScorerKind = Literal["number", "text", "letter"]


@dataclass(frozen=True, slots=True)
class BenchmarkInfo:
    """A bundled benchmark: its data file and how its replies are scored."""

    name: str
    file: str
    scorer: ScorerKind
    description: str


BENCHMARKS: dict[str, BenchmarkInfo] = {
    b.name: b
    for b in (
        BenchmarkInfo("arith", "arith.jsonl", "number", "one-step arithmetic on small integers"),
        BenchmarkInfo("capitals", "capitals.jsonl", "text", "the capital city of a well-known country"),
        BenchmarkInfo("choice", "choice.jsonl", "letter", "four-option multiple choice on simple facts"),
    )
}


@dataclass(frozen=True, slots=True)
class Item:
    """One question: the prompt sent as the user message and the accepted answers."""

    id: str
    prompt: str
    answers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Benchmark:
    """A loaded benchmark."""

    info: BenchmarkInfo
    items: tuple[Item, ...]

    @property
    def name(self) -> str:
        return self.info.name

    def score(self, item: Item, reply: str) -> bool:
        """Whether ``reply`` answers ``item`` correctly."""
        return score(self.info.scorer, reply, item.answers)


def parse_benchmark_names(raw: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"arith,capitals"`` (or a list) -> the names, checked; duplicates dropped, order kept.

    Raises :class:`ConfigError` (key ``benchmarks``) naming an unknown benchmark.
    """
    parts = raw.split(",") if isinstance(raw, str) else list(raw)
    names: list[str] = []
    for part in parts:
        name = part.strip() if isinstance(part, str) else part
        if not name:
            continue
        if name not in BENCHMARKS:
            raise ConfigError(
                f"no benchmark named {name!r} (bundled: {', '.join(BENCHMARKS)})", key="benchmarks"
            )
        if name not in names:
            names.append(name)
    if not names:
        raise ConfigError(f"expected at least one of {', '.join(BENCHMARKS)}", key="benchmarks")
    return names


@cache
def load_benchmark(name: str) -> Benchmark:
    """Load a bundled benchmark by name. Raises :class:`ConfigError` for an unknown name or a bad
    line (naming the file and line)."""
    info = BENCHMARKS.get(name)
    if info is None:
        raise ConfigError(f"no benchmark named {name!r} (bundled: {', '.join(BENCHMARKS)})", key="benchmark")
    text = files(__package__ or __name__).joinpath(info.file).read_text(encoding="utf-8")
    items: list[Item] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{info.file}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"not JSON: {exc}", file=where) from None
        if not isinstance(row, dict):
            raise ConfigError("expected an object", file=where)
        item_id, prompt, answer = row.get("id"), row.get("prompt"), row.get("answer")
        if not isinstance(item_id, str) or not item_id:
            raise ConfigError("expected a non-empty string", file=where, key="id")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError("expected a non-empty string", file=where, key="prompt")
        answers = [answer] if isinstance(answer, str) else answer
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a for a in answers):
            raise ConfigError("expected a string or a list of strings", file=where, key="answer")
        items.append(Item(item_id, prompt, tuple(answers)))
    if not items:
        raise ConfigError("no items", file=info.file)
    return Benchmark(info, tuple(items))


# -- scorers ---------------------------------------------------------------------------------------

_INT_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?!\d)|-?\d+")  # "1,000" is 1000; "1,2" is 1


def _first_int(text: str) -> int | None:
    m = _INT_RE.search(text)
    if m is None:
        return None
    try:
        return int(m.group().replace(",", ""))
    except ValueError:
        return None


def score_number(reply: str, answers: tuple[str, ...]) -> bool:
    """The reply's number (after its last ``=``, else its first integer) is one of ``answers``."""
    tail = reply.rsplit("=", 1)[1] if "=" in reply else reply
    got = _first_int(tail)
    if got is None:
        return False
    return any(_first_int(a) == got for a in answers)


def _normalise(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(re.sub(r"[^\w]+", " ", plain).split())


def score_text(reply: str, answers: tuple[str, ...]) -> bool:
    """An answer, normalised, appears as whole words in the normalised reply."""
    padded = f" {_normalise(reply)} "
    return any(f" {a} " in padded for a in (_normalise(x) for x in answers) if a)


_LETTER_PATTERNS = (
    re.compile(r"^\s*\(?([A-D])\b(?![a-zA-Z'])"),  # "B", "B) 8", "(B)"; not "A cat ..." (see below)
    re.compile(r"\b(?:answer|option)\s*(?:is|:)?\s*\(?([A-D])\b", re.IGNORECASE),
    re.compile(r"\(([A-D])\)"),
    re.compile(r"\b([A-D])\)"),
)


def score_letter(reply: str, answers: tuple[str, ...]) -> bool:
    """The option letter the reply picks is one of ``answers``."""
    picked = _picked_letter(reply)
    return picked is not None and picked in {a.strip().upper() for a in answers}


def _picked_letter(reply: str) -> str | None:
    stripped = reply.strip()
    first = _LETTER_PATTERNS[0].match(stripped)
    # A leading "A" followed by a word is the article ("A spider has ..."), not option A.
    if first and not (first.group(1) == "A" and re.match(r"^A\s+[a-z]", stripped)):
        return first.group(1).upper()
    for pattern in _LETTER_PATTERNS[1:]:
        m = pattern.search(stripped)
        if m:
            return m.group(1).upper()
    return None


_SCORERS: dict[str, Callable[[str, tuple[str, ...]], bool]] = {
    "number": score_number,
    "text": score_text,
    "letter": score_letter,
}


def score(kind: str, reply: str, answers: tuple[str, ...]) -> bool:
    """Score ``reply`` with the scorer ``kind`` (``number``, ``text`` or ``letter``)."""
    try:
        scorer = _SCORERS[kind]
    except KeyError:
        raise ConfigError(f"expected one of {', '.join(_SCORERS)}, got {kind!r}", key="scorer") from None
    return scorer(reply, answers)
