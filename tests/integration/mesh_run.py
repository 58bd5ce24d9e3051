"""A run's driver over a real sink in a temp dir, for tests of meshes running in this process."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from agentmesh.agent.routing import RoutingProgram
from agentmesh.discovery import Discovery
from agentmesh.driver import RunDriver
from agentmesh.sink import SinkWriter


@contextlib.asynccontextmanager
async def sink_driver(
    out: Path,
    program: RoutingProgram,
    discovery: Discovery,
    rows: Iterable[dict[str, Any]],
    **driver_options: Any,
) -> AsyncIterator[RunDriver]:
    """A started :class:`RunDriver` of run ``r1`` whose tasks are ``t0, t1, ...`` (rows already in
    ``out`` are skipped, as on a resumed run); it writes JSONL to ``out``. No recovery sweep unless
    ``recovery_interval_s`` is given."""
    writer = SinkWriter(out, formats=("jsonl",))
    done = writer.open()
    driver = RunDriver(
        run_id="r1",
        program=program,
        discovery=discovery,
        writer=writer,
        tasks=((f"t{i}", 0, row) for i, row in enumerate(rows) if f"t{i}" not in done),
        roles=program.roles(),
        **{"recovery_interval_s": 0, **driver_options},
    )
    await driver.start()
    try:
        yield driver
    finally:
        writer.close()
        await driver.stop()
