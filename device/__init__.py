"""The device part of sottovoce: everything that runs on the user's device.

Open an :class:`EventStore` for a region of a policy, record consent, append events; derived
state (sessions, per-track and per-artist statistics, the short-term taste vector, the latest
context) is kept up to date in the same transaction. A :class:`Personalizer` reranks candidates
with the compact TFLite :class:`Ranker` and trains it on the user's own history. Nothing here
talks to a network.

The store also keeps the device's secret and its signing key for each budget period. They never
leave it: ``store.keys`` gives a period's public key (to enrol), the device's coin for a round
and its upload keys, and seals and signs an upload itself, but returns no private key, and the
store hands out no connection to its file.

Errors (``code`` in the middle column)::

    DeviceError             device_error
    ├── InvalidEvent        invalid_event        one event that does not fit the schema (names
    │                                            the field and rule)
    ├── InvalidEventBatch   invalid_event_batch  a batch refused whole for its invalid events
    ├── EventConflict       event_conflict       an event id already stored with other content
    ├── InvalidInput        invalid_input        an argument out of range (e.g. an age of -3)
    ├── CatalogError        catalog_error        catalog rows that do not fit the store
    ├── StoreError          store_error          a file that cannot be this store (newer schema,
    │   │                                        other region), or SQLite failed under a call
    │   │                                        (code store_busy, store_io, ...)
    │   ├── StoreFull       store_full           no space left; nothing of the call written
    │   └── StoreCorrupt    store_corrupt        a damaged page met by a call; nothing written
    ├── RankerError         ranker_error         a model file that is not a usable ranker, or an
    │                                            input it cannot take
    └── NotEligible         not_eligible         training asked for while the device is not
                                                 charging, unmetered and idle

``DeviceError`` derives from :class:`sottovoce.SottovoceError`. Refusals by policy (no consent,
below the minimum age) are ``sottovoce.policy.PolicyViolation`` errors (``ConsentMissing``,
``AgeRestricted``), so every part of sottovoce reports them alike.
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
    InvalidInput,
    StoreCorrupt,
    StoreError,
    StoreFull,
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
from sottovoce.device._features import ITEM_DIM
from sottovoce.device._personalize import (
    Eligibility,
    LocalRound,
    NotEligible,
    Personalizer,
    RankedItem,
    Ranking,
    RerankOptions,
)
from sottovoce.device._ranker import (
    FEATURES,
    PARAMETER_COUNT,
    Ranker,
    RankerError,
    check_builtin_only,
)
from sottovoce.device._rows import from_ms, to_ms
from sottovoce.device._store import (
    AppendResult,
    CatalogItem,
    Durability,
    EventStore,
    ModelWeights,
    PurgeReport,
)

__all__ = [
    "COMPLETION_FRACTION",
    "EARLY_SKIP_MS",
    "FEATURES",
    "ITEM_DIM",
    "PARAMETER_COUNT",
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
    "Eligibility",
    "Event",
    "EventConflict",
    "EventStore",
    "InvalidEvent",
    "InvalidEventBatch",
    "InvalidInput",
    "Like",
    "LocalRound",
    "ModelWeights",
    "Navigate",
    "NotEligible",
    "Pause",
    "Personalizer",
    "PlayEnd",
    "PlayStart",
    "PurgeReport",
    "RankedItem",
    "Ranker",
    "RankerError",
    "Ranking",
    "RerankOptions",
    "Resume",
    "Search",
    "Seek",
    "Skip",
    "StoreCorrupt",
    "StoreError",
    "StoreFull",
    "check_builtin_only",
    "from_ms",
    "is_completion",
    "is_play",
    "to_ms",
]
