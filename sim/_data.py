"""What every dataset adapter produces: a frozen :class:`Dataset` of users' :class:`Interaction`
rows and the public catalog around them, the one error the adapters raise, and the checks of
the fields they share.

Data flow position: the adapters (:mod:`._lastfm`, :mod:`._csv`) build a :class:`Dataset`;
:mod:`._datasets` derives item vectors from it after the split and is where the rest of the
simulator imports all of these names from.

Errors::

    SimulationError
    └── DatasetError    a dataset file that is missing or does not fit its format; names the
                        file, the line and the field (codes: dataset_missing, dataset_invalid,
                        dataset_too_small)
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from sottovoce.sim._errors import SimulationError

Vector = npt.NDArray[np.float64]

EVENT_TYPES = ("play", "complete", "skip", "like", "dislike")
"""What one interaction row says: listened (``value`` times), listened to the end, skipped
early, liked, disliked."""

POSITIVE_TYPES = frozenset({"play", "complete", "like"})
"""Interactions that say the user wants the item: the only items a holdout may hold out."""

MAX_ID_LENGTH = 100  # room left in the device's 128-character event ids for a counter
_ID = re.compile(r"^\S{1,100}$")


class DatasetError(SimulationError):
    """A dataset file that is missing or does not fit its format.

    ``path``, ``line`` (1-based, the header is line 1) and ``field`` say where, when known;
    ``reason`` is the message without them.
    """

    code = "dataset_invalid"

    def __init__(
        self,
        message: str,
        *,
        path: Path | None = None,
        line: int | None = None,
        field: str | None = None,
        code: str | None = None,
    ) -> None:
        self.path, self.line, self.field, self.reason = path, line, field, message
        where = [str(path)] if path is not None else []
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message, code=code)


class Interaction(NamedTuple):
    """One thing a user did with an item. ``timestamp`` is epoch ms, None when unknown."""

    item: str
    timestamp: int | None
    event_type: str  # one of EVENT_TYPES
    value: float = 1.0  # how many times, for "play" (a play count); 1 otherwise


class TagAssignment(NamedTuple):
    """A public user's tag on an item (Last.fm's tag assignments)."""

    user: str
    item: str
    tag: str


class BadRow(NamedTuple):
    """A malformed row a loader skipped: its 1-based line, the field at fault (None when the
    row as a whole is) and why."""

    line: int
    field: str | None
    reason: str


@dataclass(frozen=True)
class SkippedRows:
    """The malformed rows a loader skipped (``skip_bad_rows=True``): how many, and the first
    few of them."""

    count: int = 0
    first: tuple[BadRow, ...] = ()
    path: Path | None = None

    def __str__(self) -> str:
        if not self.count:
            return "no malformed rows skipped"
        where = f"{self.path}: " if self.path is not None else ""
        shown = "; ".join(
            f"line {b.line}" + (f", field {b.field!r}" if b.field else "") + f": {b.reason}"
            for b in self.first
        )
        more = "; ..." if self.count > len(self.first) else ""
        plural = "row" if self.count == 1 else "rows"
        return f"{where}skipped {self.count} malformed {plural} ({shown}{more})"


@dataclass(frozen=True, eq=False)
class Dataset:
    """Users, items, every user's interactions and the public catalog metadata around them.

    ``item_vectors`` holds the vectors that came *with* the data (an item-features file) and
    is empty when they are to be derived after the split with ``build_item_vectors``.
    ``tags`` are the public tag assignments that Last.fm vectors are derived from.
    ``skipped`` counts the malformed rows the loader skipped (when asked to).
    """

    name: str
    users: tuple[str, ...]
    items: tuple[str, ...]
    interactions: Mapping[str, tuple[Interaction, ...]]
    artists: Mapping[str, str | None]
    item_vectors: Mapping[str, Vector] = field(default_factory=lambda: MappingProxyType({}))
    tags: tuple[TagAssignment, ...] = ()
    titles: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    skipped: SkippedRows = field(default_factory=SkippedRows)

    @classmethod
    def build(
        cls,
        name: str,
        interactions: Mapping[str, Sequence[Interaction]],
        *,
        catalog: Collection[str] = (),
        artists: Mapping[str, str | None] | None = None,
        item_vectors: Mapping[str, Vector] | None = None,
        tags: Sequence[TagAssignment] = (),
        titles: Mapping[str, str] | None = None,
        skipped: SkippedRows | None = None,
    ) -> Dataset:
        """A dataset whose items are those interacted with plus ``catalog`` (sorted ids)."""
        items = {i.item for rows in interactions.values() for i in rows} | set(catalog)
        ordered = tuple(sorted(items, key=id_key))
        artist_of = artists or {}
        vectors = {k: np.asarray(v, dtype=np.float64) for k, v in (item_vectors or {}).items()}
        return cls(
            name=name,
            users=tuple(sorted(interactions, key=id_key)),
            items=ordered,
            interactions=MappingProxyType({u: tuple(r) for u, r in interactions.items()}),
            artists=MappingProxyType({i: artist_of.get(i) for i in ordered}),
            item_vectors=MappingProxyType(vectors),
            tags=tuple(t for t in tags if t.item in items),
            titles=MappingProxyType({i: t for i, t in (titles or {}).items() if i in items}),
            skipped=skipped or SkippedRows(),
        )

    def touched(self, user: str) -> frozenset[str]:
        """Every item the user interacted with in any way."""
        return frozenset(i.item for i in self.interactions.get(user, ()))

    def positives(self, user: str) -> frozenset[str]:
        """Items the user listened to or liked."""
        return positive_items(self.interactions.get(user, ()))

    @property
    def size(self) -> int:
        """The number of interaction rows."""
        return sum(len(rows) for rows in self.interactions.values())

    def __repr__(self) -> str:
        skipped = f", skipped={self.skipped.count}" if self.skipped.count else ""
        return (
            f"Dataset({self.name!r}, users={len(self.users)}, items={len(self.items)}, "
            f"interactions={self.size}, tags={len(self.tags)}{skipped})"
        )


def positive_items(interactions: Sequence[Interaction]) -> frozenset[str]:
    return frozenset(i.item for i in interactions if i.event_type in POSITIVE_TYPES)


def id_key(value: str) -> tuple[int, int, str]:
    """Sort key putting numeric ids in numeric order ("2" before "10"), then the others."""
    return (0, int(value), "") if value.isdigit() else (1, 0, value)


def sample_users(
    dataset: Dataset, users: int, *, seed: int = 0, min_interactions: int = 10
) -> Dataset:
    """A deterministic random sample of ``users`` users among those with at least
    ``min_interactions`` interactions. Items are what they touched plus the items that came
    with features; tags and titles of those items stay."""
    eligible = [u for u in dataset.users if len(dataset.interactions[u]) >= min_interactions]
    if not 1 <= users <= len(eligible):
        raise DatasetError(
            f"asked for {users} users; {len(eligible)} users have at least "
            f"{min_interactions} interactions",
            code="dataset_too_small",
        )
    chosen = random.Random(seed).sample(eligible, users)
    return Dataset.build(
        f"{dataset.name}[{users} users, seed {seed}]",
        {u: dataset.interactions[u] for u in chosen},
        catalog=dataset.item_vectors,
        artists=dataset.artists,
        item_vectors=dataset.item_vectors,
        tags=dataset.tags,
        titles=dataset.titles,
        skipped=dataset.skipped,
    )


def check_id(value: str, *, path: Path, line: int, name: str) -> str:
    """``value`` if it is a valid id (1 to 100 characters, no whitespace), else the error."""
    if not _ID.match(value):
        raise DatasetError(
            f"an id must be 1 to {MAX_ID_LENGTH} characters without whitespace, not {value!r}",
            path=path,
            line=line,
            field=name,
        )
    return value


def number(value: str, *, path: Path, line: int, name: str) -> float:
    """``value`` as a finite float, else the error."""
    try:
        parsed = float(value)
    except ValueError:
        raise DatasetError(f"not a number: {value!r}", path=path, line=line, field=name) from None
    if not math.isfinite(parsed):
        raise DatasetError(f"not a finite number: {value!r}", path=path, line=line, field=name)
    return parsed
