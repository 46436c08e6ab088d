"""Errors of ``sottovoce.device``.

::

    DeviceError
    ├── InvalidEvent        one event that does not fit the schema (names the field and rule)
    ├── InvalidEventBatch   a batch refused whole because of its invalid events (lists each)
    ├── EventConflict       an event id already stored with different content
    ├── InvalidInput        an argument out of range (e.g. an age of -3)
    ├── CatalogError        catalog rows that do not fit the store (e.g. vector dimension)
    ├── StoreError          a file that cannot be used as this store (newer schema, other region),
    │   │                   or SQLite failed under a call (code store_busy, store_io, ...)
    │   ├── StoreFull       no space left (disk, quota or size limit); nothing of the call written
    │   └── StoreCorrupt    a damaged page of the file met by a call; nothing of it written
    ├── RankerError         a model file that is not a usable ranker, or an input it cannot take
    └── NotEligible         training asked for while the device is not charging/unmetered/idle

(``RankerError`` lives in ``_ranker.py`` and ``NotEligible`` in ``_personalize.py``, next to
the code that raises them.)

Refusals by policy (no consent, below the minimum age) are ``sottovoce.policy.PolicyViolation``
errors (``ConsentMissing``, ``AgeRestricted``), so every part of sottovoce reports them alike.
"""

from __future__ import annotations

from sottovoce._errors import SottovoceError


class DeviceError(SottovoceError):
    """Base class of device errors."""

    code = "device_error"


class InvalidEvent(DeviceError):
    """An event that does not fit the schema. ``field`` is a dotted path such as ``ms_played``."""

    code = "invalid_event"

    def __init__(
        self,
        *,
        field: str,
        rule: str,
        message: str,
        index: int | None = None,
        event_id: str | None = None,
    ) -> None:
        self.field = field
        self.rule = rule
        self.detail = message
        self.index = index
        self.event_id = event_id
        where = []
        if index is not None:
            where.append(f"event #{index}")
        if event_id is not None:
            where.append(f"id {event_id!r}")
        prefix = f"{', '.join(where)}: " if where else ""
        super().__init__(f"{prefix}{field}: {message} [{rule}]")


class InvalidEventBatch(DeviceError):
    """A batch with invalid events; nothing in it was stored. ``errors`` has one per problem."""

    code = "invalid_event_batch"

    def __init__(self, errors: list[InvalidEvent], *, size: int) -> None:
        self.errors = list(errors)
        self.size = size
        bad = len({e.index for e in self.errors})
        shown = "\n".join(f"  - {e}" for e in self.errors[:20])
        more = f"\n  ... and {len(self.errors) - 20} more" if len(self.errors) > 20 else ""
        super().__init__(
            f"batch of {size} refused, nothing stored: {bad} invalid event(s)\n{shown}{more}"
        )


class EventConflict(DeviceError):
    """An event id that is already stored with different content (a replay must be identical)."""

    code = "event_conflict"

    def __init__(self, event_id: str, *, index: int | None = None) -> None:
        self.event_id = event_id
        self.index = index
        super().__init__(
            f"event id {event_id!r} is already stored with different content; "
            "event ids must be unique per event"
        )


class InvalidInput(DeviceError):
    code = "invalid_input"


class CatalogError(DeviceError):
    code = "catalog_error"


class StoreError(DeviceError):
    code = "store_error"


class StoreFull(StoreError):
    """No space left for the store's file: the call wrote nothing; what was stored is intact."""

    code = "store_full"


class StoreCorrupt(StoreError):
    """The store's file is damaged where the call read or wrote; the call wrote nothing."""

    code = "store_corrupt"
