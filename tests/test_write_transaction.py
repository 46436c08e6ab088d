"""``write_transaction``: a commit that fails leaves nothing pending on the connection."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from sottovoce._sqlite import write_transaction


def test_a_failed_commit_is_rolled_back_not_left_open(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    writer = sqlite3.connect(path, isolation_level=None, timeout=0)  # rollback journal
    writer.execute("CREATE TABLE t (x INTEGER)")
    reader = sqlite3.connect(path, isolation_level=None, timeout=0)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM t").fetchone()  # holds a shared lock
    with pytest.raises(sqlite3.OperationalError), write_transaction(writer):
        writer.execute("INSERT INTO t VALUES (1)")  # the COMMIT cannot get its lock
    # SQLite keeps a transaction open after a busy COMMIT: it must not stay open, or every
    # later write would nest as a savepoint and never commit.
    assert not writer.in_transaction
    reader.execute("COMMIT")
    with write_transaction(writer):
        writer.execute("INSERT INTO t VALUES (2)")
    fresh = sqlite3.connect(path)
    assert fresh.execute("SELECT x FROM t").fetchall() == [(2,)]
    for conn in (fresh, reader, writer):
        conn.close()
