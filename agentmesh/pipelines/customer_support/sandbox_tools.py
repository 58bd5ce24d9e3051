"""The store's tools: a standalone script that runs inside a task's sandbox against a SQLite file.

Usage (inside the sandbox; the caller writes this file's text to ``/work/tools.py``)::

    python3 -I /work/tools.py [--db PATH] TOOL ['{"json": "args"}']

``--db`` defaults to ``/work/store.db``. ``init`` (re)creates the store from the built-in seed (or, with
``{"seed": "stdin"}``, from SQL read on stdin); ``dump`` prints the whole store as canonical JSON
(tables in a fixed order, rows ordered by primary key). The other tools are the ones the assistant
may call (see :data:`TOOL_ARGS`).

Every run prints exactly one JSON object on stdout: ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "..."}``. Exit status: 0 for every answer, including refusals, bad JSON and
unknown tools (a tool error is something the assistant reads, not a crash); 1 when the store itself
failed (an unexpected SQLite error; the JSON reply still says what happened); 2 for a usage error of
the script (no tool named, a bad option).

This file must stay importable on its own: standard library only, no agentmesh imports, because
its source text is what runs inside the sandbox. ``agentmesh.pipelines.customer_support.domain``
imports the same functions to compute expected states in-process, so the two cannot drift.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import sys
from collections.abc import Callable, Sequence
from datetime import date, timedelta
from typing import Any

__all__ = [
    "CANCEL_REASONS",
    "DEFAULT_DB",
    "RETURN_REASONS",
    "RETURN_WINDOW_DAYS",
    "SCHEMA_SQL",
    "TABLE_KEYS",
    "TODAY",
    "TOOL_ARGS",
    "WRITE_TOOLS",
    "ToolError",
    "create_store",
    "dump_store",
    "main",
    "run_tool",
    "seed_sql",
]

DEFAULT_DB = "/work/store.db"

#: The store's notion of "today": fixed so that the return window gives the same answer on any day.
TODAY = "2025-06-15"
#: Delivered items may be returned or exchanged up to this many days after delivery (inclusive).
RETURN_WINDOW_DAYS = 30

CANCEL_REASONS = ("no longer needed", "ordered by mistake")
RETURN_REASONS = ("damaged", "wrong item", "not as described", "no longer needed")

#: Tables in dump order, each with its primary-key column.
TABLE_KEYS: dict[str, str] = {
    "customers": "customer_id",
    "products": "product_id",
    "orders": "order_id",
    "order_items": "item_id",
    "refunds": "refund_id",
}

SCHEMA_SQL = """
CREATE TABLE customers (
    customer_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    email TEXT NOT NULL UNIQUE,
    phone TEXT NOT NULL,
    street TEXT NOT NULL,
    city TEXT NOT NULL,
    zip TEXT NOT NULL
);
CREATE TABLE products (
    product_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    family TEXT NOT NULL,
    variant TEXT NOT NULL,
    price_cents INTEGER NOT NULL CHECK (price_cents >= 0),
    stock INTEGER NOT NULL CHECK (stock >= 0)
);
CREATE TABLE orders (
    order_id TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL REFERENCES customers(customer_id),
    status TEXT NOT NULL CHECK (status IN ('pending', 'shipped', 'delivered', 'cancelled')),
    placed_at TEXT NOT NULL,
    delivered_at TEXT,
    tracking_number TEXT,
    payment_method TEXT NOT NULL,
    ship_street TEXT NOT NULL,
    ship_city TEXT NOT NULL,
    ship_zip TEXT NOT NULL,
    cancel_reason TEXT
);
CREATE TABLE refunds (
    refund_id TEXT PRIMARY KEY,
    order_id TEXT NOT NULL REFERENCES orders(order_id),
    kind TEXT NOT NULL CHECK (kind IN ('cancellation', 'return')),
    amount_cents INTEGER NOT NULL,
    reason TEXT NOT NULL,
    payment_method TEXT NOT NULL
);
CREATE TABLE order_items (
    item_id TEXT PRIMARY KEY,
    order_id TEXT NOT NULL REFERENCES orders(order_id),
    product_id TEXT NOT NULL REFERENCES products(product_id),
    price_cents INTEGER NOT NULL,
    status TEXT NOT NULL
        CHECK (status IN ('ordered', 'cancelled', 'returned', 'exchange_requested')),
    refund_id TEXT REFERENCES refunds(refund_id),
    exchange_product_id TEXT REFERENCES products(product_id)
);
"""

# --------------------------------------------------------------------------------------------------
# Seed data (small and hand-written; every task in tasks.jsonl is written against it)

_CUSTOMERS: tuple[tuple[str, str, str, str, str, str, str], ...] = (
    # customer_id, name, email, phone, street, city, zip
    ("C01", "Ada Lovelace", "ada.lovelace@example.com", "212-555-0101", "5 Hudson St", "New York", "10001"),
    ("C02", "Ben Okafor", "ben.okafor@example.com", "312-555-0102", "88 Lake Shore Dr", "Chicago", "60601"),
    (
        "C03",
        "Carla Mendes",
        "carla.mendes@example.com",
        "415-555-0103",
        "19 Valencia St",
        "San Francisco",
        "94103",
    ),
    ("C04", "Deepak Rao", "deepak.rao@example.com", "512-555-0104", "402 Congress Ave", "Austin", "73301"),
    ("C05", "Elena Petrova", "elena.petrova@example.com", "206-555-0105", "77 Pine St", "Seattle", "98101"),
    ("C06", "Farid Haddad", "farid.haddad@example.com", "617-555-0106", "9 Brattle St", "Cambridge", "02139"),
    ("C07", "Grace Kim", "grace.kim@example.com", "404-555-0107", "310 Peachtree St", "Atlanta", "30301"),
    ("C08", "Hugo Martin", "hugo.martin@example.com", "303-555-0108", "1600 Larimer St", "Denver", "80202"),
    ("C09", "Ines Duarte", "ines.duarte@example.com", "305-555-0109", "240 Ocean Dr", "Miami", "33101"),
    ("C10", "Jonas Berg", "jonas.berg@example.com", "503-555-0110", "12 Alder St", "Portland", "97201"),
    # A second Grace Kim: finding her by name needs the zip code too.
    ("C11", "Grace Kim", "gkim.mpls@example.com", "612-555-0111", "45 Nicollet Mall", "Minneapolis", "55401"),
)

_PRODUCTS: tuple[tuple[str, str, str, str, int, int], ...] = (
    # product_id, name, family, variant, price_cents, stock
    ("P01", "Cotton T-Shirt", "cotton-tshirt", "size S", 1800, 12),
    ("P02", "Cotton T-Shirt", "cotton-tshirt", "size M", 1800, 0),
    ("P03", "Cotton T-Shirt", "cotton-tshirt", "size L", 1800, 7),
    ("P04", "Running Shoes", "running-shoes", "size 42", 8900, 4),
    ("P05", "Running Shoes", "running-shoes", "size 43", 8900, 2),
    ("P06", "Running Shoes", "running-shoes", "size 44", 8900, 0),
    ("P07", "Water Bottle", "water-bottle", "blue", 1500, 20),
    ("P08", "Water Bottle", "water-bottle", "green", 1500, 5),
    ("P09", "Desk Lamp", "desk-lamp", "black", 3900, 6),
    ("P10", "Desk Lamp", "desk-lamp", "white", 3900, 3),
    ("P11", "Wireless Mouse", "wireless-mouse", "standard", 2500, 9),
    ("P12", "Backpack", "backpack", "grey", 5400, 4),
    ("P13", "Backpack", "backpack", "navy", 5400, 1),
    ("P14", "Coffee Mug", "coffee-mug", "white", 1200, 30),
    ("P15", "Yoga Mat", "yoga-mat", "purple", 3000, 5),
)

# order_id, customer_id, status, placed_at, delivered_at, tracking_number, payment_method,
# products (one item per entry), ship-to override (street, city, zip) or None for the customer's own.
_ORDERS: tuple[
    tuple[str, str, str, str, str | None, str | None, str, tuple[str, ...], tuple[str, str, str] | None],
    ...,
] = (
    ("1001", "C01", "pending", "2025-06-12", None, None, "credit card", ("P14", "P07"), None),
    (
        "1002",
        "C01",
        "delivered",
        "2025-05-20",
        "2025-05-26",
        "TRK100200",
        "credit card",
        ("P09", "P11"),
        None,
    ),
    ("1003", "C01", "shipped", "2025-06-10", None, "TRK100300", "credit card", ("P12",), None),
    ("1004", "C02", "pending", "2025-06-13", None, None, "credit card", ("P10",), None),
    ("1005", "C02", "pending", "2025-06-14", None, None, "paypal", ("P01", "P14"), None),
    ("1006", "C02", "delivered", "2025-05-28", "2025-06-03", "TRK100600", "paypal", ("P12",), None),
    (
        "1007",
        "C03",
        "delivered",
        "2025-06-01",
        "2025-06-05",
        "TRK100700",
        "credit card",
        ("P14", "P08", "P03"),
        None,
    ),
    ("1008", "C03", "shipped", "2025-06-11", None, "TRK100800", "credit card", ("P04",), None),
    ("1009", "C03", "cancelled", "2025-05-02", None, None, "credit card", ("P15",), None),
    (
        "1010",
        "C04",
        "delivered",
        "2025-05-25",
        "2025-05-30",
        "TRK101000",
        "gift card",
        ("P01", "P03", "P14"),
        None,
    ),
    ("1011", "C04", "delivered", "2025-04-02", "2025-04-08", "TRK101100", "gift card", ("P07",), None),
    ("1012", "C05", "delivered", "2025-06-02", "2025-06-06", "TRK101200", "credit card", ("P04",), None),
    ("1013", "C05", "pending", "2025-06-14", None, None, "credit card", ("P13", "P07"), None),
    ("1014", "C06", "delivered", "2025-05-30", "2025-06-04", "TRK101400", "paypal", ("P01", "P09"), None),
    ("1015", "C06", "shipped", "2025-06-09", None, "TRK101500", "paypal", ("P11",), None),
    ("1016", "C07", "pending", "2025-06-13", None, None, "credit card", ("P15", "P14"), None),
    ("1017", "C07", "delivered", "2025-03-10", "2025-03-15", "TRK101700", "credit card", ("P05",), None),
    ("1018", "C08", "pending", "2025-06-14", None, None, "gift card", ("P04",), None),
    ("1019", "C08", "delivered", "2025-06-01", "2025-06-07", "TRK101900", "gift card", ("P08", "P14"), None),
    (
        "1020",
        "C09",
        "delivered",
        "2025-05-27",
        "2025-06-02",
        "TRK102000",
        "credit card",
        ("P07", "P09"),
        None,
    ),
    ("1021", "C09", "shipped", "2025-06-12", None, "TRK102100", "credit card", ("P10",), None),
    (
        "1022",
        "C10",
        "pending",
        "2025-06-14",
        None,
        None,
        "paypal",
        ("P12", "P11"),
        ("3 Harbor Way", "Seattle", "98104"),
    ),
    ("1023", "C10", "shipped", "2025-06-08", None, "TRK102300", "paypal", ("P15",), None),
    ("1024", "C11", "pending", "2025-06-13", None, None, "credit card", ("P03",), None),
    (
        "1025",
        "C11",
        "delivered",
        "2025-05-20",
        "2025-05-24",
        "TRK102500",
        "credit card",
        ("P11", "P14"),
        None,
    ),
    ("1026", "C05", "delivered", "2025-05-18", "2025-05-22", "TRK102600", "credit card", ("P01",), None),
    ("1027", "C07", "cancelled", "2025-05-05", None, None, "credit card", ("P12",), None),
    ("1028", "C04", "shipped", "2025-06-12", None, "TRK102800", "gift card", ("P13",), None),
    (
        "1029",
        "C09",
        "delivered",
        "2025-05-21",
        "2025-05-25",
        "TRK102900",
        "credit card",
        ("P14", "P14"),
        None,
    ),
    ("1030", "C06", "pending", "2025-06-14", None, None, "credit card", ("P05",), None),
)

# Past events already in the store: (order_id, kind, reason, item numbers). Cancellations cover the
# whole order; returns cover the listed items.
_PAST_REFUNDS: tuple[tuple[str, str, str, tuple[int, ...]], ...] = (
    ("1009", "cancellation", "ordered by mistake", (1,)),
    ("1027", "cancellation", "no longer needed", (1,)),
    ("1029", "return", "damaged", (1,)),
)


def _sql_literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def _insert(table: str, row: Sequence[Any]) -> str:
    values = ", ".join(_sql_literal(v) for v in row)
    return f"INSERT INTO {table} VALUES ({values});"


def seed_sql() -> str:
    """The built-in seed as SQL text: the schema followed by one INSERT per row (deterministic)."""
    prices = {p[0]: p[4] for p in _PRODUCTS}
    addresses = {c[0]: (c[4], c[5], c[6]) for c in _CUSTOMERS}
    past = {r[0]: r for r in _PAST_REFUNDS}
    lines = [SCHEMA_SQL.strip()]
    lines += [_insert("customers", c) for c in _CUSTOMERS]
    lines += [_insert("products", p) for p in _PRODUCTS]
    for order_id, customer_id, status, placed, delivered, tracking, payment, items, ship in _ORDERS:
        street, city, zip_code = ship or addresses[customer_id]
        refund = past.get(order_id)
        cancel_reason = refund[2] if refund and refund[1] == "cancellation" else None
        order_row = (
            order_id,
            customer_id,
            status,
            placed,
            delivered,
            tracking,
            payment,
            street,
            city,
            zip_code,
            cancel_reason,
        )
        lines.append(_insert("orders", order_row))
        refund_id = None
        if refund is not None:
            refund_id = order_id + "-R1"
            amount = sum(prices[items[n - 1]] for n in refund[3])
            lines.append(_insert("refunds", (refund_id, order_id, refund[1], amount, refund[2], payment)))
        for n, product_id in enumerate(items, start=1):
            item_status, item_refund = "ordered", None
            if refund is not None and n in refund[3]:
                item_status = "cancelled" if refund[1] == "cancellation" else "returned"
                item_refund = refund_id
            lines.append(
                _insert(
                    "order_items",
                    (
                        f"{order_id}-{n}",
                        order_id,
                        product_id,
                        prices[product_id],
                        item_status,
                        item_refund,
                        None,
                    ),
                )
            )
    return "\n".join(lines) + "\n"


def create_store(conn: sqlite3.Connection, sql: str | None = None) -> dict[str, int]:
    """Fill an empty database with the seed (or ``sql``); returns the row count of each table."""
    conn.executescript(sql if sql is not None else seed_sql())
    conn.commit()
    return {t: int(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]) for t in TABLE_KEYS}


def dump_store(conn: sqlite3.Connection) -> dict[str, list[dict[str, Any]]]:
    """The whole store: every table (fixed order) as a list of rows ordered by primary key."""
    out: dict[str, list[dict[str, Any]]] = {}
    for table, key in TABLE_KEYS.items():
        cur = conn.execute(f"SELECT * FROM {table} ORDER BY {key}")
        cols = [d[0] for d in cur.description]
        out[table] = [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]
    return out


# --------------------------------------------------------------------------------------------------
# Argument checking


class ToolError(Exception):
    """A refusal or a bad argument: the message is what the assistant reads."""


def _check_args(
    tool: str, args: dict[str, Any], required: Sequence[str], optional: Sequence[str] = ()
) -> None:
    allowed = list(required) + list(optional)
    unknown = sorted(k for k in args if k not in allowed)
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        raise ToolError(
            f"unknown argument {names} for {tool}; expected: {', '.join(allowed) or 'no arguments'}"
        )
    for name in required:
        if name not in args or args[name] is None or args[name] == "":
            raise ToolError(f"missing required argument '{name}' for {tool}")


def _text(args: dict[str, Any], name: str) -> str:
    value = args[name]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ToolError(f"argument '{name}' must be a string")
    text = " ".join(str(value).split())
    if not text:
        raise ToolError(f"argument '{name}' must not be empty")
    return text


def _id(args: dict[str, Any], name: str) -> str:
    # Models write "#1004", "order 1004" or 1004; the store's ids are plain strings like "1004".
    text = _text(args, name).lstrip("#").strip()
    return text.upper() if name in ("product_id", "new_product_id") else text


def _choice(args: dict[str, Any], name: str, choices: Sequence[str]) -> str:
    text = _text(args, name).lower()
    if text not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ToolError(f"argument '{name}' must be one of: {allowed} (got {text!r})")
    return text


def _money(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


# --------------------------------------------------------------------------------------------------
# Lookups shared by the tools


def _row(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> dict[str, Any] | None:
    cur = conn.execute(sql, params)
    found = cur.fetchone()
    if found is None:
        return None
    return dict(zip([d[0] for d in cur.description], found, strict=True))


def _rows(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
    cur = conn.execute(sql, params)
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def _order(conn: sqlite3.Connection, order_id: str) -> dict[str, Any]:
    order = _row(conn, "SELECT * FROM orders WHERE order_id = ?", (order_id,))
    if order is None:
        raise ToolError(f"order_id '{order_id}' not found")
    return order


def _items(conn: sqlite3.Connection, order_id: str) -> list[dict[str, Any]]:
    return _rows(
        conn,
        "SELECT i.*, p.name, p.variant FROM order_items i JOIN products p ON p.product_id = i.product_id"
        " WHERE i.order_id = ? ORDER BY i.item_id",
        (order_id,),
    )


def _within_return_window(order: dict[str, Any]) -> bool:
    delivered = date.fromisoformat(order["delivered_at"])
    return date.fromisoformat(TODAY) <= delivered + timedelta(days=RETURN_WINDOW_DAYS)


def _require_returnable(order: dict[str, Any], action: str) -> None:
    # action: "returned" or "exchanged"
    if order["status"] != "delivered":
        raise ToolError(
            f"order {order['order_id']} is {order['status']}: only delivered orders can be {action}"
        )
    if not _within_return_window(order):
        raise ToolError(
            f"order {order['order_id']} was delivered on {order['delivered_at']}, more than "
            f"{RETURN_WINDOW_DAYS} days before today ({TODAY}): it can no longer be {action}"
        )


def _next_refund_id(conn: sqlite3.Connection, order_id: str) -> str:
    # Numbered per order, so the ids do not depend on the order in which different orders are served.
    count = conn.execute("SELECT COUNT(*) FROM refunds WHERE order_id = ?", (order_id,)).fetchone()[0]
    return f"{order_id}-R{int(count) + 1}"


def _customer_view(conn: sqlite3.Connection, customer: dict[str, Any]) -> dict[str, Any]:
    orders = _rows(
        conn,
        "SELECT order_id, status, placed_at FROM orders WHERE customer_id = ? ORDER BY order_id",
        (customer["customer_id"],),
    )
    return {
        "customer_id": customer["customer_id"],
        "name": customer["name"],
        "email": customer["email"],
        "phone": customer["phone"],
        "address": {"street": customer["street"], "city": customer["city"], "zip": customer["zip"]},
        "orders": orders,
    }


def _order_view(conn: sqlite3.Connection, order: dict[str, Any]) -> dict[str, Any]:
    items = _items(conn, order["order_id"])
    view: dict[str, Any] = {
        "order_id": order["order_id"],
        "customer_id": order["customer_id"],
        "status": order["status"],
        "placed_at": order["placed_at"],
        "delivered_at": order["delivered_at"],
        "tracking_number": order["tracking_number"],
        "payment_method": order["payment_method"],
        "shipping_address": {
            "street": order["ship_street"],
            "city": order["ship_city"],
            "zip": order["ship_zip"],
        },
        "items": [
            {
                "item_id": i["item_id"],
                "product_id": i["product_id"],
                "name": f"{i['name']} ({i['variant']})",
                "price": _money(i["price_cents"]),
                "status": i["status"],
                **({"exchange_for": i["exchange_product_id"]} if i["exchange_product_id"] else {}),
            }
            for i in items
        ],
        "total": _money(sum(i["price_cents"] for i in items)),
    }
    if order["cancel_reason"]:
        view["cancel_reason"] = order["cancel_reason"]
    refunds = _rows(
        conn,
        "SELECT refund_id, kind, amount_cents, reason FROM refunds WHERE order_id = ? ORDER BY refund_id",
        (order["order_id"],),
    )
    if refunds:
        view["refunds"] = [
            {
                "refund_id": r["refund_id"],
                "kind": r["kind"],
                "amount": _money(r["amount_cents"]),
                "reason": r["reason"],
            }
            for r in refunds
        ]
    return view


# --------------------------------------------------------------------------------------------------
# The tools. Each takes the connection and the parsed arguments and returns the result, or raises
# ToolError. Write tools run inside one transaction (see run_tool): a refusal changes nothing.


def find_customer(conn: sqlite3.Connection, args: dict[str, Any]) -> dict[str, Any]:
    _check_args("find_customer", args, (), ("email", "name", "zip"))
    if args.get("email"):
        email = _text(args, "email").lower()
        found = _row(conn, "SELECT * FROM customers WHERE lower(email) = ?", (email,))
        if found is None:
            raise ToolError(f"no customer with email '{email}'")
        return _customer_view(conn, found)
    if not args.get("name") or not args.get("zip"):
        raise ToolError("find_customer needs 'email', or both 'name' and 'zip'")
    name, zip_code = _text(args, "name"), _text(args, "zip")
    found = _row(conn, "SELECT * FROM customers WHERE lower(name) = ? AND zip = ?", (name.lower(), zip_code))
    if found is None:
        raise ToolError(f"no customer named '{name}' with zip '{zip_code}'")
    return _customer_view(conn, found)


def get_order(conn: sqlite3.Connection, args: dict[str, Any]) -> dict[str, Any]:
    _check_args("get_order", args, ("order_id",))
    return _order_view(conn, _order(conn, _id(args, "order_id")))


def list_products(conn: sqlite3.Connection, args: dict[str, Any]) -> list[dict[str, Any]]:
    _check_args("list_products", args, (), ("query",))
    query = _text(args, "query").lower() if args.get("query") else ""
    rows = _rows(conn, "SELECT * FROM products ORDER BY product_id", ())
    return [
        {
            "product_id": p["product_id"],
            "name": p["name"],
            "variant": p["variant"],
            "price": _money(p["price_cents"]),
            "in_stock": p["stock"],
        }
        for p in rows
        if query in f"{p['name']} {p['variant']} {p['family']}".lower()
    ]


def cancel_order(conn: sqlite3.Connection, args: dict[str, Any]) -> dict[str, Any]:
    _check_args("cancel_order", args, ("order_id", "reason"))
    order = _order(conn, _id(args, "order_id"))
    reason = _choice(args, "reason", CANCEL_REASONS)
    if order["status"] != "pending":
        raise ToolError(
            f"order {order['order_id']} is {order['status']}: only pending orders can be cancelled"
        )
    items = _items(conn, order["order_id"])
    amount = sum(i["price_cents"] for i in items)
    refund_id = _next_refund_id(conn, order["order_id"])
    conn.execute(
        "INSERT INTO refunds VALUES (?, ?, 'cancellation', ?, ?, ?)",
        (refund_id, order["order_id"], amount, reason, order["payment_method"]),
    )
    conn.execute(
        "UPDATE orders SET status = 'cancelled', cancel_reason = ? WHERE order_id = ?",
        (reason, order["order_id"]),
    )
    conn.execute(
        "UPDATE order_items SET status = 'cancelled', refund_id = ? WHERE order_id = ?",
        (refund_id, order["order_id"]),
    )
    return {
        "order_id": order["order_id"],
        "status": "cancelled",
        "refund_id": refund_id,
        "refund_amount": _money(amount),
        "refunded_to": order["payment_method"],
    }


def _item_ids(args: dict[str, Any]) -> list[str]:
    value = args["item_ids"]
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ToolError("argument 'item_ids' must be a non-empty list of item ids")
    ids: list[str] = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (str, int)) or not str(v).strip():
            raise ToolError("argument 'item_ids' must contain item ids (strings such as '1007-1')")
        item_id = str(v).strip().lstrip("#")
        if item_id in ids:
            raise ToolError(f"item_id '{item_id}' is listed twice in 'item_ids'")
        ids.append(item_id)
    return ids


def _open_item(items: dict[str, dict[str, Any]], order_id: str, item_id: str, action: str) -> dict[str, Any]:
    item = items.get(item_id)
    if item is None:
        raise ToolError(
            f"item_id '{item_id}' is not in order {order_id} (its items: {', '.join(sorted(items))})"
        )
    if item["status"] != "ordered":
        raise ToolError(
            f"item {item_id} is already {item['status'].replace('_', ' ')}: it cannot be {action}"
        )
    return item


def return_items(conn: sqlite3.Connection, args: dict[str, Any]) -> dict[str, Any]:
    _check_args("return_items", args, ("order_id", "item_ids", "reason"))
    order = _order(conn, _id(args, "order_id"))
    item_ids = _item_ids(args)
    reason = _choice(args, "reason", RETURN_REASONS)
    _require_returnable(order, "returned")
    items = {i["item_id"]: i for i in _items(conn, order["order_id"])}
    chosen = [_open_item(items, order["order_id"], item_id, "returned") for item_id in item_ids]
    amount = sum(i["price_cents"] for i in chosen)
    refund_id = _next_refund_id(conn, order["order_id"])
    conn.execute(
        "INSERT INTO refunds VALUES (?, ?, 'return', ?, ?, ?)",
        (refund_id, order["order_id"], amount, reason, order["payment_method"]),
    )
    conn.executemany(
        "UPDATE order_items SET status = 'returned', refund_id = ? WHERE item_id = ?",
        [(refund_id, i["item_id"]) for i in chosen],
    )
    return {
        "order_id": order["order_id"],
        "returned_items": [i["item_id"] for i in chosen],
        "refund_id": refund_id,
        "refund_amount": _money(amount),
        "refunded_to": order["payment_method"],
    }


def exchange_item(conn: sqlite3.Connection, args: dict[str, Any]) -> dict[str, Any]:
    _check_args("exchange_item", args, ("order_id", "item_id", "new_product_id"))
    order = _order(conn, _id(args, "order_id"))
    item_id = _id(args, "item_id")
    new_id = _id(args, "new_product_id")
    _require_returnable(order, "exchanged")
    items = {i["item_id"]: i for i in _items(conn, order["order_id"])}
    item = _open_item(items, order["order_id"], item_id, "exchanged")
    old = _row(conn, "SELECT * FROM products WHERE product_id = ?", (item["product_id"],))
    new = _row(conn, "SELECT * FROM products WHERE product_id = ?", (new_id,))
    if old is None:  # the schema's foreign key makes this unreachable; kept for a clear message
        raise ToolError(f"item {item_id} refers to an unknown product")
    if new is None:
        raise ToolError(f"new_product_id '{new_id}' not found")
    if new["product_id"] == old["product_id"]:
        raise ToolError(f"new_product_id '{new_id}' is the product already ordered")
    if new["family"] != old["family"]:
        raise ToolError(
            f"new_product_id '{new_id}' ({new['name']}) is a different product: an item can only be "
            f"exchanged for another variant of {old['name']}"
        )
    if new["stock"] < 1:
        raise ToolError(f"new_product_id '{new_id}' ({new['name']}, {new['variant']}) is out of stock")
    conn.execute("UPDATE products SET stock = stock - 1 WHERE product_id = ?", (new_id,))
    conn.execute(
        "UPDATE order_items SET status = 'exchange_requested', exchange_product_id = ? WHERE item_id = ?",
        (new_id, item_id),
    )
    return {
        "order_id": order["order_id"],
        "item_id": item_id,
        "status": "exchange_requested",
        "new_product": f"{new['name']} ({new['variant']})",
        "price_difference": "0.00",
    }


_ZIP = re.compile(r"^[0-9]{5}$")


def change_address(conn: sqlite3.Connection, args: dict[str, Any]) -> dict[str, Any]:
    _check_args("change_address", args, ("order_id", "street", "city", "zip"))
    order = _order(conn, _id(args, "order_id"))
    street, city, zip_code = _text(args, "street"), _text(args, "city"), _text(args, "zip")
    if not _ZIP.match(zip_code):
        raise ToolError(f"argument 'zip' must be five digits (got {zip_code!r})")
    if order["status"] != "pending":
        raise ToolError(
            f"order {order['order_id']} is {order['status']}: only a pending order's address can be changed"
        )
    conn.execute(
        "UPDATE orders SET ship_street = ?, ship_city = ?, ship_zip = ? WHERE order_id = ?",
        (street, city, zip_code, order["order_id"]),
    )
    return {
        "order_id": order["order_id"],
        "shipping_address": {"street": street, "city": city, "zip": zip_code},
    }


ToolFn = Callable[[sqlite3.Connection, dict[str, Any]], Any]

_TOOLS: dict[str, ToolFn] = {
    "find_customer": find_customer,
    "get_order": get_order,
    "list_products": list_products,
    "cancel_order": cancel_order,
    "return_items": return_items,
    "exchange_item": exchange_item,
    "change_address": change_address,
}

#: The tools that change the store (the ones a task's expected actions list).
WRITE_TOOLS = frozenset({"cancel_order", "return_items", "exchange_item", "change_address"})

#: Each assistant tool's (required, optional) argument names.
TOOL_ARGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "find_customer": ((), ("email", "name", "zip")),
    "get_order": (("order_id",), ()),
    "list_products": ((), ("query",)),
    "cancel_order": (("order_id", "reason"), ()),
    "return_items": (("order_id", "item_ids", "reason"), ()),
    "exchange_item": (("order_id", "item_id", "new_product_id"), ()),
    "change_address": (("order_id", "street", "city", "zip"), ()),
}


def _unknown_tool(tool: str) -> dict[str, Any]:
    return {"ok": False, "error": f"unknown tool {tool!r}; tools: {', '.join(_TOOLS)}"}


def run_tool(conn: sqlite3.Connection, tool: str, args: Any) -> dict[str, Any]:
    """Run one assistant tool; returns the reply object (``ok`` + ``result`` or ``error``).

    Refusals and bad arguments come back as ``{"ok": false, ...}``; a write tool's changes are
    committed only when it succeeds. SQLite errors propagate (the store itself is broken).
    """
    fn = _TOOLS.get(tool)
    if fn is None:
        return _unknown_tool(tool)
    if not isinstance(args, dict):
        return {"ok": False, "error": f"arguments for {tool} must be a JSON object"}
    if "_unparsed" in args:  # the host's call parser found a call whose arguments were not JSON
        return {
            "ok": False,
            "error": f"arguments for {tool} must be a JSON object, got {args['_unparsed']!r}",
        }
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn, args)
    except ToolError as exc:
        conn.execute("ROLLBACK")
        return {"ok": False, "error": str(exc)}
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return {"ok": True, "result": result}


# --------------------------------------------------------------------------------------------------
# Command line


def _connect(path: str) -> sqlite3.Connection:
    # isolation_level=None: run_tool manages transactions itself, so a refusal rolls back everything.
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True) + "\n")
    sys.stdout.flush()


def _usage(message: str) -> int:
    tools = ", ".join(_TOOLS)
    sys.stderr.write(
        f"{message}\nusage: python3 tools.py [--db PATH] TOOL ['{{json args}}']\ntools: init, dump, {tools}\n"
    )
    return 2


def _init(db: str, args: dict[str, Any]) -> dict[str, Any]:
    if set(args) - {"seed"}:
        return {"ok": False, "error": 'init takes only the optional argument \'seed\' ("builtin" or "stdin")'}
    seed = args.get("seed", "builtin")
    if seed not in ("builtin", "stdin"):
        return {"ok": False, "error": 'argument \'seed\' must be "builtin" or "stdin"'}
    sql = sys.stdin.read() if seed == "stdin" else None
    if sql is not None and not sql.strip():
        return {"ok": False, "error": "seed 'stdin' given but stdin was empty"}
    for suffix in ("", "-journal", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.remove(db + suffix)
    conn = _connect(db)
    try:
        counts = create_store(conn, sql)
    except sqlite3.Error as exc:
        conn.close()
        os.remove(db)
        return {"ok": False, "error": f"seed SQL failed: {exc}"}
    conn.close()
    return {"ok": True, "result": {"db": db, "rows": counts}}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; prints one JSON reply; returns the exit status (see the module docstring)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    db = DEFAULT_DB
    if args_list[:1] == ["--db"]:
        if len(args_list) < 2:
            return _usage("--db needs a path")
        db, args_list = args_list[1], args_list[2:]
    if not args_list or args_list[0].startswith("-"):
        return _usage("no tool named" if not args_list else f"unknown option {args_list[0]!r}")
    if len(args_list) > 2:
        return _usage("too many arguments: pass the tool's arguments as one JSON object")
    tool = args_list[0]
    raw = args_list[1] if len(args_list) == 2 else "{}"
    try:
        args = json.loads(raw) if raw.strip() else {}
    except ValueError as exc:
        _reply({"ok": False, "error": f"arguments are not valid JSON: {exc}"})
        return 0
    if not isinstance(args, dict):
        _reply({"ok": False, "error": 'arguments must be a JSON object, e.g. {"order_id": "1001"}'})
        return 0
    try:
        if tool == "init":
            _reply(_init(db, args))
            return 0
        if tool != "dump" and tool not in _TOOLS:
            _reply(_unknown_tool(tool))
            return 0
        if not os.path.exists(db):
            _reply({"ok": False, "error": f"the store {db} does not exist: run 'init' first"})
            return 0
        conn = _connect(db)
        try:
            if tool == "dump":
                _reply({"ok": True, "result": dump_store(conn)})
            else:
                _reply(run_tool(conn, tool, args))
        finally:
            conn.close()
    except (sqlite3.Error, OSError) as exc:
        _reply({"ok": False, "error": f"store failure: {type(exc).__name__}: {exc}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
