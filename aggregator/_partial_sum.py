"""Streaming FedAvg as a mergeable value, and the central noise of DP-FedAvg (pure, no I/O).

Data flow step 6 (aggregator): each opened delta is added to its round's :class:`PartialSum`
(a weighted sum, the sum of the weights and a count) and then dropped, so a round's memory is
O(model size) however many devices take part. Partial sums merge, associatively and
commutatively, so sharding a round across workers or machines is just merging their sums. When
the round closes, :meth:`PartialSum.mean` is the FedAvg average (local mode), and in central
mode :func:`central_release` noises the sum and divides it by the fixed expected cohort.

A round's running sum survives a restart as :meth:`PartialSum.to_bytes`, stored next to the
round (the service does the storing). Layout (little-endian)::

    offset   size  field
    0        4     magic b"SVP" + format version byte (0x01)
    4        4     uint32 dim, the number of values
    8        8     uint64 count, the number of deltas added
    16       8     float64 weight, the sum of their weights
    24       8dim  float64 total, the weighted sum of the deltas
    24+8dim  32    SHA-256 of every byte before it

The digest detects corruption (a torn write, a flipped bit, a truncated blob), not tampering:
whoever can rewrite the database can rewrite the digest too.

Every refusal is an :class:`AggregationError` (code ``aggregation_error``): a delta or sum of
the wrong shape, non-finite values (also when finite inputs overflow), an empty mean, or bytes
that are not an intact partial sum. Bad arguments that only a programming error can produce
(a non-positive clipping norm, noise multiplier or cohort) raise ``ValueError``.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from sottovoce.aggregator._errors import AggregatorError
from sottovoce.sync._noise import noisy_on_grid

FloatArray = npt.NDArray[np.float64]
Weight = float | np.integer[Any] | np.floating[Any]  # numpy scalars too, e.g. example counts

FORMAT_VERSION: Final = 1
_MAGIC_PREFIX: Final = b"SVP"
_HEADER: Final = struct.Struct("<4sIQd")  # magic+version, dim, count, weight
_DIGEST_BYTES: Final = hashlib.sha256().digest_size
_MAX_DIM: Final = 2**32 - 1


class AggregationError(AggregatorError):
    """A delta, partial sum or stored blob the aggregation refuses (see the module docstring)."""

    code = "aggregation_error"


@dataclass(frozen=True, eq=False, repr=False)
class PartialSum:
    """The running sum of a FedAvg round: ``total`` = sum of weight * delta, over ``count`` deltas.

    A value: :meth:`add` and :meth:`merge` return new sums and never keep the delta they are
    given, and ``total`` is a read-only float64 array. Floating-point addition is commutative
    but only approximately associative, so sums built in different orders or groupings agree
    to rounding (a few ulps per addition), not bit for bit.
    """

    total: FloatArray
    weight: float
    count: int
    dim: int

    def __post_init__(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, int):
            raise AggregationError(f"dim must be an integer, got {self.dim!r}")
        if not 1 <= self.dim <= _MAX_DIM:
            raise AggregationError(f"dim must be between 1 and {_MAX_DIM}, got {self.dim}")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 0:
            raise AggregationError(f"count must be an integer >= 0, got {self.count!r}")
        if isinstance(self.weight, bool) or not isinstance(
            self.weight, int | float | np.integer | np.floating
        ):
            raise AggregationError(f"weight must be a number, got {self.weight!r}")
        weight = float(self.weight)
        if not (math.isfinite(weight) and weight >= 0):
            raise AggregationError(f"weight must be a finite number >= 0, got {self.weight!r}")
        if (self.count == 0) != (weight == 0):
            raise AggregationError(
                f"count {self.count} and weight {weight} disagree: a sum has no weight exactly "
                "when it has no deltas"
            )
        # A private copy: the caller keeps no handle that could change the value afterwards.
        total = np.array(_as_vector(self.total, self.dim, what="total"), dtype=np.float64)
        total.flags.writeable = False
        if self.count == 0 and np.any(total):
            raise AggregationError("a partial sum of no deltas must have a zero total")
        object.__setattr__(self, "total", total)
        object.__setattr__(self, "weight", weight)

    @classmethod
    def empty(cls, dim: int) -> PartialSum:
        """The sum of no deltas of ``dim`` values: the identity of :meth:`merge`."""
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= _MAX_DIM:
            raise AggregationError(f"dim must be an integer between 1 and {_MAX_DIM}, got {dim!r}")
        return cls(total=np.zeros(dim, dtype=np.float64), weight=0.0, count=0, dim=dim)

    def add(self, delta: npt.ArrayLike, weight: Weight = 1.0) -> PartialSum:
        """This sum plus ``weight * delta`` (a new value; ``delta`` is read, never kept).

        ``weight`` is the delta's FedAvg weight (1 for the uniform weights of DP-FedAvg, or a
        device's example count); it must be finite and > 0.
        """
        w = _positive_weight(weight)
        values = _as_vector(delta, self.dim, what="delta")
        # One new array: the scaled copy of the delta becomes the new total.
        with np.errstate(over="ignore"):  # overflow is refused below, with a clearer error
            total = np.multiply(values, w, dtype=np.float64)
            total += self.total
        return PartialSum._trusted(total, self.weight + w, self.count + 1, self.dim)

    def remove(self, delta: npt.ArrayLike, weight: Weight = 1.0) -> PartialSum:
        """This sum without a delta that :meth:`add` put in (erasure of a pending delta).

        The caller vouches that ``delta`` was added with ``weight``; the result equals the sum
        built without it up to rounding. Removing from an empty sum is refused.
        """
        if self.count == 0:
            raise AggregationError("the partial sum has no deltas to remove")
        w = _positive_weight(weight)
        values = _as_vector(delta, self.dim, what="delta")
        with np.errstate(over="ignore"):
            total = np.multiply(values, -w, dtype=np.float64)
            total += self.total
        if self.count == 1:  # exactly empty again, not a residue of rounding
            total[:] = 0.0
        weight_left = 0.0 if self.count == 1 else max(self.weight - w, 0.0)
        return PartialSum._trusted(total, weight_left, self.count - 1, self.dim)

    def merge(self, other: PartialSum) -> PartialSum:
        """The sum of both sums' deltas (associative and commutative; ``empty`` is the identity)."""
        if not isinstance(other, PartialSum):
            raise AggregationError(f"can only merge a PartialSum, got {type(other).__name__}")
        if other.dim != self.dim:
            raise AggregationError(
                f"cannot merge partial sums of different sizes ({self.dim} and {other.dim} values)"
            )
        with np.errstate(over="ignore"):  # overflow is refused below, with a clearer error
            total = np.add(self.total, other.total)
        return PartialSum._trusted(
            total, self.weight + other.weight, self.count + other.count, self.dim
        )

    def mean(self) -> FloatArray:
        """The FedAvg average, ``total / weight`` (a new float64 array); refuses an empty sum."""
        if self.count == 0:
            raise AggregationError("the partial sum has no deltas, so it has no mean")
        with np.errstate(over="ignore"):
            mean = np.divide(self.total, self.weight)
        if not np.all(np.isfinite(mean)):  # only a built (not summed) value can get here
            raise AggregationError("the mean overflowed: its values are not finite")
        return mean

    def to_bytes(self) -> bytes:
        """The versioned, self-checking serialization described in the module docstring."""
        header = _HEADER.pack(
            _MAGIC_PREFIX + bytes([FORMAT_VERSION]), self.dim, self.count, self.weight
        )
        body = header + self.total.astype("<f8", copy=False).tobytes()
        return body + hashlib.sha256(body).digest()

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> PartialSum:
        """Read :meth:`to_bytes` output back; raises ``AggregationError`` unless it is intact."""
        blob = bytes(data)
        if len(blob) < _HEADER.size + _DIGEST_BYTES:
            raise AggregationError(f"too short for a stored partial sum ({len(blob)} bytes)")
        magic, dim, count, weight = _HEADER.unpack_from(blob)
        if magic[:3] != _MAGIC_PREFIX:
            raise AggregationError("these bytes are not a stored partial sum")
        # The version comes before the digest: another version may check itself differently.
        if magic[3] != FORMAT_VERSION:
            raise AggregationError(
                f"stored partial sum format version {magic[3]} is not supported "
                f"(this code reads version {FORMAT_VERSION})"
            )
        body, digest = blob[:-_DIGEST_BYTES], blob[-_DIGEST_BYTES:]
        if not hmac.compare_digest(hashlib.sha256(body).digest(), digest):
            raise AggregationError("the stored partial sum is corrupt (checksum mismatch)")
        if len(body) != _HEADER.size + 8 * dim:
            raise AggregationError(
                f"the stored partial sum's length does not match its {dim} values"
            )
        total = np.frombuffer(body, dtype="<f8", offset=_HEADER.size)
        return cls(total=total, weight=weight, count=count, dim=dim)  # checks and copies

    @classmethod
    def _trusted(cls, total: FloatArray, weight: float, count: int, dim: int) -> PartialSum:
        # Our own arithmetic on checked values, into a fresh array nobody else holds: only
        # overflow can break the invariants, so this skips __post_init__'s checks and copy
        # (which would cost one more model-sized array per delta).
        if not np.all(np.isfinite(total)) or not math.isfinite(weight):
            raise AggregationError("the sum overflowed: its values are no longer finite")
        total.flags.writeable = False
        value = object.__new__(cls)
        for name, field in (("total", total), ("weight", weight), ("count", count), ("dim", dim)):
            object.__setattr__(value, name, field)
        return value

    # Exact equality, as a stored round must read back. Like the array it holds, not hashable.
    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PartialSum):
            return NotImplemented
        return (
            self.dim == other.dim
            and self.count == other.count
            and self.weight == other.weight
            and bool(np.array_equal(self.total, other.total))
        )

    def __repr__(self) -> str:
        return f"PartialSum(dim={self.dim}, count={self.count}, weight={self.weight!r})"


def central_release(
    total: npt.ArrayLike,
    *,
    clipping_norm: float,
    noise_multiplier: float,
    expected_cohort: float,
    rng: np.random.Generator | None = None,
) -> FloatArray:
    """The central-mode update: ``(total + noise) / expected_cohort``.

    ``total`` is the round's sum of every on-time clipped delta (norm <= C, one per device).
    Adding or removing one device changes it by at most C; it is rounded to the fixed-point grid
    of :mod:`sottovoce.sync._noise` (which adds at most sqrt(dim) grid steps to that) and gets
    discrete Gaussian noise of standard deviation ``noise_multiplier * C`` from the OS CSPRNG
    (``rng``, a seeded generator, stands in for simulations and tests only). The divisor is the
    round's fixed expected cohort, never the count: the fixed-denominator estimator of DP-FedAvg
    (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"), so the
    count's own randomness adds nothing to the sensitivity. The ledger charges this as the
    Poisson-sampled Gaussian with sensitivity ``C * sensitivity_factor(dim)``
    (:func:`sottovoce.sync._budget.mechanism`). Returns a new float64 array.
    """
    if not (math.isfinite(expected_cohort) and expected_cohort > 0):
        raise ValueError(f"the expected cohort must be a positive number, got {expected_cohort}")
    values = _as_vector(total, None, what="total")
    noisy = noisy_on_grid(values, clipping_norm=clipping_norm,
                          noise_multiplier=noise_multiplier, rng=rng)  # fmt: skip
    return np.asarray(noisy / expected_cohort, dtype=np.float64)


def _as_vector(values: npt.ArrayLike, dim: int | None, *, what: str) -> FloatArray:
    """``values`` as a finite float64 vector of ``dim`` values (no copy if already one)."""
    try:
        array = np.asarray(values)
    except (TypeError, ValueError) as error:
        raise AggregationError(f"the {what} is not an array of numbers ({error})") from None
    if array.dtype.kind not in "fiu":
        raise AggregationError(f"the {what} must hold real numbers, got dtype {array.dtype}")
    if array.ndim != 1 or (dim is not None and array.shape[0] != dim):
        expected = f"({dim},)" if dim is not None else "a flat vector"
        raise AggregationError(f"the {what} has shape {array.shape}, expected {expected}")
    if array.size == 0:
        raise AggregationError(f"the {what} is empty")
    array = array.astype(np.float64, copy=False)
    if not np.all(np.isfinite(array)):
        raise AggregationError(f"the {what} has NaN or infinite values")
    return array


def _positive_weight(weight: Weight) -> float:
    if isinstance(weight, bool) or not isinstance(weight, int | float | np.integer | np.floating):
        raise AggregationError(f"a delta's weight must be a number, got {weight!r}")
    w = float(weight)
    if not (math.isfinite(w) and w > 0):
        raise AggregationError(f"a delta's weight must be finite and > 0, got {weight!r}")
    return w
