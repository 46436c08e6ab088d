"""Many rows per INSERT statement (``device/_many_rows.py``) store what ``executemany`` stored.

Generated rows (integers, texts, NULLs) go in through :class:`ManyRows` as they went in one row
at a time, in order; the events' own INSERT (``INSERT_EVENTS``) is held to a single-row INSERT
on the store's schema, including how it refuses a replayed id: the same error, and the
batch's savepoint undoes the rows either way. Statements stay within 999 bound values.
"""

from __future__ import annotations

import sqlite3
from functools import cache
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlite_utils import Database

from sottovoce.device._many_rows import ROWS_PER_STATEMENT, ManyRows
from sottovoce.device._rows import INSERT_EVENTS, UPSERT_ARTIST, UPSERT_TRACK, CounterUpsert
from sottovoce.device._schema import MIGRATIONS

texts = st.text(st.characters(codec="utf-8"), max_size=20)
values = st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), texts)


@cache
def schema(*tables: str) -> list[str]:
    """The store's own DDL of ``tables`` and their indexes."""
    db = Database(memory=True)
    MIGRATIONS.apply(db)
    marks = ", ".join("?" * len(tables))
    return [row[0] for row in db.execute(
        f"SELECT sql FROM sqlite_master WHERE tbl_name IN ({marks}) AND sql IS NOT NULL",
        tables)]  # fmt: skip


def store_db(*tables: str) -> sqlite3.Connection:
    """An in-memory database with the store's ``tables``."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    for sql in schema(*tables):
        conn.execute(sql)
    return conn


def events_db() -> sqlite3.Connection:
    return store_db("events")


def columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    return [[row[k] for row in rows] for k in range(width)]


@given(rows=st.integers(0, 700), width=st.integers(1, 40))
def test_statements_cover_the_rows_in_order(rows: int, width: int) -> None:
    insert = ManyRows("INSERT INTO t VALUES ", "(" + ", ".join(["?"] * width) + ")")
    flat = list(range(rows * width))
    statements = list(insert.statements(flat))
    assert [v for _, params in statements for v in params] == flat
    for sql, params in statements:
        assert sql.count("?") == len(params) <= 999
        assert len(params) // width <= ROWS_PER_STATEMENT
    # Full statements, then powers of two: few distinct statements to prepare.
    sizes = [len(params) // width for _, params in statements]
    assert len(set(sizes)) <= insert.most.bit_length() + 1


def test_refuses_what_is_not_rows() -> None:
    insert = ManyRows("INSERT INTO t VALUES ", "(?, ?)")
    with pytest.raises(ValueError, match="not rows"):
        list(insert.statements([1, 2, 3]))
    with pytest.raises(ValueError, match="columns"):
        insert.flat([[1, 2]])
    with pytest.raises(ValueError):
        insert.flat([[1, 2], [3]])  # columns of different lengths


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(st.tuples(values, values, values), max_size=300))
def test_same_rows_as_executemany(rows: list[tuple[Any, ...]]) -> None:
    one, many = (sqlite3.connect(":memory:", isolation_level=None) for _ in range(2))
    for conn in (one, many):
        conn.execute("CREATE TABLE t (a, b, c)")
    one.executemany("INSERT INTO t VALUES (?, ?, ?)", rows)
    ManyRows("INSERT INTO t VALUES ", "(?, ?, ?)").run(many, columns(rows, 3))
    query = "SELECT rowid, a, typeof(a), b, typeof(b), c, typeof(c) FROM t ORDER BY rowid"
    assert many.execute(query).fetchall() == one.execute(query).fetchall()


event_rows = st.lists(
    st.tuples(st.text(min_size=1, max_size=8), st.integers(1, 3),
              st.sampled_from(["play_end", "skip", "context"]), st.integers(0, 2**45),
              st.none() | st.text(max_size=6), st.none() | st.text(max_size=6), texts),
    max_size=250, unique_by=lambda row: row[0],
)  # fmt: skip


@settings(max_examples=100, deadline=None)
@given(rows=event_rows, first=st.integers(1, 10**9))
def test_events_insert_as_single_rows(rows: list[tuple[Any, ...]], first: int) -> None:
    numbered = [(first + k, *row) for k, row in enumerate(rows)]
    one, many = events_db(), events_db()
    one.executemany(
        "INSERT INTO events (seq, event_id, user_ref, type, ts, track_id, artist_id, body) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", numbered
    )  # fmt: skip
    INSERT_EVENTS.run(many, columns(numbered, 8))
    query = "SELECT * FROM events ORDER BY seq"
    assert many.execute(query).fetchall() == one.execute(query).fetchall()


@settings(max_examples=60, deadline=None)
@given(rows=event_rows.filter(len), data=st.data())
def test_a_replayed_id_is_refused_and_undone(rows: list[tuple[Any, ...]], data: Any) -> None:
    replayed = data.draw(st.sampled_from(rows))
    place = data.draw(st.integers(0, len(rows)))
    batch = [*rows[:place], replayed, *rows[place:]]
    numbered = [(1000 + k, *row) for k, row in enumerate(batch)]
    errors = []
    for insert in ("executemany", "many rows"):
        conn = events_db()
        conn.execute("INSERT INTO events VALUES (1, 'kept', 1, 'skip', 0, NULL, NULL, '{}')")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("SAVEPOINT new_events")
        with pytest.raises(sqlite3.IntegrityError) as refused:
            if insert == "executemany":
                conn.executemany(INSERT_EVENTS.sql(1), numbered)
            else:
                INSERT_EVENTS.run(conn, columns(numbered, 8))
        errors.append(str(refused.value))
        conn.execute("ROLLBACK TO new_events")
        conn.execute("RELEASE new_events")
        conn.execute("COMMIT")
        assert conn.execute("SELECT event_id FROM events").fetchall() == [("kept",)]
    assert errors[0] == errors[1] == "UNIQUE constraint failed: events.event_id"


small = st.integers(0, 5)
stamps = st.none() | st.integers(0, 50)
# Few users and tracks, so one call upserts the same key many times (as batches after the
# first do), with the NULLs a counter row holds before its first like or qualifying play.
counter_rows = st.lists(
    st.tuples(st.integers(1, 2), st.sampled_from("abcd"), st.none() | st.sampled_from("xy"),
              *[small] * 7, st.integers(-1, 1), stamps, stamps, stamps, st.integers(0, 50)),
    max_size=200,
)  # fmt: skip


def marked(upsert: CounterUpsert, row: tuple[Any, ...]) -> tuple[Any, ...]:
    """``row`` with its NULLs bound as marks, as ``upsert.columns`` binds them."""
    return tuple(upsert.marks.get(k, v) if v is None else v for k, v in enumerate(row))


@settings(max_examples=100, deadline=None)
@given(batches=st.lists(counter_rows, min_size=1, max_size=3))
def test_counter_upserts_as_single_rows(batches: list[list[tuple[Any, ...]]]) -> None:
    """The counters' upserts, many rows a statement, keep the counters that one upsert a
    statement kept: sums, the newest feedback, the first artist, the latest times."""
    one, many = (store_db("track_stats", "artist_stats") for _ in range(2))
    for upsert, table in ((UPSERT_TRACK, "track_stats"), (UPSERT_ARTIST, "artist_stats")):
        for batch in batches:
            rows = batch if upsert is UPSERT_TRACK else [(r[0], r[1], *r[3:]) for r in batch]
            one.executemany(upsert.insert.sql(1), [marked(upsert, row) for row in rows])
            upsert.insert.run(many, upsert.columns(rows))
        query = f"SELECT * FROM {table} ORDER BY 1, 2"
        assert many.execute(query).fetchall() == one.execute(query).fetchall()
