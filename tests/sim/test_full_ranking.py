"""Full-ranking evaluation against a plain per-user implementation, and its protocol."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
import scipy.sparse as sp

from sottovoce.sim._full_ranking import Interactions, evaluate_full


def _data(users: int = 40, items: int = 60, seed: int = 1) -> Interactions:
    rng = np.random.default_rng(seed)
    train = (rng.random((users, items)) < 0.15).astype(np.float64)
    heldout = {}
    for u in range(users):
        free = np.flatnonzero(train[u] == 0)
        if u % 5 != 4:  # every fifth user is not evaluated
            heldout[u] = np.sort(rng.choice(free, size=1 + u % 4, replace=False))
    return Interactions(tuple(f"u{u}" for u in range(users)), tuple(f"i{i}" for i in range(items)),
                        sp.csr_matrix(train), heldout)  # fmt: skip


def _plain(scores: npt.NDArray[np.float64], data: Interactions, k: int = 10) -> dict[str, float]:
    """One user at a time, with Python lists: sort every candidate by score (no ties here)."""
    totals = {"ndcg@10": 0.0, "recall@10": 0.0, "hr@10": 0.0, "mrr": 0.0}
    for u, relevant in data.heldout.items():
        trained = set(data.train[u].indices)
        ranked = sorted((i for i in range(len(data.items)) if i not in trained),
                        key=lambda i: -scores[u, i])  # fmt: skip
        hits = [i in set(relevant) for i in ranked[:k]]
        dcg = sum(1 / math.log2(n + 2) for n, hit in enumerate(hits) if hit)
        ideal = sum(1 / math.log2(n + 2) for n in range(min(k, len(relevant))))
        totals["ndcg@10"] += dcg / ideal
        totals["recall@10"] += sum(hits) / min(k, len(relevant))
        totals["hr@10"] += float(any(hits))
        first = next(n for n, i in enumerate(ranked) if i in set(relevant))
        totals["mrr"] += 1 / (first + 1)
    return {name: value / len(data.heldout) for name, value in totals.items()}


def test_the_vectorized_metrics_match_a_plain_implementation() -> None:
    data = _data()
    scores = np.random.default_rng(2).random((len(data.users), len(data.items)))
    result = evaluate_full(lambda users: scores[users], data, bootstrap=200)
    expected = _plain(scores, data)
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, abs=1e-5), name
        low, high = result["ci"][name]
        assert low <= result[name] <= high
    assert result["users"] == len(data.heldout)


def test_training_items_are_not_candidates() -> None:
    """A scorer that puts the user's training items first scores as if they were absent."""
    data = _data()
    scores = np.random.default_rng(3).random((len(data.users), len(data.items)))
    boosted = scores + 10 * data.train.toarray()
    same = evaluate_full(lambda users: scores[users], data, bootstrap=0)
    assert evaluate_full(lambda users: boosted[users], data, bootstrap=0) == same


def test_ties_never_favour_held_out_items() -> None:
    """A constant scorer ranks by a fixed random order: about what a random scorer gets, far
    from the perfect score it would get if ties kept the held-out items first."""
    data = _data(users=200, items=80)
    constant = evaluate_full(lambda users: np.zeros((len(users), len(data.items))), data,
                             bootstrap=0)  # fmt: skip
    oracle = np.zeros((len(data.users), len(data.items)))
    for u, items in data.heldout.items():
        oracle[u, items] = 1.0
    perfect = evaluate_full(lambda users: oracle[users], data, bootstrap=0)
    assert perfect["ndcg@10"] == 1.0 and perfect["mrr"] == 1.0
    assert constant["ndcg@10"] < 0.35


def test_coverage_counts_the_items_shown() -> None:
    data = _data()
    fixed = np.tile(np.arange(len(data.items), dtype=np.float64), (len(data.users), 1))
    result = evaluate_full(lambda users: fixed[users], data, bootstrap=0)
    shown = set()
    for u in data.heldout:
        trained = set(data.train[u].indices)
        shown |= set([i for i in range(len(data.items) - 1, -1, -1) if i not in trained][:10])
    assert result["coverage"] == pytest.approx(len(shown) / len(data.items), abs=1e-5)


def test_a_scorer_of_the_wrong_shape_is_an_error() -> None:
    data = _data()
    with pytest.raises(ValueError, match="scorer must return"):
        evaluate_full(lambda users: np.zeros((len(users), 3)), data)
