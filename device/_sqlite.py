"""SQLite plumbing of the store: migrations, write transactions, background WAL checkpoints,
and SQLite's failures as the store's typed errors."""

from __future__ import annotations

import functools
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Concatenate, ParamSpec, Protocol, TypeVar

from sqlite_utils import Database

from sottovoce._sqlite import write_transaction
from sottovoce.device._errors import StoreCorrupt, StoreError, StoreFull
from sottovoce.device._schema import MIGRATIONS, STORE_SCHEMA


def _migrate(db: Database, path: Path) -> None:
    known = _known_migrations()
    applied = [m.name for m in MIGRATIONS.applied(db)]
    newer = [name for name in applied if name not in known]
    if newer:
        raise StoreError(
            f"{path} was written by a newer sottovoce (schema {newer[-1]}; "
            f"this one knows up to {STORE_SCHEMA})"
        )
    if not known.issubset(applied):
        db.execute("BEGIN IMMEDIATE")  # one process migrates; others wait, then see it done
        try:
            MIGRATIONS.apply(db)  # what is still pending once the lock is held
            db.execute("COMMIT")
        except BaseException:
            db.conn.rollback()
            raise


@functools.cache
def _known_migrations() -> frozenset[str]:
    """Every migration this version knows: all of them are pending on an empty database
    (asked once per process; every store open compares its file's applied ones with it)."""
    return frozenset(m.name for m in MIGRATIONS.pending(Database(memory=True)))


class _Checkpointer(threading.Thread):
    """Copies the write-ahead log back into the database file every so often.

    PASSIVE checkpoints never block the writer; sqlite releases the GIL while it works, so the
    appending thread is not held up by the fsyncs. A crash at any point is safe: SQLite
    recovers from the WAL on the next open.
    """

    def __init__(self, path: Path, *, interval_s: float = 0.2) -> None:
        super().__init__(name=f"sottovoce-wal-{path.name}", daemon=True)
        self._path = path
        self._interval = interval_s
        self._stopped = threading.Event()

    def run(self) -> None:
        conn = sqlite3.connect(self._path, timeout=0.05)
        try:
            while not self._stopped.wait(self._interval):
                with suppress(sqlite3.Error):
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            with suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # leave a small file behind
        finally:
            conn.close()

    def stop(self) -> None:
        self._stopped.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()


_immediate = write_transaction  # the store's name for it


def store_failure(error: sqlite3.Error, *, path: Path, doing: str) -> StoreError:
    """What a failure of SQLite under a store call means to its caller, as a typed error."""
    # SQLite rolls a whole transaction back by itself after some failures (SQLITE_FULL among
    # them); undoing a savepoint then fails too, and that second error hides the first.
    while isinstance(error.__context__, sqlite3.Error):
        error = error.__context__
    primary = (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF  # extended codes: low byte
    if primary == sqlite3.SQLITE_FULL:
        return StoreFull(
            f"{path}: no space left while {doing} ({error}); nothing of it was written and what "
            "the store held before is intact: free some space and try again"
        )
    if primary in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return StoreCorrupt(
            f"{path} is damaged ({error}), met while {doing}; nothing of it was written. What "
            "the damaged pages held cannot be read: restore the file from a backup, or erase "
            "and recreate the store"
        )
    if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return StoreError(f"{path}: another connection kept the store locked while {doing}; "
                          "nothing of it was written: try again", code="store_busy")  # fmt: skip
    if primary in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN):
        return StoreError(f"{path}: the file could not be read or written while {doing} "
                          f"({error}); nothing of it was written", code="store_io")  # fmt: skip
    return StoreError(f"{path}: SQLite failed while {doing} ({error}); nothing of it was written")


@contextmanager
def store_errors(conn: sqlite3.Connection, *, path: Path, doing: str) -> Iterator[None]:
    """Run a store call, turning SQLite's failures into the store's typed errors.

    A transaction this call began is rolled back if SQLite left it open (a failed ``COMMIT``
    can), so that the connection takes the next call; one it nests in is its owner's to end.
    """
    owner = not conn.in_transaction
    try:
        yield
    except sqlite3.Error as error:
        if owner and conn.in_transaction:
            with suppress(sqlite3.Error):
                conn.rollback()
        raise store_failure(error, path=path, doing=doing) from None


class _File(Protocol):
    @property
    def conn(self) -> sqlite3.Connection: ...

    @property
    def path(self) -> Path: ...


class _Store(Protocol):
    """A component of the store: it holds the store's file (:class:`._store_file.StoreFile`)."""

    @property
    def _file(self) -> _File: ...


S = TypeVar("S", bound=_Store)
P = ParamSpec("P")
R = TypeVar("R")


def guarded(
    doing: str,
) -> Callable[[Callable[Concatenate[S, P], R]], Callable[Concatenate[S, P], R]]:
    """A store method whose SQLite failures reach its caller as typed errors (``doing`` says
    what the method was doing, in the error's sentence)."""

    def wrap(method: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
        @functools.wraps(method)
        def call(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
            with store_errors(self._file.conn, path=self._file.path, doing=doing):
                return method(self, *args, **kwargs)

        return call

    return wrap
