"""Nested write transactions (savepoints) keep their meaning on both backends, including on
PostgreSQL, where ``SAVEPOINT`` and ``RELEASE`` wait to be sent with the transaction's next
statement (one round trip instead of one each): a failed inner part is undone alone, a
savepoint with nothing after it changes nothing, and a commit keeps what it must."""

from __future__ import annotations

from pathlib import Path

import pytest

from sottovoce._database import Connection
from sottovoce._sqlite import write_transaction
from sottovoce.aggregator._postgres import PostgresConnection, open_database


@pytest.fixture(params=["sqlite", "postgres"], ids=["sqlite", "postgres"])
def conn(request: pytest.FixtureRequest, tmp_path: Path) -> Connection:
    if request.param == "sqlite":
        target = str(tmp_path / "savepoints.db")
    else:
        target = request.getfixturevalue("pg_url")
    connection = open_database(target)
    connection.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")
    request.addfinalizer(connection.close)
    return connection


def rows(conn: Connection) -> list[tuple[int, str]]:
    return [(int(k), str(v)) for k, v in conn.execute("SELECT k, v FROM t ORDER BY k").fetchall()]


def test_a_failed_inner_part_is_undone_alone(conn: Connection) -> None:
    with write_transaction(conn, name="outer"):
        conn.execute("INSERT INTO t (k, v) VALUES (1, 'kept')")
        for k, v in ((2, "kept"), (1, "duplicate key"), (3, "kept")):
            try:
                with write_transaction(conn, name="part"), write_transaction(conn, name="nested"):
                    conn.execute("INSERT INTO t (k, v) VALUES (?, ?)", (k, v))
            except Exception:  # the duplicate: its savepoint is rolled back, the rest stays
                assert conn.in_transaction
    assert rows(conn) == [(1, "kept"), (2, "kept"), (3, "kept")]


def test_an_error_before_any_statement_rolls_back_to_the_savepoint(conn: Connection) -> None:
    with write_transaction(conn, name="outer"):
        conn.execute("INSERT INTO t (k, v) VALUES (1, 'kept')")
        with pytest.raises(ZeroDivisionError), write_transaction(conn, name="empty"):
            _ = 1 / 0  # nothing sent yet on PostgreSQL: the savepoint goes with its rollback
        with write_transaction(conn, name="after"):
            conn.execute("INSERT INTO t (k, v) VALUES (2, 'kept')")
    assert rows(conn) == [(1, "kept"), (2, "kept")]


def test_savepoints_with_nothing_after_them_change_nothing(conn: Connection) -> None:
    with write_transaction(conn, name="outer"):
        conn.execute("INSERT INTO t (k, v) VALUES (1, 'kept')")
        for _ in range(3):
            with write_transaction(conn, name="idle"):
                pass
    with pytest.raises(RuntimeError), write_transaction(conn, name="outer"):
        conn.execute("INSERT INTO t (k, v) VALUES (2, 'rolled back')")
        with write_transaction(conn, name="nested"):
            raise RuntimeError("the whole transaction goes")
    assert rows(conn) == [(1, "kept")]
    assert not conn.in_transaction


def test_postgres_sends_savepoints_with_the_next_statement(pg_url: str) -> None:
    conn = open_database(pg_url)
    assert isinstance(conn, PostgresConnection)
    try:
        conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        with write_transaction(conn, name="outer"):
            with write_transaction(conn, name="a"), write_transaction(conn, name="b"):
                assert conn._deferred == ["SAVEPOINT a", "SAVEPOINT b"]  # nothing sent yet
                conn.execute("INSERT INTO t (k, v) VALUES (1, 'x')")
                assert conn._deferred == []  # they went with the insert
            assert conn._deferred == ["RELEASE b", "RELEASE a"]
        assert conn._deferred == [] and rows(conn) == [(1, "x")]
    finally:
        conn.close()
