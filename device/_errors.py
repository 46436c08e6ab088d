"""Errors of ``sottovoce.device``; the package docstring draws their tree, with each one's
``code`` and meaning.

(``RankerError`` lives in ``_ranker_layout.py`` and ``NotEligible`` in ``_personalize.py``,
next to the code that raises them.)
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
