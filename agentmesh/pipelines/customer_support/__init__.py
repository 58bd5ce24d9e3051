"""Tool-using customer support, in the manner of tau2-bench: a small online store's domain.

A user simulator (an LLM with a goal) talks to an assistant (an LLM with tools); a tool executor
runs the assistant's calls against a small SQLite store inside the task's sandbox; the reward
compares the store's final state with the state the task's expected actions produce.

* :mod:`~agentmesh.pipelines.customer_support.sandbox_tools` — the standalone tool script that runs
  in the sandbox (``python3 -I /work/tools.py TOOL '{json args}'``) and the seed data.
* :mod:`~agentmesh.pipelines.customer_support.domain` — tool descriptions and policy for the
  assistant's prompt, the tool-call parser, the tasks and the reward.
"""

from __future__ import annotations

from agentmesh.pipelines.customer_support.domain import (
    POLICY,
    TASKS_PATH,
    TOOLS,
    WRITE_TOOLS,
    ToolCall,
    ToolSpec,
    dump_state,
    expected_state,
    fresh_store,
    load_tasks,
    parse_tool_call,
    reward,
    run_tool,
    sandbox_tools_source,
    seed_state,
    tools_prompt,
)

__all__ = [
    "POLICY",
    "TASKS_PATH",
    "TOOLS",
    "WRITE_TOOLS",
    "ToolCall",
    "ToolSpec",
    "dump_state",
    "expected_state",
    "fresh_store",
    "load_tasks",
    "parse_tool_call",
    "reward",
    "run_tool",
    "sandbox_tools_source",
    "seed_state",
    "tools_prompt",
]
