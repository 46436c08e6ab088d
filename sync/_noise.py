"""Deployment noise for differential privacy: the exact discrete Gaussian on a fixed-point grid.

Where it sits in the data flow: in central mode the aggregator adds noise once to a round's sum
of clipped deltas; in local mode every device adds noise to its own clipped delta before sealing
it. Both use :func:`noisy_on_grid`, which rounds the vector to a grid of spacing
``gamma = C / 2**GRID_BITS`` (C the clipping norm) and adds integer noise drawn from the
discrete Gaussian by the exact algorithms of Canonne, Kamath & Steinke 2020, "The Discrete
Gaussian for Differential Privacy" (CKS; Algorithms 1-3): Bernoulli(exp(-gamma)) with exact
rational arithmetic, the discrete Laplace, and the discrete Gaussian by rejection from it.

Why not ``numpy`` ``rng.normal`` in deployments: PCG64 is not a cryptographically secure
generator (its state can be recovered from outputs, and from it the noise), and floating-point
Gaussian samplers leak through the gaps and rounding of their outputs (Mironov 2012, "On
Significance of the Least Significant Bits for Differential Privacy"). Here every random bit
comes from the OS CSPRNG (``secrets.SystemRandom``) and every comparison is exact in integers,
so the output distribution is exactly the discrete Gaussian. For integer shifts its Renyi
divergences are at most the continuous Gaussian's (CKS 2020), so the Gaussian mechanism's
accounting applies, with the sensitivity of :func:`sensitivity_factor`.

A seeded float path (``rng=np.random.Generator``) stays for simulations and tests only.
"""

from __future__ import annotations

import math
import random
import secrets
from collections.abc import Callable
from fractions import Fraction
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "GRID_BITS",
    "grid_step",
    "noisy_on_grid",
    "sample_discrete_gaussian",
    "sensitivity_factor",
]

GRID_BITS: Final = 20
# Grid integers stay below 2**62, and the noise's sigma below 2**56 (64 sigmas short of 2**62),
# so that their int64 sum cannot overflow.
_INT_LIMIT: Final = 2.0**62
_MAX_SIGMA_INT: Final = 2.0**56
_CHUNK: Final = 64  # bits per draw: one OS call settles a comparison but with chance 2**-64
_Bits = Callable[[int], int]  # a getrandbits


def grid_step(clipping_norm: float) -> float:
    """The grid spacing gamma = ``clipping_norm / 2**GRID_BITS``."""
    if not (math.isfinite(clipping_norm) and clipping_norm > 0):
        raise ValueError(f"the clipping norm must be a finite number > 0, got {clipping_norm}")
    gamma = clipping_norm / 2**GRID_BITS
    if not gamma > 0:
        raise ValueError(f"the clipping norm {clipping_norm} is too small for a grid")
    return gamma


def sensitivity_factor(dim: int) -> float:
    """The L2 sensitivity on the grid, in units of C/gamma: ``1 + sqrt(dim) / 2**GRID_BITS``.

    Rounding a sum S to the grid, round(S/gamma), moves each coordinate by at most 1/2, so two
    sums that differ by a vector of L2 norm <= C differ on the grid by at most
    C/gamma + sqrt(dim) in L2 (each sum moves by at most sqrt(dim)/2). In units of
    C/gamma = 2**GRID_BITS that is this factor. The accountant charges the Gaussian mechanism
    with this sensitivity, i.e. with noise multiplier ``noise_multiplier / sensitivity_factor``.
    """
    if dim < 0:
        raise ValueError(f"the dimension must be >= 0, got {dim}")
    return 1 + math.sqrt(dim) / 2**GRID_BITS


# -- the exact samplers (CKS 2020); a rational x is passed as integers num / den ---------------


def _bernoulli(num: int, den: int, bits: _Bits) -> bool:
    """Bernoulli(num/den) for 0 <= num <= den: a uniform U in [0, 1) against num/den."""
    # U is drawn 64 bits at a time and compared with the binary expansion of num/den; only
    # a tie (probability 2**-64) needs more. randrange would need ~2 OS calls per draw.
    while True:
        digit, num = divmod(num << _CHUNK, den)
        r = bits(_CHUNK)
        if r != digit:
            return r < digit


def _uniform(n: int, bits: _Bits) -> int:
    """A uniform integer in [0, n), rejecting only the top 2**64-th or so of a wider draw."""
    width = n.bit_length() + _CHUNK
    limit = (1 << width) - (1 << width) % n
    while True:
        r = bits(width)
        if r < limit:
            return r % n


def _bernoulli_exp_le1(num: int, den: int, bits: _Bits) -> bool:
    """Bernoulli(exp(-num/den)) for 0 <= num <= den (CKS Algorithm 1, first case)."""
    # K counts the Bernoulli(x/K) successes; the run stops at an odd K with prob. exp(-x).
    k = 1
    while _bernoulli(num, den * k, bits):
        k += 1
    return k % 2 == 1


def _bernoulli_exp_minus1(bits: _Bits) -> bool:
    """Bernoulli(exp(-1)): Algorithm 1 at x = 1, skipping its sure first step Bernoulli(1/1)."""
    k = 2
    while _bernoulli(1, k, bits):
        k += 1
    return k % 2 == 1


def _bernoulli_exp(num: int, den: int, bits: _Bits) -> bool:
    """Bernoulli(exp(-num/den)) for num >= 0 (CKS Algorithm 1): exp(-1) per whole unit."""
    while num > den:
        if not _bernoulli_exp_minus1(bits):
            return False
        num -= den
    return _bernoulli_exp_le1(num, den, bits)


def _discrete_laplace(t: int, bits: _Bits) -> int:
    """P(y) proportional to exp(-|y|/t) for an integer scale t >= 1 (CKS Algorithm 2, s = 1)."""
    while True:
        u = _uniform(t, bits)
        if not _bernoulli_exp_le1(u, t, bits):
            continue
        v = 0
        while _bernoulli_exp_minus1(bits):
            v += 1
        y = u + t * v
        negative = bits(1) == 1
        if negative and y == 0:
            continue  # otherwise 0 would be drawn twice as often as it should
        return -y if negative else y


def sample_discrete_gaussian(
    sigma: float, size: int, *, rng: random.Random | None = None
) -> npt.NDArray[np.int64]:
    """``size`` exact draws of the discrete Gaussian N_Z(0, sigma**2), P(x) ~ exp(-x²/2sigma²).

    CKS 2020 Algorithm 3: discrete Laplace proposals with scale t = floor(sigma) + 1, accepted
    with probability exp(-(|y| - sigma²/t)² / (2 sigma²)), computed exactly from
    ``Fraction(sigma) ** 2``. Random bits come from the OS CSPRNG (``secrets.SystemRandom``);
    pass a seeded ``random.Random`` only to test the algorithm. Works for sigma from well
    below 1 up to 1e8 and beyond (about 1.3 proposals per draw for sigma >= 1).

    Speed, measured on the development machine (2 vCPUs, CPython 3.11, Linux): 20,737 draws
    at sigma = 2**20 from the OS CSPRNG take about 0.23 s (11 us, ~12 OS calls each); at
    sigma = 1e8 about 0.26 s, at sigma = 0.5 about 0.4 s.
    """
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma}")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    bits = (rng if rng is not None else secrets.SystemRandom()).getrandbits
    p, q = (Fraction(sigma) ** 2).as_integer_ratio()  # sigma² = p/q exactly
    t = math.floor(sigma) + 1
    # (|y| - sigma²/t)² / (2 sigma²) = (|y| q t - p)² / (2 p q t²): one integer denominator.
    den = 2 * p * q * t * t
    qt = q * t
    out = np.empty(size, dtype=np.int64)
    for i in range(size):
        while True:
            y = _discrete_laplace(t, bits)
            if _bernoulli_exp((abs(y) * qt - p) ** 2, den, bits):
                out[i] = y
                break
    return out


def noisy_on_grid(
    values: npt.ArrayLike,
    *,
    clipping_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator | None = None,
) -> npt.NDArray[np.float64]:
    """``values`` rounded to the grid plus noise of std ``noise_multiplier * clipping_norm``.

    Returns ``gamma * (rint(values / gamma) + z)`` with gamma = :func:`grid_step` and z integer
    noise with sigma_int = ``noise_multiplier * 2**GRID_BITS`` (= noise_multiplier * C/gamma)
    per coordinate, in the shape of ``values``.

    ``rng=None`` (deployments): z is exact discrete Gaussian noise from the OS CSPRNG
    (:func:`sample_discrete_gaussian`). A ``numpy`` Generator instead gives
    ``rint(rng.normal(0, sigma_int))``: reproducible, for simulations and tests only;
    statistically indistinguishable at this sigma, but neither exact nor from a CSPRNG.

    Raises ``ValueError`` for non-finite values, a clipping norm or noise multiplier that is
    not a finite number > 0, values too large for int64 grid integers (|v| >= 2**42 C) or a
    noise multiplier above 2**36.
    """
    sigma_int = noise_multiplier * 2**GRID_BITS
    if not (math.isfinite(noise_multiplier) and 0 < sigma_int <= _MAX_SIGMA_INT):
        raise ValueError(
            f"the noise multiplier must be a number > 0 and <= 2**36, got {noise_multiplier}"
        )
    gamma = grid_step(clipping_norm)
    array = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError("the values must all be finite")
    with np.errstate(over="ignore"):  # an overflow to inf is refused just below
        scaled = np.rint(array / gamma)
    if np.any(np.abs(scaled) >= _INT_LIMIT):
        raise ValueError(
            f"values up to {np.max(np.abs(array)):g} are too large for the grid of step "
            f"{gamma:g} (the limit is {_INT_LIMIT * gamma:g})"
        )
    if rng is None:
        noise = sample_discrete_gaussian(sigma_int, array.size).reshape(array.shape)
    else:
        noise = np.rint(rng.normal(0.0, sigma_int, array.shape)).astype(np.int64)
    total = scaled.astype(np.int64) + noise
    return total.astype(np.float64) * gamma
