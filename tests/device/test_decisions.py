"""The device's own decision log: every enforcement point is logged, without personal data."""

from __future__ import annotations

from datetime import timedelta

import pytest
from conftest import T0, Events, StoreFactory
from store_peek import peek

from sottovoce.device import EventConflict, EventStore
from sottovoce.policy import AgeRestricted, ConsentMissing, DecisionEngine, Purpose

CANARIES = ("canary-user-7f3a", "canary-device-91bc", "canary-track-55d0", "canary-artist-0e1f",
            "canary query text", "canary-event-id-c4")  # fmt: skip


def _log_bytes(store: EventStore) -> str:
    rows = peek(store, "SELECT entry FROM decision_log")
    notes = peek(store, "SELECT note FROM decision_log_checkpoints")
    return "\n".join(r[0] for r in rows + notes)


def test_every_enforcement_point_is_logged(open_store: StoreFactory, events: Events) -> None:
    store = open_store("eu")
    with pytest.raises(AgeRestricted):
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
        ("apply_policy", "allow", "policy_applied"),
        ("store_events", "deny", "age_restricted"),
        ("record_consent", "allow", "age_recorded"),
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
    assert log.decision(6).metrics == {"granted": False, "deleted_events": 2,
                                       "deleted_track_stats": 1, "deleted_artist_stats": 1,
                                       "deleted_sessions": 1, "deleted_taste": 0,
                                       "deleted_context": 0, "deleted_model_state": 0}  # fmt: skip
    report = log.verify()
    assert report.ok and report.checkpoints == 1 and report.unsigned == 1


def test_a_refused_batch_is_logged_but_stores_nothing(
    open_store: StoreFactory, events: Events
) -> None:
    store = open_store("eu")
    with pytest.raises(AgeRestricted):
        store.append_many([events("like"), events("skip")])
    assert store.count() == 0 and store.count("users") == 0
    assert store.decisions.size == 2 and not store.decisions.decision(1).allowed


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
    assert [d["action"] for d in mine] == ["store_events", "export"]
    assert mine[0]["reason"] == "opt_out_default"
    assert [d["index"] for d in mine] == [1, 3]
    store.erase_user("ann")
    assert store.export_user("ann")["decisions"] == []
    ((links,),) = peek(store, "SELECT count(*) FROM decision_subjects")
    assert links == 1, "only bob's decision is still linked to a user"
    assert store.decisions.size == 6 and store.decisions.verify().ok


def test_decisions_are_in_the_same_transaction_as_the_action(
    open_store: StoreFactory, events: Events
) -> None:
    store = open_store("us")
    good, bad = events("like"), events("like")
    store.append(good)
    store.grant("user-1", Purpose.PERSONALIZATION)  # a change of reason: logged on next append
    size = store.decisions.size
    with pytest.raises(EventConflict):
        store.append_many([events("skip"), {**good, "track_id": "other"}])
    assert store.decisions.size == size, "a rolled-back append leaves no decision behind"
    store.append(bad)  # the decision the rolled-back append could not log is logged now
    assert store.decisions.size == size + 1 and store.decisions.verify().ok
    assert store.decisions.decision(size).reason == "consent_given"


def test_erasure_keeps_an_opt_out(open_store: StoreFactory, events: Events) -> None:
    store = open_store("us")
    store.append(events("like"))
    store.withdraw("user-1", Purpose.PERSONALIZATION)
    store.erase_user("user-1")
    with pytest.raises(ConsentMissing, match="withdrew"):
        store.append(events("like"))
    assert store.count() == 0
    store.grant("user-1", Purpose.PERSONALIZATION)  # opting in again lifts the objection
    assert store.append(events("like")).accepted == 1


def test_erasure_deletes_the_key_that_tied_decisions_to_the_user(
    open_store: StoreFactory, events: Events
) -> None:
    store = open_store("us")
    store.grant("user-1", Purpose.ANALYTICS)
    ((subject,),) = peek(store, "SELECT subject FROM users")
    ((key,),) = peek(store, "SELECT value FROM meta WHERE key = 'digest_key'")
    engine = DecisionEngine(store.policy, "us", digest_key=bytes.fromhex(key))
    logged = store.decisions.decision(store.decisions.size - 1)
    inputs = {"action": "record_consent", "subject": subject, "purpose": "analytics"}
    assert engine.digest(inputs) == logged.inputs_digest  # the link, while it exists
    store.erase_user("user-1")
    assert peek(store, "SELECT count(*) FROM users WHERE subject = ?", [subject]) == [(0,)]


def test_a_replay_after_retention_is_not_counted_again(policy: object, tmp_path: object) -> None:
    from datetime import timedelta as td
    from pathlib import Path

    now = [T0 + td(days=1)]
    store = EventStore.open(Path(str(tmp_path)) / "r.db", policy=policy, region="eu",  # type: ignore[arg-type]
                            clock=lambda: now[0])  # fmt: skip
    store.set_age("user-1", 30)
    store.grant("user-1", Purpose.PERSONALIZATION)
    play = Events()("play_end")
    store.append(play)
    now[0] = T0 + td(days=40)
    assert store.purge_expired().deleted["events"] == 1
    result = store.append(play)  # an offline device uploads it again
    assert result.accepted == 0 and result.expired_ids == (play["event_id"],)
    assert result.expired == 1 and result.retention_cutoff == now[0] - td(days=30)
    assert str(result) == (
        "stored 0 new events, 0 replays ignored, 1 dropped: already past the region's raw-event "
        "retention (older than 2026-11-11T09:00:00+00:00)"
    )
    assert store.derived_state()["track_stats"][0]["plays"] == 1
    store.close()


def test_an_age_below_the_minimum_purges_personal_data(eu_store: object, events: Events) -> None:
    from sottovoce.device import EventStore

    assert isinstance(eu_store, EventStore)
    eu_store.append(events("play_end"))
    report = eu_store.set_age("user-1", 12)
    assert report.deleted["events"] == 1 and eu_store.count() == 0
    last = eu_store.decisions.decision(eu_store.decisions.size - 1)
    assert (last.reason, last.metrics["deleted_events"]) == ("age_restricted", 1)


def test_a_policy_change_is_logged(tmp_path: object) -> None:
    from pathlib import Path

    from sottovoce.device import EventStore
    from sottovoce.policy import example_policy, policy_from_data

    path = Path(str(tmp_path)) / "p.db"
    first = example_policy()
    EventStore.open(path, policy=first, region="us", clock=lambda: T0).close()
    EventStore.open(path, policy=first, region="us", clock=lambda: T0).close()  # same: quiet
    data = first.model_dump(mode="json")
    data["version"] = "2026.12.1"
    second = policy_from_data(data)
    store = EventStore.open(path, policy=second, region="us", clock=lambda: T0)
    applied = [d for _, d in store.decisions.query(action="apply_policy")]
    assert [d.policy_hash for d in applied] == [first.hash, second.hash]
    assert first.hash[:16] in applied[1].sentence
    store.close()
