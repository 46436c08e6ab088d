"""Full-ranking evaluation: every held-out item among every item the user did not train on.

Data flow position: :func:`~sottovoce.sim.split_holdout` hides part of each evaluated user's
items; :class:`Interactions` turns the training side into a sparse user x item matrix (the
catalog's order: ``Dataset.items``); a scorer gives one score per catalog item for a batch of
users; :func:`evaluate_full` ranks every item the user did not train on (training items are
masked out, not the items of other users) and averages NDCG@k, Recall@k, HR@k, MRR and the
catalog coverage of the top k, with bootstrap confidence intervals over users.

Why full ranking: held-out items among a few sampled negatives reorder models (Krichene and
Rendle, "On Sampled Metrics for Item Recommendation", KDD 2020); the sampled figures stay in a
run's results as ``metrics_sampled``, labelled.

Relevance is binary (held out or not). Ties are broken by a fixed random order of the catalog
(seeded), never in favour of held-out items: a constant scorer scores like a random one.
Vectorized: top-k by ``argpartition`` over batches of users, so 2,000 users x 20,000 items
take seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from sottovoce.sim._datasets import Dataset, Interaction, positive_items

__all__ = ["Interactions", "Scorer", "evaluate_full"]

Matrix = npt.NDArray[np.float64]
Scorer = Callable[[npt.NDArray[np.int64]], Matrix]
"""Rows of users (indices into ``Interactions.users``) -> a (users x items) score matrix."""

BATCH = 256  # users scored at once: 256 x 20,000 float64 is 40 MB


@dataclass(frozen=True, eq=False)
class Interactions:
    """The training side of a split as matrices: ``train`` (users x items, 1 where the user
    listened to or liked the item in training) and every evaluated user's held-out items."""

    users: tuple[str, ...]
    items: tuple[str, ...]
    train: sp.csr_matrix
    heldout: Mapping[int, npt.NDArray[np.int64]]  # user row -> held-out item columns

    @classmethod
    def of(
        cls,
        dataset: Dataset,
        train: Mapping[str, Sequence[Interaction]],
        heldout: Mapping[str, frozenset[str]],
    ) -> Interactions:
        users, items = tuple(dataset.users), tuple(dataset.items)
        column = {item: n for n, item in enumerate(items)}
        rows: list[int] = []
        cols: list[int] = []
        for row, user in enumerate(users):
            picked = sorted(column[i] for i in positive_items(train[user]) if i in column)
            rows += [row] * len(picked)
            cols += picked
        matrix = sp.csr_matrix(
            (np.ones(len(rows)), (rows, cols)), shape=(len(users), len(items)), dtype=np.float64
        )
        row_of = {user: n for n, user in enumerate(users)}
        held = {
            row_of[user]: np.array(sorted(column[i] for i in items_ if i in column), np.int64)
            for user, items_ in heldout.items()
        }
        return cls(users, items, matrix, {r: h for r, h in held.items() if len(h)})

    @cached_property
    def evaluated(self) -> npt.NDArray[np.int64]:
        return np.array(sorted(self.heldout), np.int64)

    @cached_property
    def item_counts(self) -> npt.NDArray[np.float64]:
        """How many users have each item in training."""
        return np.asarray(self.train.sum(axis=0)).ravel()


def evaluate_full(
    scorer: Scorer,
    data: Interactions,
    *,
    k: int = 10,
    seed: int = 0,
    bootstrap: int = 1_000,
    users: npt.NDArray[np.int64] | None = None,
) -> dict[str, Any]:
    """NDCG@k, Recall@k, HR@k and MRR averaged over the evaluated users (or ``users``), the
    share of the catalog that appears in some user's top k (``coverage``), and a 95 %
    bootstrap interval of each mean (``ci``: metric -> [low, high])."""
    rows = data.evaluated if users is None else np.asarray(users, np.int64)
    if not len(rows):
        raise ValueError("no user has held-out items: nothing to evaluate")
    n_items = len(data.items)
    tiebreak = np.random.default_rng([seed, 7]).permutation(n_items).astype(np.float64)
    tiebreak /= n_items  # in [0, 1): ranks below any real difference in score
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    per_user = {name: np.zeros(len(rows)) for name in (f"ndcg@{k}", f"recall@{k}", f"hr@{k}",
                                                       "mrr")}  # fmt: skip
    shown = np.zeros(n_items, bool)
    for start in range(0, len(rows), BATCH):
        batch = rows[start : start + BATCH]
        scores = np.asarray(scorer(batch), np.float64)
        if scores.shape != (len(batch), n_items):
            raise ValueError(f"a scorer must return {len(batch)} x {n_items} scores, "
                             f"not {list(scores.shape)}")  # fmt: skip
        scores = _ranked_keys(scores, tiebreak)
        trained = data.train[batch]
        scores[trained.nonzero()] = -np.inf  # what the user trained on is not a candidate
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
        top = np.take_along_axis(top, order, axis=1)
        shown[top.ravel()] = True
        for n, user in enumerate(batch):
            relevant = data.heldout[int(user)]
            hits = np.isin(top[n], relevant)
            dcg = float(discounts[hits].sum())
            ideal = float(discounts[: min(k, len(relevant))].sum())
            at = start + n
            per_user[f"ndcg@{k}"][at] = dcg / ideal
            per_user[f"recall@{k}"][at] = hits.sum() / min(k, len(relevant))
            per_user[f"hr@{k}"][at] = float(hits.any())
            best = scores[n, relevant].max()
            per_user["mrr"][at] = 1.0 / (1 + int((scores[n] > best).sum()))
    result: dict[str, Any] = {name: round(float(v.mean()), 5) for name, v in per_user.items()}
    result["coverage"] = round(float(shown.mean()), 5)
    result["users"] = len(rows)
    result["ci"] = _bootstrap(per_user, draws=bootstrap, seed=seed)
    return result


def _ranked_keys(scores: Matrix, tiebreak: npt.NDArray[np.float64]) -> Matrix:
    """Scores turned into per-user dense ranks plus the catalog's tie-break, so that equal
    scores order by a fixed random permutation whatever their magnitude."""
    order = np.argsort(scores, axis=1, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=1)
    steps = np.concatenate(
        [np.zeros((len(scores), 1)), (np.diff(sorted_scores, axis=1) > 0).astype(np.float64)],
        axis=1,
    )
    dense = np.empty_like(scores)
    np.put_along_axis(dense, order, np.cumsum(steps, axis=1), axis=1)
    return dense + tiebreak[None, :]


def _bootstrap(per_user: Mapping[str, npt.NDArray[np.float64]], *, draws: int,
               seed: int) -> dict[str, list[float]]:  # fmt: skip
    """95 % percentile intervals of each mean over users resampled with replacement."""
    if draws <= 0:
        return {}
    n = len(next(iter(per_user.values())))
    rng = np.random.default_rng([seed, 11])
    picks = rng.integers(0, n, size=(draws, n))
    out = {}
    for name, values in per_user.items():
        means = values[picks].mean(axis=1)
        low, high = np.percentile(means, [2.5, 97.5])
        out[name] = [round(float(low), 5), round(float(high), 5)]
    return out
