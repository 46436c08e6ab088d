"""PartialSum: order-independent FedAvg, merging, refusals, storage bytes, memory, and the
central release (the noised sum on the grid over the fixed expected cohort)."""

from __future__ import annotations

import hashlib
import struct
import tracemalloc
from functools import reduce

import numpy as np
import pytest
from aggregator_helpers import central_update
from hypothesis import given
from hypothesis import strategies as st

from sottovoce import SottovoceError
from sottovoce.aggregator import central_release
from sottovoce.aggregator._partial_sum import AggregationError, PartialSum

DIM = 4
values = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
weights = st.floats(0.01, 100.0, allow_nan=False, allow_infinity=False)
deltas = st.lists(values, min_size=DIM, max_size=DIM).map(np.array)
weighted = st.lists(st.tuples(deltas, weights), min_size=1, max_size=20)


def add_all(items: list[tuple[np.ndarray, float]]) -> PartialSum:
    return reduce(lambda s, item: s.add(item[0], item[1]), items, PartialSum.empty(DIM))


def assert_close(a: PartialSum, b: PartialSum) -> None:
    # Each of <= 20 additions rounds by an ulp of the running magnitude (<= 20 * 1e3 * 100), so
    # totals agree to ~1e-8; the mean, a convex combination of values <= 1e3, to ~1e-11.
    assert a.count == b.count
    assert a.weight == pytest.approx(b.weight, rel=1e-12)
    np.testing.assert_allclose(a.total, b.total, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(a.mean(), b.mean(), rtol=1e-9, atol=1e-9)


# -- FedAvg --------------------------------------------------------------------------------


def test_mean_is_the_weighted_average() -> None:
    s = PartialSum.empty(3).add([1.0, 2.0, 3.0], 1.0).add(np.array([3, 2, 1], np.float32), 3.0)
    assert (s.count, s.weight, s.dim) == (2, 4.0, 3)
    np.testing.assert_array_equal(s.mean(), [2.5, 2.0, 1.5])


@given(weighted, st.data())
def test_adding_in_any_order_gives_the_same_mean(
    items: list[tuple[np.ndarray, float]], data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(items))
    assert_close(add_all(items), add_all(shuffled))


@given(weighted, st.data())
def test_merging_any_partition_in_any_grouping_equals_adding_all(
    items: list[tuple[np.ndarray, float]], data: st.DataObject
) -> None:
    groups = data.draw(st.integers(1, len(items)))
    owner = data.draw(
        st.lists(st.integers(0, groups - 1), min_size=len(items), max_size=len(items))
    )
    parts = [
        add_all([it for it, o in zip(items, owner, strict=True) if o == g]) for g in range(groups)
    ]
    # Merge a random pair (in a random order) until one sum is left: any tree shape, any order.
    while len(parts) > 1:
        i, j = data.draw(
            st.lists(st.integers(0, len(parts) - 1), min_size=2, max_size=2, unique=True)
        )
        merged = parts[i].merge(parts[j])
        parts = [p for k, p in enumerate(parts) if k not in (i, j)] + [merged]
    assert_close(parts[0], add_all(items))


@given(weighted, weighted)
def test_merge_is_commutative_and_empty_is_its_identity(
    a: list[tuple[np.ndarray, float]], b: list[tuple[np.ndarray, float]]
) -> None:
    x, y = add_all(a), add_all(b)
    assert x.merge(y) == y.merge(x)
    assert x.merge(PartialSum.empty(DIM)) == x == PartialSum.empty(DIM).merge(x)


@given(weighted, st.data())
def test_removing_an_added_delta_equals_never_adding_it(
    items: list[tuple[np.ndarray, float]], data: st.DataObject
) -> None:
    gone = data.draw(st.integers(0, len(items) - 1))
    without = items[:gone] + items[gone + 1 :]
    removed = add_all(items).remove(*items[gone])
    assert removed.count == len(without)
    if without:
        assert_close(removed, add_all(without))
    else:
        assert removed == PartialSum.empty(DIM)  # exactly empty, no rounding residue


def test_removing_from_an_empty_sum_or_a_bad_delta_is_refused() -> None:
    with pytest.raises(AggregationError, match="no deltas"):
        PartialSum.empty(DIM).remove(np.ones(DIM))
    one = PartialSum.empty(DIM).add(np.ones(DIM))
    with pytest.raises(AggregationError):
        one.remove(np.ones(DIM + 1))
    with pytest.raises(AggregationError):
        one.remove(np.full(DIM, np.nan))


def test_values_are_immutable_and_never_keep_the_delta() -> None:
    delta = np.array([1.0, 2.0])
    empty = PartialSum.empty(2)
    one = empty.add(delta)
    delta[:] = 100.0  # the caller's array is read, not kept
    np.testing.assert_array_equal(one.total, [1.0, 2.0])
    assert empty.count == 0 and not np.any(empty.total)
    with pytest.raises(ValueError, match="read-only"):
        one.total[0] = 5.0
    outside = np.array([1.0, 2.0])
    built = PartialSum(total=outside, weight=1.0, count=1, dim=2)
    outside[0] = 9.0  # a constructor's array is copied
    outside.flags.writeable = False
    frozen = PartialSum(total=outside, weight=1.0, count=1, dim=2)
    outside.flags.writeable = True  # an array that owns its memory can be made writeable again
    outside[0] = 7.0
    np.testing.assert_array_equal(built.total, [1.0, 2.0])
    np.testing.assert_array_equal(frozen.total, [9.0, 2.0])


def test_repr_is_short() -> None:
    assert repr(PartialSum.empty(20_737).add(np.ones(20_737))) == (
        "PartialSum(dim=20737, count=1, weight=1.0)"
    )


# -- refusals ------------------------------------------------------------------------------


def test_an_empty_sum_has_no_mean() -> None:
    with pytest.raises(AggregationError, match="no deltas") as caught:
        PartialSum.empty(3).mean()
    assert caught.value.code == "aggregation_error"
    assert isinstance(caught.value, SottovoceError)


@pytest.mark.parametrize(
    "delta",
    [
        np.zeros(2),
        np.zeros(4),
        np.zeros((1, 3)),
        np.zeros((3, 1)),
        np.float64(1.0),
        [1.0, 2.0],
        np.array([1.0, 2.0, float("nan")]),
        np.array([1.0, float("inf"), 2.0]),
        np.array([-float("inf"), 0.0, 0.0], np.float32),
        np.array([1 + 1j, 0, 0]),
        np.array(["a", "b", "c"]),
        np.array([True, False, True]),
        [[1.0], 2.0, 3.0],
    ],
)
def test_wrong_shape_or_non_finite_deltas_are_refused(delta: object) -> None:
    s = PartialSum.empty(3).add([1.0, 1.0, 1.0])
    with pytest.raises(AggregationError):
        s.add(delta)  # type: ignore[arg-type]


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf"), True, "2"])
def test_bad_weights_are_refused(weight: object) -> None:
    with pytest.raises(AggregationError, match="weight"):
        PartialSum.empty(2).add([1.0, 1.0], weight)  # type: ignore[arg-type]


def test_overflow_to_infinity_is_refused() -> None:
    s = PartialSum.empty(1).add([1e308])
    with pytest.raises(AggregationError, match="overflowed"):
        s.add([1e308])
    with pytest.raises(AggregationError, match="overflowed"):
        s.merge(s)
    with pytest.raises(AggregationError, match="overflowed"):
        PartialSum.empty(1).add([1.0], 1e308).add([1.0], 1e308)
    with pytest.raises(AggregationError, match="mean overflowed"):
        PartialSum(total=np.array([1e308]), weight=1e-10, count=1, dim=1).mean()


def test_numpy_scalar_weights_are_numbers() -> None:
    s = PartialSum.empty(1).add([2.0], np.float32(0.5)).add([2.0], np.int64(3))
    assert s.weight == 3.5 and s.mean()[0] == 2.0


def test_merging_different_sizes_or_other_things_is_refused() -> None:
    with pytest.raises(AggregationError, match="different sizes"):
        PartialSum.empty(3).merge(PartialSum.empty(4))
    with pytest.raises(AggregationError, match="PartialSum"):
        PartialSum.empty(3).merge(np.zeros(3))  # type: ignore[arg-type]


@pytest.mark.parametrize("dim", [0, -1, 2**32, True, 2.0])
def test_bad_sizes_are_refused(dim: object) -> None:
    with pytest.raises(AggregationError, match="dim"):
        PartialSum.empty(dim)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("total", "weight", "count", "dim"),
    [
        ([0.0, 0.0], 1.0, 0, 2),  # weight without deltas
        ([1.0, 0.0], 0.0, 0, 2),  # a total without deltas
        ([1.0, 0.0], 0.0, 1, 2),  # deltas without weight
        ([1.0, 0.0], -1.0, 1, 2),
        ([1.0, 0.0], float("nan"), 1, 2),
        ([1.0, 0.0], "1", 1, 2),
        ([1.0, 0.0], 1.0, -1, 2),
        ([1.0, 0.0], 1.0, 1.0, 2),
        ([1.0, 0.0], 1.0, 1, 3),
        ([1.0, float("nan")], 1.0, 1, 2),
    ],
)
def test_inconsistent_values_cannot_be_built(
    total: list[float], weight: object, count: object, dim: int
) -> None:
    with pytest.raises(AggregationError):
        PartialSum(total=np.array(total), weight=weight, count=count, dim=dim)  # type: ignore[arg-type]


# -- storage bytes -------------------------------------------------------------------------


@given(weighted)
def test_bytes_round_trip_exactly(items: list[tuple[np.ndarray, float]]) -> None:
    s = add_all(items)
    blob = s.to_bytes()
    assert len(blob) == 24 + 8 * DIM + 32
    back = PartialSum.from_bytes(blob)
    assert back == s
    assert back.total.tobytes() == s.total.tobytes()  # bit for bit, signed zeros included
    assert PartialSum.from_bytes(bytearray(blob)) == s == PartialSum.from_bytes(memoryview(blob))


@given(weighted, st.data())
def test_a_restart_mid_round_changes_nothing(
    items: list[tuple[np.ndarray, float]], data: st.DataObject
) -> None:
    cut = data.draw(st.integers(0, len(items)))
    restored = PartialSum.from_bytes(add_all(items[:cut]).to_bytes())
    resumed = reduce(lambda s, item: s.add(item[0], item[1]), items[cut:], restored)
    assert resumed == add_all(items)  # same order, so bit for bit


def test_empty_sums_round_trip_too() -> None:
    assert PartialSum.from_bytes(PartialSum.empty(7).to_bytes()) == PartialSum.empty(7)


def _sample_blob() -> bytes:
    return PartialSum.empty(3).add([1.5, -2.0, 0.25], 2.0).add([0.0, 1.0, 3.0]).to_bytes()


def test_every_flipped_bit_is_refused() -> None:
    blob = _sample_blob()
    for i in range(len(blob)):
        for bit in range(8):
            corrupt = bytearray(blob)
            corrupt[i] ^= 1 << bit
            with pytest.raises(AggregationError):
                PartialSum.from_bytes(bytes(corrupt))


@given(st.data())
def test_any_changed_byte_is_refused(data: st.DataObject) -> None:
    blob = _sample_blob()
    i = data.draw(st.integers(0, len(blob) - 1))
    new = data.draw(st.integers(0, 255).filter(lambda b: b != blob[i]))
    with pytest.raises(AggregationError):
        PartialSum.from_bytes(blob[:i] + bytes([new]) + blob[i + 1 :])


def test_every_truncation_and_extension_is_refused() -> None:
    blob = _sample_blob()
    for n in range(len(blob)):
        with pytest.raises(AggregationError):
            PartialSum.from_bytes(blob[:n])
        with pytest.raises(AggregationError):
            PartialSum.from_bytes(blob[len(blob) - n :])
    for extra in (b"\x00", b"\x00" * 8, blob):
        with pytest.raises(AggregationError):
            PartialSum.from_bytes(blob + extra)


def _with_digest(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (struct.pack("<4sIQd", b"SVQ\x01", 1, 1, 1.0) + struct.pack("<d", 1.0), "not a stored"),
        (struct.pack("<4sIQd", b"SVP\x02", 1, 1, 1.0) + struct.pack("<d", 1.0), "version 2"),
        (struct.pack("<4sIQd", b"SVP\x01", 2, 1, 1.0) + struct.pack("<d", 1.0), "length"),
        (struct.pack("<4sIQd", b"SVP\x01", 0, 0, 0.0), "dim"),
        (struct.pack("<4sIQd", b"SVP\x01", 1, 1, 1.0) + struct.pack("<d", float("nan")), "NaN"),
        (struct.pack("<4sIQd", b"SVP\x01", 1, 1, 0.0) + struct.pack("<d", 1.0), "disagree"),
        (struct.pack("<4sIQd", b"SVP\x01", 1, 0, 0.0) + struct.pack("<d", 1.0), "zero total"),
        (struct.pack("<4sIQd", b"SVP\x01", 1, 1, float("inf")) + struct.pack("<d", 1.0), "weight"),
    ],
)
def test_well_checksummed_but_invalid_contents_are_refused(body: bytes, message: str) -> None:
    with pytest.raises(AggregationError, match=message):
        PartialSum.from_bytes(_with_digest(body))


def test_layout_is_little_endian_and_versioned() -> None:
    blob = PartialSum.empty(2).add([1.0, -0.5], 2.0).to_bytes()
    assert blob[:24] == b"SVP\x01" + struct.pack("<IQd", 2, 1, 2.0)
    assert blob[24:40] == struct.pack("<2d", 2.0, -1.0)
    assert blob[40:] == hashlib.sha256(blob[:40]).digest()


# -- the central release --------------------------------------------------------------------


def test_the_central_release_is_the_sum_on_the_grid_plus_noise_over_the_expected_cohort() -> None:
    # gamma * (rint(total / gamma) + rint(normal(0, z * 2**20))) / expected, bit for bit.
    clip, z, expected = 1.5, 1.1, 7.0
    total = np.array([0.25, -1.0, 3.0, 1e-9])
    released = central_release(total, clipping_norm=clip, noise_multiplier=z,
                               expected_cohort=expected, rng=np.random.default_rng(7))  # fmt: skip
    gamma = clip / 2**20
    steps = np.rint(total / gamma) + np.rint(
        np.random.default_rng(7).normal(0.0, z * 2**20, size=total.shape)
    )
    np.testing.assert_array_equal(released, steps * gamma / expected)
    assert released.dtype == np.float64 and released.shape == total.shape
    np.testing.assert_array_equal(total, [0.25, -1.0, 3.0, 1e-9])  # the input is not changed
    # The helper the round tests predict releases with computes the same, independently.
    same = central_update(total, np.random.default_rng(7), clipping_norm=clip, noise_multiplier=z,
                          expected_cohort=expected)  # fmt: skip
    np.testing.assert_array_equal(released, same)


@pytest.mark.parametrize("seeded", [True, False], ids=["seeded", "csprng"])
def test_the_central_noise_has_std_z_c_over_the_expected_cohort(seeded: bool) -> None:
    # Also from the OS CSPRNG (the deployment's exact discrete Gaussian): the same scale, on
    # the grid, and never the same draw twice.
    draws, expected, clip, z = 20_000, 100.0, 1.5, 1.1
    total = np.full(draws, 25.0)  # what a round of 100 devices sending 0.25 sums to
    rng = np.random.default_rng(7) if seeded else None
    released = central_release(total, clipping_norm=clip, noise_multiplier=z,
                               expected_cohort=expected, rng=rng)  # fmt: skip
    noise = released - total / expected
    std = z * clip / expected
    assert noise.std() == pytest.approx(std, rel=0.03)
    assert abs(noise.mean()) < 4 * std / np.sqrt(draws)
    steps = released * expected / (clip / 2**20)  # grid steps: whole numbers
    np.testing.assert_allclose(steps, np.rint(steps), rtol=0, atol=1e-6)
    again = central_release(total, clipping_norm=clip, noise_multiplier=z,
                            expected_cohort=expected, rng=None)  # fmt: skip
    assert not np.array_equal(released, again)


def test_the_central_release_divides_by_the_expected_cohort_whatever_it_is_given() -> None:
    # The same sum and the same seeded noise: the divisor is the only difference.
    total = np.array([1.0, -2.0, 0.5])

    def release(expected: float) -> np.ndarray:
        return central_release(total, clipping_norm=1.0, noise_multiplier=1.0,
                               expected_cohort=expected, rng=np.random.default_rng(3))  # fmt: skip

    np.testing.assert_allclose(release(5.0) * 5.0, release(2.5) * 2.5, rtol=1e-15)


def test_the_central_release_is_reproducible_with_a_seeded_generator() -> None:
    def noisy(seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return central_release([0.0, 1.0], clipping_norm=1.0, noise_multiplier=1.0,
                               expected_cohort=10.0, rng=rng)  # fmt: skip

    np.testing.assert_array_equal(noisy(1), noisy(1))
    assert not np.array_equal(noisy(1), noisy(2))


def test_the_central_release_is_exported_and_the_old_name_is_gone() -> None:
    from sottovoce import aggregator

    assert aggregator.central_release is central_release
    assert "central_release" in aggregator.__all__
    assert not hasattr(aggregator, "central_noise")


@pytest.mark.parametrize(
    ("clip", "z", "expected"),
    [(0.0, 1.0, 10.0), (-1.0, 1.0, 10.0), (float("nan"), 1.0, 10.0), (float("inf"), 1.0, 10.0),
     (1.0, 0.0, 10.0), (1.0, -1.0, 10.0), (1.0, float("nan"), 10.0), (1.0, float("inf"), 10.0),
     (1.0, 2.0**37, 10.0), (1.0, 1.0, 0.0), (1.0, 1.0, -5.0), (1.0, 1.0, float("nan")),
     (1.0, 1.0, float("inf"))],
)  # fmt: skip
def test_the_central_release_refuses_bad_parameters(clip: float, z: float, expected: float) -> None:
    with pytest.raises(ValueError):
        central_release(np.zeros(3), clipping_norm=clip, noise_multiplier=z,
                        expected_cohort=expected, rng=np.random.default_rng(0))  # fmt: skip


BAD_SUMS = [np.array([0.0, np.nan]), np.array([np.inf, 0.0]), np.zeros((2, 2)), np.zeros(0),
            np.array(["a", "b"])]  # fmt: skip


@pytest.mark.parametrize("total", BAD_SUMS)
def test_the_central_release_refuses_a_bad_sum(total: np.ndarray) -> None:
    with pytest.raises(AggregationError):
        central_release(total, clipping_norm=1.0, noise_multiplier=1.0, expected_cohort=3.0,
                        rng=np.random.default_rng(0))  # fmt: skip


def test_a_sum_too_large_for_the_grid_is_refused() -> None:
    with pytest.raises(ValueError, match="too large for the grid"):
        central_release(np.array([2.0**43, 0.0]), clipping_norm=1.0, noise_multiplier=1.0,
                        expected_cohort=3.0, rng=np.random.default_rng(0))  # fmt: skip


# -- memory --------------------------------------------------------------------------------


def test_memory_stays_flat_in_the_number_of_deltas() -> None:
    dim, n = 20_737, 10_000
    one_delta = dim * 8  # bytes of one float64 delta
    rng = np.random.default_rng(0)
    tracemalloc.start()
    try:
        s = PartialSum.empty(dim)
        for _ in range(n):
            s = s.add(rng.standard_normal(dim, dtype=np.float32))
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert s.count == n
    # Keeping the deltas would take n * one_delta (1.6 GB); the sum holds a few deltas' worth.
    assert peak < 6 * one_delta, (peak, one_delta)
    assert current < 3 * one_delta, (current, one_delta)
