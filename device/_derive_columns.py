"""Derived state over a whole batch of facts, with numpy: :func:`._derive.derive`'s definition,
computed column-wise.

The append path hands each batch of new events to :func:`derive_batch` as a :class:`FactBatch`;
below ``SMALL_BATCH`` facts it runs the reference :func:`~._derive.derive`, above it
:func:`derive_columns`, since a per-fact Python loop was the largest cost of ingest. Both give
the same :class:`~._derive.DerivedRows` (``tests/device/test_store.py`` holds one against the
other); the rules of what counts live in :mod:`._derive` alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import compress, repeat
from operator import is_not
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from sottovoce.device._derive import (
    _TAU,
    COMPLETION_BONUS,
    COMPLETION_FRACTION,
    EARLY_SKIP_MS,
    LIKE_WEIGHT,
    OUTCOMES,
    PLAY_WEIGHT,
    QUALIFIED_PLAY_MS,
    SESSION_GAP_MS,
    DerivedRows,
    Fact,
    FactBatch,
    Run,
    Taste,
    Vector,
    derive,
)

_PLAY_END, _SKIP, _LIKE, _DISLIKE, _OTHER = range(5)
_CODES = {"play_end": _PLAY_END, "skip": _SKIP, "like": _LIKE, "dislike": _DISLIKE}
_NONE = np.iinfo(np.int64).min  # "no such time" in integer columns


SMALL_BATCH = 48
"""Below this many facts, numpy's fixed cost per call outweighs what it saves per fact."""


VectorSource = Callable[[Sequence[str | None]], Mapping[str, Vector]]
"""Track ids -> catalog vectors of those of them the catalog has (and maybe others): how the
store hands derivation its catalog, so that only the tracks derivation looks up are loaded."""


def derive_batch(batch: FactBatch, vectors: VectorSource) -> DerivedRows:
    """What ``derive(facts, vectors(batch.track)).rows()`` gives, for a batch of facts as
    columns."""
    if len(batch.seq) < SMALL_BATCH:
        facts = list(map(Fact._make, zip(*batch, strict=True)))
        return derive(facts, vectors(batch.track)).rows()
    return derive_columns(batch, vectors)


def derive_columns(batch: FactBatch, vectors_of: VectorSource) -> DerivedRows:
    """:func:`derive` computed column-wise with numpy (same definition, same rows), asking
    ``vectors_of`` only for the vectors of the tracks that weigh in the taste (a catalog lookup
    per batch track was a tenth of derivation's cost).

    Per-fact work stays in C (``map``, ``zip``, numpy); Python loops only over what is rare
    (groups with feedback, context facts, users)."""
    out = DerivedRows()
    n = len(batch.seq)
    if n == 0:
        return out
    code = _ints(map(_CODES.get, batch.type, repeat(_OTHER)), n)
    ts, seq, user = _ints(batch.ts, n), _ints(batch.seq, n), _ints(batch.user, n)
    duration = _ints(batch.duration_ms, n)
    ended = code == _PLAY_END
    ms = np.where(ended, _ints(batch.ms_played, n), 0)  # only a play_end's time counts
    played = ended & (ms >= np.minimum(QUALIFIED_PLAY_MS, duration // 2))
    completed = ended & (ms >= COMPLETION_FRACTION * duration)
    skipped = code == _SKIP
    early = skipped & (_ints(batch.position_ms, n) < EARLY_SKIP_MS)
    cols = _Columns(code, ts, seq, ms, played, completed, skipped, early)

    has_track = _present(batch.track, n)
    outcome = np.flatnonzero(has_track & (code != _OTHER))
    tracks = _pick(batch.track, outcome.tolist())
    users = user[outcome]
    groups, keys = _groups(users, tracks)
    naming = _present(_pick(batch.artist, outcome.tolist()), len(outcome))
    named = outcome[naming]
    artists = _pick(batch.artist, named.tolist())
    # A track row keeps the first artist any of its events named (as Counters.add does):
    # np.unique gives each group's first position among the rows that name one.
    first_artist: list[str | None] = [None] * len(keys[0])
    with_artist, first = np.unique(groups[naming], return_index=True)
    for g, artist in zip(with_artist.tolist(), _pick(artists, first.tolist()), strict=True):
        first_artist[g] = artist
    counters = _counters(groups, len(keys[0]), outcome, cols)
    out.tracks = list(zip(*keys, first_artist, *counters, strict=True))
    groups, keys = _groups(user[named], artists)
    counters = _counters(groups, len(keys[0]), named, cols)
    out.artists = list(zip(*keys, *counters, strict=True))

    out.runs = _batch_runs(user, cols)
    weight = np.where(code == _LIKE, LIKE_WEIGHT, 0.0)
    weight[played] = PLAY_WEIGHT + COMPLETION_BONUS * completed[played]
    liked = np.flatnonzero(has_track & (weight > 0)).tolist()
    liked_tracks = _pick(batch.track, liked)
    vectors = vectors_of(liked_tracks)
    engaged = np.array(list(compress(liked, map(vectors.__contains__, liked_tracks))),
                       dtype=np.int64)  # fmt: skip
    # sorted(set()), not np.unique: without return_index np.unique imports numpy.ma (some
    # 20 ms) on its first call, which lands in a device's first append.
    for u in sorted(set(user[engaged].tolist())):
        mine = engaged[user[engaged] == u]
        ref = int(ts[mine].max())
        w = weight[mine] * np.exp(-(ref - ts[mine]) / _TAU)
        picked = _pick(vectors, _pick(batch.track, mine.tolist()))
        stacked = np.concatenate(picked).reshape(len(picked), -1)  # np.stack, but faster
        out.taste[u] = Taste(ref, float(w.sum()), w @ stacked)
    for i in compress(range(n), map(is_not, batch.context, repeat(None))):
        context = batch.context[i]
        counted = batch.track[i] is not None and batch.type[i] in OUTCOMES
        if context is not None and not counted:
            at, who = (batch.ts[i], batch.seq[i]), batch.user[i]
            prior = out.context.get(who)
            if prior is None or at > prior[0]:
                out.context[who] = (at, context)
    return out


def _ints(values: Iterable[int], n: int) -> npt.NDArray[np.int64]:
    if isinstance(values, range):  # sequence numbers
        return np.arange(values.start, values.stop, values.step, dtype=np.int64)
    return np.fromiter(values, np.int64, n)


def _present(values: Sequence[object], n: int) -> npt.NDArray[np.bool_]:
    """Which values are not None."""
    return np.fromiter(map(is_not, values, repeat(None)), bool, n)


def _pick(values: Any, rows: Iterable[Any]) -> list[Any]:
    """``[values[i] for i in rows]``, the loop in C."""
    return list(map(values.__getitem__, rows))


class _Columns(NamedTuple):
    code: npt.NDArray[np.int64]
    ts: npt.NDArray[np.int64]
    seq: npt.NDArray[np.int64]
    ms: npt.NDArray[np.int64]  # listening time of play_end facts, else 0
    played: npt.NDArray[np.bool_]
    completed: npt.NDArray[np.bool_]
    skipped: npt.NDArray[np.bool_]
    early: npt.NDArray[np.bool_]


def _groups(
    users: npt.NDArray[np.int64], names: list[str]
) -> tuple[npt.NDArray[np.int64], tuple[list[int], list[str]]]:
    """Group rows by (user, name): each row's group, and each group's user and name.

    Keys become integers (a code per distinct name, then one number per pair), so grouping
    makes no tuple per row."""
    if not names:
        return np.zeros(0, dtype=np.int64), ([], [])
    distinct = dict.fromkeys(names)
    codes = dict(zip(distinct, range(len(distinct)), strict=True))
    code = _ints(map(codes.__getitem__, names), len(names))
    _, first, groups = np.unique(users * len(distinct) + code, return_index=True,
                                 return_inverse=True)  # fmt: skip
    return groups.reshape(-1), (users[first].tolist(), _pick(names, first.tolist()))


def _counters(
    group: npt.NDArray[np.int64], size: int, rows: npt.NDArray[np.int64], cols: _Columns
) -> list[list[Any]]:
    """Each group's counters, as columns in ``COUNTER_ROW`` order, over the facts ``rows``
    (``group[j]`` is the group of ``rows[j]``)."""

    def count(mask: npt.NDArray[np.bool_]) -> list[int]:
        counts: list[int] = np.bincount(group[mask], minlength=size).tolist()
        return counts

    code, ts, seq, played = cols.code[rows], cols.ts[rows], cols.seq[rows], cols.played[rows]
    last_played = np.full(size, _NONE)
    np.maximum.at(last_played, group[played], ts[played])
    last_event = np.full(size, _NONE)
    np.maximum.at(last_event, group, ts)
    feedback = [0] * size
    feedback_ts: list[int | None] = [None] * size
    feedback_seq: list[int | None] = [None] * size
    said = np.flatnonzero((code == _LIKE) | (code == _DISLIKE))
    if said.size:  # the latest like or dislike, by (ts, seq), of each group
        order = said[np.lexsort((seq[said], ts[said], group[said]))]
        latest = order[np.append(group[order][1:] != group[order][:-1], True)]
        for g, value, at, number in zip(
            group[latest].tolist(), np.where(code[latest] == _LIKE, 1, -1).tolist(),
            ts[latest].tolist(), seq[latest].tolist(), strict=True,
        ):  # fmt: skip
            feedback[g], feedback_ts[g], feedback_seq[g] = value, at, number
    return [
        count(played), count(cols.completed[rows]), count(cols.skipped[rows]),
        count(cols.early[rows]), _sums(group, cols.ms[rows], size), count(code == _LIKE),
        count(code == _DISLIKE), feedback, feedback_ts, feedback_seq, _optional(last_played),
        last_event.tolist(),
    ]  # fmt: skip


def _sums(group: npt.NDArray[np.int64], values: npt.NDArray[Any], size: int) -> list[int]:
    """Whole-number sums per group (exact: float64 holds integers up to 2**53)."""
    weights = values.astype(np.float64)
    sums: list[int] = np.bincount(group, weights=weights, minlength=size).astype(np.int64).tolist()
    return sums


def _optional(values: npt.NDArray[np.int64]) -> list[int | None]:
    return [None if v == _NONE else v for v in values.tolist()]


def _batch_runs(user: npt.NDArray[np.int64], cols: _Columns) -> dict[int, list[Run]]:
    """Each user's facts, in time order, cut wherever a gap exceeds ``SESSION_GAP_MS``."""
    order = np.lexsort((cols.ts, user))
    u, t = user[order], cols.ts[order]
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = (u[1:] != u[:-1]) | (t[1:] - t[:-1] > SESSION_GAP_MS)
    run = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.append(first[1:], len(order)) - 1
    size = len(first)

    def total(values: npt.NDArray[Any]) -> list[int]:
        return _sums(run, values[order], size)

    columns = zip(
        u[first].tolist(), t[first].tolist(), t[last].tolist(), (last - first + 1).tolist(),
        total(cols.played), total(cols.completed), total(cols.skipped), total(cols.ms),
        strict=True,
    )  # fmt: skip
    runs: dict[int, list[Run]] = {}
    for who, *fields in columns:
        runs.setdefault(who, []).append(Run(*fields))
    return runs
