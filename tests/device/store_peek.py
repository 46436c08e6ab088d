"""Looking into a store's file as an auditor would: through a connection of one's own, since
the store hands out none."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from typing import Any

from sottovoce.device import EventStore


def peek(store: EventStore, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> list[Any]:
    """The rows of a query on the store's file, read on a connection opened for it."""
    with closing(sqlite3.connect(store.path)) as conn:
        return conn.execute(sql, args).fetchall()


def own_connection(store: EventStore) -> sqlite3.Connection:
    """The store's own connection, for the few tests that must act on that connection itself
    (a per-connection page limit, a statement trace). White-box: a private attribute."""
    return store._file.conn
