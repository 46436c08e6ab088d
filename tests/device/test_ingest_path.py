"""The batched append path's shortcuts give what the plain code gives: event bodies byte for
byte, event times in epoch milliseconds, the collector held off for one append and left as it
was found."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from conftest import NOW, Events, StoreFactory
from hypothesis import given
from hypothesis import strategies as st
from store_peek import peek

from sottovoce.device import EventStore, InvalidEventBatch, PlayEnd
from sottovoce.device._derive_columns import SMALL_BATCH
from sottovoce.device._events import EVENT_LIST_ADAPTER
from sottovoce.device._rows import encode, epoch_ms, to_ms

# Times an event may hold (2000 to 2100), a day inside at each end for the offsets.
instants = st.datetimes(min_value=datetime(2000, 1, 2), max_value=datetime(2099, 12, 30))
offsets = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
zones = st.one_of(offsets, st.just(UTC), st.just(ZoneInfo("Europe/Paris")))


TYPES = ("play_start", "play_end", "pause", "resume", "skip", "seek", "like", "dislike",
         "search", "navigate", "context")  # fmt: skip
ids = st.text(st.characters(exclude_categories=("Cc", "Zs", "Zl", "Zp", "Cs")), min_size=1,
              max_size=12).filter(lambda t: not any(c.isspace() for c in t))  # fmt: skip
texts = st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)),
                min_size=1, max_size=40)  # fmt: skip
OPTIONAL = {
    "device_id": ids, "artist_id": st.one_of(st.none(), ids), "context_id": ids,
    "context_type": st.sampled_from(["playlist", "album", "radio"]), "results": st.integers(0, 99),
    "duration_ms": st.integers(1, 10**6), "position_ms": st.integers(0, 10**6),
}  # fmt: skip


@st.composite
def valid_events(draw: st.DrawFn) -> dict[str, Any]:
    """A valid event of any type, with optional fields set or not and ids and text of any
    characters the schema allows (quotes, backslashes, other scripts)."""
    kind = draw(st.sampled_from(TYPES))
    event = Events(draw(ids))(kind, event_id=draw(ids))
    moment = draw(instants).replace(tzinfo=draw(offsets))
    event["ts"] = draw(st.sampled_from([moment, moment.isoformat()]))
    if kind in {"search", "navigate"}:
        event["query" if kind == "search" else "screen"] = draw(texts)
    if kind == "context":
        event["local_time"] = draw(st.sampled_from(["08:30", "23:59:59", "00:00:00.250"]))
    model = EVENT_LIST_ADAPTER.validate_python([event])[0]
    for name, values in OPTIONAL.items():
        if name in type(model).model_fields and draw(st.booleans()):
            event[name] = draw(values)
    return event


@given(batch=st.lists(valid_events(), min_size=1, max_size=12))
def test_bodies_are_pydantics_json_without_the_user_id(batch: list[dict[str, Any]]) -> None:
    parsed = EVENT_LIST_ADAPTER.validate_python(batch)
    times, bodies = encode(parsed)
    assert bodies == [e.model_dump_json(exclude={"user_id"}) for e in parsed]
    assert times == [to_ms(e.ts) for e in parsed]


def test_an_event_of_an_apps_own_class_has_its_classs_body(events: Events) -> None:
    class Finished(PlayEnd):
        """An app's subclass (its own methods, no other fields)."""

    fields = events("play_end", device_id='d"1')
    mine, plain = Finished.model_validate(fields), PlayEnd.model_validate(fields)
    bodies = encode(EVENT_LIST_ADAPTER.validate_python([mine, plain]))[1]
    assert bodies == [plain.model_dump_json(exclude={"user_id"})] * 2


def _parsed(times: list[str]) -> list[datetime]:
    """Times as the append path sees them: parsed from text by the event model."""
    events = [{"type": "like", "event_id": f"e{i}", "user_id": "u", "track_id": "t", "ts": ts}
              for i, ts in enumerate(times)]  # fmt: skip
    return [event.ts for event in EVENT_LIST_ADAPTER.validate_python(events)]


@given(naive=st.lists(instants, min_size=1, max_size=30), zone=offsets)
def test_times_parsed_with_one_offset_convert_exactly(naive: list[datetime], zone: Any) -> None:
    stamps = _parsed([t.replace(tzinfo=zone).isoformat() for t in naive])
    assert epoch_ms(stamps) == [to_ms(ts) for ts in stamps]


@given(naive=st.lists(st.tuples(instants, zones), min_size=1, max_size=30))
def test_times_in_any_zones_convert_exactly(naive: list[tuple[datetime, Any]]) -> None:
    """Instances as an app hands them: one zone object or several, with or without a fixed
    offset (Paris changes its offset twice a year)."""
    stamps = [t.replace(tzinfo=zone) for t, zone in naive]
    assert epoch_ms(stamps) == [to_ms(ts) for ts in stamps]


def test_one_zone_with_daylight_saving_is_not_taken_for_a_fixed_offset() -> None:
    paris = ZoneInfo("Europe/Paris")
    winter = datetime(2026, 1, 15, 12, tzinfo=paris)
    summer = datetime(2026, 7, 15, 12, tzinfo=paris)
    assert epoch_ms([winter, summer]) == [to_ms(winter), to_ms(summer)]
    assert to_ms(summer) - to_ms(winter) == (181 * 24 - 1) * 3600 * 1000


def test_utc_text_shares_one_zone_object() -> None:
    """What makes the fast conversion apply to the common batch (all in UTC, from text)."""
    stamps = _parsed(["2026-11-01T09:00:00Z", "2026-11-01T10:00:00+00:00", "2026-11-02T00:00Z"])
    assert len({id(ts.tzinfo) for ts in stamps}) == 1
    assert epoch_ms(stamps) == [to_ms(ts) for ts in stamps]


@pytest.mark.parametrize("size", [8, 2 * SMALL_BATCH])  # fact by fact, and column-wise
def test_counter_rows_keep_their_nulls(open_store: StoreFactory, events: Events, size: int) -> None:
    """Nullable counter columns are bound as marks: what is stored is NULL all the same, on a
    new row and on one merged into (an upsert's ``excluded`` row)."""
    store = open_store()
    store.upsert_catalog([{"track_id": "t9", "artist_id": "a9", "vector": [1.0, 0.0]}])
    short = [events("play_end", track_id=f"t{i % 4}", ms_played=1_000) for i in range(size)]
    short[0] = events("play_end", track_id="unknown", artist_id=None, ms_played=1_000)
    short[1] = events("play_end", track_id="t9", artist_id=None, ms_played=1_000)
    for _ in range(2):  # the second batch merges into the rows the first made
        store.append_many(short)
        short = [dict(e, event_id=f"{e['event_id']}+") for e in short]
    marks = peek(store, "SELECT count(*) FROM track_stats WHERE artist_id = '' OR "
                 "feedback_ts = -1 OR feedback_seq = -1 OR last_played_ts = -1")  # fmt: skip
    assert marks == [(0,)]
    assert peek(store, "SELECT count(*) FROM artist_stats WHERE feedback_ts = -1 OR "
                "feedback_seq = -1 OR last_played_ts = -1") == [(0,)]  # fmt: skip
    rows = {r["track_id"]: r for r in store.derived_state()["track_stats"]}
    assert rows["unknown"]["artist_id"] is None and rows["t9"]["artist_id"] == "a9"
    assert {(r["feedback_ts"], r["feedback_seq"], r["last_played_ts"]) for r in rows.values()} == {
        (None, None, None)
    }
    store.append(events("like", track_id="t1"))
    store.append_many([dict(e, event_id=f"{e['event_id']}+") for e in short])
    liked = {r["track_id"]: r for r in store.derived_state()["track_stats"]}["t1"]
    assert liked["feedback"] == 1 and liked["feedback_ts"] is not None, "kept through a merge"
    appended = store.derived_state()
    store.rebuild_derived()  # one merge into empty tables, where appends merged into rows
    assert store.derived_state() == appended


class Probe:
    """The stores' clock, noting whether the collector was on each time the store asked."""

    def __init__(self) -> None:
        self.collector_on: list[bool] = []

    def __call__(self) -> datetime:
        self.collector_on.append(gc.isenabled())
        return NOW


@pytest.fixture
def collector() -> Iterator[None]:
    """The collector's setting, restored after the test."""
    enabled = gc.isenabled()
    try:
        yield
    finally:
        (gc.enable if enabled else gc.disable)()


def probed(open_store: StoreFactory) -> tuple[EventStore, Probe]:
    """A store whose clock notes the collector's setting, the collector on, nothing noted."""
    probe = Probe()
    store = open_store(clock=probe)
    gc.enable()
    del probe.collector_on[:]
    return store, probe


@pytest.mark.usefixtures("collector")
def test_an_append_holds_the_collector_off_and_turns_it_back_on(
    open_store: StoreFactory, events: Events
) -> None:
    store, probe = probed(open_store)
    assert store.append_many([events("play_end") for _ in range(200)]).accepted == 200
    assert probe.collector_on and not any(probe.collector_on), "off while appending"
    assert gc.isenabled()


@pytest.mark.usefixtures("collector")
def test_a_refused_append_turns_the_collector_back_on(
    open_store: StoreFactory, events: Events
) -> None:
    store, probe = probed(open_store)
    ahead = {**events("like"), "ts": (NOW + timedelta(days=1)).isoformat()}
    with pytest.raises(InvalidEventBatch):  # refused after the clock was read
        store.append_many([events("like"), ahead])
    assert probe.collector_on == [False]
    assert gc.isenabled()


@pytest.mark.usefixtures("collector")
def test_an_append_leaves_a_collector_turned_off_off(
    open_store: StoreFactory, events: Events
) -> None:
    store = open_store()
    gc.disable()
    assert store.append_many([events("like") for _ in range(50)]).accepted == 50
    assert not gc.isenabled()
