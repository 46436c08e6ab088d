"""The store's SQLite file and its one connection, which every component of the store shares.

:meth:`StoreFile.open` sets the file up (write-ahead log, durability, secure delete, the
schema's migrations, the ``meta`` rows a store is made with) and refuses a file of another
region; :meth:`StoreFile.write` is the one way a component writes; :meth:`StoreFile.generation`
is what anything cached from the file is checked against.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from sottovoce.device._errors import StoreError
from sottovoce.device._rows import to_ms
from sottovoce.device._sqlite import _Checkpointer, _immediate, _migrate, store_errors
from sottovoce.device._store_values import Durability

__all__ = ["StoreFile"]

_CACHE_KIB = 8192  # page cache per connection; the hot upserts are B-tree work


class StoreFile:
    """One open store file: its connection, its clock, and transactions on it."""

    def __init__(self, db: Database, *, path: Path, clock: Callable[[], datetime]) -> None:
        self.db = db  # sqlite-utils, for its table helpers (upserts)
        self.conn = db.conn
        self.path = path
        self.clock = clock
        self._data_version: int | None = None
        self._generation = 0
        self._held: int | None = None  # the generation one read holds (see one_read)
        self._checkpointer = _Checkpointer(path)
        self._checkpointer.start()

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        region_id: str,
        durability: Durability,
        clock: Callable[[], datetime],
        device_secret: bytes | None,
    ) -> StoreFile:
        """Open (or create) the store at ``path`` for a device of ``region_id``; see
        :meth:`sottovoce.device.EventStore.open` for ``device_secret``."""
        try:
            conn = sqlite3.connect(path, timeout=30.0)
        except sqlite3.Error as error:
            raise StoreError(f"cannot open {path}: {error}") from None
        try:
            db = Database(conn, execute_plugins=False, recursive_triggers=False)
            _configure(db, path, durability)
            fresh = not _has_meta(conn)
            _migrate(db, path)
            with _immediate(conn):
                stored = {r[0]: r[1] for r in conn.execute("SELECT key, value FROM meta")}
                if device_secret is not None:
                    if not fresh and stored.get("device_secret") != device_secret.hex():
                        raise StoreError(f"{path} exists: its device secret cannot be replaced")
                    conn.execute("UPDATE meta SET value = ? WHERE key = 'device_secret'",
                                 (device_secret.hex(),))  # fmt: skip
                if stored.get("region", region_id) != region_id:
                    raise StoreError(
                        f"{path} belongs to region {stored['region']!r}, not {region_id!r}; "
                        "a device's data never moves between regions"
                    )
                conn.executemany(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                    [("salt", secrets.token_hex(32)), ("region", region_id),
                     ("created_ts", str(to_ms(clock())))],
                )  # fmt: skip
        except sqlite3.DatabaseError as error:
            conn.close()
            raise StoreError(f"{path} is not a usable sottovoce store: {error}") from None
        except BaseException:
            conn.close()
            raise
        return cls(db, path=path, clock=clock)

    def close(self) -> None:
        self._checkpointer.stop()
        self.conn.close()

    @contextmanager
    def write(self, doing: str = "writing to the store") -> Iterator[None]:
        """A write transaction (a savepoint inside one already open); whatever it changes,
        anything cached from the file is stale after it. SQLite's failures leave it as typed
        errors (``StoreFull``, ``StoreCorrupt``, ...)."""
        try:
            with store_errors(self.conn, path=self.path, doing=doing), _immediate(self.conn):
                yield
        finally:
            self._generation += 1
            self._held = None  # a read that wrote asks the file again

    def generation(self) -> int:
        """A number that changes whenever the file's contents may have changed, by this
        connection or another one: what anything cached from the store is checked against.
        Within :meth:`one_read`, the number read when it began (until a write)."""
        if self._held is not None:
            return self._held
        version = self.conn.execute("PRAGMA data_version").fetchone()[0]
        if version != self._data_version:  # another connection wrote: nothing cached holds
            self._data_version = version
            self._generation += 1
        return self._generation

    @contextmanager
    def one_read(self) -> Iterator[None]:
        """One read that several caches check against the file (a rerank: the consent
        verdict, the model served, the user's state): :meth:`generation` asks SQLite once for
        all of them instead of once each. Another connection's write during the read shows
        at the next one; a write through this connection ends the hold at once."""
        if self._held is not None:  # already inside one
            yield
            return
        self._held = self.generation()
        try:
            yield
        finally:
            self._held = None

    def meta(self, key: str) -> str:
        """A value every store has (``salt``, ``region``, ...)."""
        value = self.meta_or_none(key)
        if value is None:
            raise StoreError(f"{self.path} has no {key!r}; it is not a sottovoce store")
        return value

    def meta_or_none(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def rows(self, sql: str, args: Sequence[Any] = ()) -> Iterator[dict[str, Any]]:
        """The rows of a query as dictionaries, column name -> value."""
        cursor = self.conn.execute(sql, args)
        names = [d[0] for d in cursor.description]
        for row in cursor:
            yield dict(zip(names, row, strict=True))


def _configure(db: Database, path: Path, durability: Durability) -> None:
    mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode != "wal":
        raise StoreError(f"{path}: cannot use write-ahead logging (journal mode {mode})")
    db.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
    db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
    # WAL checkpoints (copying the log back into the file, with fsyncs) run on a background
    # thread instead of inside whichever append crosses the threshold.
    db.execute("PRAGMA wal_autocheckpoint=0")
    # Statement journals (the counters' many-row upserts keep one) in memory, not in a file.
    db.execute("PRAGMA temp_store=MEMORY")
    db.execute("PRAGMA secure_delete=ON")  # erased rows do not linger in free pages


def _has_meta(conn: sqlite3.Connection) -> bool:
    """Whether the file already holds a store (its ``meta`` table)."""
    found = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ).fetchone()
    return found is not None
