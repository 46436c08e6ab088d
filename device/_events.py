"""The canonical, versioned schema of the behavioural events an app hands to the device store.

Every event has an ``event_id`` chosen by the app (it makes appends idempotent), the app's
``user_id`` (stored only as a salted hash), an optional ``device_id``, a timezone-aware ``ts``,
``schema_version`` and a ``type`` that selects the payload. Unknown fields are refused so that a
typo in an app never silently drops data.

Types are strict: what is stored is what the app sent, never a guess. A count of milliseconds is
a JSON integer (not ``"1000"``, ``1000.0`` or ``true``); a time is a ``datetime`` or ISO 8601 text
(not a number, whose unit and zone would be guesses); ids hold no whitespace or control
characters (a NUL byte would cut an id short in C code and logs). Every check runs inside
pydantic-core, so a batch is still validated in one call.
"""

from __future__ import annotations

from datetime import UTC, datetime, time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetPydanticSchema,
    TypeAdapter,
    WithJsonSchema,
)
from pydantic_core import CoreSchema
from pydantic_core import core_schema as cs

SCHEMA_VERSION: Literal[1] = 1

_DAY_MS = 24 * 3600 * 1000
_CONTROL = r"\x00-\x1f\x7f-\x9f"  # C0 and C1 control characters, NUL among them
ID_PATTERN = rf"^[^\s{_CONTROL}]+$"
USER_PATTERN = rf"^[^{_CONTROL}]+$"
TEXT_PATTERN = r"^[^\x00]+$"
Id = Annotated[str, Field(min_length=1, max_length=128, pattern=ID_PATTERN)]
Millis = Annotated[int, Field(ge=0, le=_DAY_MS)]
TrackMillis = Annotated[int, Field(gt=0, le=_DAY_MS)]
ContextType = Literal["playlist", "album", "artist", "radio", "search", "queue", "home", "other"]
_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
_LATEST = datetime(2100, 1, 1, tzinfo=UTC)

INSTANCE = "instance"
"""The label of the union member that takes a ``datetime``/``time`` as it is; the other member,
which parses text, is labelled with the rule to report when a value is neither."""

# Rules of our own for what the strict types refuse, with words for people; a pattern's rule
# replaces pydantic's ``string_pattern_mismatch``, which would quote the regular expression.
# Only error paths read these (see ``_rows._event_errors``).
PATTERN_RULES = {ID_PATTERN: "id_characters", USER_PATTERN: "user_id_characters",
                 TEXT_PATTERN: "text_characters"}  # fmt: skip
MESSAGES = {
    "id_characters": "an id may not contain whitespace or control characters (such as NUL)",
    "user_id_characters": "a user id may not contain control characters (such as NUL)",
    "text_characters": "text may not contain NUL characters",
    "iso_datetime": "a time must be a datetime or ISO 8601 text with a zone, such as "
    "2026-11-02T09:00:00Z (numbers are refused: their unit and zone would be guesses)",
    "iso_time": "a local time of day must be a time or text such as 08:30 or 08:30:15",
}


def _instance_or_text(instance: CoreSchema, parsed: CoreSchema, *, starts: str,
                      rule: str) -> CoreSchema:  # fmt: skip
    """A value of the type as it is, or text that starts like ``starts`` parsed by ``parsed``:
    no number or bool is coerced. Text is tried first (what JSON gives)."""
    text = cs.chain_schema([cs.str_schema(strict=True, pattern=starts), parsed])
    return cs.union_schema([(text, rule), (instance, INSTANCE)], mode="left_to_right")


def _timestamp(_: Any, __: GetCoreSchemaHandler) -> CoreSchema:
    def checked(*, strict: bool) -> CoreSchema:
        return cs.datetime_schema(strict=strict, tz_constraint="aware", ge=_EARLIEST, lt=_LATEST)

    return _instance_or_text(checked(strict=True), checked(strict=False),
                             starts=r"^\d{4}-\d{2}-\d{2}[Tt ]", rule="iso_datetime")  # fmt: skip


def _time_of_day(_: Any, __: GetCoreSchemaHandler) -> CoreSchema:
    return _instance_or_text(cs.time_schema(strict=True), cs.time_schema(strict=False),
                             starts=r"^\d{2}:\d{2}", rule="iso_time")  # fmt: skip


Timestamp = Annotated[
    datetime,
    GetPydanticSchema(_timestamp),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
TimeOfDay = Annotated[
    time, GetPydanticSchema(_time_of_day), WithJsonSchema({"type": "string", "format": "time"})
]


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: Id
    user_id: Annotated[str, Field(min_length=1, max_length=256, pattern=USER_PATTERN)]
    device_id: Id | None = None
    ts: Timestamp


class _TrackEvent(_Event):
    track_id: Id
    artist_id: Id | None = None  # looked up in the local catalog when absent


class PlayStart(_TrackEvent):
    type: Literal["play_start"] = "play_start"
    duration_ms: TrackMillis
    position_ms: Millis = 0
    context_type: ContextType | None = None
    context_id: Id | None = None


class PlayEnd(_TrackEvent):
    """The end of a play, however it ended; ``ms_played`` is listening time, not position."""

    type: Literal["play_end"] = "play_end"
    ms_played: Millis
    duration_ms: TrackMillis


class Pause(_TrackEvent):
    type: Literal["pause"] = "pause"
    position_ms: Millis


class Resume(_TrackEvent):
    type: Literal["resume"] = "resume"
    position_ms: Millis


class Skip(_TrackEvent):
    """The user skipped the track ``position_ms`` into it."""

    type: Literal["skip"] = "skip"
    position_ms: Millis
    duration_ms: TrackMillis | None = None


class Seek(_TrackEvent):
    type: Literal["seek"] = "seek"
    from_ms: Millis
    to_ms: Millis


class Like(_TrackEvent):
    type: Literal["like"] = "like"


class Dislike(_TrackEvent):
    type: Literal["dislike"] = "dislike"


class Search(_Event):
    type: Literal["search"] = "search"
    query: Annotated[str, Field(min_length=1, max_length=500, pattern=TEXT_PATTERN)]
    results: Annotated[int, Field(ge=0)] | None = None


class Navigate(_Event):
    type: Literal["navigate"] = "navigate"
    screen: Annotated[str, Field(min_length=1, max_length=64, pattern=TEXT_PATTERN)]
    context_type: ContextType | None = None
    context_id: Id | None = None


class Context(_Event):
    """What the device is like right now; the latest one is session state for reranking."""

    type: Literal["context"] = "context"
    device_type: Literal[
        "phone", "tablet", "desktop", "web", "speaker", "car", "tv", "watch", "other"
    ]
    network: Literal["wifi", "cellular", "ethernet", "offline", "other"]
    local_time: TimeOfDay  # local time of day on the device


Event = Annotated[
    PlayStart
    | PlayEnd
    | Pause
    | Resume
    | Skip
    | Seek
    | Like
    | Dislike
    | Search
    | Navigate
    | Context,
    Field(discriminator="type"),
]
EVENT_MODELS: tuple[type[_Event], ...] = (PlayStart, PlayEnd, Pause, Resume, Skip, Seek, Like,
                                          Dislike, Search, Navigate, Context)  # fmt: skip
"""The members of :data:`Event`, one per ``type``."""
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
EVENT_LIST_ADAPTER: TypeAdapter[list[Event]] = TypeAdapter(list[Event])
