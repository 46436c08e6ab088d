"""The one write-transaction helper every SQLite user in sottovoce shares."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sottovoce._database import Connection


@contextmanager
def write_transaction(conn: Connection, *, name: str = "sottovoce") -> Iterator[None]:
    """A write transaction that takes the lock up front (``BEGIN IMMEDIATE``: no deadlock
    upgrading a read lock), committed on success and rolled back on any exception.

    On PostgreSQL (:class:`sottovoce._database.PostgresConnection`) ``BEGIN IMMEDIATE`` takes
    the region's advisory lock: one writer at a time across every process, as on SQLite.

    Inside a transaction the caller already holds it nests as a savepoint: the caller decides
    when everything commits (e.g. a ledger entry in the same transaction as a release).
    """
    if conn.in_transaction:
        conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            # A full disk or an I/O error can make SQLite roll the whole transaction back on
            # its own: then there is no savepoint left to return to, and the error goes up.
            if conn.in_transaction:
                conn.execute(f"ROLLBACK TO {name}")
                conn.execute(f"RELEASE {name}")
            raise
        conn.execute(f"RELEASE {name}")
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        # Also when the COMMIT itself failed (SQLite keeps the transaction open after a busy
        # or failed commit): nothing of it may stay pending on the connection.
        if _still_open(conn):
            conn.rollback()
        raise


def _still_open(conn: Connection) -> bool:
    """Whether a transaction is open now (read again: the statements since may have ended it)."""
    return bool(conn.in_transaction)
