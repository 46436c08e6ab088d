"""The region database's tables and their versioned migrations, one list for both backends.

A region's database (an SQLite file or a PostgreSQL database, see :mod:`sottovoce._database`) has
``schema_migrations``: one row per migration applied (version, name, when). :func:`migrate`
applies the missing ones in order, each in the same write transaction as its row, so a crash
leaves a database at one version or the next, never between. Every aggregator process runs it
when it opens the database (under the region's write lock: two workers starting at once apply
each migration once). A database newer than this code is refused, not written to.

The statements are written once, in the SQL both backends accept; column types are translated
for PostgreSQL by :func:`sottovoce._database.to_postgres`. The privacy ledger and the decision log
create their own tables (:mod:`._ledger`, :mod:`sottovoce.policy._log`), idempotently, the same
way on both backends.

Versions::

    1 baseline        enrollments, rounds, contributions (with device_key), releases,
                      service_meta; SQLite files made before the list existed come up to it
    2 worker_partials round_partials: one running sum per round and worker process, merged
                      (checksums checked) when the round closes; contributions.partial_key
                      names the sum a delta went into, so erasing it takes it from that one
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sottovoce._clock import system_clock
from sottovoce._database import Connection, columns_of, table_exists
from sottovoce._sqlite import write_transaction
from sottovoce.aggregator._errors import AggregatorError

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "SchemaTooNew", "migrate", "schema_version"]


class SchemaTooNew(AggregatorError):
    """The database was migrated by a newer version of sottovoce than this one."""

    code = "schema_too_new"


_BASELINE = """
CREATE TABLE IF NOT EXISTS enrollments (
    device_key TEXT PRIMARY KEY,
    period TEXT NOT NULL,
    enrolled_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round_id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'published', 'abandoned')),
    partial BLOB,
    count INTEGER NOT NULL DEFAULT 0,
    opened_at TEXT NOT NULL,
    closed_at TEXT
);
CREATE TABLE IF NOT EXISTS contributions (
    idempotency_key TEXT PRIMARY KEY,
    round_id TEXT,
    pseudonym TEXT,
    body_sha256 TEXT NOT NULL,
    status INTEGER NOT NULL,
    code TEXT NOT NULL,
    at TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS contributions_once
    ON contributions (round_id, pseudonym) WHERE status = 200;
CREATE TABLE IF NOT EXISTS releases (
    version INTEGER PRIMARY KEY,
    model_id TEXT NOT NULL,
    body TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS service_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)
"""


def _baseline(conn: Connection) -> None:
    _run(conn, _BASELINE)
    if "device_key" not in columns_of(conn, "contributions"):  # files before once-per-key
        conn.execute("ALTER TABLE contributions ADD COLUMN device_key TEXT")
    conn.execute(
        "CREATE UNIQUE INDEX IF NOT EXISTS contributions_once_per_key ON contributions"
        " (round_id, device_key) WHERE status = 200 AND device_key IS NOT NULL"
    )


def _worker_partials(conn: Connection) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS round_partials (round_id TEXT NOT NULL, worker TEXT NOT NULL,"
        " partial BLOB NOT NULL, count INTEGER NOT NULL, PRIMARY KEY (round_id, worker))"
    )
    if "partial_key" not in columns_of(conn, "contributions"):
        conn.execute("ALTER TABLE contributions ADD COLUMN partial_key TEXT")
    # An open round's single running sum becomes the sum of a worker named 'migrated'.
    conn.execute(
        "INSERT INTO round_partials (round_id, worker, partial, count) SELECT round_id,"
        " 'migrated', partial, count FROM rounds WHERE state = 'open' AND partial IS NOT NULL"
    )
    conn.execute(
        "UPDATE contributions SET partial_key = 'migrated' WHERE status = 200 AND round_id IN"
        " (SELECT round_id FROM rounds WHERE state = 'open')"
    )
    conn.execute("UPDATE rounds SET partial = NULL")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    apply: Callable[[Connection], None]


MIGRATIONS = (
    Migration(1, "baseline", _baseline),
    Migration(2, "worker_partials", _worker_partials),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


def schema_version(conn: Connection) -> int:
    """The newest migration applied to the database (0: none)."""
    if not table_exists(conn, "schema_migrations"):
        return 0
    row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
    return 0 if row[0] is None else int(row[0])


def migrate(conn: Connection) -> list[str]:
    """Apply the migrations the database lacks; returns their names (empty: up to date)."""
    applied: list[str] = []
    with write_transaction(conn, name="migrate"):
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
            " name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        current = schema_version(conn)
        if current > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the database's schema is at version {current}, newer than this sottovoce's "
                f"{SCHEMA_VERSION}: run the newer version (migrations only go forward)"
            )
        for migration in MIGRATIONS:
            if migration.version <= current:
                continue
            migration.apply(conn)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, system_clock().isoformat(timespec="seconds")),
            )
            applied.append(migration.name)
    return applied


def _run(conn: Connection, script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)
