"""A pipeline that does nothing but move tasks: the runtime's own overhead, for benchmarks.

``Pass`` adds one short turn and forwards; chain any number of them with a ``sequential`` program.
"""

from __future__ import annotations

import asyncio

from agentmesh.agent import Role, Task

__all__ = ["Pass"]


class Pass(Role):
    """Adds a one-word turn; sleeps ``params.sleep_s`` first (default 0: a no-op step)."""

    async def step(self, task: Task) -> None:
        sleep_s = float(self.ctx.params.get("sleep_s", 0.0))
        if sleep_s > 0:
            await asyncio.sleep(sleep_s)
        task.add_turn("ok")
