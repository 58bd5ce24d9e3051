"""The customer-support domain: the store's tools and rules, the tasks, the reward, the call parser.

The tool script is exercised both in-process (as :func:`expected_state` uses it) and as the
standalone script the sandbox runs (``python3 -I tools.py ...`` from an empty directory).
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agentmesh.pipelines.customer_support import (
    TOOLS,
    WRITE_TOOLS,
    ToolCall,
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
from agentmesh.pipelines.customer_support import sandbox_tools as st

TASKS = load_tasks()
TASK_BY_ID = {t["id"]: t for t in TASKS}


# --------------------------------------------------------------------------------------------------
# The script, as the sandbox runs it


@pytest.fixture
def script(tmp_path: Path) -> Path:
    """The tool script alone in an otherwise empty directory (like /work in a sandbox)."""
    work = tmp_path / "work"
    work.mkdir()
    path = work / "tools.py"
    path.write_text(sandbox_tools_source())
    return path


def run_script(script: Path, *argv: str, stdin: str = "") -> tuple[int, dict[str, Any] | None, str]:
    """Run the script isolated (``-I``) from its own empty directory; (exit code, reply, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-I", str(script), "--db", str(script.parent / "store.db"), *argv],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=script.parent,
        timeout=30,
    )
    lines = proc.stdout.splitlines()
    reply = json.loads(lines[0]) if lines else None
    assert len(lines) <= 1, f"more than one line on stdout: {proc.stdout!r}"
    return proc.returncode, reply, proc.stderr


def call(script: Path, tool: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    code, reply, _ = run_script(script, tool, json.dumps(args or {}))
    assert code == 0 and reply is not None
    return reply


def test_script_source_uses_the_standard_library_only() -> None:
    tree = ast.parse(sandbox_tools_source())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            assert name.split(".")[0] in sys.stdlib_module_names | {"__future__"}, name


def test_script_init_and_dump_are_deterministic(script: Path) -> None:
    assert call(script, "init")["ok"]
    first = subprocess.run(
        [sys.executable, "-I", str(script), "--db", str(script.parent / "store.db"), "dump"],
        capture_output=True,
        cwd=script.parent,
        check=True,
    ).stdout
    assert call(script, "init")["ok"]  # re-creating gives the same store, byte for byte
    second = subprocess.run(
        [sys.executable, "-I", str(script), "--db", str(script.parent / "store.db"), "dump"],
        capture_output=True,
        cwd=script.parent,
        check=True,
    ).stdout
    assert first == second
    reply = json.loads(first)
    assert reply["ok"] and reply["result"] == seed_state()
    assert sorted(reply["result"]) == sorted(st.TABLE_KEYS)
    assert len(reply["result"]["orders"]) == 30 and len(reply["result"]["products"]) == 15


def test_seed_is_small_and_has_every_order_state() -> None:
    assert len(st.seed_sql().encode()) < 50_000
    seed = seed_state()
    assert {o["status"] for o in seed["orders"]} == {"pending", "shipped", "delivered", "cancelled"}
    assert len(seed["customers"]) >= 10


def test_script_init_from_stdin_seed(script: Path) -> None:
    sql = st.SCHEMA_SQL + "INSERT INTO products VALUES ('P99', 'Kite', 'kite', 'red', 999, 1);"
    code, reply, _ = run_script(script, "init", '{"seed": "stdin"}', stdin=sql)
    assert code == 0 and reply == {
        "ok": True,
        "result": {
            "db": str(script.parent / "store.db"),
            "rows": {"customers": 0, "products": 1, "orders": 0, "order_items": 0, "refunds": 0},
        },
    }
    assert call(script, "list_products")["result"][0]["product_id"] == "P99"
    code, reply, _ = run_script(script, "init", '{"seed": "stdin"}', stdin="  ")
    assert code == 0 and reply is not None and not reply["ok"] and "stdin" in reply["error"]


def test_script_errors_are_answers_and_usage_errors_exit_2(script: Path) -> None:
    # no store yet
    reply = call(script, "get_order", {"order_id": "1001"})
    assert not reply["ok"] and "init" in reply["error"]
    assert call(script, "init")["ok"]
    code, bad, _ = run_script(script, "get_order", "{not json")
    assert code == 0 and bad is not None and not bad["ok"] and "JSON" in bad["error"]
    code, bad, _ = run_script(script, "get_order", '["1001"]')
    assert code == 0 and bad is not None and not bad["ok"] and "object" in bad["error"]
    reply = call(script, "delete_everything")
    assert not reply["ok"] and "unknown tool 'delete_everything'" in reply["error"]
    reply = call(script, "get_order", {})
    assert not reply["ok"] and "'order_id'" in reply["error"]
    reply = call(script, "get_order", {"order_id": "1001", "verbose": True})
    assert not reply["ok"] and "'verbose'" in reply["error"]
    for argv in ([], ["--db"], ["--bogus", "dump"], ["get_order", "{}", "extra"]):
        proc = subprocess.run(
            [sys.executable, "-I", str(script), *argv], capture_output=True, text=True, cwd=script.parent
        )
        assert proc.returncode == 2, argv
        assert proc.stdout == "" and "usage" in proc.stderr


def test_script_default_db_path_is_work_store_db() -> None:
    assert st.DEFAULT_DB == "/work/store.db"


@pytest.mark.parametrize("task_id", [t["id"] for t in TASKS if t["expected_actions"]])
def test_every_write_task_succeeds_through_the_script(script: Path, task_id: str) -> None:
    task = TASK_BY_ID[task_id]
    assert call(script, "init")["ok"]
    for action in task["expected_actions"]:
        reply = call(script, action["tool"], action["args"])
        assert reply["ok"], reply
    final = call(script, "dump")
    verdict = reward(task, final["result"])
    assert verdict == {"reward": 1.0, "db_match": True, "info_match": None, "diff": ""}
    # the whole reply object is accepted as well
    assert reward(task, final)["reward"] == 1.0


def test_script_runs_with_a_relative_db_in_an_empty_cwd(script: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-I", "tools.py", "--db", "store.db", "init"],
        capture_output=True,
        text=True,
        cwd=script.parent,
        timeout=30,
    )
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"]
    assert sorted(p.name for p in script.parent.iterdir()) == ["store.db", "tools.py"]


@pytest.mark.skipif(shutil.which("python3") is None, reason="no python3 on PATH")
def test_script_runs_under_the_system_python3(script: Path) -> None:
    # the sandbox runs plain `python3`, not this venv's interpreter
    proc = subprocess.run(
        ["python3", "-I", str(script), "--db", str(script.parent / "store.db"), "init"],
        capture_output=True,
        text=True,
        cwd=script.parent,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"]


# --------------------------------------------------------------------------------------------------
# Tasks and reward


def test_tasks_are_many_and_well_formed() -> None:
    assert len(TASKS) >= 24
    assert len(TASK_BY_ID) == len(TASKS), "task ids must be unique"
    kinds = [t["kind"] for t in TASKS]
    assert kinds.count("write") >= 12 and kinds.count("read") >= 4 and kinds.count("refuse") >= 6
    emails = {c["email"] for c in seed_state()["customers"]}
    for t in TASKS:
        assert t["instructions"] and t["first_message"] and t["user"]["name"]
        assert "email" in t["user"] or "zip" in t["user"]
        if "email" in t["user"]:
            assert t["user"]["email"] in emails
        assert bool(t["expected_actions"]) == (t["kind"] == "write")
        assert all(a["tool"] in WRITE_TOOLS for a in t["expected_actions"])


@pytest.mark.parametrize("task_id", [t["id"] for t in TASKS])
def test_expected_state_scores_one_and_the_seed_scores_by_kind(task_id: str) -> None:
    task = TASK_BY_ID[task_id]
    want = expected_state(task)
    assert reward(task, want)["reward"] == 1.0
    seed = seed_state()
    if task["expected_actions"]:
        assert want != seed
        verdict = reward(task, seed)  # a conversation that did nothing
        assert verdict["reward"] == 0.0 and not verdict["db_match"] and verdict["diff"]
    else:
        assert want == seed


def test_expected_actions_belong_to_the_tasks_customer() -> None:
    seed = seed_state()
    owner = {o["order_id"]: o["customer_id"] for o in seed["orders"]}
    customer_of = {(c["name"], c["zip"]): c["customer_id"] for c in seed["customers"]}
    for t in TASKS:
        me = customer_of[(t["user"]["name"], t["user"]["zip"])]
        for action in t["expected_actions"]:
            assert owner[action["args"]["order_id"]] == me, t["id"]


def test_wrong_action_scores_zero_with_a_diff_naming_the_rows() -> None:
    task = TASK_BY_ID["cs001"]  # cancel 1001
    conn = fresh_store()
    assert run_tool(conn, "cancel_order", {"order_id": "1004", "reason": "no longer needed"})["ok"]
    verdict = reward(task, st.dump_store(conn))
    assert verdict["reward"] == 0.0 and not verdict["db_match"]
    assert "orders[1004]" in verdict["diff"] and "orders[1001]" in verdict["diff"]
    assert "refunds[1004-R1]: unexpected row" in verdict["diff"]
    assert "refunds[1001-R1]: missing" in verdict["diff"]


def test_right_action_with_a_different_reason_scores_zero() -> None:
    task = TASK_BY_ID["cs001"]
    conn = fresh_store()
    assert run_tool(conn, "cancel_order", {"order_id": "1001", "reason": "ordered by mistake"})["ok"]
    verdict = reward(task, st.dump_store(conn))
    assert verdict["reward"] == 0.0
    assert 'cancel_reason "ordered by mistake" (expected "no longer needed")' in verdict["diff"]


def test_reward_diff_is_bounded() -> None:
    task = TASK_BY_ID["cs001"]
    state = seed_state()
    for row in state["products"]:
        row["stock"] += 1
    diff = reward(task, state)["diff"]
    lines = diff.splitlines()
    assert len(lines) == 13 and lines[-1].startswith("... and ")


@pytest.mark.parametrize(
    "dump", [None, [], "junk", {"orders": "x"}, {"customers": [{"no_key": 1}]}, {"ok": False, "result": None}]
)
def test_reward_never_raises_on_junk_dumps(dump: Any) -> None:
    verdict = reward(TASK_BY_ID["cs017"], dump)
    assert verdict["reward"] == 0.0 and verdict["diff"]


def test_reward_checks_information_when_given_the_assistant_text() -> None:
    task = TASK_BY_ID["cs017"]  # tracking number TRK100800
    seed = seed_state()
    assert reward(task, seed)["info_match"] is None
    told = reward(task, seed, assistant_text="It shipped; the tracking number is trk100800.")
    assert told["reward"] == 1.0 and told["info_match"] is True
    untold = reward(task, seed, assistant_text="It is on its way!")
    assert untold["reward"] == 0.0 and untold["db_match"] and untold["info_match"] is False
    assert "TRK100800" in untold["diff"]


# --------------------------------------------------------------------------------------------------
# Business rules


def refused(tool: str, args: dict[str, Any]) -> str:
    """Run a tool on a fresh store; assert it was refused without changing anything; the error."""
    conn = fresh_store()
    before = st.dump_store(conn)
    reply = run_tool(conn, tool, args)
    assert not reply["ok"], reply
    assert st.dump_store(conn) == before, "a refused call changed the store"
    return str(reply["error"])


def test_only_pending_orders_can_be_cancelled() -> None:
    error = refused("cancel_order", {"order_id": "1003", "reason": "no longer needed"})
    assert "1003 is shipped" in error and "pending" in error
    assert "already" not in error
    assert "1009 is cancelled" in refused("cancel_order", {"order_id": "1009", "reason": "no longer needed"})
    assert "1002 is delivered" in refused("cancel_order", {"order_id": "1002", "reason": "no longer needed"})


def test_cancel_refunds_the_whole_order() -> None:
    conn = fresh_store()
    reply = run_tool(conn, "cancel_order", {"order_id": "#1001", "reason": " No longer  needed "})
    assert reply == {
        "ok": True,
        "result": {
            "order_id": "1001",
            "status": "cancelled",
            "refund_id": "1001-R1",
            "refund_amount": "27.00",
            "refunded_to": "credit card",
        },
    }


def test_only_delivered_orders_can_be_returned_or_exchanged() -> None:
    error = refused("return_items", {"order_id": "1003", "item_ids": ["1003-1"], "reason": "damaged"})
    assert "1003 is shipped" in error and "delivered" in error
    error = refused("exchange_item", {"order_id": "1001", "item_id": "1001-1", "new_product_id": "P14"})
    assert "1001 is pending" in error


def test_returned_items_must_belong_to_the_order() -> None:
    error = refused(
        "return_items", {"order_id": "1007", "item_ids": ["1007-1", "1010-1"], "reason": "damaged"}
    )
    assert "item_id '1010-1' is not in order 1007" in error and "1007-1" in error


def test_return_window_is_enforced() -> None:
    error = refused("return_items", {"order_id": "1017", "item_ids": ["1017-1"], "reason": "damaged"})
    assert "2025-03-15" in error and "30 days" in error
    error = refused("exchange_item", {"order_id": "1011", "item_id": "1011-1", "new_product_id": "P08"})
    assert "no longer be exchanged" in error


def test_items_cannot_be_returned_twice() -> None:
    error = refused("return_items", {"order_id": "1029", "item_ids": ["1029-1"], "reason": "damaged"})
    assert "1029-1 is already returned" in error
    error = refused(
        "return_items", {"order_id": "1029", "item_ids": ["1029-2", "1029-2"], "reason": "damaged"}
    )
    assert "twice" in error
    conn = fresh_store()
    assert run_tool(conn, "return_items", {"order_id": "1007", "item_ids": "1007-2", "reason": "wrong item"})[
        "ok"
    ]
    reply = run_tool(
        conn, "exchange_item", {"order_id": "1007", "item_id": "1007-2", "new_product_id": "P07"}
    )
    assert not reply["ok"] and "already returned" in reply["error"]


def test_return_reason_must_be_a_known_one() -> None:
    error = refused("return_items", {"order_id": "1007", "item_ids": ["1007-1"], "reason": "meh"})
    assert "'reason'" in error and "'damaged'" in error


def test_exchange_rules() -> None:
    error = refused("exchange_item", {"order_id": "1026", "item_id": "1026-1", "new_product_id": "P02"})
    assert "out of stock" in error
    error = refused("exchange_item", {"order_id": "1025", "item_id": "1025-1", "new_product_id": "P09"})
    assert "different product" in error
    error = refused("exchange_item", {"order_id": "1025", "item_id": "1025-1", "new_product_id": "P11"})
    assert "already ordered" in error
    error = refused("exchange_item", {"order_id": "1025", "item_id": "1025-1", "new_product_id": "P77"})
    assert "'P77' not found" in error


def test_change_address_rules() -> None:
    args = {"street": "1 Main St", "city": "Springfield", "zip": "12345"}
    assert "1003 is shipped" in refused("change_address", {"order_id": "1003", **args})
    assert "'zip' must be five digits" in refused(
        "change_address", {"order_id": "1001", **args, "zip": "1234"}
    )
    assert "'city'" in refused("change_address", {"order_id": "1001", **args, "city": "  "})
    assert "'9999' not found" in refused("change_address", {"order_id": "9999", **args})


def test_read_tools() -> None:
    conn = fresh_store()
    by_email = run_tool(conn, "find_customer", {"email": "ADA.Lovelace@example.com "})["result"]
    assert by_email["customer_id"] == "C01"
    assert [o["order_id"] for o in by_email["orders"]] == ["1001", "1002", "1003"]
    # two customers are called Grace Kim: the zip tells them apart
    assert (
        run_tool(conn, "find_customer", {"name": "grace kim", "zip": "55401"})["result"]["customer_id"]
        == "C11"
    )
    assert (
        run_tool(conn, "find_customer", {"name": "Grace Kim", "zip": "30301"})["result"]["customer_id"]
        == "C07"
    )
    assert "'name' and 'zip'" in run_tool(conn, "find_customer", {"name": "Grace Kim"})["error"]
    assert "no customer" in run_tool(conn, "find_customer", {"email": "nobody@example.com"})["error"]
    order = run_tool(conn, "get_order", {"order_id": 1008})["result"]
    assert order["status"] == "shipped" and order["tracking_number"] == "TRK100800"
    assert order["items"] == [
        {
            "item_id": "1008-1",
            "product_id": "P04",
            "name": "Running Shoes (size 42)",
            "price": "89.00",
            "status": "ordered",
        }
    ]
    shoes = run_tool(conn, "list_products", {"query": "running shoes"})["result"]
    assert [p["product_id"] for p in shoes] == ["P04", "P05", "P06"] and shoes[2]["in_stock"] == 0


def test_refuse_tasks_are_refused_by_the_tools_or_by_ownership() -> None:
    # What a careless assistant would do for each refusal task; all but one are stopped by the
    # tools themselves. Cancelling someone else's order (cs029) is stopped only by the policy,
    # and the reward catches it.
    tempting: dict[str, tuple[str, dict[str, Any]]] = {
        "cs022": ("cancel_order", {"order_id": "1015", "reason": "no longer needed"}),
        "cs023": ("return_items", {"order_id": "1023", "item_ids": ["1023-1"], "reason": "no longer needed"}),
        "cs024": ("return_items", {"order_id": "1017", "item_ids": ["1017-1"], "reason": "no longer needed"}),
        "cs025": ("exchange_item", {"order_id": "1026", "item_id": "1026-1", "new_product_id": "P02"}),
        "cs026": (
            "change_address",
            {"order_id": "1021", "street": "8 Bay Rd", "city": "Miami", "zip": "33139"},
        ),
        "cs027": ("cancel_order", {"order_id": "1009", "reason": "no longer needed"}),
        "cs028": ("exchange_item", {"order_id": "1025", "item_id": "1025-1", "new_product_id": "P09"}),
        "cs030": ("return_items", {"order_id": "1011", "item_ids": ["1011-1"], "reason": "no longer needed"}),
    }
    for task_id, (tool, args) in tempting.items():
        assert TASK_BY_ID[task_id]["kind"] == "refuse"
        refused(tool, args)
    conn = fresh_store()
    assert run_tool(conn, "cancel_order", {"order_id": "1013", "reason": "no longer needed"})["ok"]
    verdict = reward(TASK_BY_ID["cs029"], st.dump_store(conn))
    assert verdict["reward"] == 0.0 and "orders[1013]" in verdict["diff"]


# --------------------------------------------------------------------------------------------------
# Tool-call parsing and the assistant's prompt


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('CALL get_order {"order_id": "1001"}', ToolCall("get_order", {"order_id": "1001"})),
        ('Let me look.\nCALL get_order {"order_id": "1001"}\n', ToolCall("get_order", {"order_id": "1001"})),
        ('`CALL get_order {"order_id": "1001"}`', ToolCall("get_order", {"order_id": "1001"})),
        ('**CALL: get_order({"order_id": "1001"})**', ToolCall("get_order", {"order_id": "1001"})),
        ('call Get_Order {"order_id": "1001"} thanks', ToolCall("get_order", {"order_id": "1001"})),
        (
            'CALL return_items {\n  "order_id": "1007",\n  "item_ids": ["1007-1"],\n  "reason": "damaged"\n}',
            ToolCall("return_items", {"order_id": "1007", "item_ids": ["1007-1"], "reason": "damaged"}),
        ),
        ("CALL list_products", ToolCall("list_products", {})),
        ("CALL get_order 1001", ToolCall("get_order", {"_unparsed": "1001"})),
        (
            '```json\n{"tool": "cancel_order",\n'
            ' "args": {"order_id": "1001", "reason": "no longer needed"}}\n```',
            ToolCall("cancel_order", {"order_id": "1001", "reason": "no longer needed"}),
        ),
        (
            'Sure! {"tool": "get_order", "args": {"order_id": "1002"}}',
            ToolCall("get_order", {"order_id": "1002"}),
        ),
        (
            '{"name": "find_customer", "arguments": "{\\"email\\": \\"a@b.c\\"}"}',
            ToolCall("find_customer", {"email": "a@b.c"}),
        ),
        # messages to the customer
        ("Hello! How can I help you today?", None),
        ("Call me if you need anything else.", None),
        ('CALL refund_everything {"all": true}', None),
        ('{"tool": "drop_tables", "args": {}}', None),
        ('{"order_id": "1001"}', None),
        ('{"tool": "get_order", "args": "not an object"}', None),
        ("", None),
        ("{{{{[[[[", None),
        ("[" * 5000 + "]" * 5000, None),
        ("{" * 3000, None),
    ],
)
def test_parse_tool_call(text: str, expected: ToolCall | None) -> None:
    assert parse_tool_call(text) == expected


@pytest.mark.parametrize("junk", [None, 42, b"CALL get_order {}", ["CALL list_products"], "\x00\x01CALL"])
def test_parse_tool_call_never_raises_on_junk(junk: Any) -> None:
    assert parse_tool_call(junk) is None


def test_unparsed_arguments_come_back_as_a_clear_error() -> None:
    conn = fresh_store()
    parsed = parse_tool_call("CALL get_order 1001")
    assert parsed is not None
    reply = run_tool(conn, parsed.tool, parsed.args)
    assert not reply["ok"] and "must be a JSON object" in reply["error"] and "1001" in reply["error"]


def test_tools_and_prompt_match_the_script() -> None:
    assert {t.name for t in TOOLS} == set(st.TOOL_ARGS)
    assert {t.name for t in TOOLS if t.writes} == WRITE_TOOLS
    for spec in TOOLS:
        required, optional = st.TOOL_ARGS[spec.name]
        assert set(spec.parameters["required"]) == set(required)
        assert set(spec.parameters["properties"]) == set(required) | set(optional)
    prompt = tools_prompt()
    assert all(f"- {t.name} " in prompt for t in TOOLS)
    assert '"no longer needed"|"ordered by mistake"' in prompt
