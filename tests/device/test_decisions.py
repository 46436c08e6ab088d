"""The device's own decision log: every enforcement point is logged, without personal data."""

from __future__ import annotations

from datetime import timedelta

import pytest
from conftest import T0, Events, StoreFactory

from sottovoce.policy import ConsentMissing, Purpose

CANARIES = ("canary-user-7f3a", "canary-device-91bc", "canary-track-55d0", "canary-artist-0e1f",
            "canary query text", "canary-event-id-c4")  # fmt: skip


def _log_bytes(store: object) -> str:
    db = store.db  # type: ignore[attr-defined]
    rows = db.execute("SELECT entry FROM decision_log").fetchall()
    notes = db.execute("SELECT note FROM decision_log_checkpoints").fetchall()
    return "\n".join(r[0] for r in rows + notes)


def test_every_enforcement_point_is_logged(open_store: StoreFactory, events: Events) -> None:
    store = open_store("eu")
    with pytest.raises(Exception, match="age"):
        store.append(events("like"))  # refused: logged
    store.set_age("user-1", 30)
    store.grant("user-1", Purpose.PERSONALIZATION)
    store.append_many([events("play_end"), events("like")])
    store.export_user("user-1")
    store.withdraw("user-1", Purpose.PERSONALIZATION)
    with pytest.raises(ConsentMissing):
        store.append(events("like"))
    store.purge_expired(now=T0 + timedelta(days=365))
    store.erase_user("user-1")
    log = store.decisions
    got = [(d.action.value, d.outcome.value, d.reason) for _, d in log.query()]
    assert got == [
        ("store_events", "deny", "age_restricted"),
        ("record_consent", "allow", "consent_recorded"),
        ("store_events", "allow", "consent_given"),
        ("export", "allow", "user_request"),
        ("record_consent", "allow", "consent_recorded"),
        ("store_events", "deny", "consent_missing"),
        ("purge_retention", "allow", "retention_ttl"),
        ("erase", "allow", "user_request"),
    ]
    for _, decision in log.query():
        assert decision.policy_hash == store.policy.hash and decision.region == "eu"
        assert decision.sentence.endswith(".")
    assert log.decision(4).metrics == {"granted": False, "deleted_events": 2,
                                       "deleted_track_stats": 1, "deleted_artist_stats": 1,
                                       "deleted_sessions": 1, "deleted_taste": 0,
                                       "deleted_context": 0}  # fmt: skip
    report = log.verify()
    assert report.ok and report.checkpoints == 1 and report.unsigned == 1


def test_a_refused_batch_is_logged_but_stores_nothing(
    open_store: StoreFactory, events: Events
) -> None:
    store = open_store("eu")
    with pytest.raises(Exception, match="age"):
        store.append_many([events("like"), events("skip")])
    assert store.count() == 0 and store.count("users") == 0
    assert store.decisions.size == 1 and not store.decisions.decision(0).allowed


def test_no_personal_data_in_the_log(open_store: StoreFactory) -> None:
    store = open_store("us")
    user, device, track, artist, query, event_id = CANARIES
    store.upsert_catalog([{"track_id": track, "artist_id": artist, "vector": [1.0, 2.0]}])
    made = Events(user)
    batch = [
        {**made("play_end", track_id=track, artist_id=artist), "device_id": device},
        {**made("search", query=query), "event_id": event_id},
        made("like", track_id=track),
    ]
    store.append_many(batch)
    store.grant(user, Purpose.FEDERATED_TRAINING)
    store.export_user(user)
    store.purge_expired()
    store.withdraw(user, Purpose.PERSONALIZATION)
    store.erase_user(user)
    text = _log_bytes(store)
    assert store.decisions.size >= 6
    for canary in (*CANARIES, store.user_hash(user)):
        assert canary not in text, canary


def test_access_request_shows_decisions_about_the_user_and_erasure_unlinks_them(
    open_store: StoreFactory,
) -> None:
    store = open_store("us")
    ann, bob = Events("ann"), Events("bob")
    store.append(ann("like"))
    store.append(bob("like"))
    store.append(ann("skip"))
    mine = store.export_user("ann")["decisions"]
    assert [d["action"] for d in mine] == ["store_events", "store_events", "export"]
    assert all(d["reason"] == "opt_out_default" for d in mine[:2])
    assert [d["index"] for d in mine] == [0, 2, 3]
    store.erase_user("ann")
    assert store.export_user("ann")["decisions"] == []
    links = store.db.execute("SELECT count(*) FROM decision_subjects").fetchone()[0]
    assert links == 1, "only bob's decision is still linked to a user"
    assert store.decisions.size == 6 and store.decisions.verify().ok


def test_decisions_are_in_the_same_transaction_as_the_action(
    open_store: StoreFactory, events: Events
) -> None:
    store = open_store("us")
    good, bad = events("like"), events("like")
    store.append(good)
    with pytest.raises(Exception, match="different content"):
        store.append_many([events("skip"), {**good, "track_id": "other"}])
    assert store.decisions.size == 1, "a rolled-back append leaves no decision behind"
    store.append(bad)
    assert store.decisions.size == 2 and store.decisions.verify().ok
