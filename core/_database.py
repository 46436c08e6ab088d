"""The database connection the region's storage talks to: what it needs of one.

Everything that stores a region's state (rounds, the privacy ledger, the decision log) talks to
a :class:`Connection`: the part of Python's ``sqlite3.Connection`` they use (``execute`` with
``?`` placeholders, ``executemany``, ``in_transaction``, ``rollback``, ``close``). A SQLite
connection is one as it is; the aggregator's PostgreSQL backend
(:class:`sottovoce.aggregator._postgres.PostgresConnection`) is another, with
``backend = "postgres"``. The SQL is written once, in the dialect both accept (``INSERT ...
ON CONFLICT``, never ``INSERT OR REPLACE``); the few questions whose SQL differs (does a table
exist, which columns has it, a JSON field of a text column) are answered here for both.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

__all__ = ["Connection", "backend_of", "columns_of", "json_text", "table_exists"]


class Connection(Protocol):
    """What the region's storage needs of a database connection (``sqlite3.Connection`` has
    it; the PostgreSQL backend too)."""

    @property
    def in_transaction(self) -> bool: ...
    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Any: ...
    def executemany(self, sql: str, seq_of_parameters: Any, /) -> Any: ...
    def rollback(self) -> None: ...
    def close(self) -> None: ...


def backend_of(conn: Connection) -> str:
    """``"sqlite"`` or ``"postgres"``."""
    return str(getattr(conn, "backend", "sqlite"))


def table_exists(conn: Connection, name: str) -> bool:
    if backend_of(conn) == "postgres":
        return conn.execute("SELECT to_regclass(?) IS NOT NULL", (name,)).fetchone()[0] is True
    found = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    ).fetchone()
    return found is not None


def columns_of(conn: Connection, table: str) -> set[str]:
    if backend_of(conn) == "postgres":
        rows = conn.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = ?",
            (table,),
        ).fetchall()
        return {str(row[0]) for row in rows}
    if not re.fullmatch(r"[a-z_]+", table):
        raise ValueError(f"not a table name: {table!r}")
    return {str(row[1]) for row in conn.execute(f"PRAGMA table_info({table})")}


def json_text(conn: Connection, column: str, key: str) -> str:
    """SQL for the text of top-level field ``key`` of the JSON in ``column`` (NULL when the
    column is empty, e.g. a pruned log entry). ``column`` and ``key`` are identifiers of the
    caller's own, never input."""
    if not (re.fullmatch(r"[a-z_]+", column) and re.fullmatch(r"[a-z_]+", key)):
        raise ValueError(f"not an identifier: {column!r}, {key!r}")
    if backend_of(conn) == "postgres":
        return f"(CASE WHEN {column} = '' THEN NULL ELSE {column}::jsonb ->> '{key}' END)"
    return f"json_extract({column}, '$.{key}')"
