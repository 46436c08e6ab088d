"""Reranking: candidates' feature rows scored by the ranker, then the guards no model may
override.

Data flow position: :meth:`~._personalize.Personalizer.rerank` and
:meth:`~._personalize.Personalizer.rank_catalog` serve the user's model, ask the store for the
candidates' :class:`~._store_ranking.RankingInputs`, and hand them to :func:`rank`. It gathers
feature rows (:func:`._features.features`) a chunk at a time (``CHUNK_SIZE`` rows: the model's
activations stay in cache), scores them, and arranges the whole list (:func:`_arrange`):
disliked tracks never in the top k, at most ``max_per_artist`` of one artist there, an artist
skipped in this session pushed down, and a bounded, seeded share of exploration
(:func:`_explore`). Each item comes back with a short reason (:func:`_reasons`).

This is the hot path (``bench/rerank.py``): what is linear in the number of candidates runs in
numpy, and Python walks only the top of the list.
"""

from __future__ import annotations

import itertools
import math
import operator
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from sottovoce.device._features import ARTIST, COSINE, SESSION, TRACK, Snapshot, features
from sottovoce.device._ranker import Ranker
from sottovoce.device._store_ranking import RankingInputs

MAX_EXPLORE_SHARE = 0.3
CHUNK_SIZE = 1_024  # feature rows scored at a time: the model's activations stay in cache


@dataclass(frozen=True)
class RerankOptions:
    top_k: int = 10
    max_per_artist: int = 2
    explore_share: float = 0.1  # of the top k, at most MAX_EXPLORE_SHARE
    seed: int | None = None  # exploration is reproducible with a seed
    session_skip_penalty: float = 1.5  # logit points per skip of the artist this session

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.max_per_artist < 1:
            raise ValueError("top_k and max_per_artist must be at least 1")
        if not 0 <= self.explore_share <= MAX_EXPLORE_SHARE:
            raise ValueError(f"explore_share must be between 0 and {MAX_EXPLORE_SHARE}")


class RankedItem(NamedTuple):
    track_id: str
    score: float
    reason: str
    explored: bool = False


class Ranking:
    """Items in order; ``personalized`` is False when the app's order came back untouched.

    A ranking that :func:`rank` made keeps what it decided as arrays (the candidates' order,
    scores, reasons and explored flags) and builds ``items`` when they are first read: an app
    that reorders its list reads ``track_ids`` (one C call), and an item per candidate costs
    about as much as the guards and reasons that decided them (``bench/rerank.py`` times
    both). Immutable; equal when items, ``personalized`` and ``note`` are.
    """

    __slots__ = ("_columns", "_items", "note", "personalized")

    personalized: bool
    note: str
    _items: tuple[RankedItem, ...] | None
    _columns: _Columns | None

    def __init__(self, items: Iterable[RankedItem], personalized: bool, note: str = "") -> None:
        _set(self, _items=tuple(items), _columns=None, personalized=personalized, note=note)

    @classmethod
    def _of(cls, columns: _Columns) -> Ranking:
        """A personalized ranking whose items are built from ``columns`` when first read."""
        ranking = cls.__new__(cls)
        _set(ranking, _items=None, _columns=columns, personalized=True, note="")
        return ranking

    @property
    def items(self) -> tuple[RankedItem, ...]:
        items = self._items
        if items is None:  # only a ranking with columns starts without items
            assert self._columns is not None
            items = self._columns.items()
            _set(self, _items=items)
        return items

    @property
    def track_ids(self) -> list[str]:
        if self._columns is not None:
            return list(self._columns.track_ids())
        return [item.track_id for item in self.items]

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"a Ranking is immutable: cannot set {name!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ranking):
            return NotImplemented
        return (self.personalized, self.note, self.items) == (
            other.personalized, other.note, other.items)  # fmt: skip

    def __hash__(self) -> int:
        return hash((self.items, self.personalized, self.note))

    def __reduce__(self) -> tuple[type[Ranking], tuple[tuple[RankedItem, ...], bool, str]]:
        return Ranking, (self.items, self.personalized, self.note)  # pickle, copy: items built

    def __repr__(self) -> str:
        return (f"Ranking(items={self.items!r}, personalized={self.personalized!r}, "
                f"note={self.note!r})")  # fmt: skip


def _set(ranking: Ranking, **values: object) -> None:
    for name, value in values.items():
        object.__setattr__(ranking, name, value)


@dataclass(frozen=True)
class _Columns:
    """What :func:`rank` decided, before items are built: the candidates, their order (row
    numbers), and per candidate its score, reason code and whether it was explored."""

    ids: Sequence[str]
    order: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float64]
    codes: npt.NDArray[np.int64]
    explored: set[int]

    def track_ids(self) -> Sequence[str]:
        return _pick(self.ids, self.order)

    def items(self) -> tuple[RankedItem, ...]:
        order = self.order
        reasons = _REASON_TEXTS[self.codes[order]]
        flags = np.zeros(len(self.scores), dtype=bool)
        flags[list(self.explored)] = True
        flags = flags[order]
        reasons[flags] = _REASONS[0]
        # Built in C (one itemgetter call, zip, map, and tuple.__new__ on complete tuples
        # instead of RankedItem's Python-level __new__): a whole catalog's items would
        # otherwise take longer than scoring it.
        rows = zip(self.track_ids(), self.scores[order].tolist(), reasons.tolist(),
                   flags.tolist(), strict=True)  # fmt: skip
        return tuple(map(tuple.__new__, itertools.repeat(RankedItem), rows))


def rank(
    ranker: Ranker,
    snapshot: Snapshot,
    inputs: RankingInputs,
    *,
    options: RerankOptions,
    chunk_size: int = CHUNK_SIZE,
    limit: int | None = None,
) -> Ranking:
    """Score ``inputs`` in chunks of ``chunk_size``, then apply the guards and exploration to
    the whole list; the first ``limit`` items when given."""
    n = len(inputs)
    if not n:
        return Ranking((), personalized=True)
    parts = []
    for start in range(0, n, chunk_size):
        chunk = inputs.chunk(start, min(n, start + chunk_size))
        x = features(snapshot, chunk)
        parts.append((
            ranker.infer(x),
            chunk.artist_skips,  # the session's skips of the candidate's artist
            chunk.tracks[:, 5] > 0,  # disliked
            # may be explored: never played, and (in a session) its artist not skipped
            (chunk.tracks[:, 7] > 0) & (chunk.artist_skips == 0) if inputs.in_session
            else chunk.tracks[:, 7] > 0,
            _reasons(x),
        ))  # fmt: skip
    logits, skips, disliked, fresh, codes = (
        np.concatenate(column) if len(column) > 1 else column[0]
        for column in zip(*parts, strict=True)
    )
    scores = logits.astype(np.float64)
    if inputs.in_session:  # outside a session every skip count is 0: nothing to take off
        scores = scores - options.session_skip_penalty * skips
    order, explored = _arrange(scores, disliked, fresh, inputs.artist_codes, options)
    if limit is not None:
        order = order[:limit]
    # The candidates as a tuple: the app may change its list once this returns.
    return Ranking._of(_Columns(tuple(inputs.track_ids), order, scores, codes, explored))


def _pick(ids: Sequence[str], order: npt.NDArray[np.int64]) -> Sequence[str]:
    """``ids`` in ``order`` (one C call for two or more)."""
    if len(order) < 2:
        return [ids[i] for i in order.tolist()]
    picked: Sequence[str] = operator.itemgetter(*order.tolist())(ids)
    return picked


def unpersonalized(candidates: Sequence[str], why: str) -> Ranking:
    """The app's order, untouched, with the reason it was not personalized."""
    items = tuple(RankedItem(t, 0.0, "in the app's order") for t in candidates)
    return Ranking(items, personalized=False, note=f"not personalized: {why}")


def _arrange(
    scores: npt.NDArray[np.float64],
    disliked: npt.NDArray[np.bool_],
    fresh: npt.NDArray[np.bool_],
    artists: npt.NDArray[np.int64],
    options: RerankOptions,
) -> tuple[npt.NDArray[np.int64], set[int]]:
    """Final order (candidate indices) and the explored candidates: guards first, then
    exploration. ``artists`` are artist codes, -1 for none. What is linear in the number of
    candidates runs in numpy; Python walks only the top of the list."""
    n = len(scores)
    ranked = (-scores).argsort(kind="stable")
    k = min(options.top_k, n - int(np.count_nonzero(disliked)))
    top: list[int] = []
    per_artist: dict[int, int] = {}
    for i, artist, refused in _walk(ranked, artists, disliked):  # stops once top is full
        if len(top) == k:
            break
        capped = artist >= 0 and per_artist.get(artist, 0) >= options.max_per_artist
        if refused or capped:
            continue
        top.append(i)
        if artist >= 0:
            per_artist[artist] = per_artist.get(artist, 0) + 1
    chosen = disliked.copy()
    chosen[top] = True
    rest = ranked[~chosen[ranked]]  # still in score order
    if len(top) < k:  # too few artists to honour the cap: fill in score order
        fill = rest[: k - len(top)].tolist()
        position = np.empty(n, dtype=np.int64)
        position[ranked] = np.arange(n)
        top = sorted(top + fill, key=position.__getitem__)
        chosen[fill] = True
        rest = ranked[~chosen[ranked]]
    before = list(top)
    explored = _explore(top, rest, fresh, artists, options)
    if explored:  # what exploration displaced leads the rest, in score order
        kept = set(top)
        displaced = np.array([i for i in before if i not in kept], dtype=np.int64)
        chosen[list(explored)] = True
        rest = np.concatenate([displaced, rest[~chosen[rest]]])
    tail = ranked[disliked[ranked]]
    return np.concatenate([np.array(top, dtype=np.int64), rest, tail]), explored


def _walk(
    order: npt.NDArray[np.int64],
    artists: npt.NDArray[np.int64],
    disliked: npt.NDArray[np.bool_],
    step: int = 64,
) -> Iterator[tuple[int, int, bool]]:
    """(index, artist, disliked) in ``order``, as Python values, converted a slice at a time
    (the walk usually stops within the first slice)."""
    for start in range(0, len(order), step):
        part = order[start : start + step]
        yield from zip(part.tolist(), artists[part].tolist(), disliked[part].tolist(), strict=True)


def _explore(
    top: list[int],
    rest: npt.NDArray[np.int64],
    fresh: npt.NDArray[np.bool_],
    artists: npt.NDArray[np.int64],
    options: RerankOptions,
) -> set[int]:
    """Swap a bounded, seeded share of the top k (never the first two places) for tracks the
    user has never played, from artists not skipped this session, keeping the artist cap.
    Changes ``top`` in place; returns the explored candidates."""
    slots = math.floor(options.explore_share * len(top))
    first = min(2, len(top))
    if not slots or len(top) <= first:
        return set()
    pool = rest[fresh[rest]]  # in score order
    rng = random.Random(options.seed)
    counts: dict[int, int] = {}

    def bump(artist: int, by: int) -> None:
        if artist >= 0:
            counts[artist] = counts.get(artist, 0) + by

    for artist in artists[top].tolist():
        bump(artist, 1)
    explored: set[int] = set()
    for place in rng.sample(range(first, len(top)), min(slots, len(top) - first)):
        leaving = int(artists[top[place]])
        bump(leaving, -1)
        fits = pool
        full = [a for a, c in counts.items() if c >= options.max_per_artist]
        if full:  # usually an artist or two: a comparison each (np.isin costs more)
            of_pool = artists[pool]
            capped = of_pool == full[0]
            for artist in full[1:]:
                capped |= of_pool == artist
            fits = pool[~capped]
        if not len(fits):
            bump(leaving, 1)
            continue
        pick = int(rng.choice(fits))  # the same draw as from a list: fits[randbelow(len)]
        pool = pool[pool != pick]
        top[place] = pick
        explored.add(pick)
        bump(int(artists[pick]), 1)
    return explored


_REASONS: tuple[str, ...] = (
    "something new to explore",
    "you disliked this",
    "lower: you skipped this artist just now",
    "you liked this",
    "you often finish this track",
    "you often finish this artist",
    "close to what you've been playing",
    "new to you",
    "ranked by your listening",
)


_REASON_TEXTS = np.array(_REASONS, dtype=object)


def _reasons(x: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
    """Index into ``_REASONS`` for every row: the first rule that holds (0 is exploration)."""
    rules = (
        x[:, TRACK + 5] > 0,  # disliked
        x[:, SESSION + 2] > 0,  # artist skipped this session
        x[:, TRACK + 4] > 0,  # liked
        (x[:, TRACK] > 0) & (x[:, TRACK + 1] >= 0.7),
        (x[:, ARTIST] >= math.log1p(3)) & (x[:, ARTIST + 1] >= 0.6),
        x[:, COSINE] >= 0.5,
        (x[:, TRACK + 7] > 0) & (x[:, ARTIST + 7] > 0),
    )
    codes = np.full(len(x), len(rules) + 1, dtype=np.int64)
    for code in range(len(rules), 0, -1):  # the earliest rule that holds is written last
        codes[rules[code - 1]] = code
    return codes
