"""The region database's versioned migrations (aggregator/_schema.py) on real databases.

- A file of the previous schema (before versioned migrations: no ``schema_migrations``, the
  open round's running sum in ``rounds.partial``, contributions without ``partial_key``) comes
  up to version 2 when an aggregator opens it; the open round's sum moves to a running sum
  named ``migrated``, which later deltas join (and an erasure of a migrated delta leaves), and
  the round closes with the exact sum.
- A database a newer sottovoce migrated (version 99) is refused with ``SchemaTooNew`` and left
  as it was, on both backends.
- Two processes opening a fresh PostgreSQL database at once apply each migration once, and
  the region's policy is logged once.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from contextlib import closing
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aggregator_helpers import Clock, Keys, central_update, stored_sum
from service_helpers import Device, small

from sottovoce._database import Connection
from sottovoce.aggregator import RegionAggregator, SchemaTooNew, open_database
from sottovoce.aggregator._partial_sum import PartialSum
from sottovoce.aggregator._schema import SCHEMA_VERSION, migrate, schema_version
from sottovoce.aggregator._service import generate_keys, policy_with_keys
from sottovoce.policy import DecisionLog, example_policy
from sottovoce.sync import period_label, verify_round_spec

pytest.importorskip("opacus")

SEED = 9
# contributions as the previous schema had them (its baseline, then device_key added).
PREVIOUS_CONTRIBUTIONS = {"idempotency_key", "round_id", "pseudonym", "body_sha256", "status",
                          "code", "at", "device_key"}  # fmt: skip


def region(keys: Keys, conn: Any, clock: Clock) -> RegionAggregator:
    return keys.aggregator(conn, clock=clock, base_weights=np.linspace(-1, 1, 8),
                           rng=np.random.default_rng(SEED))  # fmt: skip


def to_previous_schema(path: Path, round_id: str) -> PartialSum:
    """Rewrite ``path`` to the layout the previous sottovoce wrote (see the module docstring):
    the round's running sum back in ``rounds.partial``; returns that sum."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        merged = stored_sum(conn, round_id)
        assert merged is not None
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE rounds SET partial = ? WHERE round_id = ?",
                     (merged.to_bytes(), round_id))  # fmt: skip
        conn.execute("DROP TABLE round_partials")
        conn.execute("DROP TABLE schema_migrations")
        conn.execute("ALTER TABLE contributions DROP COLUMN partial_key")
        conn.execute("COMMIT")
        columns = {row[1] for row in conn.execute("PRAGMA table_info(contributions)")}
        assert columns == PREVIOUS_CONTRIBUTIONS
    return merged


def test_a_previous_schema_file_migrates_and_its_open_round_keeps_its_sum(tmp_path: Path) -> None:
    path, keys, clock = tmp_path / "region.db", Keys(), Clock()
    agg = region(keys, sqlite3.connect(path), clock)
    spec = verify_round_spec(agg.open_round(deadline=clock.now + timedelta(hours=6)),
                             keys.signing.public_key())  # fmt: skip
    devices = [Device.seeded(f"migrate/{i}") for i in range(6)]
    hpke = keys.hpke.public_key()
    sealed = [d.seal(spec, small(i), hpke) for i, d in enumerate(devices)]
    for device in devices:
        agg.enroll(device.public_b64, period_label(spec))
    for s in sealed[:3]:
        assert agg.accept(s.to_wire(), s.idempotency_key).added
    agg.close()
    before = to_previous_schema(path, spec.round_id)

    agg = region(keys, sqlite3.connect(path), clock)  # opening migrates
    with closing(sqlite3.connect(path)) as conn:
        assert schema_version(conn) == SCHEMA_VERSION == 2
        applied = conn.execute("SELECT version, name FROM schema_migrations ORDER BY version")
        assert applied.fetchall() == [(1, "baseline"), (2, "worker_partials")]
        (worker, blob, count), *others = conn.execute(
            "SELECT worker, partial, count FROM round_partials WHERE round_id = ?",
            (spec.round_id,),
        ).fetchall()
        assert (worker, count, others) == ("migrated", 3, [])
        assert PartialSum.from_bytes(blob).to_bytes() == before.to_bytes()  # bit for bit
        keys_of = dict(conn.execute("SELECT idempotency_key, partial_key FROM contributions"))
        assert keys_of == {s.idempotency_key: "migrated" for s in sealed[:3]}
        assert conn.execute("SELECT partial FROM rounds").fetchall() == [(None,)]
    for s in sealed[3:]:  # later deltas go into this process's own running sum
        assert agg.accept(s.to_wire(), s.idempotency_key).added
    assert agg.erase(sealed[0].to_wire()).code == "user_request"  # out of the migrated sum
    with closing(sqlite3.connect(path)) as conn:
        rows = dict(conn.execute("SELECT worker, count FROM round_partials").fetchall())
        assert rows.pop("migrated") == 2 and list(rows.values()) == [3]

    clock.now = spec.deadline + timedelta(seconds=1)
    assert agg.sweep() == [spec.round_id]
    kept = np.sum([small(i) for i in range(1, 6)], axis=0, dtype=np.float64)
    release = agg.latest_release()
    assert release is not None and release.version == 1
    noise = np.random.default_rng(SEED)
    expected = np.linspace(-1, 1, 8) + central_update(
        kept, noise, noise_multiplier=spec.noise_multiplier, expected_cohort=spec.expected_cohort
    )
    np.testing.assert_allclose(release.weights_array(), expected, rtol=0, atol=1e-6)
    report = agg.log.verify(verifier_key=agg.log.verifier_key)
    assert report.ok, report.problems
    agg.close()


def snapshot(conn: Connection) -> list[Any]:
    """What a refused open must leave as it was."""
    tables = ("schema_migrations", "service_meta", "decision_log", "rounds")
    return [conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall() for table in tables]


def test_a_database_of_a_newer_schema_is_refused_untouched(backend: str) -> None:
    keys, clock = Keys(), Clock()
    region(keys, open_database(backend), clock).close()
    with closing(open_database(backend)) as conn:
        conn.execute("INSERT INTO schema_migrations (version, name, applied_at)"
                     " VALUES (99, 'from_the_future', '2030-01-01T00:00:00+00:00')")  # fmt: skip
        before = snapshot(conn)
    other = keys.policy(min_cohort=4)  # a policy change would be logged, if it got that far
    with closing(open_database(backend)) as conn:
        with pytest.raises(SchemaTooNew, match="version 99, newer than this sottovoce's 2"):
            keys.aggregator(conn, clock=clock, policy=other)
        with pytest.raises(SchemaTooNew):
            migrate(conn)
        assert SchemaTooNew.code == "schema_too_new"
        assert snapshot(conn) == before


OPENING_CHILD = """
import json, pathlib, sys, time
from datetime import UTC, datetime
from sottovoce.aggregator import RegionAggregator, load_keys, open_database
from sottovoce.aggregator._schema import migrate
from sottovoce.policy import load_policy
url, root = sys.argv[1], pathlib.Path(sys.argv[2])
policy, keys = load_policy(root / "policy.json"), load_keys(root / "keys")
conn = open_database(url)
conn.execute("SELECT 1")
print("ready", flush=True)
while not (root / "go").exists():
    time.sleep(0.001)
applied = migrate(conn)  # what opening does first, then the log and the ledger
RegionAggregator(conn, policy=policy, region="eu", signing_key=keys.signing,
                 hpke_key=keys.hpke, model_id="ab" * 32, dim=8,
                 clock=lambda: datetime(2026, 11, 3, 9, tzinfo=UTC)).close()
print(json.dumps(applied), flush=True)
"""


def test_two_processes_opening_a_fresh_postgres_database_apply_each_migration_once(
    pg_url: str, tmp_path: Path
) -> None:
    keys = generate_keys(tmp_path / "keys")
    policy = policy_with_keys(example_policy(), "eu", keys, None)
    (tmp_path / "policy.json").write_text(json.dumps(policy.model_dump(mode="json")))
    children = [subprocess.Popen([sys.executable, "-c", OPENING_CHILD, pg_url, str(tmp_path)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]  # fmt: skip
    for child in children:  # connected, waiting for the word
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
    (tmp_path / "go").touch()  # both open the region's database at once
    applied = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        applied.append(json.loads(out))
    assert sorted(applied) == [[], ["baseline", "worker_partials"]]
    with closing(open_database(pg_url)) as conn:
        rows = conn.execute("SELECT version, name FROM schema_migrations ORDER BY version")
        assert rows.fetchall() == [(1, "baseline"), (2, "worker_partials")]
        assert schema_version(conn) == SCHEMA_VERSION
        log = DecisionLog(conn)
        # The policy the region applies is logged once, by whichever process opened first.
        assert [d.action.value for _, d in log.query()] == ["apply_policy"]
        report = log.verify(verifier_key=log.verifier_key)
        assert report.ok, report.problems
