"""The device's own privacy ledger: it refuses what would exceed its policy, whatever a spec says.

Every refusal is a typed ``SpecRefused``, logged in the device's decision log, and nothing is
trained or queued. The epsilons are recomputed here with dp-accounting directly, independently of
the device's code path.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import dp_accounting
import pytest
from conftest import NOW, consenting, policy_where_all_take_part, round_spec
from dp_accounting import pld, rdp

from sottovoce._demo import listen, make_catalog
from sottovoce.device import Eligibility, EventStore, Personalizer
from sottovoce.policy import Policy, Purpose, example_policy
from sottovoce.sync import SpecRefused, sample_into_round
from sottovoce.sync._budget import RDP_ORDERS, period_start_for
from sottovoce.sync._noise import sensitivity_factor

READY = Eligibility(charging=True, unmetered=True, idle=True)


def independent_epsilon(
    z: float, q: float, rounds: int, delta: float, dim: int, *, accountant: str = "rdp"
) -> float:
    """The epsilon of ``rounds`` Poisson-sampled Gaussian rounds, written out here: by RDP for a
    policy's ``rdp``, by privacy loss distributions (dp-accounting's PLD, at the device's
    discretization of 1e-3) for its ``prv``."""
    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(z / sensitivity_factor(dim))
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    if accountant == "prv":
        loss = pld.PLDAccountant(value_discretization_interval=1e-3)
        loss.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
        return float(loss.get_epsilon(delta))
    moments = rdp.RdpAccountant(list(RDP_ORDERS))
    moments.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(moments.get_epsilon(delta))


class Device:
    """An EU device with a listener who consented to training, on a settable clock."""

    def __init__(
        self, path: Path, policy: Policy, region: str = "eu", *, secret: bytes | None = None
    ) -> None:
        self.now: datetime = NOW
        self.policy, self.region = policy, region
        store = EventStore.open(path, policy=policy, region=region, clock=lambda: self.now,
                                device_secret=secret)  # fmt: skip
        consenting(store, "ann", Purpose.PERSONALIZATION, Purpose.FEDERATED_TRAINING)
        tracks, rows = make_catalog(random.Random(1))
        store.upsert_catalog(rows)
        history = listen(random.Random(2), "ann", tracks, {2, 5}, 300)
        shift = NOW - timedelta(days=20) - datetime.fromisoformat(history[0]["ts"])
        for event in history:  # inside the EU's 30 days of raw-event retention
            event["ts"] = (datetime.fromisoformat(event["ts"]) + shift).isoformat()
        store.append_many(history)
        self.personalizer = Personalizer(store)
        self.store = store

    def spec(self, round_id: str, **overrides: Any) -> Any:
        fields = {"model_version": self.personalizer.version, **overrides}
        return round_spec(self.policy, self.region, model_id=self.personalizer.ranker.model_id,
                          now=self.now, round_id=round_id, **fields)  # fmt: skip

    def join(self, spec: Any) -> str | None:
        return self.personalizer.contribute("ann", spec=spec, eligibility=READY, steps=5)

    def refusals(self) -> list[str]:
        return [d.reason for _, d in self.store.decisions.query(action="contribute_delta")
                if not d.allowed]  # fmt: skip


@pytest.fixture
def dim() -> int:
    from sottovoce.device import Ranker

    return Ranker.load().parameter_count


def test_the_four_hostile_specs_are_all_refused(tmp_path: Path, dim: int) -> None:
    """Tiny noise, q = 1, a fresh "period" each round, a falsely low claimed epsilon: the device
    joins none of them, logs each refusal and queues nothing."""
    device = Device(tmp_path / "d.db", example_policy())
    privacy = example_policy().region("eu").privacy
    hostile = {
        "noise_multiplier": device.spec("h1", noise_multiplier=0.001, epsilon_after=0.5),
        "sampling_rate": device.spec(
            "h2", sampling_rate=1.0, expected_cohort=50_000.0, epsilon_after=0.5
        ),
        "period": device.spec("h3", period_start=NOW - timedelta(hours=1), epsilon_after=0.5),
    }
    for rule, spec in hostile.items():
        with pytest.raises(SpecRefused) as refused:
            device.join(spec)
        assert refused.value.rule == rule
    # What those would really have cost, recomputed independently: far beyond the budget.
    # (By RDP: a loss distribution at a noise multiplier of 0.001 is too wide to compute.)
    assert independent_epsilon(0.001, privacy.sampling_rate, 1, privacy.delta, dim) > 1e3
    kind = privacy.accountant
    unsampled = independent_epsilon(privacy.noise_multiplier, 1.0, 1, privacy.delta, dim,
                                    accountant=kind)  # fmt: skip
    assert unsampled > privacy.epsilon
    assert device.refusals() == ["spec_outside_policy"] * 3
    assert device.store.outbox_states() == {}
    assert device.store.privacy_history("eu") == []


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_a_falsely_low_claimed_epsilon_does_not_buy_a_round(
    tmp_path: Path, dim: int, accountant: str
) -> None:
    # Every device in every round (q = 1) and a budget of 6: one round of z = 1 costs about 4.7
    # (PLD: 4.4), two about 7.1 (PLD: 6.6). Each spec claims 0.5; the device's own ledger
    # refuses the second.
    policy = policy_where_all_take_part(epsilon=6.0, noise_multiplier=1.0, accountant=accountant)
    device = Device(tmp_path / "d.db", policy)
    one = independent_epsilon(1.0, 1.0, 1, 1e-5, dim, accountant=accountant)
    two = independent_epsilon(1.0, 1.0, 2, 1e-5, dim, accountant=accountant)
    assert one <= 6.0 < two
    assert device.join(device.spec("r1", noise_multiplier=1.0, epsilon_after=0.5)) is not None
    with pytest.raises(SpecRefused) as refused:
        device.join(device.spec("r2", noise_multiplier=1.0, epsilon_spent=0.0,
                                epsilon_after=0.5))  # fmt: skip
    assert refused.value.code == "budget_exhausted" and refused.value.rule == "epsilon"
    assert f"{two:.4g}" in str(refused.value)  # the device's figure is the independent one
    assert device.refusals() == ["budget_exhausted"]
    assert device.store.outbox_states() == {"pending": 1}
    # The same round again (a retry after a crash) is not charged twice.
    assert device.join(device.spec("r1", noise_multiplier=1.0)) is not None
    assert len(device.store.privacy_history("eu")) == 1


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_more_noise_buys_more_rounds_and_a_new_period_a_fresh_budget(
    tmp_path: Path, dim: int, accountant: str
) -> None:
    policy = policy_where_all_take_part(epsilon=6.0, noise_multiplier=1.0, accountant=accountant)
    device = Device(tmp_path / "d.db", policy)
    joined = 0
    while True:
        try:
            device.join(device.spec(f"r{joined}", noise_multiplier=3.0))
        except SpecRefused:
            break
        joined += 1
    assert independent_epsilon(3.0, 1.0, joined, 1e-5, dim, accountant=accountant) <= 6.0
    assert independent_epsilon(3.0, 1.0, joined + 1, 1e-5, dim, accountant=accountant) > 6.0
    # The next budget period (the policy's, at the device's clock) starts afresh.
    period = policy.region("eu").privacy.period
    device.now = period_start_for(device.now, policy.region("eu")) + period + timedelta(hours=1)
    assert device.join(device.spec("next", noise_multiplier=3.0)) is not None


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_the_device_cap_bounds_spending_across_periods(
    tmp_path: Path, dim: int, accountant: str
) -> None:
    policy = policy_where_all_take_part(epsilon=40.0, noise_multiplier=1.0, accountant=accountant,
                                        device_cap={"epsilon": 8.0, "window": "365d"})  # fmt: skip
    device = Device(tmp_path / "d.db", policy)
    period = policy.region("eu").privacy.period
    assert (
        independent_epsilon(1.0, 1.0, 2, 1e-5, dim, accountant=accountant)
        <= 8.0
        < (independent_epsilon(1.0, 1.0, 3, 1e-5, dim, accountant=accountant))
    )
    for n in range(2):  # one round in each of two periods
        assert device.join(device.spec(f"p{n}", noise_multiplier=1.0)) is not None
        device.now += period
    with pytest.raises(SpecRefused) as refused:
        device.join(device.spec("p2", noise_multiplier=1.0))
    assert refused.value.rule == "device_cap"


def test_central_mode_charges_a_round_the_coin_left_out(tmp_path: Path) -> None:
    """The amplification by sampling rests on the secret coin: a device that could have been in
    the round is charged for it whether or not the coin picked it."""
    secret = bytes(range(32))  # the test knows it; the store never hands it out
    device = Device(tmp_path / "d.db", example_policy(), secret=secret)
    round_id = next(f"c{i}" for i in range(1000)
                    if not sample_into_round(device.spec(f"c{i}"), secret))  # fmt: skip
    assert device.join(device.spec(round_id)) is None  # not picked
    (charge,) = device.store.privacy_history("eu")
    assert charge.round_id == round_id and charge.mechanism.sampling_rate == 0.002


def test_local_mode_charges_each_upload_without_amplification(tmp_path: Path, dim: int) -> None:
    policy = policy_where_all_take_part(mode="local", epsilon=40.0, noise_multiplier=4.0)
    device = Device(tmp_path / "d.db", policy)
    assert device.join(device.spec("l1")) is not None
    (charge,) = device.store.privacy_history("eu")
    assert charge.mechanism.sampling_rate == 1.0
    assert charge.mechanism.sensitivity == pytest.approx(2 * sensitivity_factor(dim))


def test_a_spec_for_another_model_version_is_a_logged_refusal(tmp_path: Path) -> None:
    device = Device(tmp_path / "d.db", example_policy())
    with pytest.raises(SpecRefused) as refused:
        device.join(device.spec("m1", model_version=device.personalizer.version + 1))
    assert refused.value.rule == "model"
    assert device.refusals() == ["spec_outside_policy"]
