"""The aggregator ledger's cached RDP curves give opacus' own figure, bit for bit.

The ledger caches one round's RDP curve per (noise multiplier, sampling rate) and composes
periods from the cache; these tests recompute each epsilon with a fresh opacus
``RDPAccountant`` (its own history, its own curves) and compare with ``==``.
"""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("opacus")

from opacus.accountants import RDPAccountant

from sottovoce.aggregator._ledger import RDP_ORDERS, _rdp_curve, epsilon_of
from sottovoce.policy import Accountant

DELTA = 1e-6

# (noise multiplier, sampling rate, steps[, sensitivity]) per period: one mechanism, several,
# unsampled rounds, and a sensitivity above 1 (the ledger divides it out first).
PERIODS = [
    [(1.1065, 0.5, 1)],
    [(1.1065, 0.5, 5)],
    [(1.8261, 0.5, 3), (1.1065, 0.5, 2)],
    [(4.0, 1.0, 7, 2.0002746)],
    [(1.3, 0.05, 40), (4.0, 1.0, 3, 2.0), (1.3, 0.05, 10)],
]


def opacus_epsilon(rounds: list[tuple[float, ...]], delta: float) -> float:
    """The same period through opacus' public accountant, nothing cached."""
    grouped: dict[tuple[float, float], int] = {}
    for sigma, q, steps, *rest in rounds:
        key = (sigma / (rest[0] if rest else 1.0), q)
        grouped[key] = grouped.get(key, 0) + steps
    accountant = RDPAccountant()
    accountant.history = [(sigma, q, steps) for (sigma, q), steps in grouped.items()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=delta, alphas=list(RDP_ORDERS)))


@pytest.mark.parametrize("rounds", PERIODS, ids=[str(len(p)) for p in PERIODS])
def test_cached_curves_give_opacus_figure_exactly(rounds: list[tuple[float, ...]]) -> None:
    _rdp_curve.cache_clear()
    cold = epsilon_of(rounds, delta=DELTA, accountant=Accountant.RDP)
    warm = epsilon_of(rounds, delta=DELTA, accountant=Accountant.RDP)
    assert _rdp_curve.cache_info().hits >= 1  # the second answer came from the cache
    assert cold == warm == opacus_epsilon(rounds, DELTA)


def test_a_growing_period_matches_opacus_at_every_round() -> None:
    # A region's rounds as the simulator runs them: the same mechanism, one more each time.
    for k in range(1, 8):
        rounds: list[tuple[float, ...]] = [(1.1065486930310728, 0.5, 1, 1.0001373324128917)] * k
        assert epsilon_of(rounds, delta=DELTA, accountant=Accountant.RDP) == opacus_epsilon(
            rounds, DELTA
        )


def test_curves_are_read_only() -> None:
    curve = _rdp_curve(1.1065, 0.5)
    with pytest.raises(ValueError):
        curve[0] = 0.0  # a caller cannot change what later periods compose
