from __future__ import annotations

from typing import Any

import pytest
from conftest import Events, StoreFactory
from store_peek import peek

from sottovoce.device import DeviceError, EventStore, InvalidEvent, InvalidEventBatch, PlayEnd
from sottovoce.device._events import EVENT_ADAPTER


def _refused(store: EventStore, batch: list[Any]) -> list[InvalidEvent]:
    before = store.count()
    with pytest.raises(InvalidEventBatch) as caught:
        store.append_many(batch)
    assert store.count() == before, "a refused batch must store nothing"
    assert caught.value.code == "invalid_event_batch"
    return caught.value.errors


@pytest.mark.parametrize(
    ("change", "field", "rule"),
    [
        ({"ms_played": -1}, "ms_played", "greater_than_equal"),
        ({"duration_ms": 0}, "duration_ms", "greater_than"),
        ({"ms_played": "lots"}, "ms_played", "int_type"),
        ({"ts": "2026-11-01T10:00:00"}, "ts", "timezone_aware"),
        ({"ts": "1999-12-31T23:59:59Z"}, "ts", "greater_than_equal"),
        ({"ts": "yesterday"}, "ts", "iso_datetime"),
        ({"track_id": ""}, "track_id", "string_too_short"),
        ({"track_id": "has space"}, "track_id", "id_characters"),
        ({"event_id": None}, "event_id", "string_type"),
        ({"colour": "red"}, "colour", "extra_forbidden"),
        ({"schema_version": 2}, "schema_version", "literal_error"),
        ({"type": "plya_end"}, "type", "union_tag_invalid"),
    ],
)
def test_invalid_event_names_the_field(
    open_store: StoreFactory, events: Events, change: dict[str, Any], field: str, rule: str
) -> None:
    bad = {**events("play_end"), **change}
    errors = _refused(open_store(), [events("play_start"), bad, events("like")])
    assert [(e.index, e.field, e.rule) for e in errors] == [(1, field, rule)]
    assert errors[0].event_id == (bad["event_id"] if isinstance(bad["event_id"], str) else None)
    assert field in str(errors[0])


def test_missing_fields_and_type(open_store: StoreFactory, events: Events) -> None:
    no_type = events("like")
    del no_type["type"]
    no_duration = events("play_end")
    del no_duration["duration_ms"]
    errors = _refused(open_store(), [no_type, no_duration, "not an event"])
    assert [(e.index, e.field, e.rule) for e in errors] == [
        (0, "type", "union_tag_not_found"),
        (1, "duration_ms", "missing"),
        (2, "(event)", "model_attributes_type"),
    ]


def test_every_bad_event_is_reported_and_good_ones_not_stored(
    open_store: StoreFactory, events: Events
) -> None:
    store = open_store()
    batch = [events("play_end") for _ in range(10)]
    batch[2]["ms_played"] = -5
    batch[7]["ts"] = "not a time"
    errors = _refused(store, batch)
    assert sorted(e.index for e in errors) == [2, 7]
    assert store.append_many(batch[:2]).accepted == 2  # the valid ones were not stored


def test_every_event_type_round_trips(open_store: StoreFactory, events: Events) -> None:
    kinds = ["play_start", "play_end", "pause", "resume", "skip", "seek", "like", "dislike",
             "search", "navigate", "context"]  # fmt: skip
    store = open_store()
    batch = [events(kind) for kind in kinds]
    assert store.append_many(batch).accepted == len(kinds)
    exported = store.export_user("user-1")["events"]
    assert [e["type"] for e in exported] == kinds
    assert all("user_id" not in e for e in exported), "raw user ids are never stored"


def test_model_instances_are_accepted(open_store: StoreFactory, events: Events) -> None:
    store = open_store()
    event = PlayEnd.model_validate(events("play_end"))
    assert store.append(event).accepted == 1
    with pytest.raises(DeviceError):  # the one base class of device errors
        store.append({"type": "play_end"})


def test_the_stored_body_is_pydantics_canonical_json(
    open_store: StoreFactory, events: Events
) -> None:
    """Replays are compared with the stored body byte for byte: the body must stay exactly
    ``model_dump_json`` without the user id, whatever the append path does to get it."""
    kinds = ["play_start", "play_end", "pause", "resume", "skip", "seek", "like", "dislike",
             "search", "navigate", "context"]  # fmt: skip
    store = open_store()
    batch = [events(kind) for kind in kinds]
    batch[0]["ts"] = "2026-11-01T10:00:00.123456+02:00"  # an offset and microseconds
    batch[8]["query"] = 'nuit "blanche" \u00e9t\u00e9 \\ \n'  # escapes and non-ASCII
    store.append_many(batch)
    bodies = [r[0] for r in peek(store, "SELECT body FROM events ORDER BY seq")]
    expected = [EVENT_ADAPTER.validate_python(e).model_dump_json(exclude={"user_id"})
                for e in batch]  # fmt: skip
    assert bodies == expected
