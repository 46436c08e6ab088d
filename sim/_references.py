"""Reference recommenders, trained centrally on the run's training split: the yardsticks that
the private rows are measured against, in the same run, on the same split.

- :func:`popularity`: how many users have the item in training;
- :func:`item_knn`: item-based collaborative filtering with cosine similarity over all items
  (score = the user's items' summed similarity to the candidate);
- :func:`ease`: EASE (Steck, "Embarrassingly Shallow Autoencoders", WWW 2019), the closed form
  ``B = I - P diagMat(1 / diag(P))``, ``P = (X'X + lambda I)^-1``, on the ``EASE_ITEMS`` most
  popular items (the rest ranked after them by popularity, so that a large catalog costs one
  bounded inverse); lambda is chosen on a validation slice cut from the training data (20 % of
  each user's training items), never on the held-out items;
- :func:`content_profile`: what a device can do with nothing shared at all: the cosine of each
  item's public content vector with the mean vector of the user's own items (the
  ``local_only`` row).

Each returns a :data:`~._full_ranking.Scorer`.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from sottovoce.sim._full_ranking import Interactions, Scorer, evaluate_full

__all__ = ["EASE_ITEMS", "content_profile", "ease", "item_knn", "popularity"]

EASE_ITEMS = 4_000
LAMBDAS = (30.0, 100.0, 300.0, 1_000.0, 3_000.0)  # tried in this order (the first best wins)


def popularity(data: Interactions) -> Scorer:
    counts = data.item_counts

    def score(users: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        return np.broadcast_to(counts, (len(users), len(counts))).copy()

    return score


def item_knn(data: Interactions) -> Scorer:
    """Cosine item-item similarity, every neighbour: ``X S`` with ``S = N X'X N`` and ``N`` the
    inverse item norms, computed as ``((X N) X') (X N)`` per batch (no items x items matrix)."""
    norms = np.sqrt(data.item_counts)
    scale = sp.diags(np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0))
    normalized = (data.train @ scale).tocsr()
    transposed = data.train.T.tocsr()

    def score(users: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        overlap = normalized[users] @ transposed  # users x users: shared items, weighted
        return np.asarray((overlap @ normalized).todense()) * 1.0

    return score


def ease(data: Interactions, *, seed: int = 0, lambdas: tuple[float, ...] = LAMBDAS,
         items: int = EASE_ITEMS) -> tuple[Scorer, float]:  # fmt: skip
    """EASE with lambda chosen on a validation slice of the training data; returns the scorer
    (fitted on all of the training data) and the chosen lambda."""
    top = np.argsort(-data.item_counts, kind="stable")[: min(items, len(data.items))]
    fit, validation = _validation_split(data, seed=seed)
    best, chosen = -1.0, lambdas[0]
    for lam in lambdas:
        result = evaluate_full(_ease_scorer(fit, top, lam), validation, seed=seed, bootstrap=0)
        if result["ndcg@10"] > best:
            best, chosen = result["ndcg@10"], lam
    return _ease_scorer(data, top, chosen), chosen


def _ease_scorer(data: Interactions, top: npt.NDArray[np.int64], lam: float) -> Scorer:
    x = data.train[:, top]
    gram = np.asarray((x.T @ x).todense(), np.float64)
    gram[np.diag_indices_from(gram)] += lam
    p = np.linalg.inv(gram)
    b = p / -np.diag(p)[None, :]
    b[np.diag_indices_from(b)] = 0.0
    counts = data.item_counts
    floor = counts / (counts.max() + 1.0) - 2.0  # every item outside ``top``, by popularity

    def score(users: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        out = np.broadcast_to(floor, (len(users), len(counts))).copy()
        inside = np.asarray(x[users] @ b)
        out[:, top] = inside - inside.min(axis=1, keepdims=True)  # >= 0: above the floor
        return out

    return score


def _validation_split(data: Interactions, *, seed: int) -> tuple[Interactions, Interactions]:
    """Cut 20 % of each user's training items (users with at least 5) into a validation
    target: the model fits the rest, and is scored on the cut items."""
    rng = np.random.default_rng([seed, 23])
    train = data.train.tolil()
    held: dict[int, npt.NDArray[np.int64]] = {}
    for row in range(train.shape[0]):
        items = np.array(train.rows[row], np.int64)
        if len(items) < 5:
            continue
        cut = rng.choice(items, size=max(1, round(0.2 * len(items))), replace=False)
        held[row] = np.sort(cut)
        for item in cut:
            train[row, item] = 0
    fit = Interactions(data.users, data.items, train.tocsr(), {})
    return fit, Interactions(data.users, data.items, fit.train, held)


def content_profile(data: Interactions, vectors: npt.NDArray[np.float64]) -> Scorer:
    """Cosine between each item's content vector and the mean of the user's own items'
    vectors (rows of ``vectors`` follow the catalog's order; zero rows score 0)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)

    def score(users: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        profile = np.asarray(data.train[users] @ unit)
        length = np.linalg.norm(profile, axis=1, keepdims=True)
        profile = np.divide(profile, length, out=np.zeros_like(profile), where=length > 0)
        out: npt.NDArray[np.float64] = profile @ unit.T
        return out

    return score
