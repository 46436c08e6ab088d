"""Feature rows for the ranker: one row of ``FEATURES`` floats per candidate track.

Data flow position: the store gives a :class:`Snapshot` of the user's state (a fixed number of
queries, whatever the number of candidates) and local training builds snapshots by replaying
events; :func:`features` turns a snapshot and the candidates' columns (:class:`Candidates`)
into the matrix, vectorized with numpy, so serving and training see identical features. The
candidates' columns come either from the snapshot's mappings (:func:`assemble`) or, when
ranking, from arrays the store caches per user (:class:`HistoryTable` rows gathered by index,
``_store_ranking.RankingInputs``); ``tests/device/test_rerank.py`` holds the two equal.

Layout (columns): item vector (16), short-term taste vector (16), their elementwise product
(16), cosine, has-taste; the user's history with the track (8) and with its artist (8): log
plays, completion rate, log skips, early-skip rate, liked, disliked, recency, never played;
session: log skips and plays so far, log skips and plays of the candidate's artist in this
session; time of day (sin, cos); device type (6, one-hot); cellular; offline. The rest is zero,
reserved. (The candidate's position in the app's list is deliberately not a feature: in
training the labelled track always comes first, so position would teach the label.)
Catalog vectors longer than 16 are truncated, shorter ones padded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from sottovoce.device._ranker import FEATURES  # the model fixes the width

ITEM_DIM = 16
DEVICE_TYPES = ("phone", "tablet", "desktop", "speaker", "car", "other")
_DEVICE_INDEX = {"phone": 0, "tablet": 1, "desktop": 2, "web": 2, "speaker": 3, "car": 4}
RECENCY_DAYS = 30.0

# column offsets
ITEM, TASTE, PRODUCT, COSINE, HAS_TASTE = 0, 16, 32, 48, 49
TRACK, ARTIST = 50, 58
SESSION = 66  # skips, plays, artist skips, artist plays, position
TIME_OF_DAY = 71
DEVICE = 73
CELLULAR, OFFLINE = 79, 80
assert OFFLINE < FEATURES, "the feature layout must fit the ranker's input"

Matrix = npt.NDArray[np.float32]


class History(NamedTuple):
    """A user's statistics with one track or artist (the derived-state counters)."""

    plays: int = 0
    completions: int = 0
    skips: int = 0
    early_skips: int = 0
    feedback: int = 0
    last_played_ts: int = -1  # epoch ms; -1 when never played


@dataclass
class Snapshot:
    """Everything about one user that features need, as of ``now`` (epoch ms)."""

    now: int
    tracks: Mapping[str, History] = field(default_factory=dict)
    artists: Mapping[str, History] = field(default_factory=dict)
    taste: npt.NDArray[np.float64] | None = None
    session_skips: int = 0
    session_plays: int = 0
    session_artist_skips: Mapping[str, int] = field(default_factory=dict)
    session_artist_plays: Mapping[str, int] = field(default_factory=dict)
    local_hour: float | None = None  # 0..24, the device's local time of day
    device_type: str | None = None
    network: str | None = None


def apply_context(snapshot: Snapshot, context: tuple[str, str, str, int] | None) -> None:
    """Fill time of day, device type and network from the latest context event
    (device type, network, local time "HH:MM[:SS]", its epoch ms), advancing the local time
    by what has passed since it was reported."""
    if context is None:
        return
    device_type, network, local_time, ts = context
    hours, minutes = (int(p) for p in local_time.split(":")[:2])
    elapsed_h = max(snapshot.now - ts, 0) / 3_600_000
    snapshot.device_type, snapshot.network = device_type, network
    snapshot.local_hour = (hours + minutes / 60 + elapsed_h) % 24


def fit_vector(vector: npt.NDArray[np.float64] | None) -> npt.NDArray[np.float64]:
    """A catalog or taste vector as ``ITEM_DIM`` unit-length floats (zeros when absent)."""
    out = np.zeros(ITEM_DIM)
    if vector is None:
        return out
    width = min(ITEM_DIM, vector.shape[0])
    out[:width] = vector[:width]
    norm = math.sqrt(float(out @ out))  # what np.linalg.norm computes, without its checks
    return out / norm if norm > 0 else out


class Candidates(NamedTuple):
    """What the feature rows need of each candidate, as columns (``n`` rows each)."""

    items: npt.NDArray[np.floating[Any]]  # fitted item vectors, ITEM_DIM columns
    tracks: npt.NDArray[np.float64]  # the user's history with the track, 8 columns
    artists: npt.NDArray[np.float64]  # ... and with its artist, 8 columns
    artist_skips: npt.NDArray[np.float64]  # the artist's skips in this session
    artist_plays: npt.NDArray[np.float64]  # ... and plays


def assemble(
    snapshot: Snapshot,
    tracks: Sequence[str],
    artists: Sequence[str | None],
    vectors: Sequence[npt.NDArray[np.float64] | None] | npt.NDArray[np.float32],
) -> Matrix:
    """The feature matrix for candidates ``tracks`` (with their artists and catalog vectors).

    ``vectors`` are raw catalog vectors (``None`` when unknown), or an already fitted matrix
    of ``ITEM_DIM`` columns, as the store hands out for ranking.
    """
    n = len(tracks)
    if n == 0:
        return np.zeros((0, FEATURES), dtype=np.float32)
    items = vectors if isinstance(vectors, np.ndarray) else fit_rows(vectors)
    track_rows = HistoryTable.of([snapshot.tracks.get(t) for t in tracks])
    # Candidates share artists: look each one up once, then index (-1, the table's last row,
    # serves candidates without an artist).
    unique = {a: i for i, a in enumerate(dict.fromkeys(a for a in artists if a))}
    where = np.fromiter((unique[a] if a else -1 for a in artists), np.int64, n)
    artist_rows = HistoryTable.of([snapshot.artists.get(a) for a in unique])
    session = [
        np.array([*(counts.get(a, 0) for a in unique), 0], dtype=np.float64)[where]
        for counts in (snapshot.session_artist_skips, snapshot.session_artist_plays)
    ]
    return features(
        snapshot,
        Candidates(items, track_rows.gather(np.arange(n), snapshot.now),
                   artist_rows.gather(where, snapshot.now), *session),
    )  # fmt: skip


def features(snapshot: Snapshot, candidates: Candidates) -> Matrix:
    """The feature matrix: the user's state in ``snapshot``, the candidates' columns in
    ``candidates`` (the one place that knows the layout)."""
    # What every row shares (the user's state) is written once, into a row copied to all.
    shared, taste = _shared(snapshot)
    items = candidates.items
    x = np.empty((len(items), FEATURES), dtype=np.float32)
    x[:] = shared
    x[:, ITEM : ITEM + ITEM_DIM] = items
    if taste is not None:
        x[:, PRODUCT : PRODUCT + ITEM_DIM] = items * taste
        x[:, COSINE] = items @ taste
    _candidate_columns(x, candidates)
    return x


def features_of_many(snapshots: Sequence[tuple[Snapshot, int]], candidates: Candidates) -> Matrix:
    """:func:`features` of several snapshots at once, as training needs them (a snapshot per
    labelled event): the first ``count`` rows of ``candidates`` belong to the first snapshot,
    the next to the second, and so on. Equal, bit for bit, to concatenating ``features`` of
    each (the cosine is each snapshot's own matrix-vector product, as there)."""
    parts = [_shared(snapshot) for snapshot, _ in snapshots]
    counts = [count for _, count in snapshots]
    items = candidates.items
    if not parts:
        return np.zeros((0, FEATURES), dtype=np.float32)
    x = np.repeat(np.stack([shared for shared, _ in parts]), counts, axis=0)
    x[:, ITEM : ITEM + ITEM_DIM] = items
    starts = np.cumsum([0, *counts]).tolist()
    tasted = [(n, taste) for n, (_, taste) in enumerate(parts) if taste is not None]
    if tasted:
        rows = np.repeat([taste is not None for _, taste in parts], counts)
        their_tastes = np.repeat(np.stack([taste for _, taste in tasted]),
                                 [counts[n] for n, _ in tasted], axis=0)  # fmt: skip
        x[rows, PRODUCT : PRODUCT + ITEM_DIM] = items[rows] * their_tastes
        for n, taste in tasted:
            x[starts[n] : starts[n + 1], COSINE] = items[starts[n] : starts[n + 1]] @ taste
    _candidate_columns(x, candidates)
    return x


def _shared(snapshot: Snapshot) -> tuple[Matrix, npt.NDArray[np.float32] | None]:
    """The row every candidate of ``snapshot`` shares (the user's state), and the taste in
    the rows' precision (None without one)."""
    shared = np.zeros(FEATURES, dtype=np.float32)
    taste: npt.NDArray[np.float32] | None = None
    if snapshot.taste is not None:
        taste = fit_vector(snapshot.taste).astype(np.float32)  # the rows' precision
        shared[TASTE : TASTE + ITEM_DIM] = taste
        shared[HAS_TASTE] = 1.0
    shared[SESSION] = math.log1p(snapshot.session_skips)
    shared[SESSION + 1] = math.log1p(snapshot.session_plays)
    if snapshot.local_hour is not None:
        angle = 2 * math.pi * snapshot.local_hour / 24
        shared[TIME_OF_DAY], shared[TIME_OF_DAY + 1] = math.sin(angle), math.cos(angle)
    if snapshot.device_type is not None:
        shared[DEVICE + _DEVICE_INDEX.get(snapshot.device_type, 5)] = 1.0
    shared[CELLULAR] = float(snapshot.network == "cellular")
    shared[OFFLINE] = float(snapshot.network == "offline")
    return shared, taste


def _candidate_columns(x: Matrix, candidates: Candidates) -> None:
    """The candidates' own columns: history with the track and its artist, the artist's
    session counts."""
    x[:, TRACK : TRACK + 8] = candidates.tracks
    x[:, ARTIST : ARTIST + 8] = candidates.artists
    for column, counts in ((SESSION + 2, candidates.artist_skips),
                           (SESSION + 3, candidates.artist_plays)):  # fmt: skip
        if np.count_nonzero(counts):  # outside a session every count is 0, as the shared row says
            x[:, column] = np.log1p(counts)


def fit_rows(
    vectors: Sequence[npt.NDArray[np.float64] | None] | npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """``fit_vector`` for many vectors at once (one stack, one normalization); ``vectors`` may
    be a matrix (2-D), a row per vector."""
    out = np.zeros((len(vectors), ITEM_DIM))
    if isinstance(vectors, np.ndarray):
        known: list[int] | slice = slice(None)
        stacked = vectors
    else:
        known = [i for i, v in enumerate(vectors) if v is not None]
        if not known:
            return out
        stacked = np.stack([vectors[i] for i in known])  # type: ignore[misc]
    width = min(ITEM_DIM, stacked.shape[1])
    out[known, :width] = stacked[:, :width]
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


NO_HISTORY = History()
"""What a track or artist the user never met looks like (zero counts, never played)."""


class HistoryTable(NamedTuple):
    """History columns of many tracks (or artists) of one user, and a last row for "none".

    Eight columns per row: log plays, completion rate, log skips, early-skip rate, liked,
    disliked, recency, never played. Recency depends on the time of ranking, so the table
    keeps when each was last played and :meth:`gather` fills recency in.
    """

    columns: npt.NDArray[np.float64]  # (n + 1, 8), recency left at zero
    last_played: npt.NDArray[np.float64]  # (n + 1,), -1 when never played

    @classmethod
    def of(cls, rows: Sequence[History | None]) -> HistoryTable:
        stats = np.array([*(NO_HISTORY if h is None else h for h in rows), NO_HISTORY],
                         dtype=np.float64)  # fmt: skip
        plays, completions, skips, early, feedback, last = stats.T
        columns = np.column_stack([
            np.log1p(plays),
            completions / np.maximum(plays, 1),
            np.log1p(skips),
            early / np.maximum(plays + skips, 1),
            feedback > 0,
            feedback < 0,
            np.zeros_like(last),
            (plays == 0) & (skips == 0),
        ])  # fmt: skip
        return cls(columns, np.ascontiguousarray(last))

    def gather(self, rows: npt.NDArray[np.int64], now: int) -> npt.NDArray[np.float64]:
        """The columns of ``rows`` (-1: the "none" row) as of ``now`` (epoch ms)."""
        out = self.columns[rows]
        out[:, 6] = _recency(self.last_played[rows], now)
        return out

    def at(self, now: int) -> npt.NDArray[np.float64]:
        """Every row's columns as of ``now``: gather from this when ranking more candidates
        than the table has rows."""
        out = self.columns.copy()
        out[:, 6] = _recency(self.last_played, now)
        return out


def _recency(last: npt.NDArray[np.float64], now: int) -> npt.NDArray[np.float64]:
    """``exp(-days since last played / RECENCY_DAYS)``, 1 for a time after ``now``, 0 for
    never played (``last`` < 0)."""
    recency = np.minimum(last - now, 0.0)
    recency *= 1.0 / (86_400_000 * RECENCY_DAYS)
    np.exp(recency, out=recency)
    recency[last < 0] = 0.0
    return recency
