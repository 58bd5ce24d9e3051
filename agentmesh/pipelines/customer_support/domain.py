"""The customer-support domain: a small online store's tools, policy, tasks and reward.

The store (customers, products, orders, their items and refunds) lives in a SQLite file inside each
task's sandbox; :mod:`~agentmesh.pipelines.customer_support.sandbox_tools` is the script that runs
there, and this module is the host side of the same domain:

* :data:`TOOLS` describes the assistant's tools (for its prompt; :func:`tools_prompt` renders them)
  and :data:`POLICY` the rules it must follow.
* :func:`parse_tool_call` finds a tool call in an LLM's reply. The protocol is one line
  ``CALL tool_name {"arg": ...}``; a JSON object ``{"tool": ..., "args": {...}}`` (bare or in a
  fenced block) is accepted too. Anything else is a message to the customer.
* :func:`load_tasks` reads the bundled tasks; :func:`expected_state` applies a task's expected
  write actions to a freshly seeded in-memory store with the very functions the sandbox runs, and
  :func:`reward` compares a final store dump with it (1.0 when equal, else 0.0 and a short diff).
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from agentmesh.pipelines.customer_support import sandbox_tools
from agentmesh.pipelines.customer_support.sandbox_tools import TABLE_KEYS, WRITE_TOOLS

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

#: The bundled tasks (one JSON object per line).
TASKS_PATH = Path(str(files(__package__ or __name__).joinpath("tasks.jsonl")))

#: At most this many differing rows are described in a reward's diff.
MAX_DIFF_LINES = 12
_MAX_LINE = 240


# --------------------------------------------------------------------------------------------------
# Tools and policy (what the assistant is told)


@dataclass(frozen=True)
class ToolSpec:
    """One tool as the assistant sees it: ``parameters`` is a JSON-schema object."""

    name: str
    description: str
    parameters: dict[str, Any]
    #: Whether the tool changes the store (only these appear in a task's expected actions).
    writes: bool = False


def _schema(props: dict[str, dict[str, Any]], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(required)}


_STR = {"type": "string"}

TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec(
        "find_customer",
        "Find a customer by email, or by full name and zip code. Returns their id, address and orders.",
        _schema({"email": _STR, "name": _STR, "zip": _STR}),
    ),
    ToolSpec(
        "get_order",
        "An order's status, dates, tracking number, shipping address, items (with item ids) and refunds.",
        _schema({"order_id": _STR}, ("order_id",)),
    ),
    ToolSpec(
        "list_products",
        "Products with variants, prices and stock; 'query' filters by words in the name or variant.",
        _schema({"query": _STR}),
    ),
    ToolSpec(
        "cancel_order",
        "Cancel a pending order; the whole amount is refunded to the original payment method.",
        _schema(
            {"order_id": _STR, "reason": {"type": "string", "enum": list(sandbox_tools.CANCEL_REASONS)}},
            ("order_id", "reason"),
        ),
        writes=True,
    ),
    ToolSpec(
        "return_items",
        "Return items of a delivered order (within 30 days of delivery); they are refunded.",
        _schema(
            {
                "order_id": _STR,
                "item_ids": {"type": "array", "items": _STR},
                "reason": {"type": "string", "enum": list(sandbox_tools.RETURN_REASONS)},
            },
            ("order_id", "item_ids", "reason"),
        ),
        writes=True,
    ),
    ToolSpec(
        "exchange_item",
        "Exchange one item of a delivered order (within 30 days) for another in-stock variant of the "
        "same product (e.g. another size or colour).",
        _schema(
            {"order_id": _STR, "item_id": _STR, "new_product_id": _STR},
            ("order_id", "item_id", "new_product_id"),
        ),
        writes=True,
    ),
    ToolSpec(
        "change_address",
        "Change the shipping address of a pending order.",
        _schema(
            {"order_id": _STR, "street": _STR, "city": _STR, "zip": _STR},
            ("order_id", "street", "city", "zip"),
        ),
        writes=True,
    ),
)

_TOOL_NAMES = frozenset(t.name for t in TOOLS)

POLICY = (
    f"Today is {sandbox_tools.TODAY}. "
    "First identify the customer with find_customer (their email, or their full name and zip code). "
    "Only act on that customer's own orders, and only do what the customer asked for. "
    "Only pending orders can be cancelled or have their address changed. "
    f"Only delivered orders can be returned or exchanged, within {sandbox_tools.RETURN_WINDOW_DAYS} days "
    "of delivery; an exchange must be for another variant of the same product that is in stock. "
    "Shipped orders cannot be changed. If the policy forbids a request, say so and do not call a tool "
    "for it. Never make up order or item ids: look them up."
)


def _param_hint(schema: Mapping[str, Any]) -> str:
    if "enum" in schema:
        return "|".join(json.dumps(v) for v in schema["enum"])
    if schema.get("type") == "array":
        return "[" + str(schema.get("items", {}).get("type", "any")) + ", ...]"
    return str(schema.get("type", "any"))


def tools_prompt() -> str:
    """The tools as compact lines for the assistant's prompt: ``name {args}: what it does``."""
    lines = []
    for spec in TOOLS:
        required = set(spec.parameters.get("required", []))
        args = ", ".join(
            f'"{name}"{"" if name in required else "?"}: {_param_hint(schema)}'
            for name, schema in spec.parameters["properties"].items()
        )
        lines.append(f"- {spec.name} {{{args}}}: {spec.description}")
    return "\n".join(lines)


def sandbox_tools_source() -> str:
    """The text of the tool script, to be written into a sandbox (e.g. as ``/work/tools.py``)."""
    return files(__package__ or __name__).joinpath("sandbox_tools.py").read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Tool calls in an LLM's text


@dataclass(frozen=True)
class ToolCall:
    """A tool call found in the assistant's text."""

    tool: str
    args: dict[str, Any] = field(default_factory=dict)


# `CALL name` then (optionally) the rest of the line, which should start a JSON object. Models often
# wrap the line in backticks or bold markers, or write "CALL: name(...)".
_CALL_LINE = re.compile(
    r"^[\s>*`_-]*CALL\s*:?\s*([A-Za-z_][A-Za-z0-9_]*)\s*(.*)$", re.IGNORECASE | re.MULTILINE
)
_FENCE = re.compile(r"```[A-Za-z]*\s*\n?(.*?)```", re.DOTALL)
_DECODER = json.JSONDecoder()


def _json_object_at(text: str, start: int) -> dict[str, Any] | None:
    """The JSON object that starts at ``text[start]`` (trailing text ignored), or None."""
    try:
        value, _ = _DECODER.raw_decode(text, start)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _json_objects(text: str) -> Iterator[dict[str, Any]]:
    """Every top-level-looking JSON object in ``text``, fenced blocks first."""
    for block in _FENCE.findall(text):
        obj = _json_object_at(block, block.find("{")) if "{" in block else None
        if obj is not None:
            yield obj
    pos = text.find("{")
    while pos != -1:
        obj = _json_object_at(text, pos)
        if obj is not None:
            yield obj
        pos = text.find("{", pos + 1)


def _call_from_object(obj: Mapping[str, Any]) -> ToolCall | None:
    # {"tool": ..., "args": ...} is the documented shape; OpenAI-style {"name": ..., "arguments": ...}
    # (arguments possibly a JSON string) is what many chat models write by habit.
    name = obj.get("tool", obj.get("name"))
    args = obj.get("args", obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):
        args = _json_object_at(args, args.find("{")) if "{" in args else None
    if not isinstance(name, str) or name.strip() not in _TOOL_NAMES or not isinstance(args, dict):
        return None
    return ToolCall(name.strip(), dict(args))


def parse_tool_call(text: object) -> ToolCall | None:
    """The first tool call in an assistant's reply, or None when the reply is a message.

    Accepted: a line ``CALL tool_name {"arg": ...}`` (arguments may be omitted for a tool that needs
    none; ``CALL tool_name({...})`` works too), or a JSON object ``{"tool": ..., "args": {...}}``, bare
    or in a fenced block. A ``CALL`` line with a known tool but unreadable arguments still counts as
    a call, with the raw text under ``"_unparsed"`` (the script then names the bad argument); a name
    that is no tool is not a call. Never raises.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        for m in _CALL_LINE.finditer(text):
            name, rest = m.group(1), m.group(2).strip().strip("`").strip()
            if name not in _TOOL_NAMES:
                lowered = name.lower()
                if lowered not in _TOOL_NAMES:
                    continue
                name = lowered
            if rest.startswith("(") and rest.endswith(")"):
                rest = rest[1:-1].strip()
            if not rest:
                return ToolCall(name, {})
            # the arguments may continue on the following lines (pretty-printed JSON)
            tail = text[m.start(2) :]
            brace = tail.find("{")
            args = _json_object_at(tail, brace) if brace != -1 else None
            return ToolCall(name, args if args is not None else {"_unparsed": rest[:200]})
        for obj in _json_objects(text):
            call = _call_from_object(obj)
            if call is not None:
                return call
    except (RecursionError, ValueError, TypeError):  # pathological input: treat it as a message
        return None
    return None


# --------------------------------------------------------------------------------------------------
# The store in-process (same code as in the sandbox)


def fresh_store() -> sqlite3.Connection:
    """A new in-memory store holding the seed, opened like the script opens its file."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    sandbox_tools.create_store(conn)
    return conn


def run_tool(conn: sqlite3.Connection, tool: str, args: Any) -> dict[str, Any]:
    """Run one tool against ``conn``; the reply object the script would print."""
    return sandbox_tools.run_tool(conn, tool, args)


def dump_state(conn: sqlite3.Connection) -> dict[str, list[dict[str, Any]]]:
    """The store's whole state, as the script's ``dump`` prints it (after a JSON round trip)."""
    dumped: dict[str, list[dict[str, Any]]] = json.loads(json.dumps(sandbox_tools.dump_store(conn)))
    return dumped


def seed_state() -> dict[str, list[dict[str, Any]]]:
    """The state of a freshly seeded store."""
    conn = fresh_store()
    try:
        return dump_state(conn)
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------------
# Tasks and reward


def _check_task(task: Mapping[str, Any], where: str) -> None:
    for key in ("id", "user", "instructions", "first_message", "expected_actions"):
        if key not in task:
            raise ValueError(f"{where}: task is missing '{key}'")
    actions = task["expected_actions"]
    if not isinstance(actions, list):
        raise ValueError(f"{where}: 'expected_actions' must be a list")
    for i, action in enumerate(actions):
        if not isinstance(action, dict) or action.get("tool") not in WRITE_TOOLS:
            raise ValueError(
                f"{where}: expected_actions[{i}] must be {{'tool': <write tool>, 'args': {{...}}}}"
            )
        if not isinstance(action.get("args", {}), dict):
            raise ValueError(f"{where}: expected_actions[{i}].args must be an object")


def load_tasks(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The tasks of ``path`` (default: the bundled ``tasks.jsonl``), checked for shape."""
    source = Path(path) if path is not None else TASKS_PATH
    tasks = []
    for n, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        task = json.loads(line)
        _check_task(task, f"{source.name}:{n}")
        tasks.append(task)
    return tasks


def expected_state(task: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The store after the task's expected actions, applied in order to a freshly seeded store.

    Raises ValueError when an expected action is refused: the task itself is wrong.
    """
    conn = fresh_store()
    try:
        for i, action in enumerate(task.get("expected_actions") or []):
            reply = sandbox_tools.run_tool(conn, str(action.get("tool")), dict(action.get("args") or {}))
            if not reply["ok"]:
                raise ValueError(
                    f"task {task.get('id')!r}: expected_actions[{i}] ({action.get('tool')}) was refused: "
                    f"{reply['error']}"
                )
        return dump_state(conn)
    finally:
        conn.close()


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _table_diff(table: str, key: str, want: list[Any], got: Any) -> list[str]:
    if not isinstance(got, list) or not all(isinstance(r, dict) and key in r for r in got):
        return [f"{table}: not a list of rows with '{key}'"]
    want_rows = {str(r[key]): r for r in want}
    got_rows = {str(r[key]): r for r in got}
    lines = []
    for row_key in sorted(want_rows.keys() | got_rows.keys()):
        w, g = want_rows.get(row_key), got_rows.get(row_key)
        if g is None:
            lines.append(f"{table}[{row_key}]: missing (expected {_short(w)})")
        elif w is None:
            lines.append(f"{table}[{row_key}]: unexpected row {_short(g)}")
        elif w != g:
            cols = sorted(set(w) | set(g))
            changes = [
                f"{c} {_short(g.get(c))} (expected {_short(w.get(c))})" for c in cols if w.get(c) != g.get(c)
            ]
            lines.append(f"{table}[{row_key}]: " + ", ".join(changes))
    return lines


def _diff_lines(want: Mapping[str, Any], got: Mapping[str, Any]) -> list[str]:
    lines = []
    for table, key in TABLE_KEYS.items():
        if table not in got:
            lines.append(f"{table}: missing from the dump")
            continue
        lines.extend(_table_diff(table, key, want[table], got[table]))
    lines.extend(f"{table}: unexpected table" for table in sorted(set(got) - set(TABLE_KEYS)))
    return lines


def reward(task: Mapping[str, Any], final_dump: Any, *, assistant_text: str | None = None) -> dict[str, Any]:
    """Score one trajectory: 1.0 when the final store equals the task's expected state, else 0.0.

    ``final_dump`` is the ``result`` of the script's ``dump`` (the whole reply object is accepted
    too). Returns ``{"reward", "db_match", "diff"}``: ``diff`` is empty on a match, else one line per
    differing row (at most :data:`MAX_DIFF_LINES` lines, then a count of the rest). When the task
    lists ``expected_info`` (facts the customer must be told, e.g. a tracking number) and
    ``assistant_text`` (everything the assistant said) is given, each must appear in it too
    (case-insensitive); ``info_match`` says whether they did (None when not checked).
    """
    if isinstance(final_dump, Mapping) and "ok" in final_dump and "result" in final_dump:
        final_dump = final_dump["result"]
    if not isinstance(final_dump, Mapping):
        lines = [f"final dump is not a store dump (got {type(final_dump).__name__})"]
    else:
        lines = _diff_lines(expected_state(task), final_dump)
    db_match = not lines
    info_match: bool | None = None
    expected_info = task.get("expected_info") or []
    if assistant_text is not None and expected_info:
        said = " ".join(assistant_text.split()).lower()
        missing = [str(fact) for fact in expected_info if " ".join(str(fact).split()).lower() not in said]
        info_match = not missing
        if missing:
            lines.append("not told to the customer: " + ", ".join(missing))
    shown = [
        line if len(line) <= _MAX_LINE else line[: _MAX_LINE - 3] + "..." for line in lines[:MAX_DIFF_LINES]
    ]
    if len(lines) > MAX_DIFF_LINES:
        shown.append(f"... and {len(lines) - MAX_DIFF_LINES} more differences")
    ok = db_match and info_match is not False
    return {
        "reward": 1.0 if ok else 0.0,
        "db_match": db_match,
        "info_match": info_match,
        "diff": "\n".join(shown),
    }
