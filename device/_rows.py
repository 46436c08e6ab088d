"""Events as stored rows, and back: a valid batch as columns (:class:`EventRows`), SQL for the
derived-state upserts, time in milliseconds, validation errors mapped to fields. Used by the
store; nothing here touches a connection.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, time, timedelta, timezone
from itertools import compress, repeat
from operator import attrgetter, eq, itemgetter
from typing import Any, NamedTuple

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import SchemaSerializer
from pydantic_core import core_schema as cs

from sottovoce.device._derive import Fact, FactBatch
from sottovoce.device._errors import InvalidEvent, InvalidEventBatch
from sottovoce.device._events import (
    EVENT_ADAPTER,
    EVENT_LIST_ADAPTER,
    EVENT_MODELS,
    INSTANCE,
    MESSAGES,
    PATTERN_RULES,
    Event,
)
from sottovoce.device._many_rows import ManyRows
from sottovoce.device._schema import COUNTER_COLUMNS
from sottovoce.policy import format_duration

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _utcnow() -> datetime:
    return datetime.now(UTC)


_MS = timedelta(milliseconds=1)
_TS, _TZINFO = attrgetter("ts"), attrgetter("tzinfo")
# Zones with one offset for every instant: pydantic's (what it gives times parsed from text)
# and the standard library's fixed offsets (UTC among them).
_FIXED_ZONES = (type(TypeAdapter(datetime).validate_python("2026-01-01T00:00:00Z").tzinfo),
                timezone)  # fmt: skip

# Many rows a statement (._many_rows). OR FAIL: a refused row ends its statement without
# undoing the statement's earlier rows, so SQLite keeps no statement journal; the batch's
# savepoint undoes them, as it undid the rows executemany had inserted before a refusal.
INSERT_EVENTS = ManyRows(
    "INSERT OR FAIL INTO events (seq, event_id, user_ref, type, ts, track_id, artist_id, body) "
    "VALUES ",
    "(?, ?, ?, ?, ?, ?, ?, ?)",
)
_NOT_STORED: set[str] = {"user_id"}  # stored as a salted hash in its own column


# CPython's sqlite3 binds None through its adapter lookup, at several times the cost of an int
# or a text (``need_adapt`` in its cursor.c), and a batch's counter rows hold a few NULLs each
# (no like yet, no qualifying play). Their nullable columns are bound as a mark no real value
# takes (ids are never empty; times and sequence numbers are never negative), which the
# statement turns back into NULL before anything reads it.
_NULL_MARKS: dict[str, str | int] = {"artist_id": "", "feedback_ts": -1, "feedback_seq": -1,
                                     "last_played_ts": -1}  # fmt: skip


class CounterUpsert(NamedTuple):
    """The upsert of a counter table's rows (:class:`._derive.DerivedRows`), many rows a
    statement (``insert``), and the mark each nullable column is bound as (by its place in the
    row)."""

    insert: ManyRows
    marks: dict[int, str | int]

    def columns(self, rows: list[tuple[Any, ...]]) -> list[Sequence[Any]]:
        """``rows`` as columns for ``insert.run``, each NULL replaced by its column's mark;
        column by column, so only the columns that hold a NULL are looped over."""
        if not rows:
            return [()] * self.insert.width
        columns: list[Sequence[Any]] = list(zip(*rows, strict=True))
        for place, mark in self.marks.items():
            if None in columns[place]:
                columns[place] = [mark if v is None else v for v in columns[place]]
        return columns


def _upsert_counters(table: str, key: str, extra: tuple[str, ...]) -> CounterUpsert:
    columns = ("user_ref", key, *extra, *COUNTER_COLUMNS, "feedback", "feedback_ts",
               "feedback_seq", "last_played_ts", "last_event_ts")  # fmt: skip
    marks = {i: _NULL_MARKS[c] for i, c in enumerate(columns) if c in _NULL_MARKS and c != key}
    values = ", ".join(f"nullif(?, {marks[i]!r})" if i in marks else "?"
                       for i in range(len(columns)))  # fmt: skip
    sums = ", ".join(f"{c} = {c} + excluded.{c}" for c in COUNTER_COLUMNS)
    newer = (
        "excluded.feedback_ts IS NOT NULL AND (feedback_ts IS NULL OR "
        "(excluded.feedback_ts, excluded.feedback_seq) > (feedback_ts, feedback_seq))"
    )
    keep = ", ".join(f"{c} = coalesce({c}, excluded.{c})" for c in extra)
    tail = (
        f" ON CONFLICT (user_ref, {key}) DO UPDATE SET {sums}, "
        + (f"{keep}, " if keep else "")
        + f"feedback = CASE WHEN {newer} THEN excluded.feedback ELSE feedback END, "
        f"feedback_seq = CASE WHEN {newer} THEN excluded.feedback_seq ELSE feedback_seq END, "
        f"feedback_ts = CASE WHEN {newer} THEN excluded.feedback_ts ELSE feedback_ts END, "
        "last_played_ts = coalesce(max(last_played_ts, excluded.last_played_ts), "
        "last_played_ts, excluded.last_played_ts), "
        "last_event_ts = max(last_event_ts, excluded.last_event_ts)"
    )
    head = f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
    return CounterUpsert(ManyRows(head, f"({values})", tail), marks)


UPSERT_TRACK = _upsert_counters("track_stats", "track_id", ("artist_id",))
UPSERT_ARTIST = _upsert_counters("artist_stats", "artist_id", ())


def to_ms(ts: datetime) -> int:
    """Epoch milliseconds of an aware datetime (exact, no float rounding)."""
    return (ts - _EPOCH) // _MS


def from_ms(ms: int) -> datetime:
    return _EPOCH + ms * _MS


def _validate(items: list[Any]) -> list[Event]:
    try:
        return EVENT_LIST_ADAPTER.validate_python(items)
    except ValidationError as error:
        raise InvalidEventBatch(_event_errors(error, items), size=len(items)) from None


def _event_errors(error: ValidationError, items: list[Any]) -> list[InvalidEvent]:
    out = []
    for item in error.errors(include_url=False):
        # A list item's location is (index, union tag, field...); the tag is not a field.
        loc = item["loc"]
        index = loc[0] if loc and isinstance(loc[0], int) else None
        rule = item["type"]
        member = loc[-1] if len(loc) > 3 and (loc[-1] == INSTANCE or loc[-1] in MESSAGES) else None
        if member is not None:
            # A time given as an instance or as text: report what the way it was given broke,
            # and a value given neither way (a number) as the text member's rule.
            loc = loc[:-1]
            if (member == INSTANCE) != isinstance(item["input"], datetime | time):
                continue
            if rule in {"string_type", "string_pattern_mismatch"}:
                rule = str(member)
        elif rule == "string_pattern_mismatch":
            rule = PATTERN_RULES.get((item.get("ctx") or {}).get("pattern", ""), rule)
        if rule.startswith("union_tag"):
            field = "type"
        else:
            field = ".".join(str(p) for p in loc[2:]) or "(event)"
        out.append(
            InvalidEvent(field=field, rule=rule, message=MESSAGES.get(rule, item["msg"]),
                         index=index, event_id=_item_id(items, index))
        )  # fmt: skip
    return out


def refuse_ahead(items: list[Any], times: Sequence[int], *, now: datetime, skew: timedelta) -> None:
    """Refuse, as one ``InvalidEventBatch``, events timed more than ``skew`` after ``now``
    (``times`` in epoch ms, of the valid events ``items``): such an event would count as the
    latest listening, steering the session and taste until its time came, and outlive
    retention as long."""
    limit = to_ms(now + skew)
    if not times or max(times) <= limit:  # the common case: one pass in C
        return
    events = _validate(items)  # valid, parsed again only to be named as parsed
    clock, allowed = now.isoformat(timespec="seconds"), format_duration(skew)
    errors = [
        InvalidEvent(field="ts", rule="ts_ahead_of_clock", index=i, event_id=events[i].event_id,
                     message=f"{events[i].ts.isoformat()} is more than the allowed clock skew "
                     f"({allowed}) ahead of the device's clock ({clock})")
        for i, ms in enumerate(times) if ms > limit
    ]  # fmt: skip
    raise InvalidEventBatch(errors, size=len(events))


def _item_id(items: list[Any], index: int | None) -> str | None:
    if index is None or not 0 <= index < len(items):
        return None
    item = items[index]
    value = item.get("event_id") if isinstance(item, Mapping) else getattr(item, "event_id", None)
    return value if isinstance(value, str) else None


def _body_serializer(model: type[BaseModel]) -> SchemaSerializer:
    """What ``model.model_dump_json(exclude=_NOT_STORED)`` writes, written from the instance's
    field dict: the model's own field schemas in the model's order, the user id left out by
    the schema instead of by an ``exclude`` argument, which pydantic reads on every call."""
    schema = model.__pydantic_core_schema__
    if schema["type"] != "model" or schema["schema"]["type"] != "model-fields":
        raise TypeError(f"{model.__name__}: not a plain model schema")  # a pydantic change
    fields = {
        name: cs.typed_dict_field(field["schema"], serialization_exclude=name in _NOT_STORED)
        for name, field in schema["schema"]["fields"].items()
    }
    return SchemaSerializer(cs.typed_dict_schema(fields, config=schema.get("config")))


_BODIES = {model: _body_serializer(model) for model in EVENT_MODELS}


def _body(event: Event) -> str:
    """The canonical JSON of an event of another class (a subclass an app made)."""
    return event.__pydantic_serializer__.to_json(event, exclude=_NOT_STORED).decode()


def encode(events: Sequence[Event]) -> tuple[list[int], list[str]]:
    """Each event's time (epoch ms) and body: the canonical JSON kept in the store
    (pydantic's, without the user id), which replays are compared against byte for byte."""
    bodies = [
        _body(e) if serializer is None else serializer.to_json(e.__dict__).decode()
        for e, serializer in zip(events, map(_BODIES.get, map(type, events)), strict=True)
    ]
    return epoch_ms(list(map(_TS, events))), bodies


def epoch_ms(stamps: Sequence[datetime]) -> list[int]:
    """:func:`to_ms` of each aware datetime, the same integers, computed faster when they
    share one fixed-offset zone *object* (what a UTC batch parsed from text has: pydantic hands
    every ``Z`` or ``+00:00`` time the same one; other offsets get a zone object each, equal
    but not the same, and subtracting across two objects calls utcoffset() on both, which is
    slower than the plain expression)."""
    zones = {id(zone): zone for zone in map(_TZINFO, stamps)}.values()
    if len(zones) != 1:
        return [(ts - _EPOCH) // _MS for ts in stamps]
    (zone,) = zones
    if type(zone) not in _FIXED_ZONES:  # a zone with daylight saving has no one offset
        return [(ts - _EPOCH) // _MS for ts in stamps]
    # Two datetimes with the same zone object subtract as wall times: no utcoffset() call
    # per event (pydantic's zone answers it slowly). The epoch is moved into that zone.
    epoch = datetime(1970, 1, 1, tzinfo=zone) + zone.utcoffset(None)
    return [delta // _MS for delta in map(epoch.__rsub__, stamps)]


class EventRows(NamedTuple):
    """A valid batch as columns (lists or tuples), in batch order: what is stored of each
    event (id, user, time in epoch ms, body) and what derivation reads of it. Made from parsed
    events (:func:`event_rows`) or, from plain dicts, by :func:`._plain_events.plain_rows`."""

    event_id: Sequence[str]
    user_id: Sequence[str]
    type: Sequence[str]
    ts: Sequence[int]
    track: Sequence[str | None]
    artist: Sequence[str | None]
    ms_played: Sequence[int]
    duration_ms: Sequence[int]
    position_ms: Sequence[int]
    context: Sequence[tuple[str, str, str] | None]
    body: Sequence[str]

    def pick(self, indices: Sequence[int]) -> EventRows:
        """The rows ``indices``, in that order."""
        picked: list[Any] = [list(map(column.__getitem__, indices)) for column in self]
        return EventRows(*picked)

    def facts(self, *, first_seq: int, refs: Mapping[str, int]) -> FactBatch:
        """The rows' facts, numbered from ``first_seq``, users by their references."""
        return FactBatch(
            range(first_seq, first_seq + len(self.ts)),
            list(map(refs.__getitem__, self.user_id)),
            self.type, self.ts, self.track, self.artist, self.ms_played, self.duration_ms,
            self.position_ms, self.context,
        )  # fmt: skip


FACT_FIELDS: tuple[tuple[str, int | None], ...] = (
    ("track_id", None), ("artist_id", None), ("ms_played", 0), ("duration_ms", 0),
    ("position_ms", 0),
)  # fmt: skip
"""The fields of an event derivation reads (besides its type, time and context), in
:class:`EventRows` order, and what it takes when the event's type has no such field or it is
null (a skip's duration)."""
CONTEXT_FIELDS = ("device_type", "network", "local_time")
"""What derivation reads of a ``context`` event: its context."""


def fact_values(values: Sequence[Any], default: int | None) -> Sequence[Any]:
    """A field's values as a fact's column: each null as the fact's ``default`` (from
    :data:`FACT_FIELDS`; ``None``: nulls stay), the same sequence when there is none."""
    if default is not None and None in values:
        return [default if v is None else v for v in values]
    return values


def event_rows(events: Sequence[Event]) -> EventRows:
    """The rows of parsed events, column by column (no tuple is made per event)."""
    times, bodies = encode(events)
    fields = [e.__dict__ for e in events]  # pydantic's __getattr__ is slow for absent fields
    kinds = list(map(itemgetter("type"), fields))
    context: list[tuple[str, str, str] | None] = [None] * len(fields)
    for i in compress(range(len(fields)), map(eq, kinds, repeat("context"))):
        context[i] = _context(fields[i])
    facts = [fact_values(list(map(dict.get, fields, repeat(name), repeat(default))), default)
             for name, default in FACT_FIELDS]  # fmt: skip
    ids, users = map(itemgetter("event_id"), fields), map(itemgetter("user_id"), fields)
    return EventRows._make([list(ids), list(users), kinds, times, *facts, context, bodies])


def _context(fields: Mapping[str, Any]) -> tuple[str, str, str]:
    return fields["device_type"], fields["network"], fields["local_time"].isoformat()


def _fact(row: Sequence[Any], event: Event) -> Fact:
    """A derivation fact from a stored row (seq, id, user, type, ts, track, artist, body)."""
    fields = event.__dict__
    context = _context(fields) if event.type == "context" else None
    return Fact(
        seq=row[0],
        user=row[2],
        type=row[3],
        ts=row[4],
        track=row[5],
        artist=row[6],
        ms_played=fields.get("ms_played", 0),
        duration_ms=fields.get("duration_ms") or 0,
        position_ms=fields.get("position_ms", 0),
        context=context,
    )


def _row_order(row: dict[str, Any]) -> list[tuple[bool, Any]]:
    """Rows in column order, NULLs last (sessions by start time, stats by key)."""
    return [(value is None, value if value is not None else 0) for value in row.values()]


def stored_fact(row: Sequence[Any]) -> Fact:
    """:func:`_fact` of a stored row (seq, id, user, type, ts, track, artist, body), without
    validating its body again: the body is the store's own canonical JSON of an event it
    validated when it took it, so its numbers are read from the JSON as they are (an absent
    or null number is 0, as the models' fields read). A context event's time of day goes
    through its model, which gives it in the form serving reads. ``facts`` replays every
    event of a user each round; validating each body again took about half of it."""
    if row[3] == "context":
        return _fact(row, _revive(row[7]))
    fields = json.loads(row[7])
    return Fact(row[0], row[2], row[3], row[4], row[5], row[6], fields.get("ms_played", 0),
                fields.get("duration_ms") or 0, fields.get("position_ms", 0))  # fmt: skip


def _revive(body: str) -> Event:
    return EVENT_ADAPTER.validate_python({**json.loads(body), "user_id": "-"})


def _chunks(values: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]
