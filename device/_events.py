"""The canonical, versioned schema of the behavioural events an app hands to the device store.

Every event has an ``event_id`` chosen by the app (it makes appends idempotent), the app's
``user_id`` (stored only as a salted hash), an optional ``device_id``, a timezone-aware ``ts``,
``schema_version`` and a ``type`` that selects the payload. Unknown fields are refused so that a
typo in an app never silently drops data.
"""

from __future__ import annotations

from datetime import UTC, datetime, time
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter

SCHEMA_VERSION: Literal[1] = 1

_DAY_MS = 24 * 3600 * 1000
Id = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\s]+$")]
Millis = Annotated[int, Field(ge=0, le=_DAY_MS)]
TrackMillis = Annotated[int, Field(gt=0, le=_DAY_MS)]
ContextType = Literal["playlist", "album", "artist", "radio", "search", "queue", "home", "other"]
_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
_LATEST = datetime(2100, 1, 1, tzinfo=UTC)


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: Id
    user_id: Annotated[str, Field(min_length=1, max_length=256)]
    device_id: Id | None = None
    ts: Annotated[AwareDatetime, Field(ge=_EARLIEST, lt=_LATEST)]


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
    query: Annotated[str, Field(min_length=1, max_length=500)]
    results: Annotated[int, Field(ge=0)] | None = None


class Navigate(_Event):
    type: Literal["navigate"] = "navigate"
    screen: Annotated[str, Field(min_length=1, max_length=64)]
    context_type: ContextType | None = None
    context_id: Id | None = None


class Context(_Event):
    """What the device is like right now; the latest one is session state for reranking."""

    type: Literal["context"] = "context"
    device_type: Literal[
        "phone", "tablet", "desktop", "web", "speaker", "car", "tv", "watch", "other"
    ]
    network: Literal["wifi", "cellular", "ethernet", "offline", "other"]
    local_time: time  # local time of day on the device


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
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
EVENT_LIST_ADAPTER: TypeAdapter[list[Event]] = TypeAdapter(list[Event])
