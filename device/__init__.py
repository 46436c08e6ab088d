"""The device part of sottovoce: everything that runs on the user's device.

Open an :class:`EventStore` for a region of a policy, record consent, append events; derived
state (sessions, per-track and per-artist statistics, the short-term taste vector, the latest
context) is kept up to date in the same transaction. Nothing here talks to a network.
"""

from sottovoce.device._derive import (
    COMPLETION_FRACTION,
    EARLY_SKIP_MS,
    QUALIFIED_PLAY_MS,
    SESSION_GAP_MS,
    TASTE_HALF_LIFE_MS,
    is_completion,
    is_play,
)
from sottovoce.device._errors import (
    CatalogError,
    DeviceError,
    EventConflict,
    InvalidEvent,
    InvalidEventBatch,
    StoreError,
)
from sottovoce.device._events import (
    SCHEMA_VERSION,
    Context,
    Dislike,
    Event,
    Like,
    Navigate,
    Pause,
    PlayEnd,
    PlayStart,
    Resume,
    Search,
    Seek,
    Skip,
)
from sottovoce.device._store import (
    AppendResult,
    CatalogItem,
    Durability,
    EventStore,
    PurgeReport,
    from_ms,
    to_ms,
)

__all__ = [
    "COMPLETION_FRACTION",
    "EARLY_SKIP_MS",
    "QUALIFIED_PLAY_MS",
    "SCHEMA_VERSION",
    "SESSION_GAP_MS",
    "TASTE_HALF_LIFE_MS",
    "AppendResult",
    "CatalogError",
    "CatalogItem",
    "Context",
    "DeviceError",
    "Dislike",
    "Durability",
    "Event",
    "EventConflict",
    "EventStore",
    "InvalidEvent",
    "InvalidEventBatch",
    "Like",
    "Navigate",
    "Pause",
    "PlayEnd",
    "PlayStart",
    "PurgeReport",
    "Resume",
    "Search",
    "Seek",
    "Skip",
    "StoreError",
    "from_ms",
    "is_completion",
    "is_play",
    "to_ms",
]
