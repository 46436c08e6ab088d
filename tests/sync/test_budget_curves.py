"""The device ledger's cached RDP curves and PLDs give dp-accounting's own figure, bit for bit.

``sync._budget.epsilon`` caches one round's RDP curve per (effective noise multiplier,
sampling rate) and composes charges from the cache; these tests recompute each epsilon by
composing the same events into a fresh dp-accounting ``RdpAccountant`` and compare with ``==``.
"""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from sottovoce.policy import PrivacyMode
from sottovoce.sync._budget import (
    PLD_INTERVAL,
    RDP_ORDERS,
    Mechanism,
    _composed_pld,
    _rdp_curve,
    _sampled_gaussian_pld,
    epsilon,
    mechanism,
)

DELTA = 1e-6
DIM = 20_737  # the ranker's parameters

CENTRAL_EU = mechanism(PrivacyMode.CENTRAL, noise_multiplier=1.8261, sampling_rate=0.5, dim=DIM)
CENTRAL_US = mechanism(PrivacyMode.CENTRAL, noise_multiplier=1.1065, sampling_rate=0.5, dim=DIM)
LOCAL = mechanism(PrivacyMode.LOCAL, noise_multiplier=4.0, sampling_rate=0.5, dim=DIM)
SPARSE = Mechanism(noise_multiplier=1.3, sampling_rate=0.05, sensitivity=1.0)

HISTORIES = {
    "one round": [CENTRAL_US],
    "five rounds": [CENTRAL_US] * 5,
    "two mechanisms": [CENTRAL_EU, CENTRAL_US, CENTRAL_EU],
    "unsampled": [LOCAL] * 3,
    "mixed": [SPARSE] * 30 + [LOCAL, CENTRAL_EU] + [SPARSE] * 5,
}


def composed_event(history: list[Mechanism]) -> dp_accounting.DpEvent:
    """The charges as dp-accounting events: each mechanism self-composed its count of times."""
    counts: dict[tuple[float, float], int] = {}
    for m in history:
        key = (m.effective_noise_multiplier, m.sampling_rate)
        counts[key] = counts.get(key, 0) + 1
    events = []
    for (z, q), count in sorted(counts.items()):
        event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(z)
        if q < 1.0:
            event = dp_accounting.PoissonSampledDpEvent(q, event)
        events.append(dp_accounting.SelfComposedDpEvent(event, count))
    return dp_accounting.ComposedDpEvent(events)


def independent_epsilon(history: list[Mechanism], delta: float) -> float:
    """The same charges through dp-accounting's public accountant, nothing cached."""
    accountant = rdp.RdpAccountant(list(RDP_ORDERS))
    accountant.compose(composed_event(history))
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize("name", list(HISTORIES))
def test_cached_curves_give_dp_accounting_figure_exactly(name: str) -> None:
    history = HISTORIES[name]
    _rdp_curve.cache_clear()
    cold = epsilon(history, delta=DELTA)
    warm = epsilon(history, delta=DELTA)
    assert _rdp_curve.cache_info().hits >= 1  # the second answer came from the cache
    assert cold == warm == independent_epsilon(history, DELTA)


def test_a_device_ledger_growing_round_by_round_matches_at_every_round() -> None:
    for k in range(1, 8):
        history = [CENTRAL_US] * k
        assert epsilon(history, delta=DELTA) == independent_epsilon(history, DELTA)
    assert epsilon([], delta=DELTA) == 0.0


def test_curves_are_read_only() -> None:
    curve = _rdp_curve(CENTRAL_US.effective_noise_multiplier, 0.5)
    with pytest.raises(ValueError):
        curve[0] = 0.0  # a caller cannot change what later charges compose


def independent_pld_epsilon(history: list[Mechanism], delta: float) -> float:
    """The same charges through dp-accounting's public PLD accountant, nothing cached."""
    accountant = pld.PLDAccountant(value_discretization_interval=PLD_INTERVAL)
    accountant.compose(composed_event(history))
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize("name", ["one round", "five rounds", "two mechanisms", "unsampled"])
def test_cached_sampled_plds_give_dp_accounting_figure_exactly(name: str) -> None:
    # the PLD ledger (the device's beside a PRV aggregator) caches each sampled Gaussian's own
    # distribution and composes it: each figure must be the public accountant's, bit for bit,
    # and a distribution taken from the cache must not have been changed by composing it
    history = HISTORIES[name]
    _composed_pld.cache_clear()
    _sampled_gaussian_pld.cache_clear()
    first = epsilon(history, delta=DELTA, accountant="pld")
    _composed_pld.cache_clear()  # so the second figure composes the cached distributions again
    again = epsilon(history, delta=DELTA, accountant="pld")
    if any(m.sampling_rate < 1.0 for m in history):
        assert _sampled_gaussian_pld.cache_info().hits >= 1
    assert first == again == independent_pld_epsilon(history, DELTA)


@pytest.mark.parametrize(
    "history",
    [[Mechanism(0.0, 0.5, 1.0), CENTRAL_US], [Mechanism(1.3, 0.0, 1.0), CENTRAL_US]],
    ids=["no noise", "never sampled"],
)
def test_degenerate_charges_count_as_the_pld_accountant_counts_them(
    history: list[Mechanism],
) -> None:
    # no noise is not private (infinite epsilon); a rate of 0 is no event at all
    assert epsilon(history, delta=DELTA, accountant="pld") == independent_pld_epsilon(
        history, DELTA
    )


def test_a_pld_ledger_growing_round_by_round_matches_at_every_round() -> None:
    for k in range(1, 7):
        history = [CENTRAL_EU] * k + [CENTRAL_US] * (k // 2)
        assert epsilon(history, delta=DELTA, accountant="pld") == independent_pld_epsilon(
            history, DELTA
        )
