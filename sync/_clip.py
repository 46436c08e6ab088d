"""A delta's numbers before it is sealed: its L2 norm, clipping to the round's bound, local noise.

Data flow step 5 (device), first half: :func:`clip` bounds the delta's L2 norm by the round's
clipping norm C, and in ``local`` mode :func:`add_noise` adds the device's discrete Gaussian
noise (:mod:`._noise`) before :func:`~sottovoce.sync.seal_delta` signs and encrypts it. The
aggregator measures a received delta with the same :func:`l2_norm`.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from sottovoce.sync._errors import NonFinite
from sottovoce.sync._noise import noisy_on_grid

__all__ = ["FloatArray", "add_noise", "clip", "l2_norm"]

FloatArray = npt.NDArray[np.float32]


def l2_norm(values: npt.NDArray[np.floating]) -> float:
    """L2 norm computed in float64 (no overflow or float32 rounding in the sum).

    A plain sum of squares rather than ``np.linalg.norm``: that goes to the BLAS dot, whose
    threads stall for milliseconds when the other core is busy (measured in the aggregator).
    """
    wide = values.astype(np.float64, copy=False)
    return math.sqrt(float(np.sum(wide * wide)))


def clip(delta: npt.ArrayLike, norm: float) -> FloatArray:
    """Scale ``delta`` down (never up) so its L2 norm is at most ``norm``; returns float32.

    The bound holds for the float32 result itself, as the receiver measures it: rounding to
    float32 after scaling can land a hair above ``norm``, so the result is nudged down by an ulp
    until it is within.
    """
    if not (math.isfinite(norm) and norm > 0):
        raise ValueError(f"the clipping norm must be a positive number, got {norm}")
    values = np.array(delta, dtype=np.float32)  # a copy: the caller's array is not touched
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"a delta is a non-empty flat vector, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise NonFinite("the delta has NaN or infinite values; it cannot be sealed")
    current = l2_norm(values)
    if current <= norm:
        return values
    values = (values.astype(np.float64) * (norm / current)).astype(np.float32)
    while l2_norm(values) > norm:
        values = np.nextafter(values, np.float32(0)).astype(np.float32)
    return values


def add_noise(
    delta: FloatArray,
    *,
    clipping_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator | None = None,
) -> FloatArray:
    """``delta`` on the fixed-point grid plus discrete Gaussian noise of standard deviation
    ``noise_multiplier * clipping_norm`` (float32): :func:`sottovoce.sync._noise.noisy_on_grid`.

    ``rng`` None draws from the OS CSPRNG (deployments); a seeded generator is for simulations
    and tests only.
    """
    noisy = noisy_on_grid(np.asarray(delta, dtype=np.float64), clipping_norm=clipping_norm,
                          noise_multiplier=noise_multiplier, rng=rng)  # fmt: skip
    return noisy.astype(np.float32)
