"""Neighbouring rounds on the real aggregator: the release moves by at most the sensitivity the
ledger charges for.

Two runs of the same round differ in one device (added, or replaced by another); the noise is
the same seeded draw in both, so the releases differ by exactly what the devices' data moved.
Central mode charges ``PoissonSampled(q, Gaussian(z / s))`` with sensitivity ``C * s`` on the
sum (``s`` the grid's factor), so the released update may move by at most ``C * s / n`` (added)
and ``2 * C * s / n`` (replaced), ``n`` the fixed expected cohort. Closing a round at a fixed
count instead (what the aggregator did before) lets an added device push another one out: the
update then moves by up to ``2 C / n`` for one added device, which these tests catch.
"""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from aggregator_helpers import COHORT, DIM, EXPECTED, Clock, Keys
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sottovoce.sync import new_device_secret, period_label, seal_delta, verify_release
from sottovoce.sync._noise import sensitivity_factor
from sottovoce.sync._wire import b64encode

pytest.importorskip("opacus")

C = 1.0


def _unit(axis: int, sign: float = 1.0) -> npt.NDArray[np.float32]:
    """A delta of norm C along one axis (the clipping bound: the most one device can move)."""
    values = np.zeros(DIM, dtype=np.float32)
    values[axis] = sign * C
    return values


def release_of(tmp_path: Path, name: str, deltas: list[npt.NDArray[np.float32]]) -> np.ndarray:
    """One central round on a fresh aggregator: ``deltas`` uploaded in order, then the deadline
    passes. The noise comes from the same seed in every call."""
    keys = Keys(signing=KEYS.signing, hpke=KEYS.hpke)
    clock = Clock()
    conn = sqlite3.connect(tmp_path / f"{name}.db")
    agg = keys.aggregator(conn, clock=clock, rng=np.random.default_rng(11))
    spec = agg.open_round(deadline=clock.now + timedelta(hours=1)).spec
    assert spec.expected_cohort == EXPECTED
    for delta in deltas:
        device = Ed25519PrivateKey.generate()
        public = device.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        agg.enroll(b64encode(public), period_label(spec))
        sealed = seal_delta(
            delta=delta,
            spec=spec,
            device_secret=new_device_secret(),
            signing_key=device,
            aggregator_hpke_key=keys.hpke.public_key(),
        )
        assert agg.accept(sealed.to_wire(), sealed.idempotency_key).code == "within_policy"
    clock.now = spec.deadline + timedelta(seconds=1)
    agg.sweep()
    release = agg.latest_release()
    assert release is not None
    weights = verify_release(release, keys.signing.public_key()).astype(np.float64)
    conn.close()
    return weights


KEYS = Keys()
BOUND = C * sensitivity_factor(DIM) / EXPECTED  # the release's sensitivity, as charged


def test_adding_one_device_moves_the_release_by_at_most_the_sensitivity(tmp_path: Path) -> None:
    # COHORT devices pushing one way; the added device arrives first and pulls the other way.
    # A round closed at COHORT contributions would drop the last of them for it: 2C / n.
    base = [_unit(0) for _ in range(COHORT)]
    without = release_of(tmp_path, "without", base)
    with_one = release_of(tmp_path, "with", [_unit(0, -1.0), *base])
    moved = float(np.linalg.norm(with_one - without))
    assert moved <= BOUND * (1 + 1e-6)
    assert moved >= 0.9 * C / EXPECTED  # the added device did count


def test_replacing_one_device_moves_the_release_by_at_most_twice_the_sensitivity(
    tmp_path: Path,
) -> None:
    others = [_unit(1) for _ in range(COHORT + 1)]
    first = release_of(tmp_path, "first", [_unit(0), *others])
    second = release_of(tmp_path, "second", [_unit(0, -1.0), *others])
    moved = float(np.linalg.norm(first - second))
    assert moved <= 2 * BOUND * (1 + 1e-6)
    assert moved >= 1.8 * C / EXPECTED


def test_the_release_divides_by_the_expected_cohort_not_the_count(tmp_path: Path) -> None:
    # Same seeded noise: two devices or four, each pushing C along one axis, move that axis
    # of the release by count * C / EXPECTED, so the count is never the divisor.
    two = release_of(tmp_path, "two", [_unit(2)] * 2)
    four = release_of(tmp_path, "four", [_unit(2)] * 4)
    assert (four - two)[2] == pytest.approx(2 * C / EXPECTED, abs=1e-5)
