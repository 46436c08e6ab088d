"""Offline evaluation: a per-user holdout, candidate pools, ranking metrics and baselines, and
the bridge from a dataset's interactions to what a device store takes.

Data flow position: :func:`split_holdout` cuts a :class:`~._datasets.Dataset` into training
interactions and held-out items; :func:`device_events` and :func:`catalog_items` turn the
training side into events and catalog rows for ``EventStore``; after training, every evaluated
user's :class:`Pool` (held-out items among sampled items the user never touched) is ranked by
a rank function, and :func:`evaluate` averages HR@k, NDCG@k and MRR over users.

Protocol: a user with at least ``min_items`` positive items (listened or liked) has
``max(1, round(fraction * n))`` of them held out (at least one stays for training); a user
with fewer is training-only: their interactions train models and shape item vectors, but
they are not evaluated. Every interaction with a held-out item leaves the training side.
"""

from __future__ import annotations

import math
import random
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from sottovoce.sim._datasets import (
    POSITIVE_TYPES,
    Dataset,
    Interaction,
    Vector,
    id_key,
    positive_items,
)

RankFn = Callable[[str, Sequence[str]], Sequence[str]]
"""(user, candidates) -> the same candidates, best first."""


@dataclass(frozen=True, eq=False)
class Split:
    """A holdout: ``train`` has every user's training interactions, ``heldout`` the held-out
    items of each evaluated user, ``touched`` every item each user interacted with."""

    train: Mapping[str, tuple[Interaction, ...]]
    heldout: Mapping[str, frozenset[str]]
    touched: Mapping[str, frozenset[str]]
    fraction: float
    seed: int

    @property
    def evaluated(self) -> tuple[str, ...]:
        return tuple(sorted(self.heldout, key=id_key))

    def heldout_pairs(self) -> frozenset[tuple[str, str]]:
        return frozenset((u, i) for u, items in self.heldout.items() for i in items)


def split_holdout(
    dataset: Dataset, *, fraction: float = 0.2, seed: int = 0, min_items: int = 5,
    by: str = "random",
) -> Split:  # fmt: skip
    """Hold out ``fraction`` of every user's positive items: chosen at random (``by="random"``;
    the same user gets the same items whatever else is in the dataset), or the user's latest
    (``by="time"``: items by their last interaction's time; every interaction needs one)."""
    if by not in ("random", "time"):
        raise ValueError(f"by must be 'random' or 'time', not {by!r}")
    if by == "time" and any(i.timestamp is None for rows in dataset.interactions.values()
                            for i in rows):  # fmt: skip
        raise ValueError("a time split needs a timestamp on every interaction; this dataset "
                         "has interactions without one (use the random split)")  # fmt: skip
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be between 0 and 1, not {fraction}")
    if min_items < 2:
        raise ValueError("min_items must be at least 2 (one to hold out, one to train on)")
    train: dict[str, tuple[Interaction, ...]] = {}
    heldout: dict[str, frozenset[str]] = {}
    touched: dict[str, frozenset[str]] = {}
    for user in dataset.users:
        rows = dataset.interactions[user]
        touched[user] = frozenset(i.item for i in rows)
        positives = sorted(positive_items(rows), key=id_key)
        if len(positives) < min_items:
            train[user] = rows
            continue
        k = min(max(1, round(fraction * len(positives))), len(positives) - 1)
        if by == "time":
            last: dict[str, int] = {}
            wanted = set(positives)
            for row in rows:
                if row.item in wanted:
                    last[row.item] = max(last.get(row.item, 0), row.timestamp or 0)
            latest = sorted(positives, key=lambda item: (last.get(item, 0), id_key(item)))
            held = frozenset(latest[-k:])
        else:
            held = frozenset(random.Random(f"{seed}:holdout:{user}").sample(positives, k))
        heldout[user] = held
        train[user] = tuple(i for i in rows if i.item not in held)
    return Split(train, heldout, touched, fraction, seed)


@dataclass(frozen=True)
class Pool:
    """One user's candidates (shuffled) and which of them are relevant (held out)."""

    user: str
    candidates: tuple[str, ...]
    relevant: frozenset[str]


def candidate_pool(
    split: Split,
    user: str,
    *,
    universe: Sequence[str],
    negatives: int = 100,
    rng: random.Random,
) -> Pool:
    """The user's held-out items and ``negatives`` items of ``universe`` the user never
    touched (fewer if the universe has fewer), in a random order."""
    if user not in split.heldout:
        raise ValueError(f"user {user!r} has no held-out items (not evaluated)")
    touched = split.touched.get(user, frozenset())
    relevant = split.heldout[user]
    picked: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(picked) < negatives and attempts < 20 * negatives + 1_000:
        attempts += 1
        item = universe[rng.randrange(len(universe))] if universe else None
        if item is None:
            break
        if item not in touched and item not in seen:
            seen.add(item)
            picked.append(item)
    if len(picked) < negatives:  # a small or crowded universe: take from what is left
        rest = [i for i in dict.fromkeys(universe) if i not in touched and i not in seen]
        rng.shuffle(rest)
        picked += rest[: negatives - len(picked)]
    candidates = sorted(relevant, key=id_key) + picked
    rng.shuffle(candidates)  # ties in a ranker must not favour the held-out items
    return Pool(user, tuple(candidates), relevant)


def candidate_pools(
    split: Split, *, universe: Sequence[str], negatives: int = 100, seed: int = 0
) -> list[Pool]:
    """:func:`candidate_pool` for every evaluated user, each with its own seeded generator."""
    return [
        candidate_pool(
            split,
            user,
            universe=universe,
            negatives=negatives,
            rng=random.Random(f"{seed}:pool:{user}"),
        )
        for user in split.evaluated
    ]


# --- Metrics -------------------------------------------------------------------------------


def hr_at_k(ranked: Sequence[str], relevant: Iterable[str], k: int = 10) -> float:
    """1 if any relevant item is in the first ``k``, else 0."""
    wanted = set(relevant)
    return float(any(item in wanted for item in ranked[:k]))


def ndcg_at_k(ranked: Sequence[str], relevant: Iterable[str], k: int = 10) -> float:
    """Binary-relevance DCG of the first ``k`` over the ideal DCG of min(k, |relevant|) hits."""
    wanted = set(relevant)
    dcg = sum(1 / math.log2(n + 2) for n, item in enumerate(ranked[:k]) if item in wanted)
    ideal = sum(1 / math.log2(n + 2) for n in range(min(k, len(wanted))))
    return dcg / ideal if ideal else 0.0


def mrr(ranked: Sequence[str], relevant: Iterable[str]) -> float:
    """1 / the rank of the first relevant item (0 when none is ranked)."""
    wanted = set(relevant)
    return next((1 / (n + 1) for n, item in enumerate(ranked) if item in wanted), 0.0)


def evaluate(rank_fn: RankFn, pools: Sequence[Pool], *, k: int = 10) -> dict[str, float]:
    """HR@k, NDCG@k and MRR averaged over the pools' users."""
    if not pools:
        raise ValueError("no pools to evaluate: no user has held-out items")
    totals = {f"hr@{k}": 0.0, f"ndcg@{k}": 0.0, "mrr": 0.0}
    for pool in pools:
        ranked = list(rank_fn(pool.user, pool.candidates))
        if len(ranked) != len(pool.candidates) or set(ranked) != set(pool.candidates):
            raise ValueError(
                f"the ranking for user {pool.user!r} is not a permutation of its candidates"
            )
        totals[f"hr@{k}"] += hr_at_k(ranked, pool.relevant, k)
        totals[f"ndcg@{k}"] += ndcg_at_k(ranked, pool.relevant, k)
        totals["mrr"] += mrr(ranked, pool.relevant)
    return {name: value / len(pools) for name, value in totals.items()}


class RandomRanker:
    """Candidates in a random order (seeded per user): the floor every model must clear."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def __call__(self, user: str, candidates: Sequence[str]) -> list[str]:
        ranked = list(candidates)
        random.Random(f"{self.seed}:random:{user}").shuffle(ranked)
        return ranked


class PopularityRanker:
    """Candidates by how many users listened to or liked them in training (ties keep the
    candidates' order)."""

    def __init__(self, train: Mapping[str, Sequence[Interaction]]) -> None:
        self.counts = Counter(item for rows in train.values() for item in positive_items(rows))

    def __call__(self, user: str, candidates: Sequence[str]) -> list[str]:
        return sorted(candidates, key=lambda item: -self.counts.get(item, 0))


# --- Into a device store -------------------------------------------------------------------

SESSION_PLAYS = (5, 15)  # plays per session when the data has no times
MAX_INTERACTIONS = 2_000
"""The most a device replays of a user's interactions: the most recent ones (a device trains
on its recent history, ``SimulationConfig.examples`` examples)."""
_DEVICES = ("phone", "desktop", "speaker", "tablet")
_SKIP_MS = (2_000, 20_000)  # how long a skipped track plays


def device_events(
    user: str,
    interactions: Sequence[Interaction],
    *,
    artists: Mapping[str, str | None],
    end: datetime,
    days: float = 28.0,
    seed: int = 0,
    max_plays: int = 4,
    device_id: str | None = None,
) -> list[dict[str, Any]]:
    """The user's training interactions as device events for ``EventStore.append_many``.

    A ``play`` worth ``value`` listens becomes min(``max_plays``, 1 + floor(log2(value)))
    completed plays (``play_start`` then ``play_end`` with the whole track played), so heavy
    listeners stay cheap; ``complete`` is one completed play, ``skip`` a play skipped within
    seconds, ``like``/``dislike`` the event itself. Everything lands in the ``days`` before
    ``end`` (the store's clock; keep ``days`` inside the region's raw-event retention): when
    every interaction has a time, in that order and with proportional gaps; otherwise in
    sessions of 5 to 15 plays at seeded random times. Each session opens with a ``context``
    event. Track lengths are fixed per item (2.5 to 5 minutes).

    Any user fits, however heavy: only the :data:`MAX_INTERACTIONS` most recent interactions
    are replayed (by time, or the last rows when some have no time); if their plays back to
    back would still outlast ``days``, each interaction gets fewer plays (down to one), then
    the oldest are left out until the rest fit. An action is never placed so late that those
    after it could not finish by ``end``.
    """
    if days < 2:
        raise ValueError("days must be at least 2")
    if end.tzinfo is None:
        raise ValueError("end must be timezone-aware")
    rng = random.Random(f"{seed}:events:{user}")
    rows = list(interactions)
    timed = all(row.timestamp is not None for row in rows)
    if timed:
        rows.sort(key=lambda row: (row.timestamp or 0, id_key(row.item)))
    plays, rows = _fit(rows[-MAX_INTERACTIONS:], window_ms=days * 86_400_000, max_plays=max_plays)
    actions = [(row.timestamp, row) for row in rows for _ in range(_plays(row, plays))]
    if not actions:
        return []
    start = end - timedelta(days=days)
    span_ms = (days - 1) * 86_400_000  # the last day stays free for sessions to finish
    if timed:
        first, last = actions[0][0] or 0, actions[-1][0] or 0
        scale = span_ms / max(last - first, 1)
        starts = [start + timedelta(milliseconds=((ts or 0) - first) * scale) for ts, _ in actions]
    else:
        rng.shuffle(actions)
        starts = _session_starts(len(actions), rng, start, span_ms)
    latest = _latest_starts([row for _, row in actions], end)
    device = rng.choice(_DEVICES)
    out: list[dict[str, Any]] = []
    clock = start
    for wanted, deadline, (_, row) in zip(starts, latest, actions, strict=True):
        when = min(wanted, deadline)
        if when - clock > timedelta(minutes=30) or not out:
            out.append(
                {
                    "type": "context",
                    "ts": when,
                    "device_type": device,
                    "network": rng.choice(("wifi", "wifi", "cellular")),
                    "local_time": when.strftime("%H:%M"),
                }
            )
        clock = max(clock, when) + timedelta(seconds=1)
        clock = _play(out, row, clock, artists.get(row.item), rng)
    for n, event in enumerate(out):
        event.update(event_id=f"{user}.{n}", user_id=user, ts=event["ts"].isoformat())
        if device_id is not None:
            event["device_id"] = device_id
    return out


def _plays(row: Interaction, most: int) -> int:
    """How many actions an interaction becomes: a play's count, capped at ``most``; one for
    anything else."""
    if row.event_type != "play":
        return 1
    return min(most, 1 + int(math.log2(max(row.value, 1.0))))


def _action_ms(row: Interaction) -> int:
    """The most time one action of ``row`` takes on the device's clock: the second before it
    starts and the part of the track it plays."""
    if row.event_type in ("like", "dislike"):
        return 1_000
    return 1_000 + (_SKIP_MS[1] if row.event_type == "skip" else track_length(row.item))


def _fit(
    rows: list[Interaction], *, window_ms: float, max_plays: int
) -> tuple[int, list[Interaction]]:
    """The most plays per interaction (up to ``max_plays``) and the most recent rows whose
    actions fit back to back in ``window_ms``: fewer plays first, then fewer rows."""
    lengths = [_action_ms(row) for row in rows]
    for most in range(max(max_plays, 1), 0, -1):
        if sum(n * _plays(r, most) for n, r in zip(lengths, rows, strict=True)) <= window_ms:
            return most, rows
    total, keep = 0, 0
    for length in reversed(lengths):  # one play each: keep the newest rows that fit
        total += length
        if total > window_ms:
            break
        keep += 1
    return 1, rows[len(rows) - keep :]


def _latest_starts(rows: Sequence[Interaction], end: datetime) -> list[datetime]:
    """For each action, the latest start that still lets it and every action after it finish
    by ``end`` when played back to back."""
    latest: list[datetime] = []
    at = end
    for row in reversed(rows):
        at -= timedelta(milliseconds=_action_ms(row))
        latest.append(at)
    return latest[::-1]


def _session_starts(
    count: int, rng: random.Random, start: datetime, span_ms: float
) -> list[datetime]:
    """A start time per action: sessions at sorted random times, actions back to back."""
    sizes: list[int] = []
    while sum(sizes) < count:
        sizes.append(rng.randint(*SESSION_PLAYS))
    offsets = sorted(rng.uniform(0, span_ms) for _ in sizes)
    starts: list[datetime] = []
    for size, offset in zip(sizes, offsets, strict=True):
        starts += [start + timedelta(milliseconds=offset)] * size
    return starts[:count]


def _play(
    out: list[dict[str, Any]],
    row: Interaction,
    at: datetime,
    artist: str | None,
    rng: random.Random,
) -> datetime:
    """Append the events of one action at ``at``; returns when it ends."""
    base = {"track_id": row.item, "artist_id": artist} if artist else {"track_id": row.item}
    if row.event_type in ("like", "dislike"):
        out.append({**base, "type": row.event_type, "ts": at})
        return at
    duration = track_length(row.item)
    played = duration if row.event_type in POSITIVE_TYPES else rng.randint(*_SKIP_MS)
    out.append({**base, "type": "play_start", "ts": at, "duration_ms": duration})
    done = at + timedelta(milliseconds=played)
    if row.event_type == "skip":
        out.append(
            {**base, "type": "skip", "ts": done, "position_ms": played, "duration_ms": duration}
        )
    out.append(
        {**base, "type": "play_end", "ts": done, "ms_played": played, "duration_ms": duration}
    )
    return done


def track_length(item: str) -> int:
    """A fixed, made-up length in ms for an item (150 to 300 s), the same on every device."""
    return 150_000 + zlib.crc32(item.encode()) % 150_000


def catalog_items(
    dataset: Dataset, vectors: Mapping[str, Vector], *, items: Iterable[str] | None = None
) -> list[dict[str, Any]]:
    """Catalog rows for ``EventStore.upsert_catalog`` (every item, or ``items``); an item
    without a vector gets zeros of the others' width."""
    width = len(next(iter(vectors.values()))) if vectors else 1
    rows = []
    for item in dataset.items if items is None else items:
        vector = vectors.get(item)
        row: dict[str, Any] = {
            "track_id": item,
            "artist_id": dataset.artists.get(item),
            "vector": [0.0] * width if vector is None else np.asarray(vector, float).tolist(),
        }
        if item in dataset.titles:
            row["title"] = dataset.titles[item]
        rows.append(row)
    return rows
