"""Offline evaluation: a per-user holdout, candidate pools, ranking metrics and baselines, and
the bridge from a dataset's interactions to what a device store takes.

Data flow position: :func:`split_holdout` cuts a :class:`~._datasets.Dataset` into training
interactions and held-out items; :func:`device_events` and :func:`catalog_items` turn the
training side into events and catalog rows for ``EventStore``; after training, every evaluated
user's :class:`Pool` (held-out items among sampled items the user never touched) is ranked by
a rank function, and :func:`evaluate` averages HR@k, NDCG@k and MRR over users.

The bridge into a device store (:func:`device_events`, :func:`catalog_items`) is in
:mod:`._device_feed`; this module re-exports it.

Protocol: a user with at least ``min_items`` positive items (listened or liked) has
``max(1, round(fraction * n))`` of them held out (at least one stays for training); a user
with fewer is training-only: their interactions train models and shape item vectors, but
they are not evaluated. Every interaction with a held-out item leaves the training side.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from sottovoce.sim._datasets import (
    Dataset,
    Interaction,
    id_key,
    positive_items,
)
from sottovoce.sim._device_feed import (  # re-exported
    MAX_INTERACTIONS,
    catalog_items,
    device_events,
    track_length,
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


__all__ = [
    "MAX_INTERACTIONS", "Pool", "PopularityRanker", "RandomRanker", "RankFn", "Split",
    "candidate_pool", "candidate_pools", "catalog_items", "device_events", "evaluate", "hr_at_k",
    "mrr", "ndcg_at_k", "split_holdout", "track_length",
]  # fmt: skip
