"""Many rows per INSERT statement: a batch's rows bound from one flat list into statements
whose ``VALUES`` lists many rows, instead of one statement run per row.

Why: ``executemany`` steps and resets its statement once per row, about 0.7 µs a row in
CPython's sqlite3 and SQLite before the row's own work; a ``VALUES`` list of 64 rows pays
that once. In ``bench/ingest.py`` the events' rows went in about a third faster (2.8 µs an
event to 1.9). The rows, their order and every constraint SQLite checks are the same; where a
row is refused, the statement ends there, and the caller undoes the whole batch (a savepoint,
a transaction) as it did when a row of ``executemany`` was refused.

Statements that may be undone midway (SQLite's ABORT, the default; an upsert's ``DO UPDATE``
always) make SQLite keep a statement journal: the pages a statement is about to change,
copied first. The events' INSERT says ``OR FAIL`` and needs none. The counters' upserts need
one; the store keeps SQLite's temporary files in memory (``PRAGMA temp_store=MEMORY``,
``_store_file.py``), where that copy is cheap enough for them to go many rows a statement too
(in a temporary file on disk it cost more than the rows saved).

Statements hold at most :data:`ROWS_PER_STATEMENT` rows and 999 bound values (the oldest
limit SQLite has had); a batch is cut into full statements and then powers of two, so only a
few distinct statements are ever prepared (CPython's sqlite3 caches each).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache
from sqlite3 import Connection
from typing import Any

__all__ = ["ROWS_PER_STATEMENT", "ManyRows"]

ROWS_PER_STATEMENT = 64
_MAX_VALUES = 999  # SQLITE_MAX_VARIABLE_NUMBER before SQLite 3.32


class ManyRows:
    """An INSERT of rows ``row`` (``"(?, ?, ...)"``, any SQL in place of a ``?`` too), as
    ``head`` + the rows + ``tail`` (``"INSERT INTO t (a, b) VALUES "``, an ``ON CONFLICT``
    clause)."""

    def __init__(self, head: str, row: str, tail: str = "") -> None:
        self.head, self.row, self.tail = head, row, tail
        self.width = row.count("?")
        if not 0 < self.width <= _MAX_VALUES:
            raise ValueError(f"a row of {self.width} bound values")
        self.most = min(ROWS_PER_STATEMENT, _MAX_VALUES // self.width)

    def sql(self, rows: int) -> str:
        """The statement of ``rows`` rows."""
        return _statement(self.head, self.row, self.tail, rows)

    def statements(self, values: Sequence[Any]) -> Iterator[tuple[str, Sequence[Any]]]:
        """The statements, and their parameters, that insert the rows whose values are
        ``values`` (row after row, ``width`` values each), in order."""
        width = self.width
        rows, extra = divmod(len(values), width)
        if extra:
            raise ValueError(f"{len(values)} values are not rows of {width}")
        start = 0
        for size in _sizes(rows, self.most):
            end = start + size * width
            yield self.sql(size), values[start:end]
            start = end

    def run(self, conn: Connection, columns: Sequence[Sequence[Any]]) -> None:
        """Insert on ``conn``, in order, the rows whose values are ``columns`` (``width`` of
        them, all of one length)."""
        for sql, values in self.statements(self.flat(columns)):
            conn.execute(sql, values)

    def flat(self, columns: Sequence[Sequence[Any]]) -> list[Any]:
        """The values of the rows of ``columns``, row after row (each column laid in by one
        slice assignment, in C: no tuple per row)."""
        if len(columns) != self.width:
            raise ValueError(f"{len(columns)} columns, not {self.width}")
        width, rows = self.width, len(columns[0])
        values: list[Any] = [None] * (width * rows)
        for k, column in enumerate(columns):
            values[k::width] = column  # a column of another length raises ValueError
        return values


def _sizes(rows: int, most: int) -> Iterator[int]:
    """``rows`` cut into statements: as many of ``most`` rows as fit, then the rest by powers
    of two, largest first."""
    full, rest = divmod(rows, most)
    yield from [most] * full
    size = 1 << max(rest.bit_length() - 1, 0)
    while rest:
        if rest >= size:
            yield size
            rest -= size
        size >>= 1


@lru_cache(maxsize=64)
def _statement(head: str, row: str, tail: str, rows: int) -> str:
    return head + ",".join([row] * rows) + tail
