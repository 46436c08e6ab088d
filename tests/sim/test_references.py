"""The reference recommenders against direct computations of their definitions."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from sottovoce.sim import _references as references
from sottovoce.sim._full_ranking import Interactions


def _data(users: int = 30, items: int = 25, seed: int = 4) -> Interactions:
    rng = np.random.default_rng(seed)
    train = (rng.random((users, items)) < 0.3).astype(np.float64)
    heldout = {u: np.array([int(np.flatnonzero(train[u] == 0)[0])]) for u in range(users)}
    return Interactions(tuple(f"u{u}" for u in range(users)), tuple(f"i{i}" for i in range(items)),
                        sp.csr_matrix(train), heldout)  # fmt: skip


def test_item_knn_is_the_summed_cosine_of_the_users_items() -> None:
    data = _data()
    x = data.train.toarray()
    users = np.arange(len(data.users))
    scores = references.item_knn(data)(users)
    for u in (0, 7, 19):
        for i in (0, 5, 24):
            expected = 0.0
            for j in np.flatnonzero(x[u]):
                norm = np.linalg.norm(x[:, i]) * np.linalg.norm(x[:, j])
                expected += x[:, i] @ x[:, j] / norm if norm else 0.0
            assert scores[u, i] == pytest.approx(expected)


def test_ease_is_the_closed_form() -> None:
    """B = I - P diagMat(1 / diag P), P = (X'X + lambda I)^-1, zero diagonal; scores X B."""
    data = _data()
    x = data.train.toarray()
    top = np.arange(len(data.items))
    score = references._ease_scorer(data, top, 50.0)
    p = np.linalg.inv(x.T @ x + 50.0 * np.eye(x.shape[1]))
    b = np.eye(x.shape[1]) - p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    expected = x @ b
    got = score(np.arange(len(data.users)))
    # the scorer shifts each user's row to start at 0: the order is what counts
    assert np.allclose(got - got.min(axis=1, keepdims=True),
                       expected - expected.min(axis=1, keepdims=True))  # fmt: skip


def test_ease_chooses_lambda_without_the_held_out_items() -> None:
    data = _data(users=60, items=40)
    moved = {u: np.array([(int(h[0]) + 7) % 40]) for u, h in data.heldout.items()}
    other = Interactions(data.users, data.items, data.train, moved)
    assert references.ease(data)[1] == references.ease(other)[1]


def test_popularity_counts_training_users() -> None:
    data = _data()
    scores = references.popularity(data)(np.array([0, 1]))
    assert np.array_equal(scores[0], data.train.toarray().sum(axis=0))


def test_the_content_profile_is_a_cosine() -> None:
    data = _data()
    vectors = np.random.default_rng(5).standard_normal((len(data.items), 6))
    scores = references.content_profile(data, vectors)(np.array([3]))
    mine = data.train.toarray()[3] @ (vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    expected = (vectors @ mine) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(mine)
    assert np.allclose(scores[0], expected)
