"""The one write-transaction helper every SQLite user in sottovoce shares."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def write_transaction(conn: sqlite3.Connection, *, name: str = "sottovoce") -> Iterator[None]:
    """A write transaction that takes the lock up front (``BEGIN IMMEDIATE``: no deadlock
    upgrading a read lock), committed on success and rolled back on any exception.

    Inside a transaction the caller already holds it nests as a savepoint: the caller decides
    when everything commits (e.g. a ledger entry in the same transaction as a release).
    """
    if conn.in_transaction:
        conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            conn.execute(f"ROLLBACK TO {name}")
            conn.execute(f"RELEASE {name}")
            raise
        conn.execute(f"RELEASE {name}")
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.rollback()
        raise
    conn.execute("COMMIT")
