"""The values the store takes and gives back: catalog items, what an append did, ranker
weights, what a purge deleted. Immutable; nothing here touches the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator

from sottovoce.device._events import USER_PATTERN

__all__ = ["AppendResult", "CatalogItem", "Durability", "ModelWeights", "PurgeReport"]

Durability = Literal["normal", "full"]

CatalogId = Annotated[str, Strict(), Field(min_length=1, max_length=128, pattern=USER_PATTERN)]


class CatalogItem(BaseModel):
    """Public metadata of one track, with its feature vector (no user data)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Strict, as events are: no bytes or numbers taken for ids, no text or bools for numbers.
    track_id: CatalogId
    artist_id: CatalogId | None = None
    title: Annotated[str, Strict(), Field(pattern=r"^[^\x00]*$")] | None = None
    vector: tuple[Annotated[float, Strict()], ...] = Field(min_length=1, max_length=1024)

    @field_validator("vector")
    @classmethod
    def _finite(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not np.all(np.isfinite(value)):
            raise ValueError("vector values must be finite")
        return value


@dataclass(frozen=True)
class AppendResult:
    """What an append did: how many events were new, which were replays, which too old.

    ``expired_ids`` are events older than the region keeps raw events (older than
    ``retention_cutoff``, the store's clock minus the raw-event retention): not stored, not
    counted. ``str(result)`` says all of it in a sentence.
    """

    accepted: int
    duplicate_ids: tuple[str, ...] = ()
    expired_ids: tuple[str, ...] = ()
    retention_cutoff: datetime | None = None

    @property
    def duplicates(self) -> int:
        return len(self.duplicate_ids)

    @property
    def expired(self) -> int:
        """How many events were dropped because they were already past retention."""
        return len(self.expired_ids)

    def __str__(self) -> str:
        text = f"stored {self.accepted} new events, {self.duplicates} replays ignored"
        if self.expired:
            cutoff = (
                ""
                if self.retention_cutoff is None
                else (f" (older than {self.retention_cutoff.isoformat(timespec='seconds')})")
            )
            text += (f", {self.expired} dropped: already past the region's raw-event "
                     f"retention{cutoff}")  # fmt: skip
        return text


@dataclass(frozen=True)
class ModelWeights:
    """Ranker weights kept in the store, for the model file ``model_id``."""

    model_id: str
    version: int
    weights: npt.NDArray[np.float32]
    state: npt.NDArray[np.float32] | None = None


@dataclass(frozen=True)
class PurgeReport:
    """Rows deleted per table by a retention purge, a withdrawal or an erasure."""

    deleted: Mapping[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.deleted.values())
