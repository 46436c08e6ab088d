"""Training examples from a user's own history, by replaying their events in time order.

Each labelled event becomes a feature row built from the state *before* it happened (so a
completed play does not teach "tracks already completed get completed"): completions and likes
are positives, early skips, short plays and dislikes negatives, and every positive brings a few
catalog tracks sampled uniformly as negatives. (Sampling only tracks the user had never
touched taught the model "unplayed means bad", a shortcut that hurt held-out ranking.) The
replay reuses the store's own counters (:class:`._derive.Counters`) so training sees the
features serving sees.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
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
    derive,
    is_completion,
    is_play,
)
from sottovoce.device._features import History, Snapshot, apply_context, assemble
from sottovoce.device._ranker import FEATURES


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


def build_examples(
    facts: Sequence[Fact],
    catalog: Mapping[str, tuple[str | None, Vector]],
    *,
    negatives: int = 4,
    limit: int = 2_000,
    seed: int = 0,
) -> Examples:
    """Examples from one user's ``facts`` (any order), the most recent ``limit`` kept."""
    rng = random.Random(seed)
    pool = sorted(catalog)
    rows: list[npt.NDArray[np.float32]] = []
    labels: list[float] = []
    weights: list[float] = []
    tracks: dict[str, Counters] = {}
    artists: dict[str, Counters] = {}
    taste: Taste | None = None
    session_end = -(2**62)
    session: dict[str, dict[str, int]] = {"skips": {}, "plays": {}}
    totals = {"skips": 0, "plays": 0}
    context: tuple[str, str, str, int] | None = None
    for fact in sorted(facts, key=lambda f: (f.ts, f.seq)):
        if fact.context is not None:
            context = (*fact.context, fact.ts)
        if fact.ts - session_end > SESSION_GAP_MS:
            session = {"skips": {}, "plays": {}}
            totals = {"skips": 0, "plays": 0}
        session_end = fact.ts
        verdict = label(fact) if fact.track is not None else None
        if verdict is not None and fact.track is not None:
            snap = Snapshot(
                now=fact.ts,
                tracks=_Histories(tracks),  # live views: used before the next event applies
                artists=_Histories(artists),
                taste=None if taste is None else taste.mean(),
                session_skips=totals["skips"],
                session_plays=totals["plays"],
                session_artist_skips=session["skips"],
                session_artist_plays=session["plays"],
            )
            apply_context(snap, context)  # as serving does
            chosen = [fact.track]
            if verdict[0] == 1.0 and pool:
                others = [t for t in rng.sample(pool, min(len(pool), negatives + 1))
                          if t != fact.track]  # fmt: skip
                chosen += others[:negatives]
            info = [catalog.get(t) for t in chosen]
            artists_of = [fact.artist] + [i[0] if i else None for i in info[1:]]
            x = assemble(snap, chosen, artists_of, [i[1] if i else None for i in info])
            rows.append(x)
            labels += [verdict[0]] + [0.0] * (len(chosen) - 1)
            weights += [verdict[1]] + [1.0] * (len(chosen) - 1)
        _apply(fact, tracks=tracks, artists=artists, session=session, totals=totals)
        known = catalog.get(fact.track) if fact.track is not None else None
        step = derive([fact], {fact.track: known[1]} if fact.track and known else {})
        for piece in step.taste.values():
            taste = piece if taste is None else taste.merge(piece)
    if not rows:
        empty = np.zeros((0, FEATURES), dtype=np.float32)
        return Examples(empty, np.zeros(0, np.float32), np.zeros(0, np.float32))
    x = np.concatenate(rows)[-limit:]
    y = np.array(labels, np.float32)[-limit:]
    return Examples(x, y, np.array(weights, np.float32)[-limit:])


class _Histories(Mapping[str, History]):
    """Counters seen as the ``History`` rows the features read, converted on access."""

    def __init__(self, counters: dict[str, Counters]) -> None:
        self._counters = counters

    def __getitem__(self, key: str) -> History:
        c = self._counters[key]
        return History(c.plays, c.completions, c.skips, c.early_skips, c.feedback,
                       c.last_played_ts if c.last_played_ts is not None else -1)  # fmt: skip

    def __iter__(self) -> Iterator[str]:
        return iter(self._counters)

    def __len__(self) -> int:
        return len(self._counters)


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
