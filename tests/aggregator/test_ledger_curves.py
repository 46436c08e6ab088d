"""The aggregator ledger's cached RDP curves give opacus' own figures, bit for bit.

The ledger caches one round's RDP curve per (noise multiplier, sampling rate, orders) and
composes periods from the cache, for its RDP epsilon and for the RDP bound that sizes its PRV
accountant's discretization; these tests recompute each epsilon with a fresh opacus
``RDPAccountant`` or ``PRVAccountant`` (its own history, its own curves) and compare with ``==``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("opacus")

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

from sottovoce.aggregator._ledger import (
    RDP_ORDERS,
    _prv_epsilon,
    _rdp_curve,
    _safe_domain_size,
    epsilon_of,
)
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


def grouped(rounds: list[tuple[float, ...]]) -> list[tuple[float, float, int]]:
    """A period's rounds as an accountant's history: steps summed per mechanism."""
    steps_of: dict[tuple[float, float], int] = {}
    for sigma, q, steps, *rest in rounds:
        key = (sigma / (rest[0] if rest else 1.0), q)
        steps_of[key] = steps_of.get(key, 0) + int(steps)
    return [(sigma, q, steps) for (sigma, q), steps in steps_of.items()]


def opacus_epsilon(rounds: list[tuple[float, ...]], delta: float) -> float:
    """The same period through opacus' public accountant, nothing cached."""
    accountant = RDPAccountant()
    accountant.history = grouped(rounds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=delta, alphas=list(RDP_ORDERS)))


def opacus_prv_epsilon(rounds: list[tuple[float, ...]], delta: float) -> float:
    accountant = PRVAccountant()
    accountant.history = grouped(rounds)
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=delta))


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


@pytest.mark.parametrize("rounds", PERIODS, ids=[str(len(p)) for p in PERIODS])
def test_the_prv_domain_is_opacus_own(rounds: list[tuple[float, ...]]) -> None:
    history = grouped(rounds)
    prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history]
    steps = [s for _, _, s in history]
    for eps_error, delta_error in ((0.01, DELTA / 1000), (0.1, 1e-9)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = compute_safe_domain_size(prvs, steps, eps_error, delta_error)
        assert _safe_domain_size(history, eps_error=eps_error, delta_error=delta_error) == expected


@pytest.mark.parametrize("rounds", PERIODS, ids=[str(len(p)) for p in PERIODS])
def test_prv_epsilon_on_cached_curves_is_opacus_own(rounds: list[tuple[float, ...]]) -> None:
    _prv_epsilon.cache_clear()
    ours = epsilon_of(rounds, delta=DELTA, accountant=Accountant.PRV)
    assert ours == opacus_prv_epsilon(rounds, DELTA)


def test_a_growing_prv_period_reuses_its_curves() -> None:
    # The rounds of one mechanism, one more each time: after the first answer, the domain's
    # RDP bound comes from the cache, and every answer is still opacus' own.
    _prv_epsilon.cache_clear()
    mechanism = (1.7101, 0.5, 1, 1.0001)
    epsilon_of([mechanism], delta=DELTA, accountant=Accountant.PRV)
    misses = _rdp_curve.cache_info().misses
    for k in (2, 3):
        rounds: list[tuple[float, ...]] = [mechanism] * k
        assert epsilon_of(rounds, delta=DELTA, accountant=Accountant.PRV) == opacus_prv_epsilon(
            rounds, DELTA
        )
    assert _rdp_curve.cache_info().misses == misses
