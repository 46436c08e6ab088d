"""Hostile and sloppy events: what an app hands the store is stored as sent or refused by
field, never coerced; an event timed far ahead of the device's clock is refused, since it would
steer the session and the taste vector until its time came and outlive every retention."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import NOW, Events, StoreFactory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sottovoce.device import CatalogError, EventConflict, EventStore, InvalidEventBatch
from sottovoce.policy import InvalidPolicy, Policy, example_policy, policy_from_data


def _refused(store: EventStore, batch: list[dict[str, Any]]) -> list[tuple[int | None, str, str]]:
    """The (index, field, rule) of each error of a refused batch; checks nothing was kept."""
    before = (store.count(), store.derived_state(), store.decisions.size)
    with pytest.raises(InvalidEventBatch) as caught:
        store.append_many(batch)
    assert (store.count(), store.derived_state(), store.decisions.size) == before
    for error in caught.value.errors:
        assert error.field in str(error) and error.rule in str(error)
    return [(e.index, e.field, e.rule) for e in caught.value.errors]


def _with_skew(skew: str) -> Policy:
    data = example_policy().model_dump(mode="json")
    for region in data["regions"]:
        region["clock_skew"] = skew
    return policy_from_data(data)


# -- finding 3: events from the future --------------------------------------------------------


def test_an_event_from_2099_is_refused_by_field_and_id(
    open_store: StoreFactory, events: Events
) -> None:
    store = open_store()  # its clock reads NOW
    store.append_many([events("play_end"), events("like")])
    future = events("play_end", track_id="t9")
    future["ts"] = "2099-06-01T12:00:00Z"
    with pytest.raises(InvalidEventBatch) as caught:
        store.append_many([events("skip"), future])
    (error,) = caught.value.errors
    assert (error.index, error.event_id, error.field, error.rule) == (
        1, future["event_id"], "ts", "ts_ahead_of_clock")  # fmt: skip
    assert "2099-06-01T12:00:00+00:00" in str(error) and "5m" in str(error)
    # Nothing of the batch steers anything: the session still ends at the last real event.
    (session,) = store.derived_state("user-1")["sessions"]
    assert session["end_ts"] < int((NOW + timedelta(minutes=5)).timestamp() * 1000)
    assert store.count() == 2


def test_the_allowance_is_the_regions_clock_skew(
    open_store: StoreFactory, events: Events, tmp_path: Path
) -> None:
    def at(delta: timedelta) -> dict[str, Any]:
        event = events("like")
        event["ts"] = (NOW + delta).isoformat()
        return event

    store = open_store()  # the example policy's default: five minutes
    assert store.region.clock_skew == timedelta(minutes=5)
    assert store.append(at(timedelta(minutes=4, seconds=59))).accepted == 1
    assert _refused(store, [at(timedelta(minutes=5, seconds=1))]) == [
        (0, "ts", "ts_ahead_of_clock")]  # fmt: skip
    with EventStore.open(tmp_path / "lenient.db", policy=_with_skew("1h"), region="us",
                         clock=lambda: NOW) as lenient:  # fmt: skip
        assert lenient.append(at(timedelta(minutes=59))).accepted == 1
        assert _refused(lenient, [at(timedelta(minutes=61))]) == [(0, "ts", "ts_ahead_of_clock")]


def test_the_allowance_follows_the_stores_clock_not_the_wall_clock(
    open_store: StoreFactory, events: Events
) -> None:
    later = datetime(2099, 6, 1, 12, 0, tzinfo=UTC)  # a device whose clock says 2099
    store = open_store(name="later.db", clock=lambda: later)
    event = events("like")
    event["ts"] = later.isoformat()
    assert store.append(event).accepted == 1


@pytest.mark.parametrize(
    ("skew", "rule"),
    [
        ("0s", "positive_duration"),
        ("2d", "clock_skew_bound"),
        ("soon", "time_delta_parsing"),
        (True, "duration"),
    ],
)
def test_a_policy_clock_skew_is_checked_when_loaded(skew: object, rule: str) -> None:
    with pytest.raises(InvalidPolicy) as caught:
        _with_skew(skew)  # type: ignore[arg-type]
    assert {(p.field, p.rule) for p in caught.value.problems} == {
        ("regions[0].clock_skew", rule), ("regions[1].clock_skew", rule)}  # fmt: skip


# -- finding 11: strict types, no coercion ----------------------------------------------------

SECONDS = int(NOW.timestamp())


@pytest.mark.parametrize(
    ("change", "field", "rule"),
    [
        ({"ms_played": "185000"}, "ms_played", "int_type"),
        ({"ms_played": True}, "ms_played", "int_type"),
        ({"ms_played": 185000.0}, "ms_played", "int_type"),
        ({"duration_ms": "200000"}, "duration_ms", "int_type"),
        ({"ts": SECONDS - 60}, "ts", "iso_datetime"),  # seconds or ms? a guess either way
        ({"ts": (SECONDS - 60) * 1000}, "ts", "iso_datetime"),
        ({"ts": str(SECONDS - 60)}, "ts", "iso_datetime"),
        ({"ts": 1.5e9}, "ts", "iso_datetime"),
        ({"event_id": "e\x001"}, "event_id", "id_characters"),
        ({"track_id": "t1\x00"}, "track_id", "id_characters"),
        ({"artist_id": "a\x1b[31m"}, "artist_id", "id_characters"),
        ({"device_id": "d\x00"}, "device_id", "id_characters"),
        ({"user_id": "user-1\x00admin"}, "user_id", "user_id_characters"),
        ({"track_id": b"t1"}, "track_id", "string_type"),
    ],
)
def test_loose_input_is_refused_by_field(
    open_store: StoreFactory, events: Events, change: dict[str, Any], field: str, rule: str
) -> None:
    bad = {**events("play_end", ms_played=185_000), **change}
    assert _refused(open_store(), [events("like"), bad]) == [(1, field, rule)]


def test_free_text_and_times_of_day_are_strict_too(
    open_store: StoreFactory, events: Events
) -> None:
    store = open_store()
    batch = [events("search", query="night\x00drive"), events("navigate", screen="\x00"),
             events("context", local_time=30600), events("search", results="3")]  # fmt: skip
    assert _refused(store, batch) == [(0, "query", "text_characters"),
                                      (1, "screen", "text_characters"),
                                      (2, "local_time", "iso_time"),
                                      (3, "results", "int_type")]  # fmt: skip
    # A query may hold any other character, a newline among them.
    assert store.append(events("search", query="night\ndrive \u00e9")).accepted == 1


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({"track_id": "t\x00", "vector": [1.0]}, "track_id"),
        ({"track_id": b"t1", "vector": [1.0]}, "track_id"),
        ({"track_id": "t1", "artist_id": "a\x00", "vector": [1.0]}, "artist_id"),
        ({"track_id": "t1", "vector": ["0.5"]}, "vector.0"),
        ({"track_id": "t1", "vector": [True]}, "vector.0"),
    ],
)
def test_catalog_rows_are_strict_too(
    open_store: StoreFactory, item: dict[str, Any], field: str
) -> None:
    store = open_store()
    with pytest.raises(CatalogError, match=field.replace(".", r"\.")):
        store.upsert_catalog([{"track_id": "t0", "vector": [0.0]}, item])
    assert store.count("catalog") == 0
    assert store.upsert_catalog([{"track_id": "t1", "vector": [1, 0.5]}]) == 1  # ints are exact


loose = st.one_of(
    st.integers(-(2**40), 2**40),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(0, 86_400_000).map(str),
    st.text(max_size=12),
    st.sampled_from(["t1\x00", "a\x00", "\x7f", "2026-11-01T10:00:00Z", "185000", "08:30"]),
)
FIELDS = ("event_id", "device_id", "track_id", "artist_id", "ms_played", "duration_ms", "ts")


@pytest.fixture
def fuzz_store(open_store: StoreFactory) -> EventStore:
    return open_store(name="fuzz.db")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])  # fmt: skip
@given(field=st.sampled_from(FIELDS), value=loose)
def test_what_is_stored_is_what_was_sent(fuzz_store: EventStore, field: str, value: Any) -> None:
    """Any value in any field is either refused naming that field, or stored unchanged: the
    same value of the same type (a time as the same instant)."""
    event = Events("user-1")("play_end", ms_played=185_000)
    event["event_id"] = f"fuzz-{fuzz_store.count()}"
    event[field] = value
    try:
        fuzz_store.append(event)
    except InvalidEventBatch as refused:
        assert {e.field for e in refused.errors} == {field}
        return
    except EventConflict:  # a drawn event id that an earlier example stored
        assert field == "event_id"
        return
    (stored,) = [e for e in fuzz_store.export_user("user-1")["events"]
                 if e["event_id"] == event["event_id"]]  # fmt: skip
    if field == "ts":
        assert isinstance(value, str)
        assert datetime.fromisoformat(stored["ts"]) == datetime.fromisoformat(value)
    else:
        assert type(stored[field]) is type(value) and stored[field] == value
        if isinstance(value, str):
            assert not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in value)
