"""Derived state as a pure, mergeable function of events.

``derive(facts, vectors)`` turns events into a :class:`Derived` value: per-track and per-artist
counters, session runs, a decayed taste sum and the latest device context. Every part merges
associatively and commutatively (sums, maxima, interval unions, exponentially decayed sums), so
deriving a batch and merging it into stored state gives the same result as deriving all stored
events at once; ``tests/device/test_rebuild.py`` holds the store to that.

This module holds the definition: what counts (below), the mergeable values, and :func:`derive`,
which goes fact by fact (the reference, and what replays for training and ``rebuild_derived``
use). :mod:`._derive_columns` computes the same rows with numpy over a :class:`FactBatch`, which
the append path uses for all but small batches, since a per-fact Python loop was the largest
cost of ingest. ``tests/device/test_store.py`` (one against the other) and
``tests/device/test_rebuild.py`` (appended state against a rebuild) hold the two equal.

What counts (a 1-second play is not a 30-second play):

- a *play* is a ``play_end`` with at least 30 s listened (or half the track, for short tracks);
- a *completion* is a ``play_end`` with at least 90% of the track listened;
- a *skip* is a ``skip`` event; an *early skip* one within the first 30 s;
- likes and dislikes count, and the latest of them (by time) is the track's ``feedback``;
- starts, pauses, resumes and seeks count toward sessions only;
- a *session* is a run of one user's events with no gap longer than 30 minutes;
- the *taste* vector is the mean of catalog vectors of played (completion weighs 1.5) and liked
  (2.0) tracks, each weight decaying with a 6-hour half-life.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

QUALIFIED_PLAY_MS = 30_000
COMPLETION_FRACTION = 0.9
EARLY_SKIP_MS = 30_000
SESSION_GAP_MS = 30 * 60 * 1000
TASTE_HALF_LIFE_MS = 6 * 3600 * 1000
_TAU = TASTE_HALF_LIFE_MS / math.log(2)
PLAY_WEIGHT, COMPLETION_BONUS, LIKE_WEIGHT = 1.0, 0.5, 2.0
# The events that change per-item statistics; the others (start, pause, resume, seek) carry no
# outcome of their own and count only toward sessions.
OUTCOMES = frozenset({"play_end", "skip", "like", "dislike"})

Vector = npt.NDArray[np.float64]


class Fact(NamedTuple):
    """What derivation needs of one stored event (a tuple: made once per event, so cheap)."""

    seq: int
    user: int  # the store's reference to the (salted, hashed) user
    type: str
    ts: int  # epoch milliseconds
    track: str | None = None
    artist: str | None = None
    ms_played: int = 0
    duration_ms: int = 0
    position_ms: int = 0
    context: tuple[str, str, str] | None = None  # device_type, network, local time


class FactBatch(NamedTuple):
    """Facts as columns (one sequence per :class:`Fact` field, all of one length)."""

    seq: Sequence[int]
    user: Sequence[int]
    type: Sequence[str]
    ts: Sequence[int]
    track: Sequence[str | None]
    artist: Sequence[str | None]
    ms_played: Sequence[int]
    duration_ms: Sequence[int]
    position_ms: Sequence[int]
    context: Sequence[tuple[str, str, str] | None]

    @classmethod
    def of(cls, facts: Sequence[Fact]) -> FactBatch:
        if not facts:
            return cls((), (), (), (), (), (), (), (), (), ())
        return cls(*zip(*facts, strict=True))


def is_play(ms_played: int, duration_ms: int) -> bool:
    return ms_played >= min(QUALIFIED_PLAY_MS, duration_ms // 2)


def is_completion(ms_played: int, duration_ms: int) -> bool:
    return ms_played >= COMPLETION_FRACTION * duration_ms


@dataclass(slots=True)
class Counters:
    """Additive per-(user, track) or per-(user, artist) statistics."""

    plays: int = 0
    completions: int = 0
    skips: int = 0
    early_skips: int = 0
    ms_played: int = 0
    likes: int = 0
    dislikes: int = 0
    feedback: int = 0  # +1 liked, -1 disliked, by the latest like/dislike
    feedback_at: tuple[int, int] | None = None  # (ts, seq) of that latest like/dislike
    last_played_ts: int | None = None
    last_event_ts: int | None = None
    artist: str | None = None  # for track counters only

    def add(self, fact: Fact) -> None:
        kind = fact.type
        if kind == "play_end":
            self.ms_played += fact.ms_played
            if is_play(fact.ms_played, fact.duration_ms):
                self.plays += 1
                self.last_played_ts = _max(self.last_played_ts, fact.ts)
            if is_completion(fact.ms_played, fact.duration_ms):
                self.completions += 1
        elif kind == "skip":
            self.skips += 1
            if fact.position_ms < EARLY_SKIP_MS:
                self.early_skips += 1
        elif kind in ("like", "dislike"):
            if kind == "like":
                self.likes += 1
            else:
                self.dislikes += 1
            at = (fact.ts, fact.seq)
            if self.feedback_at is None or at > self.feedback_at:
                self.feedback, self.feedback_at = (1 if kind == "like" else -1), at
        self.last_event_ts = _max(self.last_event_ts, fact.ts)
        if self.artist is None:
            self.artist = fact.artist

    def values(self) -> tuple[Any, ...]:
        """The counters in stored column order (see :data:`COUNTER_ROW`)."""
        fb_ts, fb_seq = self.feedback_at if self.feedback_at is not None else (None, None)
        return (self.plays, self.completions, self.skips, self.early_skips, self.ms_played,
                self.likes, self.dislikes, self.feedback, fb_ts, fb_seq, self.last_played_ts,
                self.last_event_ts)  # fmt: skip


@dataclass(slots=True)
class Run:
    """A session: one user's events with no gap longer than ``SESSION_GAP_MS``."""

    start: int
    end: int
    events: int = 0
    plays: int = 0
    completions: int = 0
    skips: int = 0
    ms_played: int = 0

    def absorb(self, other: Run) -> None:
        self.start, self.end = min(self.start, other.start), max(self.end, other.end)
        self.events += other.events
        self.plays += other.plays
        self.completions += other.completions
        self.skips += other.skips
        self.ms_played += other.ms_played


@dataclass(slots=True)
class Taste:
    """An exponentially decayed weighted sum of item vectors, referenced to time ``ref``."""

    ref: int
    weight: float
    total: Vector

    def merge(self, other: Taste) -> Taste:
        ref = max(self.ref, other.ref)
        a, b = _decay(ref - self.ref), _decay(ref - other.ref)
        return Taste(ref, self.weight * a + other.weight * b, self.total * a + other.total * b)

    def mean(self) -> Vector | None:
        """The taste vector: decayed mean of what the user engaged with."""
        if self.weight <= 0:
            return None
        return self.total / self.weight


COUNTER_ROW = (
    "plays", "completions", "skips", "early_skips", "ms_played", "likes", "dislikes", "feedback",
    "feedback_ts", "feedback_seq", "last_played_ts", "last_event_ts",
)  # fmt: skip
"""The columns of a counter row, after its key (user, track, artist / user, artist)."""

ContextAt = tuple[tuple[int, int], tuple[str, str, str]]  # ((ts, seq), context)


@dataclass
class DerivedRows:
    """Derived state as rows ready to merge: what both implementations produce.

    ``tracks`` rows are (user, track, artist, *counters), ``artists`` rows (user, artist,
    *counters), counters in :data:`COUNTER_ROW` order; row order carries no meaning.
    """

    tracks: list[tuple[Any, ...]] = field(default_factory=list)
    artists: list[tuple[Any, ...]] = field(default_factory=list)
    runs: dict[int, list[Run]] = field(default_factory=dict)
    taste: dict[int, Taste] = field(default_factory=dict)
    context: dict[int, ContextAt] = field(default_factory=dict)


@dataclass
class Derived:
    """Everything derived from a set of events, ready to merge into stored state."""

    tracks: dict[tuple[int, str], Counters] = field(default_factory=dict)
    artists: dict[tuple[int, str], Counters] = field(default_factory=dict)
    runs: dict[int, list[Run]] = field(default_factory=dict)
    taste: dict[int, Taste] = field(default_factory=dict)
    context: dict[int, ContextAt] = field(default_factory=dict)

    def rows(self) -> DerivedRows:
        return DerivedRows(
            tracks=[(u, t, c.artist, *c.values()) for (u, t), c in self.tracks.items()],
            artists=[(u, a, *c.values()) for (u, a), c in self.artists.items()],
            runs=self.runs,
            taste=self.taste,
            context=self.context,
        )


def derive(facts: Iterable[Fact], vectors: Mapping[str, Vector]) -> Derived:
    """Derive state from ``facts``; ``vectors`` maps track ids to catalog vectors."""
    out = Derived()
    tracks, artists, context = out.tracks, out.artists, out.context
    by_user: dict[int, list[Fact]] = {}
    engaged: dict[int, list[tuple[int, float, Vector]]] = {}
    for fact in facts:
        user = fact.user
        user_facts = by_user.get(user)
        if user_facts is None:
            user_facts = by_user[user] = []
        user_facts.append(fact)
        if fact.track is not None and fact.type in OUTCOMES:
            key = (user, fact.track)
            counters = tracks.get(key)
            if counters is None:
                counters = tracks[key] = Counters()
            counters.add(fact)
            if fact.artist is not None:
                akey = (user, fact.artist)
                acounters = artists.get(akey)
                if acounters is None:
                    acounters = artists[akey] = Counters()
                acounters.add(fact)
            weight = _taste_weight(fact)
            vector = vectors.get(fact.track) if weight else None
            if vector is not None:
                engaged.setdefault(user, []).append((fact.ts, weight, vector))
        elif fact.context is not None:
            at = (fact.ts, fact.seq)
            prior = context.get(user)
            if prior is None or at > prior[0]:
                context[user] = (at, fact.context)
    for user, user_facts in by_user.items():
        out.runs[user] = _runs(user_facts)
    for user, items in engaged.items():
        out.taste[user] = _taste(items)
    return out


def _taste(items: list[tuple[int, float, Vector]]) -> Taste:
    """The decayed sum of engaged items, referenced to the latest of them."""
    ref = max(ts for ts, _, _ in items)
    weights = np.array([w * _decay(ref - ts) for ts, w, _ in items])
    total = weights @ np.stack([v for _, _, v in items])
    return Taste(ref, float(weights.sum()), total)


def _runs(facts: list[Fact]) -> list[Run]:
    facts = sorted(facts, key=lambda f: f.ts)
    runs: list[Run] = []
    current: Run | None = None
    for fact in facts:
        if current is None or fact.ts - current.end > SESSION_GAP_MS:
            current = Run(fact.ts, fact.ts)
            runs.append(current)
        current.end = max(current.end, fact.ts)
        current.events += 1
        if fact.type == "play_end":
            current.ms_played += fact.ms_played
            current.plays += is_play(fact.ms_played, fact.duration_ms)
            current.completions += is_completion(fact.ms_played, fact.duration_ms)
        elif fact.type == "skip":
            current.skips += 1
    return runs


def _taste_weight(fact: Fact) -> float:
    if fact.type == "like":
        return LIKE_WEIGHT
    if fact.type == "play_end" and is_play(fact.ms_played, fact.duration_ms):
        bonus = COMPLETION_BONUS if is_completion(fact.ms_played, fact.duration_ms) else 0.0
        return PLAY_WEIGHT + bonus
    return 0.0


def _decay(elapsed_ms: int) -> float:
    return math.exp(-elapsed_ms / _TAU)


def _max(a: int | None, b: int) -> int:
    return b if a is None or b > a else a
