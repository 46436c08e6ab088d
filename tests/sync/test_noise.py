"""Deployment noise: the exact discrete Gaussian sampler and the fixed-point grid around it."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest

from sottovoce.sync._noise import (
    GRID_BITS,
    grid_step,
    noisy_on_grid,
    sample_discrete_gaussian,
    sensitivity_factor,
)

N = 20_000
N_ROUND = 20_737  # a cohort-sized vector: the dimension the aggregator noises per round


def _pmf(sigma: float) -> dict[int, float]:
    """The exact discrete Gaussian pmf, normalised over a support far wider than its mass."""
    reach = math.ceil(40 * sigma) + 10
    weights = {x: math.exp(-(x * x) / (2 * sigma * sigma)) for x in range(-reach, reach + 1)}
    total = math.fsum(weights.values())
    return {x: w / total for x, w in weights.items()}


def _chi_square(samples: Sequence[int], sigma: float) -> tuple[float, float]:
    """Pearson's statistic against N_Z(0, sigma²) and a critical value it exceeds rarely.

    Values expected at least 5 times get a bin each; the two tails get one bin each. The
    critical value, dof + 6 sqrt(2 dof), is six standard deviations of the statistic up.
    """
    pmf, counts, n = _pmf(sigma), Counter(samples), len(samples)
    assert set(counts) <= set(pmf), "a sample outside a support of 40 sigma"
    central = [x for x in sorted(pmf) if n * pmf[x] >= 5]
    lo, hi = central[0], central[-1]
    bins = [(pmf[x], counts[x]) for x in central]
    for tail in ([x for x in pmf if x < lo], [x for x in pmf if x > hi]):
        bins.append((math.fsum(pmf[x] for x in tail), sum(counts[x] for x in tail)))
    stat = sum((seen - n * p) ** 2 / (n * p) for p, seen in bins)
    dof = len(bins) - 1
    return stat, dof + 6 * math.sqrt(2 * dof)


def _discrete_laplace_same_variance(sigma: float, n: int, seed: int) -> list[int]:
    """A wrong sampler: P(x) ~ a**|x| with the discrete Gaussian's variance, 2a/(1-a)² = sigma²."""
    s2 = sigma * sigma
    a = (s2 + 1 - math.sqrt(2 * s2 + 1)) / s2
    rng = np.random.default_rng(seed)
    # The difference of two geometric counts is a two-sided geometric (discrete Laplace).
    return [int(v) for v in rng.geometric(1 - a, n) - rng.geometric(1 - a, n)]


@pytest.mark.parametrize("sigma", [0.5, 0.8, 1.5, 3.0])
def test_the_exact_sampler_draws_the_discrete_gaussian(sigma: float) -> None:
    samples = sample_discrete_gaussian(sigma, N, rng=random.Random(2020))
    assert samples.dtype == np.int64
    assert samples.shape == (N,)
    stat, critical = _chi_square(samples.tolist(), sigma)
    assert stat < critical, (stat, critical)

    # The same statistic tells wrong samplers apart, so the check above has power.
    laplace = _discrete_laplace_same_variance(sigma, N, seed=1)
    assert _chi_square(laplace, sigma)[0] > critical
    too_wide = sample_discrete_gaussian(1.05 * sigma, N, rng=random.Random(2021))
    assert _chi_square(too_wide.tolist(), sigma)[0] > critical
    if sigma < 1:  # above about 1 a rounded continuous Gaussian is too close to tell apart
        gauss = random.Random(2022).gauss
        rounded = [round(gauss(0.0, sigma)) for _ in range(N)]
        assert _chi_square(rounded, sigma)[0] > critical


def test_the_csprng_sampler_at_deployment_sigma() -> None:
    sigma = float(2**GRID_BITS)
    samples = sample_discrete_gaussian(sigma, N_ROUND)
    assert samples.dtype == np.int64
    x = samples.astype(np.float64) / sigma
    n = len(x)
    assert abs(x.mean()) < 5 / math.sqrt(n)
    assert abs(x.var() - 1) < 0.05  # the standard error is sqrt(2/n), about 1%
    positive, negative = int((samples > 0).sum()), int((samples < 0).sum())
    assert abs(positive - negative) < 5 * math.sqrt(n)
    assert abs(float((x**3).mean())) < 0.1  # skewness, standard error about 0.017
    assert abs(float((x**4).mean()) / float((x**2).mean()) ** 2 - 3) < 0.3  # Laplace: 6
    # Every integer is reachable: odd values make up half, not none (no coarser grid).
    assert abs(float((samples % 2).mean()) - 0.5) < 5 * 0.5 / math.sqrt(n)


@pytest.mark.parametrize("sigma", [0.5, 1e8])
def test_the_sampler_covers_the_range_of_sigma(sigma: float) -> None:
    samples = sample_discrete_gaussian(sigma, 5000).astype(np.float64)
    # Far above 1 the discrete Gaussian's variance is sigma² to many digits.
    variance = math.fsum(x * x * p for x, p in _pmf(sigma).items()) if sigma < 10 else sigma**2
    assert abs(float(samples.var()) / variance - 1) < 0.12  # standard error about 2%


def test_csprng_draws_differ() -> None:
    a = sample_discrete_gaussian(2.0**20, 64)
    b = sample_discrete_gaussian(2.0**20, 64)
    assert not np.array_equal(a, b)
    values = np.zeros(64)
    first = noisy_on_grid(values, clipping_norm=1.0, noise_multiplier=1.0)
    second = noisy_on_grid(values, clipping_norm=1.0, noise_multiplier=1.0)
    assert not np.array_equal(first, second)


def test_the_seeded_path_is_reproducible() -> None:
    values = np.linspace(-1.0, 1.0, 101)

    def draw(seed: int) -> npt.NDArray[np.float64]:
        rng = np.random.default_rng(seed)
        return noisy_on_grid(values, clipping_norm=1.0, noise_multiplier=1.0, rng=rng)

    assert np.array_equal(draw(7), draw(7))
    assert not np.array_equal(draw(7), draw(8))
    assert sample_discrete_gaussian(3.0, 50, rng=random.Random(5)).tolist() == (
        sample_discrete_gaussian(3.0, 50, rng=random.Random(5)).tolist()
    )


@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize("clipping_norm", [2.0, 1.7])
def test_grid_quantization_error_is_at_most_half_a_step(seeded: bool, clipping_norm: float) -> None:
    values = np.random.default_rng(3).uniform(-3, 3, 1000) * clipping_norm
    gamma = grid_step(clipping_norm)
    rng = np.random.default_rng(4) if seeded else None
    # sigma_int is about 0.001: the noise is 0 but with probability about exp(-450,000).
    out = noisy_on_grid(values, clipping_norm=clipping_norm, noise_multiplier=1e-9, rng=rng)
    assert out.dtype == np.float64
    assert np.array_equal(out, np.rint(values / gamma) * gamma)
    assert np.max(np.abs(out - values)) <= gamma / 2 * (1 + 1e-9)


@pytest.mark.parametrize("seeded", [False, True])
def test_a_tiny_noise_multiplier_keeps_the_values(seeded: bool) -> None:
    clipping_norm, multiplier = 1.3, 1e-6
    values = np.random.default_rng(5).normal(0, 1, (40, 25))
    gamma, sigma_int = grid_step(clipping_norm), multiplier * 2**GRID_BITS
    rng = np.random.default_rng(6) if seeded else None
    out = noisy_on_grid(values, clipping_norm=clipping_norm, noise_multiplier=multiplier, rng=rng)
    assert out.shape == values.shape
    steps = out / gamma
    assert np.max(np.abs(steps - np.rint(steps))) < 1e-6  # on the grid (gamma is inexact)
    assert np.max(np.abs(out - values)) <= gamma / 2 + 10 * sigma_int * gamma
    assert np.any(out != np.rint(values / gamma) * gamma)  # but noise was added


@pytest.mark.parametrize("seeded", [False, True])
def test_the_noise_has_std_noise_multiplier_times_clipping_norm(seeded: bool) -> None:
    rng = np.random.default_rng(9) if seeded else None
    out = noisy_on_grid(np.zeros(N_ROUND), clipping_norm=0.5, noise_multiplier=1.1, rng=rng)
    assert abs(float(out.std()) / (1.1 * 0.5) - 1) < 0.03


def test_grid_step_and_sensitivity_factor() -> None:
    assert grid_step(1.0) == 2.0**-20
    assert grid_step(3.0) == 3.0 / 2**20
    assert sensitivity_factor(N_ROUND) == pytest.approx(1.000137, abs=5e-7)
    assert sensitivity_factor(N_ROUND) == 1 + math.sqrt(N_ROUND) / 2**20
    assert sensitivity_factor(0) == 1.0


@pytest.mark.parametrize("sigma", [0.0, -1.0, math.nan, math.inf, -math.inf])
def test_bad_sigma_is_refused(sigma: float) -> None:
    with pytest.raises(ValueError, match="sigma"):
        sample_discrete_gaussian(sigma, 3)


def test_bad_size_and_dimension_are_refused() -> None:
    with pytest.raises(ValueError, match="size"):
        sample_discrete_gaussian(1.0, -1)
    assert sample_discrete_gaussian(1.0, 0).shape == (0,)
    with pytest.raises(ValueError, match="dimension"):
        sensitivity_factor(-1)


@pytest.mark.parametrize(
    ("values", "clipping_norm", "noise_multiplier", "match"),
    [
        ([0.0, math.nan], 1.0, 1.0, "finite"),
        ([math.inf], 1.0, 1.0, "finite"),
        ([-math.inf], 1.0, 1.0, "finite"),
        ([0.0], 1.0, 0.0, "noise multiplier"),
        ([0.0], 1.0, -1.0, "noise multiplier"),
        ([0.0], 1.0, math.nan, "noise multiplier"),
        ([0.0], 1.0, math.inf, "noise multiplier"),
        ([0.0], 1.0, 2.0**37, "noise multiplier"),
        ([0.0], 0.0, 1.0, "clipping norm"),
        ([0.0], -1.0, 1.0, "clipping norm"),
        ([0.0], math.nan, 1.0, "clipping norm"),
        ([0.0], math.inf, 1.0, "clipping norm"),
        ([0.0], 1e-320, 1.0, "clipping norm"),
        ([2.0**42], 1.0, 1.0, "too large"),  # 2**62 grid steps
        ([0.0, -(2.0**43)], 1.0, 1.0, "too large"),
        ([1e300], 1e-6, 1.0, "too large"),  # overflows to inf on the grid
    ],
)
def test_bad_noisy_on_grid_inputs_are_refused(
    values: list[float], clipping_norm: float, noise_multiplier: float, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        noisy_on_grid(values, clipping_norm=clipping_norm, noise_multiplier=noise_multiplier)


def test_values_just_inside_the_int64_range_are_accepted() -> None:
    big = 2.0**41  # 2**61 grid steps at C = 1
    out = noisy_on_grid([big, -big], clipping_norm=1.0, noise_multiplier=1.0)
    assert np.all(np.abs(np.abs(out) - big) < 10.0)
