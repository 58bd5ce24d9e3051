"""Shipped pipelines: the roles, predicates and data of agentmesh's case studies.

Each subpackage is one runnable pipeline; its run configs live in ``examples/<name>/``.

* :mod:`agentmesh.pipelines.collab_reasoning` — a teacher and a student debate a multiple-choice
  question until they agree or a turn limit is reached.
"""

from __future__ import annotations

__all__: list[str] = []
