"""Roles of the sandbox mesh test: one writes a file in the task's sandbox, a later one reads it."""

from __future__ import annotations

import json

from agentmesh.agent.role import Role, Task


class AskWrite(Role):
    async def step(self, task: Task) -> None:
        secret = task.input["secret"]
        task.results["tool_call"] = json.dumps(
            {"argv": ["sh", "-c", 'printf %s "$SECRET" > /work/secret; id -u'], "env": {"SECRET": secret}}
        )


class AskRead(Role):
    async def step(self, task: Task) -> None:
        task.results["writer_uid"] = json.loads(task.results["tool_result"])["stdout"].strip()
        task.results["tool_call"] = json.dumps({"argv": ["sh", "-c", "cat /work/secret; echo; id -u"]})
