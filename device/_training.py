"""Training examples from a user's own history, by replaying their events in time order.

Each labelled event becomes a feature row built from the state *before* it happened (so a
completed play does not teach "tracks already completed get completed"): completions and likes
are positives, early skips, short plays and dislikes negatives, and every positive brings a few
catalog tracks sampled uniformly as negatives. (Sampling only tracks the user had never
touched taught the model "unplayed means bad", a shortcut that hurt held-out ranking.) The
replay reuses the store's own counters (:class:`._derive.Counters`) and taste weights, and the
rows come from the layout of :func:`._features.features`, so training sees the features serving
sees.

Cost: a round trains on the most recent ``limit`` rows only, so a first pass draws every
event's negatives (the same draws, in the same order, whatever is kept) and finds the first
event that reaches those rows; the replay then updates counters for every event but collects
rows only from there on, and the rows' history columns are computed for all of them at once.
Every kept event's rows are then written at once (:func:`._features.features_of_many`: each
event's user-level state, one matrix), equal bit for bit to a ``features`` call per event.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from sottovoce.device._derive import (
    OUTCOMES,
    SESSION_GAP_MS,
    Counters,
    Fact,
    Taste,
    Vector,
    _taste_weight,  # derive's definition of what an engagement weighs
    is_completion,
    is_play,
)
from sottovoce.device._features import (
    Candidates,
    History,
    HistoryTable,
    Snapshot,
    apply_context,
    features_of_many,
    fit_rows,
)
from sottovoce.device._ranker import FEATURES

Catalog = Mapping[str, tuple[str | None, Vector]]


@dataclass(frozen=True)
class Examples:
    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.float32]
    w: npt.NDArray[np.float32]

    def __len__(self) -> int:
        return int(self.y.shape[0])


def label(fact: Fact) -> tuple[float, float] | None:
    """(label, weight) of an event, or None when it says nothing about preference.

    A play is labelled once, by its ``play_end`` (an early skip ends in a short play); the
    ``skip`` event of the same play is not labelled again, or the second example would see
    the first one's outcome in its features.
    """
    if fact.type == "play_end":
        if is_completion(fact.ms_played, fact.duration_ms):
            return 1.0, 1.0
        if not is_play(fact.ms_played, fact.duration_ms):
            return 0.0, 1.0
        return None  # a partial play: ambiguous
    if fact.type == "like":
        return 1.0, 2.0
    if fact.type == "dislike":
        return 0.0, 2.0
    return None


@dataclass(frozen=True)
class _Labelled:
    """One labelled event: where it is in the replay, its label and weight, the tracks of its
    rows (the event's own track first, then its sampled negatives)."""

    index: int
    label: float
    weight: float
    tracks: list[str]


def build_examples(
    facts: Sequence[Fact],
    catalog: Catalog,
    *,
    negatives: int = 4,
    limit: int = 2_000,
    seed: int = 0,
) -> Examples:
    """Examples from one user's ``facts`` (any order), the most recent ``limit`` rows kept."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    ordered = sorted(facts, key=lambda f: (f.ts, f.seq))
    plan = _plan(ordered, sorted(catalog), negatives=negatives, seed=seed)
    # The first event whose rows reach the most recent `limit` rows: the replay collects rows
    # from there on (the final cut drops the part of its rows before the limit).
    first, rows = len(plan), 0
    while first > 0 and rows < limit:
        first -= 1
        rows += len(plan[first].tracks)
    rows_x = _replay(ordered, plan[first:], catalog)
    if rows_x.shape[0] == 0:
        empty = np.zeros((0, FEATURES), dtype=np.float32)
        return Examples(empty, np.zeros(0, np.float32), np.zeros(0, np.float32))
    kept = plan[first:]
    y = np.array([v for e in kept for v in [e.label] + [0.0] * (len(e.tracks) - 1)], np.float32)
    w = np.array([v for e in kept for v in [e.weight] + [1.0] * (len(e.tracks) - 1)], np.float32)
    return Examples(rows_x[-limit:], y[-limit:], w[-limit:])


def _plan(ordered: Sequence[Fact], pool: list[str], *, negatives: int,
          seed: int) -> list[_Labelled]:  # fmt: skip
    """Every labelled event with its rows' tracks; negatives drawn in event order, so the
    draws do not depend on which events end up kept."""
    rng = random.Random(seed)
    plan = []
    for index, fact in enumerate(ordered):
        verdict = label(fact) if fact.track is not None else None
        if verdict is None or fact.track is None:
            continue
        chosen = [fact.track]
        if verdict[0] == 1.0 and pool:
            others = [t for t in rng.sample(pool, min(len(pool), negatives + 1))
                      if t != fact.track]  # fmt: skip
            chosen += others[:negatives]
        plan.append(_Labelled(index, verdict[0], verdict[1], chosen))
    return plan


class _Rows:
    """What the kept events' rows need, collected during the replay; turned into feature rows
    at the end (history columns for all rows at once, then the rows of every event at once,
    ``features_of_many``).

    Recency is measured from each event's time, but one ``gather`` measures from one time,
    ``now``: a row's last play is stored moved forward by ``now`` minus its event's time.
    Epoch milliseconds are exact in float64, so the differences, and the rows, are unchanged.
    """

    def __init__(self, now: int) -> None:
        self.now = now
        self.snapshots: list[tuple[Snapshot, int]] = []  # per event: its state, its row count
        self.vectors: list[Vector | None] = []
        self.tracks: list[History | None] = []
        self.artists: list[History | None] = []
        self.artist_skips: list[int] = []
        self.artist_plays: list[int] = []

    def history(self, counters: Counters | None, at: int) -> History | None:
        """The ``History`` that features read, as of an event at ``at``."""
        if counters is None:
            return None
        last = -1 if counters.last_played_ts is None else counters.last_played_ts
        moved = last + (self.now - at) if last >= 0 else last  # negative: never played
        return History(counters.plays, counters.completions, counters.skips,
                       counters.early_skips, counters.feedback, moved)  # fmt: skip

    def matrix(self) -> npt.NDArray[np.float32]:
        if not self.snapshots:
            return np.zeros((0, FEATURES), dtype=np.float32)
        every = np.arange(len(self.vectors))
        items = fit_rows(self.vectors)
        tracks = HistoryTable.of(self.tracks).gather(every, self.now)
        artists = HistoryTable.of(self.artists).gather(every, self.now)
        skips = np.array(self.artist_skips, dtype=np.float64)
        plays = np.array(self.artist_plays, dtype=np.float64)
        candidates = Candidates(items, tracks, artists, skips, plays)
        return features_of_many(self.snapshots, candidates)


def _replay(ordered: Sequence[Fact], kept: Sequence[_Labelled],
            catalog: Catalog) -> npt.NDArray[np.float32]:  # fmt: skip
    """Replay the events in order, collecting the rows of the ``kept`` events from the state
    just before each of them."""
    if not kept:
        return np.zeros((0, FEATURES), dtype=np.float32)
    last = kept[-1].index
    rows = _Rows(now=ordered[last].ts)
    wanted = {event.index: event for event in kept}
    tracks: dict[str, Counters] = {}
    artists: dict[str, Counters] = {}
    taste: Taste | None = None
    session_end = -(2**62)
    session: dict[str, dict[str, int]] = {"skips": {}, "plays": {}}
    totals = {"skips": 0, "plays": 0}
    context: tuple[str, str, str, int] | None = None
    for index, fact in enumerate(ordered[: last + 1]):
        if fact.context is not None:
            context = (*fact.context, fact.ts)
        if fact.ts - session_end > SESSION_GAP_MS:
            session = {"skips": {}, "plays": {}}
            totals = {"skips": 0, "plays": 0}
        session_end = fact.ts
        event = wanted.get(index)
        if event is not None:
            snapshot = Snapshot(now=fact.ts, taste=None if taste is None else taste.mean(),
                                session_skips=totals["skips"],
                                session_plays=totals["plays"])  # fmt: skip
            apply_context(snapshot, context)  # as serving does
            rows.snapshots.append((snapshot, len(event.tracks)))
            for n, track in enumerate(event.tracks):
                known = catalog.get(track)
                # The event's own track has the event's artist; a negative its catalog artist.
                artist = fact.artist if n == 0 else (known[0] if known else None)
                artist = artist or None  # an empty artist id is no artist, as in serving
                rows.vectors.append(known[1] if known else None)
                rows.tracks.append(rows.history(tracks.get(track), fact.ts))
                rows.artists.append(rows.history(artists.get(artist), fact.ts) if artist else None)
                rows.artist_skips.append(session["skips"].get(artist, 0) if artist else 0)
                rows.artist_plays.append(session["plays"].get(artist, 0) if artist else 0)
        _apply(fact, tracks=tracks, artists=artists, session=session, totals=totals)
        taste = _taste(taste, fact, catalog)
    return rows.matrix()


def _taste(taste: Taste | None, fact: Fact, catalog: Catalog) -> Taste | None:
    """The taste after ``fact``: what ``derive`` computes for it alone, merged in."""
    if fact.track is None or fact.type not in OUTCOMES:
        return taste
    weight = _taste_weight(fact)
    known = catalog.get(fact.track) if weight else None
    if known is None:
        return taste
    piece = Taste(fact.ts, weight, weight * known[1])
    return piece if taste is None else taste.merge(piece)


def _apply(
    fact: Fact,
    *,
    tracks: dict[str, Counters],
    artists: dict[str, Counters],
    session: dict[str, dict[str, int]],
    totals: dict[str, int],
) -> None:
    if fact.track is None or fact.type not in OUTCOMES:
        return
    tracks.setdefault(fact.track, Counters()).add(fact)
    if fact.artist is not None:
        artists.setdefault(fact.artist, Counters()).add(fact)
    kind = None
    if fact.type == "skip":
        kind = "skips"
    elif fact.type == "play_end" and is_play(fact.ms_played, fact.duration_ms):
        kind = "plays"
    if kind is not None:
        totals[kind] += 1
        if fact.artist is not None:
            counts = session[kind]
            counts[fact.artist] = counts.get(fact.artist, 0) + 1
