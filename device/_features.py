"""Feature rows for the ranker: one row of ``FEATURES`` floats per candidate track.

Data flow position: :mod:`._rerank` loads a :class:`Snapshot` of the user's state from the store
(a fixed number of queries, whatever the number of candidates) and local training builds
snapshots by replaying events; both turn a snapshot and candidates into a matrix with
:func:`assemble`, vectorized with numpy, so serving and training see identical features.

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
from typing import NamedTuple

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
    norm = float(np.linalg.norm(out))
    return out / norm if norm > 0 else out


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
    x = np.zeros((n, FEATURES), dtype=np.float32)
    if n == 0:
        return x
    items = vectors if isinstance(vectors, np.ndarray) else fit_rows(vectors)
    x[:, ITEM : ITEM + ITEM_DIM] = items
    if snapshot.taste is not None:
        taste = fit_vector(snapshot.taste)
        x[:, TASTE : TASTE + ITEM_DIM] = taste
        x[:, PRODUCT : PRODUCT + ITEM_DIM] = items * taste
        x[:, COSINE] = items @ taste
        x[:, HAS_TASTE] = 1.0
    x[:, TRACK : TRACK + 8] = _history([snapshot.tracks.get(t) for t in tracks], snapshot.now)
    # Candidates share artists: compute each artist's columns once, then index (the extra
    # last row, "never played", serves candidates without an artist).
    unique = {a: i for i, a in enumerate(dict.fromkeys(a for a in artists if a))}
    per_artist = _history([*(snapshot.artists.get(a) for a in unique), None], snapshot.now)
    where = np.fromiter((unique[a] if a else -1 for a in artists), np.int64, n)
    x[:, ARTIST : ARTIST + 8] = per_artist[where]
    x[:, SESSION] = math.log1p(snapshot.session_skips)
    x[:, SESSION + 1] = math.log1p(snapshot.session_plays)
    for column, counts in ((SESSION + 2, snapshot.session_artist_skips),
                           (SESSION + 3, snapshot.session_artist_plays)):  # fmt: skip
        if counts:  # per unique artist, then indexed like the artist history above
            per = np.log1p([*(counts.get(a, 0) for a in unique), 0])
            x[:, column] = per[where]
    if snapshot.local_hour is not None:
        angle = 2 * math.pi * snapshot.local_hour / 24
        x[:, TIME_OF_DAY], x[:, TIME_OF_DAY + 1] = math.sin(angle), math.cos(angle)
    if snapshot.device_type is not None:
        x[:, DEVICE + _DEVICE_INDEX.get(snapshot.device_type, 5)] = 1.0
    x[:, CELLULAR] = float(snapshot.network == "cellular")
    x[:, OFFLINE] = float(snapshot.network == "offline")
    return x


def fit_rows(vectors: Sequence[npt.NDArray[np.float64] | None]) -> npt.NDArray[np.float64]:
    """``fit_vector`` for many vectors at once (one stack, one normalization)."""
    out = np.zeros((len(vectors), ITEM_DIM))
    known = [i for i, v in enumerate(vectors) if v is not None]
    if known:
        stacked = np.stack([vectors[i] for i in known])  # type: ignore[misc]
        width = min(ITEM_DIM, stacked.shape[1])
        out[known, :width] = stacked[:, :width]
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
    return out


def _history(rows: Sequence[History | None], now: int) -> npt.NDArray[np.float64]:
    """Eight columns per row: log plays, completion rate, log skips, early-skip rate, liked,
    disliked, recency, never played."""
    out = np.zeros((len(rows), 8))
    out[:, 7] = 1.0
    known = [i for i, h in enumerate(rows) if h is not None]
    if not known:
        return out
    stats = np.array([rows[i] for i in known], dtype=np.float64)
    plays, completions, skips, early, feedback, last = stats.T
    days = np.maximum(now - last, 0) / 86_400_000
    out[known] = np.column_stack([
        np.log1p(plays),
        completions / np.maximum(plays, 1),
        np.log1p(skips),
        early / np.maximum(plays + skips, 1),
        feedback > 0,
        feedback < 0,
        np.where(last >= 0, np.exp(-days / RECENCY_DAYS), 0.0),
        (plays == 0) & (skips == 0),
    ])  # fmt: skip
    return out
