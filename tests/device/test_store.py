from __future__ import annotations

import random
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from conftest import NOW, T0, Events, StoreFactory, round_spec
from hypothesis import given, settings
from hypothesis import strategies as st
from store_peek import own_connection, peek

from sottovoce._demo import listen, make_catalog
from sottovoce.device import EventConflict, EventStore, StoreError
from sottovoce.device._derive import Fact, FactBatch, derive
from sottovoce.device._derive_columns import SMALL_BATCH, derive_columns
from sottovoce.policy import (
    AgeRestricted,
    ConsentMissing,
    Policy,
    Purpose,
    UnknownRegion,
    example_policy,
)
from sottovoce.sync import idempotency_key, period_label


def test_file_is_wal_and_migrated(open_store: StoreFactory, tmp_path: Path) -> None:
    open_store()
    conn = sqlite3.connect(tmp_path / "device.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    applied = [r[0] for r in conn.execute("SELECT name FROM _sqlite_migrations")]
    assert applied == [
        "m001_initial",
        "m002_decision_log",
        "m003_ranker_and_erasure",
        "m004_outbox",
        "m005_privacy_spend",
        "m006_outbox_sizes",
    ]
    # the device's privacy ledger starts empty: round ids and mechanism parameters, nothing else
    columns = [r[1] for r in conn.execute("PRAGMA table_info(privacy_spend)")]
    assert columns == ["region", "round_id", "mode", "period_start_ts", "noise_multiplier",
                       "sampling_rate", "sensitivity", "charged_ts"]  # fmt: skip
    assert conn.execute("SELECT count(*) FROM privacy_spend").fetchone()[0] == 0


def test_an_older_store_is_migrated_in_place(tmp_path: Path, policy: Policy) -> None:
    from sqlite_utils import Database

    from sottovoce.device._schema import MIGRATIONS

    path = tmp_path / "old.db"
    db = Database(path)
    MIGRATIONS.apply(db, stop_before="m002_decision_log")
    db.table("meta").insert_all([{"key": "salt", "value": "00" * 32},
                                 {"key": "region", "value": "us"}])  # fmt: skip
    db.execute(
        "INSERT INTO events (event_id, user_ref, type, ts, body) VALUES ('old', 1, 'like', 0, '{}')"
    )
    db.conn.commit()
    db.close()
    store = EventStore.open(path, policy=policy, region="us", clock=lambda: NOW)
    assert store.count() == 1
    assert [d.action.value for _, d in store.decisions.query()] == ["apply_policy"]
    store.append(Events()("like"))
    assert store.decisions.size == 2 and store.decisions.verify().ok
    store.close()


def test_migrating_the_outbox_keeps_sizes_and_drops_finished_bodies(tmp_path: Path) -> None:
    from sqlite_utils import Database

    from sottovoce.device._schema import MIGRATIONS

    db = Database(tmp_path / "old.db")
    MIGRATIONS.apply(db, stop_before="m006_outbox_sizes")
    for key, state in (("sent", "acknowledged"), ("refused", "dropped"), ("waiting", "pending")):
        db.execute(
            "INSERT INTO outbox (idempotency_key, user_ref, region, round_id, deadline_ts, body,"
            " state, attempts, next_attempt_ts, created_ts) VALUES (?, 1, 'us', ?, 0, ?, ?, 0,"
            " 0, 0)",
            (key, f"r-{key}", b"sealed-" + key.encode(), state),
        )
    db.conn.commit()
    MIGRATIONS.apply(db)
    rows = db.execute("SELECT idempotency_key, body, bytes FROM outbox ORDER BY created_ts, rowid")
    assert rows.fetchall() == [
        ("sent", b"", len(b"sealed-sent")),
        ("refused", b"", len(b"sealed-refused")),
        ("waiting", b"sealed-waiting", len(b"sealed-waiting")),  # still to be sent: kept
    ]
    db.close()


def test_reopening_keeps_data_and_salt(open_store: StoreFactory, events: Events) -> None:
    first = open_store()
    first.append(events("play_end"))
    digest = first.user_hash("user-1")
    first.close()
    again = open_store()
    assert again.count() == 1 and again.user_hash("user-1") == digest


def test_user_hash_is_salted_per_device(open_store: StoreFactory) -> None:
    a, b = open_store(name="a.db"), open_store(name="b.db")
    assert a.user_hash("user-1") != b.user_hash("user-1")


def test_newer_schema_is_refused(open_store: StoreFactory, tmp_path: Path) -> None:
    open_store().close()
    conn = sqlite3.connect(tmp_path / "device.db")
    conn.execute(
        "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) "
        "VALUES ('sottovoce.device', 'm999_future', 'x')"
    )
    conn.commit()
    with pytest.raises(StoreError, match="newer sottovoce"):
        open_store()


def test_region_is_bound_to_the_file(open_store: StoreFactory) -> None:
    open_store("us").close()
    with pytest.raises(StoreError, match="never moves between regions"):
        open_store("eu")
    with pytest.raises(UnknownRegion):
        open_store("apac", name="other.db")


def test_replayed_events_are_not_counted_twice(open_store: StoreFactory, events: Events) -> None:
    store = open_store()
    batch = [events("play_end"), events("like"), events("skip")]
    assert store.append_many(batch).accepted == 3
    result = store.append_many([*batch, batch[0]])
    assert result.accepted == 0
    assert result.duplicate_ids == tuple(e["event_id"] for e in [*batch, batch[0]])
    stats = store.derived_state()["track_stats"]
    assert (stats[0]["plays"], stats[0]["likes"], stats[0]["skips"]) == (1, 1, 1)


def test_replay_inside_one_batch(open_store: StoreFactory, events: Events) -> None:
    store = open_store()
    play = events("play_end")
    result = store.append_many([play, dict(play)])
    assert (result.accepted, result.duplicates) == (1, 1)
    assert store.derived_state()["track_stats"][0]["plays"] == 1


def test_same_id_other_content_is_a_conflict(open_store: StoreFactory, events: Events) -> None:
    store = open_store()
    play = events("play_end")
    store.append(play)
    fresh = events("like")
    with pytest.raises(EventConflict) as caught:
        store.append_many([fresh, {**play, "ms_played": 1}])
    assert caught.value.event_id == play["event_id"] and caught.value.index == 1
    assert store.count() == 1, "nothing of the conflicting batch is stored"
    other_user = {**play, "user_id": "user-2"}
    with pytest.raises(EventConflict):
        store.append(other_user)


# -- consent ---------------------------------------------------------------------------------
def test_eu_needs_age_and_opt_in(open_store: StoreFactory, events: Events) -> None:
    store = open_store("eu")
    with pytest.raises(AgeRestricted, match="needs the user's age"):
        store.append(events("play_end"))
    store.set_age("user-1", 15)
    with pytest.raises(AgeRestricted, match="from age 16"):
        store.append(events("play_end"))
    store.set_age("user-1", 16)
    with pytest.raises(ConsentMissing, match="opt-in"):
        store.append(events("play_end"))
    store.grant("user-1", Purpose.PERSONALIZATION)
    assert store.append(events("play_end")).accepted == 1
    assert store.count() == 1


def test_us_is_opt_out(open_store: StoreFactory, events: Events) -> None:
    store = open_store("us")
    assert store.allows("user-1", Purpose.PERSONALIZATION)
    assert store.append(events("play_end")).accepted == 1
    store.withdraw("user-1", Purpose.PERSONALIZATION)
    with pytest.raises(ConsentMissing, match="withdrew"):
        store.append(events("play_end"))


def test_a_refused_user_refuses_the_whole_batch(open_store: StoreFactory) -> None:
    store = open_store("eu")
    store.set_age("ok", 30)
    store.grant("ok", Purpose.PERSONALIZATION)
    ok, other = Events("ok"), Events("not-asked")
    with pytest.raises(AgeRestricted):
        store.append_many([ok("play_end"), other("play_end")])
    assert store.count() == 0


def test_consent_records_time_and_policy_hash(eu_store: EventStore, policy: Policy) -> None:
    exported = eu_store.export_user("user-1")
    assert exported["consent"] == [
        {"purpose": "personalization", "granted": True, "ts": exported["consent"][0]["ts"],
         "policy_hash": policy.hash, "region": "eu", "at": exported["consent"][0]["at"]}
    ]  # fmt: skip


def test_withdrawal_purges_what_the_purpose_covered(eu_store: EventStore, events: Events) -> None:
    other = Events("user-2")
    eu_store.set_age("user-2", 40)
    eu_store.grant("user-2", Purpose.PERSONALIZATION)
    eu_store.append_many([events("play_end"), events("like"), other("play_end")])
    eu_store.grant("user-1", Purpose.FEDERATED_TRAINING)
    report = eu_store.withdraw("user-1", Purpose.PERSONALIZATION)
    assert report.deleted["events"] == 2 and report.deleted["track_stats"] == 1
    mine = eu_store.export_user("user-1")
    assert mine["events"] == [] and all(rows == [] for rows in mine["derived"].values())
    assert [c["granted"] for c in mine["consent"]] == [True, True, False]
    assert len(eu_store.export_user("user-2")["events"]) == 1, "others keep their data"
    assert eu_store.withdraw("user-1", Purpose.ANALYTICS).total == 0


# -- retention, erasure, export ----------------------------------------------------------------
def test_retention_follows_region_ttls(open_store: StoreFactory, events: Events) -> None:
    eu, us = open_store("eu", name="eu.db"), open_store("us", name="us.db")
    eu.set_age("user-1", 30)
    eu.grant("user-1", Purpose.PERSONALIZATION)
    batch = [events("play_end"), events("context")]
    eu.append_many(batch)
    us.append_many(batch)
    day40 = T0 + timedelta(days=40)
    assert eu.purge_expired(now=day40).deleted["events"] == 2  # EU keeps raw events 30 days
    assert eu.derived_state()["track_stats"] != []  # and derived state 90 days
    assert us.purge_expired(now=day40).total == 0  # US keeps them 180 days
    day100 = T0 + timedelta(days=100)
    report = eu.purge_expired(now=day100)
    assert report.deleted["track_stats"] == 1 and report.deleted["context"] == 1
    assert all(rows == [] for rows in eu.derived_state().values())
    assert us.purge_expired(now=T0 + timedelta(days=181)).deleted["events"] == 2


def test_retention_cutoff_is_exact(open_store: StoreFactory, events: Events) -> None:
    store = open_store("us")
    event = events("like")
    store.append(event)
    edge = T0 + timedelta(seconds=10) + timedelta(days=180)
    assert store.purge_expired(now=edge).total == 0
    assert store.purge_expired(now=edge + timedelta(milliseconds=1)).deleted["events"] == 1


def test_erasure_removes_everything_about_the_user(eu_store: EventStore, events: Events) -> None:
    other = Events("user-2")
    eu_store.set_age("user-2", 40)
    eu_store.grant("user-2", Purpose.PERSONALIZATION)
    eu_store.append_many([events("play_end"), events("context"), other("like")])
    ((ref,),) = peek(eu_store, "SELECT user_ref FROM users WHERE user_hash = ?",
                     [eu_store.user_hash("user-1")])  # fmt: skip
    tables = [r[0] for r in peek(eu_store,
        "SELECT m.name FROM sqlite_master m JOIN pragma_table_info(m.name) c "
        "WHERE m.type = 'table' AND c.name = 'user_ref'")]  # fmt: skip
    assert {"events", "track_stats", "artist_stats", "sessions", "context", "consent",
            "users", "model_state", "decision_subjects", "taste"} <= set(tables)  # fmt: skip

    def rows_about_user_1() -> int:
        return sum(peek(eu_store, f"SELECT count(*) FROM {t} WHERE user_ref = ?",
                        [ref])[0][0] for t in tables)  # fmt: skip

    assert rows_about_user_1() > 5
    report = eu_store.erase_user("user-1")
    assert report.deleted["events"] == 2 and report.deleted["consent"] == 1
    assert report.deleted["users"] == 1
    assert rows_about_user_1() == 0, "every table that refers to users is clean"
    left = eu_store.export_user("user-1")
    assert left["profile"] is None and left["consent"] == [] and left["events"] == []
    assert eu_store.count("events") == 1, "other users keep their data"


def test_export_has_everything_for_one_user(eu_store: EventStore, events: Events) -> None:
    eu_store.upsert_catalog([{"track_id": "t1", "artist_id": "a1", "vector": [1.0, 0.0]}])
    eu_store.append_many([events("play_start"), events("play_end"), events("context")])
    data = eu_store.export_user("user-1")
    assert data["format"] == "sottovoce.access-export/1"
    assert data["user_hash"] == eu_store.user_hash("user-1") and data["region"] == "eu"
    assert data["profile"]["age"] == 30
    assert [e["type"] for e in data["events"]] == ["play_start", "play_end", "context"]
    derived = data["derived"]
    assert derived["track_stats"][0]["plays"] == 1 and derived["sessions"][0]["events"] == 3
    assert derived["taste"][0]["vector"] == pytest.approx([1.0, 0.0])
    assert derived["context"][0]["device_type"] == "phone"
    import json

    json.dumps(data)  # JSON-ready


def test_durability_full_is_accepted(open_store: StoreFactory, events: Events) -> None:
    store = open_store(durability="full")
    # A setting of the connection: the store's own.
    assert own_connection(store).execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store.append(events("like")).accepted == 1


def test_a_simulation_can_fix_the_device_secret_of_a_new_store_only(tmp_path: Path) -> None:
    # The secret is never read back: what it keys (upload keys, the round coin) shows it.
    secret = bytes(range(32))
    spec = round_spec(example_policy(), "us", model_id="ab" * 32)
    keyed = idempotency_key(secret, spec=spec, period=period_label(spec))
    store = EventStore.open(tmp_path / "a.db", policy=example_policy(), region="us",
                            device_secret=secret)  # fmt: skip
    assert store.keys.upload_key(spec) == keyed
    store.close()
    again = EventStore.open(tmp_path / "a.db", policy=example_policy(), region="us",
                            device_secret=secret)  # fmt: skip
    assert again.keys.upload_key(spec) == keyed
    again.close()
    with pytest.raises(StoreError, match="cannot be replaced"):
        EventStore.open(tmp_path / "a.db", policy=example_policy(), region="us",
                        device_secret=bytes(32))  # fmt: skip
    other = EventStore.open(tmp_path / "b.db", policy=example_policy(), region="us")
    assert other.keys.upload_key(spec) != keyed  # a random secret of its own
    other.close()
    with pytest.raises(ValueError, match="32 bytes"):
        EventStore.open(tmp_path / "c.db", policy=example_policy(), region="us",
                        device_secret=b"short")  # fmt: skip


def test_a_replay_among_new_events_stores_only_the_new_ones(
    open_store: StoreFactory, events: Events
) -> None:
    store = open_store()
    old = events("play_end")
    store.append(old)
    batch = [events("play_end"), old, events("skip"), dict(old)]
    result = store.append_many(batch)
    assert (result.accepted, result.duplicate_ids) == (2, (old["event_id"], old["event_id"]))
    seqs = [r[0] for r in peek(store, "SELECT seq FROM events ORDER BY seq")]
    assert seqs == [1, 2, 3], "the new events follow on, without a gap"
    stats = store.derived_state()["track_stats"][0]
    assert (stats["plays"], stats["skips"]) == (2, 1)


def test_a_conflict_names_its_place_in_the_batch_as_sent(
    open_store: StoreFactory, events: Events
) -> None:
    store = open_store()
    play = events("play_end")
    store.append(play)
    expired = events("like")
    expired["ts"] = (T0 - timedelta(days=400)).isoformat()  # dropped by retention, not stored
    with pytest.raises(EventConflict) as caught:
        store.append_many([expired, events("like"), {**play, "ms_played": 1}])
    assert caught.value.index == 2


_KINDS = ["play_start", "play_end", "pause", "skip", "seek", "like", "dislike", "search",
          "context"]  # fmt: skip


@st.composite
def _facts(draw: st.DrawFn) -> list[Fact]:
    """Facts of two users with ties in time, gaps beyond a session, missing artists."""
    unit = draw(st.sampled_from([1, 1_000, 20 * 60_000]))
    facts = []
    for seq in draw(st.lists(st.integers(1, 10_000), unique=True, max_size=80)):
        kind = draw(st.sampled_from(_KINDS))
        track = None
        if kind not in ("search", "context"):
            track = draw(st.sampled_from(["t0", "t1", "t2", "t-uncatalogued"]))
        facts.append(Fact(
            seq=seq, user=draw(st.sampled_from([1, 2])), type=kind,
            ts=draw(st.integers(0, 6)) * unit, track=track,
            artist=draw(st.sampled_from([None, "a0", "a1"])) if track else None,
            ms_played=draw(st.integers(0, 300_000)) if kind == "play_end" else 0,
            duration_ms=draw(st.integers(1, 300_000)) if kind in ("play_start", "play_end") else 0,
            position_ms=draw(st.integers(0, 60_000)) if kind == "skip" else 0,
            context=(draw(st.sampled_from(["phone", "car"])), "wifi", "08:30:00")
            if kind == "context" else None,
        ))  # fmt: skip
    return facts


@settings(max_examples=300, deadline=None)
@given(facts=_facts())
def test_the_batch_derivation_equals_the_fact_by_fact_one(facts: list[Fact]) -> None:
    vectors = {f"t{i}": np.array([i, 1.0 - i, 0.5]) for i in range(3)}
    expected = derive(facts, vectors).rows()
    got = derive_columns(FactBatch.of(facts), lambda _: vectors)
    assert sorted(got.tracks, key=repr) == sorted(expected.tracks, key=repr)
    assert sorted(got.artists, key=repr) == sorted(expected.artists, key=repr)
    assert {u: sorted(r, key=repr) for u, r in got.runs.items()} == {
        u: sorted(r, key=repr) for u, r in expected.runs.items()
    }
    assert got.context == expected.context
    assert got.taste.keys() == expected.taste.keys()
    for user, taste in expected.taste.items():
        mine = got.taste[user]
        assert (mine.ref, mine.weight) == (taste.ref, pytest.approx(taste.weight, rel=1e-9))
        assert np.allclose(mine.total, taste.total, rtol=1e-9, atol=1e-9)  # exp: C vs numpy


def test_large_batches_derive_what_a_rebuild_derives(open_store: StoreFactory) -> None:
    """Batches this large take the column-wise derivation; a rebuild goes fact by fact."""
    assert SMALL_BATCH < 300
    rng = random.Random(4)
    tracks, rows = make_catalog(rng, artists_per_genre=3, tracks_per_artist=4)
    history = listen(rng, "ann", tracks, {0, 1}, 1_200)
    end = max(datetime.fromisoformat(e["ts"]) for e in history) + timedelta(minutes=1)
    store = open_store(clock=lambda: end)
    store.upsert_catalog(rows[: len(rows) // 2])  # the other half is not in the catalog
    history += [{**e, "user_id": "bob", "event_id": f"bob-{e['event_id']}"} for e in history[:300]]
    for start in range(0, len(history), 500):
        batch = history[start : start + 500]
        assert store.append_many(batch).accepted == len(batch)
    appended = store.derived_state()
    assert store.rebuild_derived() == len(history)
    rebuilt = store.derived_state()
    for table in ("track_stats", "artist_stats", "sessions", "context"):
        assert appended[table] == rebuilt[table], table
    for mine, theirs in zip(appended["taste"], rebuilt["taste"], strict=True):
        assert mine["vector"] == pytest.approx(theirs["vector"], rel=1e-9, abs=1e-12)
