"""The plain event reader gives exactly what pydantic's path gives, or declines.

Generated batches, valid and broken in the ways apps break them (wrong types, bools and digit
strings for numbers, missing and extra fields, bad ids, naive, malformed or out-of-range
times, odd offsets, unicode): whatever ``plain_rows`` returns equals the rows of pydantic's
validation and the body serializers, and it returns nothing for a batch pydantic refuses. A
store fed either way holds the same rows and derived state and refuses the same way.
"""

from __future__ import annotations

import enum
import random
from datetime import UTC, datetime, time, timedelta, timezone
from typing import Any

import pytest
from conftest import NOW, T0, Events, StoreFactory, consenting
from hypothesis import HealthCheck, given, settings
from hypothesis import event as tally
from hypothesis import strategies as st
from store_peek import peek

from sottovoce.device import EventStore, InvalidEventBatch
from sottovoce.device import _store_events as store_events
from sottovoce.device._events import EVENT_MODELS
from sottovoce.device._plain_events import SMALL_BATCH, plain_rows
from sottovoce.device._plain_rules import MODELS
from sottovoce.device._rows import EventRows, _fact, _revive, _validate, event_rows
from sottovoce.policy import Purpose

TYPES = tuple(model.model_fields["type"].default for model in EVENT_MODELS)


class Text(str):
    """A str subclass: pydantic takes it as text; this reader leaves it to pydantic."""


class Number(enum.IntEnum):
    ONE = 1


plain_ids = st.text(st.sampled_from("abcXYZ019-_.:/é日😀"), min_size=1, max_size=12)
odd_ids = st.sampled_from(["", "a b", "a\tb", "a\x00b", "a\x85b", "a\u2028b", "a\u00a0b",
                           'a"b', "a\\b", "x" * 128, "x" * 129, "\ud800", "a\u200bb", "a\x7fb",
                           Text("abc")])  # fmt: skip
junk = st.sampled_from([None, True, False, 0, 1, -1, 1.0, 2.5, "1000", "", b"x", [], {}, 2**70,
                        Number.ONE, 86_400_000, 86_400_001, datetime(2026, 11, 1, tzinfo=UTC),
                        datetime(2026, 11, 1), time(8, 30), "phone", "wifi"])  # fmt: skip
instants = st.datetimes(min_value=datetime(1999, 12, 30), max_value=datetime(2100, 1, 2))
offsets = st.sampled_from([0, 0, 60, -60, 330, -570, 23 * 60 + 59, -(23 * 60 + 59)])
clock_texts = st.sampled_from(["08:30", "23:59", "00:00:00", "23:59:59", "08:30:15.5", "8:30",
                               "08:60", "24:00", "23:59:60", "08:30Z", "08:30+01:00", "０８:３０",
                               "08:30:00.000000", time(8, 30)])  # fmt: skip
odd_times = st.sampled_from([
    "2026-11-01T09:00:00+24:00", "2026-11-01T09:00:00+00:60", "2026-11-01T09:00:00-00:00",
    "2026-11-01t09:00:00Z", "2026-11-01 09:00:00Z", "2026-11-01T09:00:00z", "2026-11-01T09:00Z",
    "2026-02-29T09:00:00Z", "2028-02-29T09:00:00Z", "2026-13-01T09:00:00Z", "2026-11-00T09:00:00Z",
    "2026-11-31T09:00:00Z", "2026-11-01T24:00:00Z", "2026-11-01T23:59:60Z", "2026-11-01T09:00:00",
    "2026-11-01", "1999-12-31T23:59:59.999999Z", "2000-01-01T00:00:00Z",
    "2000-01-01T00:30:00+01:00", "2099-12-31T23:59:59.999999Z", "2099-12-31T23:30:00-01:00",
    "2100-01-01T00:00:00Z", "2026-11-01T09:00:00.000000Z", "2026-11-01T09:00:00.5Z",
    "2026-11-01T09:00:00.1234567Z", "2026-11-01T09:00:00,123456Z", "２０２６-11-01T09:00:00Z",
    "2026-11-01T09:00:00+0100", "2026-11-01T09:00:00+01", "20261101T090000Z", "1762000000",
])  # fmt: skip


@st.composite
def stamps(draw: st.DrawFn) -> Any:
    """A time as an app might send it: ISO text in several shapes (most of them the ones
    pydantic writes), sometimes an odd text or a value of another kind."""
    moment = draw(instants).replace(tzinfo=timezone(timedelta(minutes=draw(offsets))))
    if draw(st.booleans()):
        moment = moment.replace(microsecond=0)
    text = moment.isoformat()
    shape = draw(st.sampled_from(["iso", "iso", "z", "odd", "junk"]))
    if shape == "z" and moment.utcoffset() == timedelta(0):
        return text.replace("+00:00", "Z")
    if shape == "odd":
        return draw(odd_times)
    return draw(junk) if shape == "junk" else text


@st.composite
def plain_events(draw: st.DrawFn, *, broken: bool) -> Any:
    """An event of any type with optional fields set or not; ``broken``: some fields
    dropped, replaced by odd values, or added."""
    kind = draw(st.sampled_from(TYPES))
    event = Events(draw(plain_ids))(kind, event_id=draw(plain_ids))
    if kind in {"search", "navigate"}:
        event["query" if kind == "search" else "screen"] = draw(plain_ids)
    fields = MODELS[kind].fields
    maybe_null = st.one_of(st.none(), plain_ids)
    for name, value in {"device_id": maybe_null, "artist_id": maybe_null, "context_id": maybe_null,
                        "context_type": st.sampled_from([None, "album", "radio"]),
                        "results": st.integers(0, 99), "duration_ms": st.integers(1, 10**6),
                        "position_ms": st.integers(0, 10**6), "schema_version": st.just(1),
                        }.items():  # fmt: skip
        if name in fields and name not in event and draw(st.booleans()):
            event[name] = draw(value)
    if kind == "skip" and draw(st.booleans()):
        event["duration_ms"] = None
    if not broken:
        return event
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        name = draw(st.sampled_from(sorted(event, key=str)))
        action = draw(st.sampled_from(["drop", "odd", "junk", "add", "time", "clock"]))
        if action == "drop":
            event.pop(name, None)
        elif action == "odd":
            event[name] = draw(odd_ids)
        elif action == "junk":
            event[name] = draw(junk)
        elif action == "add":
            event[draw(st.sampled_from(["extra", "ms_played", "query", 1]))] = draw(junk)
        elif action == "time":
            event["ts"] = draw(stamps())
        elif kind == "context":
            event["local_time"] = draw(clock_texts)
    return draw(st.sampled_from([event] * 6 + [dict(event).items(), None]))


def pydantic_rows(items: list[Any]) -> list[list[Any]] | None:
    try:
        return columns(event_rows(_validate(items)))
    except InvalidEventBatch:
        return None


def columns(rows: EventRows | None) -> list[list[Any]] | None:
    """The rows' columns, as lists (a column may be any sequence)."""
    return None if rows is None else [list(column) for column in rows]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(plain_events(broken=True), min_size=1, max_size=8), shared=stamps())
def test_whatever_it_reads_pydantic_reads_the_same(batch: list[Any], shared: Any) -> None:
    if len(batch) > 1:  # most batches share one shape of time: what it takes
        for event in batch[1:]:
            if isinstance(event, dict) and isinstance(event.get("ts"), str):
                event["ts"] = shared
    got, expected = columns(plain_rows(batch, smallest=1)), pydantic_rows(batch)
    tally("read here" if got is not None else "left to pydantic, " + (
        "refused" if expected is None else "taken"))  # fmt: skip
    if got is not None:
        assert got == expected


@st.composite
def sent_times(draw: st.DrawFn, count: int) -> list[str]:
    """Times of a batch as an app sends them: one shape for all (Z, zero offset, another
    offset; with microseconds or not), each in range."""
    zone = timezone(timedelta(minutes=draw(offsets)))
    micro = draw(st.booleans())
    start = datetime(2000, 1, 2)
    moments = draw(st.lists(st.datetimes(min_value=start, max_value=datetime(2099, 12, 30)),
                            min_size=count, max_size=count))  # fmt: skip
    texts = [m.replace(microsecond=max(m.microsecond, 1) if micro else 0, tzinfo=zone).isoformat()
             for m in moments]  # fmt: skip
    if zone.utcoffset(None) == timedelta(0) and draw(st.booleans()):
        texts = [t.replace("+00:00", "Z") for t in texts]
    return texts


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), count=st.integers(1, 20))
def test_it_reads_well_formed_batches(data: st.DataObject, count: int) -> None:
    """It reads, rather than declines, what apps commonly send: so the equality above is
    about batches it takes, not only ones it leaves to pydantic."""
    batch = data.draw(st.lists(plain_events(broken=False), min_size=count, max_size=count))
    for event, ts in zip(batch, data.draw(sent_times(count)), strict=True):
        event["ts"] = ts
        if event["type"] == "context":
            event["local_time"] = data.draw(st.sampled_from(["08:30", "23:59"]))
    got = columns(plain_rows(batch, smallest=1))
    assert got is not None
    assert got == pydantic_rows(batch)


def test_every_event_type_is_read_here() -> None:
    assert sorted(MODELS) == sorted(TYPES)


class Touchy:
    """A key an app made that, once armed, raises when compared (it hashes as "ts" does)."""

    armed = False

    def __hash__(self) -> int:
        return hash("ts")

    def __eq__(self, other: object) -> bool:
        if self.armed:
            raise RuntimeError("compared")
        return self is other


def test_a_key_that_raises_is_left_to_pydantic() -> None:
    batch = bench_like(3, seed=6)
    key = Touchy()
    batch[1][key] = 1
    key.armed = True  # now looking up "ts" in that event compares the key with it
    assert plain_rows(batch, smallest=1) is None


def bench_like(count: int, *, seed: int, start: datetime = T0) -> list[dict[str, Any]]:
    """Two users' listening of every type, as dicts with text times (as in bench/ingest.py)."""
    rng = random.Random(seed)
    builders = {user: Events(user) for user in ("ann", "bob")}
    for builder in builders.values():
        builder.clock = start
    batch = []
    for i in range(count):
        builder = builders[rng.choice(["ann", "bob"])]
        kind = rng.choice(TYPES)
        track = f"t{rng.randrange(40)}"
        fields: dict[str, Any] = {"event_id": f"s{seed}.{i}", "device_id": "dev-1"}
        if kind not in {"search", "navigate", "context"}:
            fields |= {"track_id": track, "artist_id": f"a{int(track[1:]) % 7}"}
        if kind == "play_end":
            fields |= {"ms_played": rng.randrange(0, 200_001), "duration_ms": 200_000}
        batch.append(builder(kind, after=rng.uniform(1, 900), **fields))
    return batch


def both_ways(open_store: StoreFactory, monkeypatch: pytest.MonkeyPatch,
              *batches: list[dict[str, Any]]) -> list[tuple[EventStore, list[Any]]]:  # fmt: skip
    """Two stores fed the same batches, one through the plain reader, one through pydantic;
    each with what each append returned or raised."""
    out = []
    for name, reader in (("plain.db", plain_rows), ("pydantic.db", lambda items: None)):
        monkeypatch.setattr(store_events, "plain_rows", reader)
        store = open_store(name=name, clock=lambda: NOW + timedelta(days=3))
        for user in ("ann", "bob"):
            consenting(store, user, Purpose.PERSONALIZATION)
        store.upsert_catalog({"track_id": f"t{t}", "artist_id": f"a{t % 7}",
                              "vector": [t / 40, 1 - t / 40, 0.5]} for t in range(30))  # fmt: skip
        results: list[Any] = []
        for batch in batches:
            try:
                results.append(store.append_many(batch))
            except InvalidEventBatch as error:
                results.append((str(error), [(e.field, e.rule, e.detail, e.index, e.event_id)
                                             for e in error.errors]))  # fmt: skip
        out.append((store, results))
    return out


def test_a_store_fed_either_way_holds_the_same(
    open_store: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = bench_like(3 * SMALL_BATCH, seed=1), bench_like(2 * SMALL_BATCH, seed=2)
    replayed = second[: SMALL_BATCH // 2] + bench_like(SMALL_BATCH, seed=3, start=NOW)
    (plain, said), (parsed, expected) = both_ways(open_store, monkeypatch, first, second,
                                                  replayed)  # fmt: skip
    assert said == expected and said[2].duplicates == SMALL_BATCH // 2
    rows = "SELECT seq, event_id, user_ref, type, ts, track_id, artist_id, body FROM events"
    assert peek(plain, rows) == peek(parsed, rows)
    assert plain.derived_state() == parsed.derived_state()


def test_a_store_fed_either_way_refuses_the_same(
    open_store: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    ahead = bench_like(SMALL_BATCH, seed=4, start=NOW + timedelta(days=3, minutes=-30))
    wrong = bench_like(SMALL_BATCH, seed=5)
    next(e for e in wrong if e["type"] == "play_end")["ms_played"] = True
    (plain, said), (_, expected) = both_ways(open_store, monkeypatch, ahead, wrong)
    assert said == expected
    rules = {rule for _, refusal in said for _, rule, *_ in refusal}
    assert rules == {"ts_ahead_of_clock", "int_type"}
    assert peek(plain, "SELECT count(*) FROM events") == [(0,)]


def test_facts_read_stored_bodies_as_the_event_models_do(open_store: StoreFactory) -> None:
    # ``facts`` reads the numbers of each stored body from its JSON instead of validating it
    # again: the facts equal those of the models' own reading, for every event type, with the
    # fields the models default (a skip's duration absent or null, a play start's position).
    store = open_store(clock=lambda: NOW + timedelta(days=3))
    for user in ("ann", "bob"):
        consenting(store, user, Purpose.PERSONALIZATION)
    batch = bench_like(3 * SMALL_BATCH, seed=5)
    add = Events("ann")
    add.clock = T0 - timedelta(days=1)
    batch += [
        add("skip", duration_ms=None),
        add("skip", duration_ms=180_000),
        add("play_start", position_ms=4_000),
        add("play_start"),
        add("play_end", ms_played=0, duration_ms=1),
        add("context", device_type="car", network="cellular", local_time="23:59:59.5"),
    ]
    store.append_many(batch)
    rows = peek(store, "SELECT seq, event_id, user_ref, type, ts, track_id, artist_id, body "
                       "FROM events ORDER BY seq")  # fmt: skip
    expected = [_fact(row, _revive(row[7])) for row in rows]
    facts = sorted(store.facts("ann") + store.facts("bob"), key=lambda f: f.seq)
    assert facts == expected
    assert {f.type for f in facts} == set(TYPES)
    assert {f.duration_ms for f in facts if f.type == "skip"} >= {0, 180_000}
