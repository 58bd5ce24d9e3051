"""The tool-executor role: runs a task's pending command in the task's own sandbox.

A role earlier in the program (an assistant that decided to call a tool, a generator that wrote
code) leaves the call in ``results["tool_call"]`` as JSON::

    {"argv": ["python3", "-c", "print(1)"], "stdin": "", "env": {}, "cwd": "/work", "timeout_s": 10}

The executor takes it, runs it in the task's sandbox (acquired on first use; every later role and
step of the task gets the same one, and the sink releases it when the task ends), and leaves
``results["tool_result"]`` (exit code, stdout, stderr, which limit ended it, truncation) for the
next role, plus a turn in the history. Subclasses change what a call means by overriding
:meth:`ToolExecutor.command` (e.g. a named tool → a script in the sandbox) and
:meth:`ToolExecutor.record`.

A command that fails is a result, not a failure of the task; a sandbox that is gone (reclaimed,
lost with its holder) fails the task with code ``sandbox_lost``, since its state is gone too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agentmesh.agent.role import Role, Task
from agentmesh.container.client import ContainerGone
from agentmesh.container.sandbox import ExecResult
from agentmesh.errors import TaskFailed

__all__ = ["Command", "ToolExecutor"]

TOOL_CALL = "tool_call"
TOOL_RESULT = "tool_result"


@dataclass
class Command:
    argv: list[str]
    stdin: bytes = b""
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = ""
    timeout_s: float = 0.0


def _str_list(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise TaskFailed("bad_tool_call", f"{TOOL_CALL}.{key}: expected a non-empty list of strings")
    return list(value)


class ToolExecutor(Role):
    """Runs ``results["tool_call"]`` in the task's sandbox (see the module docstring).

    Params: ``output_chars`` (how much of stdout/stderr goes into the result, default 4000).
    """

    async def step(self, task: Task) -> None:
        raw = task.results.get(TOOL_CALL)
        if raw is None:
            raise TaskFailed("bad_tool_call", f"results.{TOOL_CALL}: nothing to run")
        try:
            call = json.loads(raw)
        except ValueError as exc:
            raise TaskFailed("bad_tool_call", f"results.{TOOL_CALL}: not JSON ({exc})") from None
        if not isinstance(call, Mapping):
            raise TaskFailed("bad_tool_call", f"results.{TOOL_CALL}: expected a JSON object")
        command = await self.command(task, call)
        ref = await self.sandbox(task)
        try:
            result = await self.containers.exec(
                ref,
                command.argv,
                stdin=command.stdin,
                env=command.env,
                cwd=command.cwd,
                timeout_s=command.timeout_s,
            )
        except ContainerGone as exc:
            raise TaskFailed("sandbox_lost", f"the task's sandbox {ref.id} is gone: {exc}") from None
        del task.results[TOOL_CALL]
        await self.record(task, call, result)

    async def command(self, task: Task, call: Mapping[str, Any]) -> Command:
        """The command a call stands for. By default the call spells it out (argv, stdin, ...)."""
        env = call.get("env") or {}
        if not isinstance(env, Mapping) or not all(isinstance(v, str) for v in env.values()):
            raise TaskFailed("bad_tool_call", f"{TOOL_CALL}.env: expected an object of strings")
        stdin = call.get("stdin") or ""
        if not isinstance(stdin, str):
            raise TaskFailed("bad_tool_call", f"{TOOL_CALL}.stdin: expected a string")
        return Command(
            argv=_str_list(call.get("argv"), "argv"),
            stdin=stdin.encode(),
            env={str(k): v for k, v in env.items()},
            cwd=str(call.get("cwd") or ""),
            timeout_s=float(call.get("timeout_s") or 0.0),
        )

    async def record(self, task: Task, call: Mapping[str, Any], result: ExecResult) -> None:
        """Leave the result for the next role and in the history."""
        limit = int(self.ctx.params.get("output_chars", 4000))
        out = result.stdout.decode(errors="replace")[:limit]
        err = result.stderr.decode(errors="replace")[:limit]
        task.results[TOOL_RESULT] = json.dumps(
            {
                "exit_code": result.exit_code,
                "stdout": out,
                "stderr": err,
                "killed": result.killed,
                "truncated": result.truncated,
            }
        )
        task.add_turn(
            out
            if result.ok
            else f"[exit {result.exit_code}{' ' + result.killed if result.killed else ''}] {err}",
            metadata={"exit_code": str(result.exit_code), "duration_ms": f"{result.duration_s * 1000:.1f}"},
        )
