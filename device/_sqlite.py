"""SQLite plumbing of the store: migrations, write transactions, background WAL checkpoints."""

from __future__ import annotations

import sqlite3
import threading
from contextlib import suppress
from pathlib import Path

from sqlite_utils import Database

from sottovoce._sqlite import write_transaction
from sottovoce.device._errors import StoreError
from sottovoce.device._schema import MIGRATIONS, STORE_SCHEMA


def _migrate(db: Database, path: Path) -> None:
    # Every migration this version knows is pending on an empty database.
    known = {m.name for m in MIGRATIONS.pending(Database(memory=True))}
    newer = [m.name for m in MIGRATIONS.applied(db) if m.name not in known]
    if newer:
        raise StoreError(
            f"{path} was written by a newer sottovoce (schema {newer[-1]}; "
            f"this one knows up to {STORE_SCHEMA})"
        )
    if MIGRATIONS.pending(db):
        db.execute("BEGIN IMMEDIATE")  # one process migrates; others wait, then see it done
        try:
            MIGRATIONS.apply(db)
            db.execute("COMMIT")
        except BaseException:
            db.conn.rollback()
            raise


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
