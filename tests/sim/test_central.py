"""Centralized baselines: torch and the TFLite ranker agree on the weights, training learns,
DP-SGD stays within its epsilon."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from sottovoce.device import FEATURES, PARAMETER_COUNT, Ranker
from sottovoce.sim._central import (
    PoissonBatches,
    initial_weights,
    scores,
    train_central,
    train_central_dp,
    unflatten,
    weighted_loss,
)

needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("opacus") is None,
    reason="the centralized baselines need torch and opacus (the aggregator extra)",
)


def _problem(n: int = 2_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows whose label depends on a few features, with the training weights of the ranker's
    examples (likes weigh 2)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, FEATURES)).astype(np.float32)
    logit = 2.5 * x[:, 0] - 2.0 * x[:, 5] + 1.5 * x[:, 0] * x[:, 7]
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    w = np.where(rng.random(n) < 0.2, 2.0, 1.0).astype(np.float32)
    return x, y, w


def _auc(score: np.ndarray, y: np.ndarray) -> float:
    order = np.argsort(score)
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    positives = y == 1
    n_pos, n_neg = positives.sum(), (~positives).sum()
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_sim_package_imports_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['opacus'] = None\n"
        "import sottovoce.sim._central, sottovoce.sim._evaluate, sottovoce.sim._datasets"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@needs_torch
def test_torch_weights_score_the_same_in_the_tflite_ranker() -> None:
    x, y, w = _problem(600)
    trained = train_central(x, y, w, epochs=2, batch=64, lr=1e-2, seed=0)
    assert trained.shape == (PARAMETER_COUNT,) and trained.dtype == np.float32
    assert not np.allclose(trained, initial_weights())  # training moved every layer
    assert all(
        not np.allclose(a, b)
        for a, b in zip(unflatten(trained), unflatten(initial_weights()), strict=True)
    )
    ranker = Ranker.load()
    ranker.set_weights(trained)
    probe = np.random.default_rng(9).standard_normal((257, FEATURES)).astype(np.float32)
    tflite = ranker.infer(probe)
    np.testing.assert_allclose(tflite, scores(trained, probe), rtol=1e-4, atol=1e-4)
    import torch

    from sottovoce.sim._central import _MLP

    with torch.no_grad():
        reference = _MLP(trained).module(torch.from_numpy(probe)).numpy().reshape(-1)
    np.testing.assert_allclose(tflite, reference, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(_MLP(trained).flat(), trained)  # the layout round-trips


@needs_torch
def test_one_torch_step_is_one_tflite_train_step() -> None:
    """Same loss, same Adam (betas, epsilon, bias correction): a full-batch step from the same
    weights lands on the same weights in both."""
    x, y, w = _problem(48, seed=2)
    ranker = Ranker.load()
    ranker.reset_optimizer()
    loss = ranker.train_step(x, y, w, lr=0.01)
    assert loss == pytest.approx(weighted_loss(initial_weights(), x, y, w), rel=1e-5)
    torch_step = train_central(x, y, w, epochs=1, batch=48, lr=0.01, seed=0)
    np.testing.assert_allclose(torch_step, ranker.get_weights(), atol=1e-5)


@needs_torch
def test_central_training_learns_and_is_deterministic() -> None:
    x, y, w = _problem(3_000)
    test_x, test_y, test_w = _problem(1_000, seed=1)
    before = weighted_loss(initial_weights(), test_x, test_y, test_w)
    trained = train_central(x, y, w, epochs=4, batch=128, lr=3e-3, seed=0)
    after = weighted_loss(trained, test_x, test_y, test_w)
    assert after < before - 0.2, (before, after)
    assert _auc(scores(trained, test_x), test_y) > 0.85
    assert _auc(scores(initial_weights(), test_x), test_y) < 0.7
    np.testing.assert_array_equal(
        trained, train_central(x, y, w, epochs=4, batch=128, lr=3e-3, seed=0)
    )
    assert not np.array_equal(trained, train_central(x, y, w, epochs=4, batch=128, lr=3e-3, seed=1))


@needs_torch
def test_dp_training_spends_at_most_its_epsilon_and_still_learns() -> None:
    x, y, w = _problem(3_000)
    test_x, test_y, _ = _problem(1_000, seed=1)
    run = train_central_dp(
        x, y, w, epsilon=3.0, delta=1e-5, epochs=3, batch=200, max_grad_norm=1.0, lr=1e-2, seed=0
    )
    assert 0 < run.epsilon <= 3.0 and run.delta == 1e-5
    assert run.noise_multiplier > 0.5 and run.steps == 3 * 15
    assert run.sample_rate == pytest.approx(200 / 3_000)
    assert run.weights.shape == (PARAMETER_COUNT,) and np.isfinite(run.weights).all()
    assert _auc(scores(run.weights, test_x), test_y) > 0.78  # from ~0.47 at the start
    again = train_central_dp(
        x, y, w, epsilon=3.0, delta=1e-5, epochs=3, batch=200, max_grad_norm=1.0, lr=1e-2, seed=0
    )
    np.testing.assert_array_equal(run.weights, again.weights)


@needs_torch
def test_ghost_clipping_trains_what_per_example_gradients_train() -> None:
    # opacus' ghost clipping (the default) never writes out an example's gradient; the weights
    # must still be those of clipping each written-out gradient (opacus' hooks), with the same
    # batches and noise: equal to float rounding, and far from a run that clips differently
    x, y, w = _problem(2_000)
    common = dict(epsilon=4.0, delta=1e-5, epochs=2, batch=100, lr=1e-2, seed=3)
    ghost = train_central_dp(x, y, w, max_grad_norm=0.5, **common)
    written = train_central_dp(x, y, w, max_grad_norm=0.5, clipping="per_sample", **common)
    looser = train_central_dp(x, y, w, max_grad_norm=5.0, **common)
    assert (ghost.steps, ghost.noise_multiplier) == (written.steps, written.noise_multiplier)
    np.testing.assert_allclose(ghost.weights, written.weights, atol=2e-5)
    assert np.abs(ghost.weights - looser.weights).max() > 1e-2
    with pytest.raises(ValueError, match="clipping"):
        train_central_dp(x, y, w, clipping="none", **common)  # type: ignore[arg-type]


def test_poisson_batches_take_each_row_independently_at_the_rate() -> None:
    # the gaps between taken rows are drawn instead of a coin per row: the rows taken must
    # still be each row's own coin of probability rate (what the DP-SGD accountant assumes)
    from scipy import stats

    batches = PoissonBatches(1_000, batch=50, seed=7)
    assert (len(batches), batches.rate) == (20, 1 / 20)
    draws = 4_000
    taken = np.zeros((draws, 1_000), dtype=bool)
    for n in range(draws):
        rows = batches.draw()
        assert rows == sorted(set(rows)) and all(0 <= r < 1_000 for r in rows)
        taken[n, rows] = True
    per_row = taken.sum(axis=0)  # each row: binomial(draws, rate), mean 200, sd 13.8
    assert abs(per_row - 200).max() < 6 * 13.8
    assert stats.chisquare(per_row).pvalue > 1e-3  # no row favoured (the first, the last)
    sizes = taken.sum(axis=1)  # each batch: binomial(1000, rate)
    assert abs(sizes.mean() - 50) < 0.5 and abs(sizes.var() / 47.5 - 1) < 0.1
    pairs = (taken[:, :-1] & taken[:, 1:]).mean()  # neighbours independent: rate squared
    assert abs(pairs - 1 / 400) < 2.5e-4
    assert batches.draw() != PoissonBatches(1_000, batch=50, seed=8).draw()
    assert list(PoissonBatches(30, batch=50, seed=0)) == [list(range(30))]  # rate 1: every row


@needs_torch
def test_dp_training_steps_through_empty_batches() -> None:
    # 20 rows at a rate of 1/10: about one step in eight takes no row, and is still a step of
    # noise (as opacus' own sampler's empty batches are); the weights stay finite either way
    x, y, w = _problem(20)
    sampler = PoissonBatches(20, batch=2, seed=0)  # the batches these runs take (seed 0)
    assert any(not sampler.draw() for _ in range(30)), "no empty batch: the test tests nothing"
    for clipping in ("ghost", "per_sample"):
        run = train_central_dp(x, y, w, epsilon=8.0, delta=1e-5, epochs=3, batch=2,
                               clipping=clipping)  # fmt: skip
        assert run.steps == 30 and np.isfinite(run.weights).all()


@needs_torch
def test_bad_inputs_are_refused() -> None:
    x, y, w = _problem(10)
    with pytest.raises(ValueError, match="shape"):
        train_central(x[:, :5], y, w)
    with pytest.raises(ValueError, match="one value per row"):
        train_central(x, y[:3], w)
    with pytest.raises(ValueError, match="labels"):
        train_central(x, y + 2, w)
    with pytest.raises(ValueError, match="delta"):
        train_central_dp(x, y, w, epsilon=1.0, delta=0.0)
    with pytest.raises(ValueError, match="weights"):
        train_central(x, y, w, init=np.zeros(5))
