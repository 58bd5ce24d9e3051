"""Collaborative reasoning: a teacher and a student debate a multiple-choice question.

Each loop turn runs ``teacher → student → extractor → matcher``: both LLM roles answer (from the
second turn on, each sees the other's latest reasoning), the extractor pulls each chosen letter,
and the pure-Python matcher records agreement. The routing program stops on
:func:`~agentmesh.pipelines.collab_reasoning.roles.agreed` or after ``max_turns`` turns.
Run configs: ``examples/collab_reasoning/``.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from agentmesh.pipelines.collab_reasoning.roles import (
    Extractor,
    Matcher,
    Student,
    Teacher,
    agreed,
    extract_letter,
)

__all__ = ["QUESTIONS_PATH", "Extractor", "Matcher", "Student", "Teacher", "agreed", "extract_letter"]

#: The bundled question set (original questions, one JSON object per line).
QUESTIONS_PATH = Path(str(files(__name__).joinpath("questions.jsonl")))
