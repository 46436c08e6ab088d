"""Events as stored rows, and back: SQL for the derived-state upserts, time in milliseconds,
validation errors mapped to fields. Used by the store; nothing here touches a connection.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from sottovoce.device._derive import Fact
from sottovoce.device._errors import InvalidEvent, InvalidEventBatch
from sottovoce.device._events import EVENT_ADAPTER, EVENT_LIST_ADAPTER, Event
from sottovoce.device._schema import COUNTER_COLUMNS

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _utcnow() -> datetime:
    return datetime.now(UTC)


_MS = timedelta(milliseconds=1)

_INSERT_EVENT = (
    "INSERT INTO events (seq, event_id, user_ref, type, ts, track_id, artist_id, body) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_NOT_STORED: set[str] = {"user_id"}  # stored as a salted hash in its own column


def _upsert_counters(table: str, key: str, extra: tuple[str, ...]) -> str:
    columns = ("user_ref", key, *extra, *COUNTER_COLUMNS, "feedback", "feedback_ts",
               "feedback_seq", "last_played_ts", "last_event_ts")  # fmt: skip
    sums = ", ".join(f"{c} = {c} + excluded.{c}" for c in COUNTER_COLUMNS)
    newer = (
        "excluded.feedback_ts IS NOT NULL AND (feedback_ts IS NULL OR "
        "(excluded.feedback_ts, excluded.feedback_seq) > (feedback_ts, feedback_seq))"
    )
    keep = ", ".join(f"{c} = coalesce({c}, excluded.{c})" for c in extra)
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
        f"ON CONFLICT (user_ref, {key}) DO UPDATE SET {sums}, "
        + (f"{keep}, " if keep else "")
        + f"feedback = CASE WHEN {newer} THEN excluded.feedback ELSE feedback END, "
        f"feedback_seq = CASE WHEN {newer} THEN excluded.feedback_seq ELSE feedback_seq END, "
        f"feedback_ts = CASE WHEN {newer} THEN excluded.feedback_ts ELSE feedback_ts END, "
        "last_played_ts = coalesce(max(last_played_ts, excluded.last_played_ts), "
        "last_played_ts, excluded.last_played_ts), "
        "last_event_ts = max(last_event_ts, excluded.last_event_ts)"
    )


_UPSERT_TRACK = _upsert_counters("track_stats", "track_id", ("artist_id",))
_UPSERT_ARTIST = _upsert_counters("artist_stats", "artist_id", ())


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
        if rule.startswith("union_tag"):
            field = "type"
        else:
            field = ".".join(str(p) for p in loc[2:]) or "(event)"
        out.append(
            InvalidEvent(field=field, rule=rule, message=item["msg"], index=index,
                         event_id=_item_id(items, index))
        )  # fmt: skip
    return out


def _item_id(items: list[Any], index: int | None) -> str | None:
    if index is None or not 0 <= index < len(items):
        return None
    item = items[index]
    value = item.get("event_id") if isinstance(item, Mapping) else getattr(item, "event_id", None)
    return value if isinstance(value, str) else None


def _fact(row: Sequence[Any], event: Event) -> Fact:
    """A derivation fact from a stored row (seq, id, user, type, ts, track, artist, body)."""
    fields = event.__dict__
    context = None
    if event.type == "context":
        context = (fields["device_type"], fields["network"], fields["local_time"].isoformat())
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


def _revive(body: str) -> Event:
    return EVENT_ADAPTER.validate_python({**json.loads(body), "user_id": "-"})


def _counter_values(c: Any) -> tuple[Any, ...]:
    fb_ts, fb_seq = c.feedback_at if c.feedback_at is not None else (None, None)
    return (c.plays, c.completions, c.skips, c.early_skips, c.ms_played, c.likes,
            c.dislikes, c.feedback, fb_ts, fb_seq, c.last_played_ts, c.last_event_ts)  # fmt: skip


def _chunks(values: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]
