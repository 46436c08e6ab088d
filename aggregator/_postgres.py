"""The region's database: an embedded SQLite file, or PostgreSQL over psycopg 3 and a pool.

:class:`PostgresConnection` is the ``sqlite3.Connection`` surface the storage uses
(:class:`sottovoce._database.Connection`) over PostgreSQL, so the same code and the same SQL run
on both backends. What differs is translated here, in one place:

- placeholders: ``?`` becomes ``%s`` (a literal ``%`` is escaped);
- column types in ``CREATE TABLE``/``ALTER TABLE``: ``BLOB`` is ``BYTEA``, ``REAL`` is
  ``DOUBLE PRECISION``, ``INTEGER`` is ``BIGINT``;
- ``BEGIN IMMEDIATE`` (SQLite: take the write lock up front) is ``BEGIN`` followed by
  ``pg_advisory_xact_lock`` on one key per region database: writers are serialized by the
  database, across every worker process of the region, exactly as on SQLite, and the lock is
  released by the commit or rollback. Reads outside a write see committed data only;
- ``SAVEPOINT`` and ``RELEASE`` (a nested write) are sent with the transaction's next statement,
  in the same round trip, instead of in one each: the lock is held for a group's round trips.

A statement outside a transaction (a read) runs on a pooled connection in autocommit mode. A
transaction holds one pooled connection from ``BEGIN`` to ``COMMIT``/``ROLLBACK``. A connection
the server dropped (a restart) is discarded by the pool; a read, or a ``BEGIN``, that finds its
connection gone is tried once more on a fresh one, so a server restart costs the writes in
flight at that moment (:class:`DatabaseUnavailable`, answered as retryable), not the process.

:func:`open_database` takes what an operator types: a path (SQLite, created if missing, WAL and
``synchronous=FULL``: an acknowledged write survives power loss) or a ``postgresql://`` URL.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sottovoce._database import Connection
from sottovoce.aggregator._errors import AggregatorError

__all__ = ["DatabaseUnavailable", "PostgresConnection", "is_postgres_url", "open_database"]


class DatabaseUnavailable(AggregatorError):
    """The database could not take the write now (server down or restarting): nothing of the
    write was kept; the same request can be retried later."""

    code = "unavailable"


def is_postgres_url(target: str | Path) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def open_database(target: str | Path, *, application: str = "sottovoce") -> Connection:
    """A connection to ``target``: a ``postgresql://`` URL, or a SQLite file path."""
    if is_postgres_url(target):
        return PostgresConnection(str(target), application=application)
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # an acknowledged write survives power loss
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


_TYPES = ((re.compile(r"\bBLOB\b"), "BYTEA"), (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
          (re.compile(r"\bINTEGER\b"), "BIGINT"))  # fmt: skip
_DDL = re.compile(r"^\s*(CREATE|ALTER)\s+TABLE\b", re.IGNORECASE)
_SAVEPOINT = re.compile(r"^\s*(SAVEPOINT|RELEASE|ROLLBACK TO)\b", re.IGNORECASE)
# Sent with the next statement instead of in a round trip of their own (see PostgresConnection).
_DEFERRABLE = re.compile(r"^(SAVEPOINT|RELEASE)\s+\w+$", re.IGNORECASE)


def to_postgres(sql: str) -> str:
    """``sql`` in PostgreSQL's spelling (see the module docstring)."""
    if _DDL.match(sql):
        for pattern, replacement in _TYPES:
            sql = pattern.sub(replacement, sql)
    return sql.replace("%", "%%").replace("?", "%s")


class _Rows:
    """A finished statement's rows (read before its connection goes back to the pool)."""

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self._next = 0
        self.rowcount = rowcount

    def fetchone(self) -> Any:
        if self._next >= len(self._rows):
            return None
        self._next += 1
        return self._rows[self._next - 1]

    def fetchall(self) -> list[Any]:
        rest, self._next = self._rows[self._next :], len(self._rows)
        return rest

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())


class PostgresConnection:
    """A region's PostgreSQL database behind the ``sqlite3.Connection`` surface the storage
    uses (see the module docstring). One instance is used by one thread at a time."""

    backend = "postgres"

    def __init__(self, url: str, *, application: str = "sottovoce", max_size: int = 4) -> None:
        try:
            import psycopg  # noqa: F401  (the aggregator extra; a device never needs it)
            from psycopg_pool import ConnectionPool
        except ImportError:  # pragma: no cover - the aggregator extra installs both
            raise AggregatorError(
                "a postgresql:// database needs psycopg and psycopg-pool: "
                "pip install 'sottovoce[aggregator]'"
            ) from None
        self.url = url
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max_size,
            kwargs={
                "autocommit": True,
                "application_name": application,
                # A connection that went silent is found out in about a minute, and a write
                # never waits for the region's lock or idles in a transaction for ever.
                "keepalives": 1,
                "keepalives_idle": 30,
                "keepalives_interval": 10,
                "keepalives_count": 3,
                "options": "-c lock_timeout=30s -c idle_in_transaction_session_timeout=60s",
            },
            open=False,
            name=application,
        )
        try:
            self._pool.open(wait=True, timeout=15)
        except Exception as error:
            self._pool.close()
            raise DatabaseUnavailable(f"cannot reach the PostgreSQL database: {error}") from None
        self._held: Any = None  # the pooled connection of the open transaction
        # SAVEPOINT and RELEASE statements not yet sent: they go, in order, in one round trip
        # before the transaction's next other statement (a group's upload or enrollment holds
        # the region's lock for its round trips, and a savepoint alone changes nothing until a
        # statement follows it); COMMIT and ROLLBACK drop them (they end every savepoint).
        self._deferred: list[str] = []
        self._lock_key: int | None = None
        self._cache: dict[str, str] = {}

    @property
    def in_transaction(self) -> bool:
        return self._held is not None

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> _Rows:
        statement = sql.strip()
        upper = statement.upper()
        if upper in ("BEGIN", "BEGIN IMMEDIATE"):
            self._begin()
            return _Rows([], -1)
        if upper in ("COMMIT", "END"):
            self._finish("COMMIT")
            return _Rows([], -1)
        if upper == "ROLLBACK":
            self.rollback()
            return _Rows([], -1)
        translated = self._translated(statement)
        if self._held is not None:
            if _DEFERRABLE.match(statement) and not parameters:
                self._deferred.append(statement)
                return _Rows([], -1)
            return self._run(self._held, translated, parameters)
        if _SAVEPOINT.match(statement):
            raise RuntimeError("a savepoint outside a transaction")
        return self._autocommit(translated, parameters)

    def executemany(self, sql: str, seq_of_parameters: Any, /) -> _Rows:
        import psycopg

        translated = self._translated(sql.strip())
        rows = list(seq_of_parameters)
        try:
            if self._held is not None:
                self._send_deferred(self._held)
                with self._held.cursor() as cur:
                    cur.executemany(translated, rows)
                    return _Rows([], cur.rowcount)
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                cur.executemany(translated, rows)
                return _Rows([], cur.rowcount)
        except psycopg.OperationalError as error:
            raise DatabaseUnavailable(f"the database is unavailable: {error}") from None

    def rollback(self) -> None:
        if self._held is not None:
            self._finish("ROLLBACK")

    def close(self) -> None:
        if self._held is not None:
            self.rollback()
        self._pool.close()

    # -- internals -------------------------------------------------------------------------

    def _translated(self, sql: str) -> str:
        found = self._cache.get(sql)
        if found is None:
            found = self._cache[sql] = to_postgres(sql)
        return found

    def _begin(self) -> None:
        import psycopg

        if self._held is not None:
            raise RuntimeError("a transaction is already open on this connection")
        for attempt in (1, 2):
            conn = self._getconn()
            try:
                # Read committed whatever the server's default: every read after the lock
                # sees what the writer before committed.
                conn.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._region_lock(conn),))
            except psycopg.OperationalError as error:
                self._pool.putconn(conn)
                if attempt == 2 or not conn.broken:
                    raise DatabaseUnavailable(f"the database is unavailable: {error}") from None
                self._pool.check()  # the server restarted: drop every stale connection
                continue  # once more, on a fresh one
            except BaseException:
                self._pool.putconn(conn)  # the pool rolls it back
                raise
            self._held = conn
            return

    def _finish(self, verb: str) -> None:
        import psycopg

        conn, self._held = self._held, None
        self._deferred = []  # the commit or rollback ends every savepoint
        try:
            done = conn.execute(verb)
            if verb == "COMMIT" and done.statusmessage != "COMMIT":
                # PostgreSQL ends a failed transaction with ROLLBACK, not an error.
                raise DatabaseUnavailable("the transaction had failed: nothing was kept")
        except psycopg.OperationalError as error:
            if verb == "ROLLBACK":
                return  # the server already ended it
            # The connection went at the commit: the server may or may not have kept the
            # write. Either way the answer is "retry": a kept upload answers its retry with
            # its stored answer and counts once.
            raise DatabaseUnavailable(f"the commit's outcome is unknown: {error}") from None
        finally:
            self._pool.putconn(conn)

    def _getconn(self) -> Any:
        try:
            return self._pool.getconn(timeout=15)
        except Exception as error:
            raise DatabaseUnavailable(f"no database connection: {error}") from None

    def _region_lock(self, conn: Any) -> int:
        # One advisory lock key per database: every writer of the region takes the same one.
        if self._lock_key is None:
            row = conn.execute("SELECT hashtext(current_database())").fetchone()
            self._lock_key = int(row[0])
        return self._lock_key

    def _run(self, conn: Any, sql: str, parameters: Sequence[Any]) -> _Rows:
        import psycopg

        try:
            self._send_deferred(conn)
            cur = conn.execute(sql, tuple(parameters))
        except psycopg.OperationalError as error:
            raise DatabaseUnavailable(f"the database is unavailable: {error}") from None
        rows = cur.fetchall() if cur.description is not None else []
        return _Rows(rows, cur.rowcount)

    def _send_deferred(self, conn: Any) -> None:
        if self._deferred and conn is self._held:
            statements, self._deferred = self._deferred, []
            conn.execute("; ".join(statements))

    def _autocommit(self, sql: str, parameters: Sequence[Any]) -> _Rows:
        for attempt in (1, 2):
            conn = self._getconn()
            try:
                return self._run(conn, sql, parameters)
            except DatabaseUnavailable:
                if attempt == 2 or not conn.broken:
                    raise
            finally:
                self._pool.putconn(conn)
            self._pool.check()  # the server restarted: drop every stale connection, then retry
        raise AssertionError("unreachable")
