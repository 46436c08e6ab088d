"""``sottovoce aggregator migrate``: an operator checks and applies the schema migrations of a
region's database ahead of an upgrade, on either backend."""

from __future__ import annotations

from conftest import run_cli

from sottovoce.aggregator import SCHEMA_VERSION, open_database
from sottovoce.aggregator._schema import MIGRATIONS, schema_version


def test_check_then_migrate_then_check(backend: str) -> None:
    before = run_cli("aggregator", "migrate", "--db", backend, "--check")
    assert before.returncode == 1, before
    assert f"schema version 0; this sottovoce: {SCHEMA_VERSION} (needs migrating)" in before.stdout
    applied = run_cli("aggregator", "migrate", "--db", backend)
    assert applied.returncode == 0, applied
    names = ", ".join(m.name for m in MIGRATIONS)
    assert f"schema version 0 -> {SCHEMA_VERSION}: {names}" in applied.stdout
    again = run_cli("aggregator", "migrate", "--db", backend)
    assert f"-> {SCHEMA_VERSION}: nothing to apply" in again.stdout
    after = run_cli("aggregator", "migrate", "--db", backend, "--check")
    assert after.returncode == 0 and "(up to date)" in after.stdout
    conn = open_database(backend)
    try:
        assert schema_version(conn) == SCHEMA_VERSION
        rows = conn.execute("SELECT version, name FROM schema_migrations ORDER BY version")
        assert [tuple(r) for r in rows.fetchall()] == [(m.version, m.name) for m in MIGRATIONS]
    finally:
        conn.close()
