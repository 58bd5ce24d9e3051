"""Entry point of a function task: ``python -m agentmesh.jobs.run_function package.module:function``.

Reads the keyword arguments (JSON) from the file named by ``$AGENTMESH_TASK_ARGS``, calls the
function (awaiting it if it is a coroutine function), and writes its return value as JSON to the
file named by ``$AGENTMESH_TASK_RESULT``. A function raising, or returning something that is not
JSON, exits 1 with the reason on stderr (which is the attempt's log). Running functions as
processes, like commands, makes timeouts, cancellation and logs work the same for both.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import os
import sys
import traceback
from typing import Any

from agentmesh.files import write_atomic

__all__ = ["main", "resolve"]


def resolve(target: str) -> Any:
    """The object named by ``module:attr.attr``; ImportError/AttributeError say what is missing."""
    module_name, _, qual = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def main(argv: list[str]) -> int:
    if len(argv) != 1 or ":" not in argv[0]:
        print("usage: python -m agentmesh.jobs.run_function package.module:function", file=sys.stderr)
        return 2
    target = argv[0]
    args_path = os.environ.get("AGENTMESH_TASK_ARGS", "")
    result_path = os.environ.get("AGENTMESH_TASK_RESULT", "")
    try:
        kwargs = json.loads(open(args_path, encoding="utf-8").read()) if args_path else {}
    except (OSError, ValueError) as exc:
        print(f"run_function: cannot read the arguments from {args_path}: {exc}", file=sys.stderr)
        return 1
    try:
        fn = resolve(target)
    except (ImportError, AttributeError) as exc:
        print(f"run_function: cannot import {target}: {exc}", file=sys.stderr)
        return 1
    if not callable(fn):
        print(f"run_function: {target} is not callable", file=sys.stderr)
        return 1
    try:
        result = fn(**kwargs)
        if inspect.isawaitable(result):
            result = asyncio.run(_awaited(result))
    except Exception as exc:
        traceback.print_exc()
        print(f"run_function: {target} raised {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    try:
        text = json.dumps(result, allow_nan=False)
    except (TypeError, ValueError) as exc:
        print(f"run_function: the result of {target} is not JSON: {exc}", file=sys.stderr)
        return 1
    if result_path:
        write_atomic(result_path, text)
    return 0


async def _awaited(aw: Any) -> Any:
    return await aw


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
