"""The device's own check of a round spec against its policy and its privacy ledger, and its
sampling coin."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import policy_where_all_take_part
from hypothesis import given
from hypothesis import strategies as st
from sync_helpers import make_spec

from sottovoce.policy import Policy, PrivacyMode, Region
from sottovoce.sync import (
    Charge,
    Mechanism,
    SpecRefused,
    UnsupportedProtocol,
    charge_for,
    check_budget,
    check_spec,
    sample_into_round,
)
from sottovoce.sync._budget import EPOCH, period_start_for
from sottovoce.sync._noise import sensitivity_factor


@pytest.fixture(scope="module")
def eu(policy: Policy) -> Region:
    return policy.region("eu")


@pytest.fixture(scope="module")
def us(policy: Policy) -> Region:
    return policy.region("us")


def _us_spec(**overrides: Any) -> Any:
    fields: dict[str, Any] = {
        "region": "us",
        "round_id": "us-r1",
        "min_cohort": 20,
        "sampling_rate": 0.001,
        "noise_multiplier": 0.8,
        "epsilon_spent": 7.0,
        "epsilon_after": 8.0,
    }
    return make_spec(**(fields | overrides))


def test_specs_within_the_policy_pass(eu: Region, us: Region) -> None:
    check_spec(make_spec(), eu)
    check_spec(_us_spec(), us)  # exactly at the US budget of 8 is still within it
    check_spec(make_spec(clipping_norm=0.5, min_cohort=100, delta=1e-7, epsilon_after=4.0), eu)


@pytest.mark.parametrize(
    ("change", "rule", "code"),
    [
        ({"region": "us"}, "region", "spec_outside_policy"),
        ({"mode": "local"}, "mode", "spec_outside_policy"),
        ({"clipping_norm": 1.0001}, "clipping_norm", "spec_outside_policy"),
        ({"min_cohort": 24}, "min_cohort", "spec_outside_policy"),
        ({"noise_multiplier": 0.0}, "noise_multiplier", "spec_outside_policy"),
        ({"delta": 2e-6}, "delta", "spec_outside_policy"),
        (
            {"deadline": make_spec().period_start + timedelta(days=30, seconds=1)},
            "period",
            "spec_outside_policy",
        ),
        ({"epsilon_after": 4.01}, "epsilon", "budget_exhausted"),
        ({"epsilon_spent": 4.5, "epsilon_after": 4.6}, "epsilon", "budget_exhausted"),
    ],
)
def test_each_rule_refuses_in_the_eu(
    eu: Region, change: dict[str, Any], rule: str, code: str
) -> None:
    with pytest.raises(SpecRefused) as error:
        check_spec(make_spec(**change), eu)
    assert error.value.rule == rule
    assert error.value.code == code
    assert "eu-2026-11-01-r7" in str(error.value)


def test_the_us_budget_is_its_own(us: Region) -> None:
    with pytest.raises(SpecRefused) as error:
        check_spec(_us_spec(epsilon_after=8.5), us)
    assert error.value.code == "budget_exhausted" and "8.5" in str(error.value)
    with pytest.raises(SpecRefused, match="20"):
        check_spec(_us_spec(min_cohort=19), us)


def test_a_local_mode_region_refuses_central_rounds(eu: Region) -> None:
    local = eu.model_copy(
        update={"privacy": eu.privacy.model_copy(update={"mode": PrivacyMode.LOCAL})}
    )
    check_spec(make_spec(mode="local"), local)
    with pytest.raises(SpecRefused, match="central"):
        check_spec(make_spec(mode="central"), local)


def test_a_spec_of_another_protocol_is_unsupported(eu: Region) -> None:
    with pytest.raises(UnsupportedProtocol):
        check_spec(make_spec(protocol=2), eu)


# -- sampling --------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.5, 0.9])
def test_sampling_rate_is_respected_over_many_rounds(rate: float) -> None:
    secret = b"\x11" * 32
    n = 20_000
    taken = sum(
        sample_into_round(make_spec(round_id=f"r{i}", sampling_rate=rate), secret) for i in range(n)
    )
    sd = (n * rate * (1 - rate)) ** 0.5
    assert abs(taken - n * rate) < 5 * sd, (taken, n * rate)


def test_sampling_rate_is_respected_over_many_devices() -> None:
    spec = make_spec(sampling_rate=0.2)
    n = 20_000
    taken = sum(sample_into_round(spec, i.to_bytes(16, "big")) for i in range(n))
    assert abs(taken - 0.2 * n) < 5 * (n * 0.2 * 0.8) ** 0.5


def test_rate_one_always_takes_part() -> None:
    assert all(
        sample_into_round(make_spec(round_id=f"r{i}", sampling_rate=1.0), b"s" * 16)
        for i in range(200)
    )


@given(
    secret=st.binary(min_size=16, max_size=32),
    round_id=st.from_regex(r"r[0-9]{1,6}", fullmatch=True),
)
def test_the_coin_is_the_same_after_a_restart(secret: bytes, round_id: str) -> None:
    spec = make_spec(round_id=round_id, sampling_rate=0.5)
    assert sample_into_round(spec, secret) == sample_into_round(spec, bytes(secret))


def test_the_coin_depends_on_the_round_and_the_secret() -> None:
    spec = make_spec(sampling_rate=0.5)
    by_round = {
        sample_into_round(make_spec(round_id=f"r{i}", sampling_rate=0.5), b"a" * 16)
        for i in range(64)
    }
    by_secret = {sample_into_round(spec, bytes([i]) * 16) for i in range(64)}
    assert by_round == {True, False} and by_secret == {True, False}


def test_short_secrets_are_refused() -> None:
    with pytest.raises(ValueError):
        sample_into_round(make_spec(), b"short")


# -- the device's own ledger (check_budget) --------------------------------------------------

DIM = 20_737  # the shipped ranker's parameter count
AT = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)  # the device's clock
PERIOD = datetime(2026, 10, 4, tzinfo=UTC)  # EPOCH + 691 x 30 days: the 30-day period holding AT


def _eu_round(**overrides: Any) -> Any:
    """An EU round exactly as the example policy's aggregator would open it at ``AT``."""
    fields: dict[str, Any] = {"round_id": "eu-r1", "noise_multiplier": 1.0,
                              "period_start": PERIOD, "deadline": AT + timedelta(hours=1),
                              "epsilon_spent": 0.0, "epsilon_after": 0.1}  # fmt: skip
    return make_spec(**(fields | overrides))


@pytest.mark.parametrize(
    ("at", "start"),
    [
        (AT, PERIOD),
        (PERIOD, PERIOD),  # a period includes its first instant ...
        (PERIOD - timedelta(microseconds=1), PERIOD - timedelta(days=30)),  # ... not its last
        (datetime(2026, 11, 3, tzinfo=UTC), datetime(2026, 11, 3, tzinfo=UTC)),
        (EPOCH + timedelta(days=29), EPOCH),
    ],
)
def test_budget_periods_are_fixed_windows_from_the_epoch(
    eu: Region, at: datetime, start: datetime
) -> None:
    assert (PERIOD - EPOCH).days == 691 * 30
    assert period_start_for(at, eu) == start


def test_period_start_is_computed_in_utc(eu: Region) -> None:
    from datetime import timezone

    tokyo = timezone(timedelta(hours=9))
    # 2026-11-03T08:00+09:00 is 2026-11-02T23:00Z: still the period that started 2026-10-04
    assert period_start_for(datetime(2026, 11, 3, 8, 0, tzinfo=tokyo), eu) == PERIOD
    assert period_start_for(datetime(2026, 11, 3, 9, 0, tzinfo=tokyo), eu) == (
        PERIOD + timedelta(days=30)
    )


def test_a_round_of_the_policys_mechanism_is_charged_as_it_runs(eu: Region) -> None:
    spec = _eu_round()
    charge = check_budget(spec, eu, history=[], dim=DIM, now=AT)
    assert charge == Charge("eu-r1", "eu", PERIOD, Mechanism(1.0, 0.002, sensitivity_factor(DIM)),
                            AT, PrivacyMode.CENTRAL)  # fmt: skip
    assert charge == charge_for(spec, dim=DIM, at=AT)
    # More noise than the policy's least is fine, and charged as what it is.
    louder = check_budget(_eu_round(noise_multiplier=2.5), eu, history=[], dim=DIM, now=AT)
    assert louder.mechanism.noise_multiplier == 2.5
    # Local mode: no amplification by sampling, and twice the sensitivity.
    local = charge_for(_eu_round(mode="local"), dim=DIM, at=AT).mechanism
    assert local == Mechanism(1.0, 1.0, 2 * sensitivity_factor(DIM))


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        ({"noise_multiplier": 0.99}, "noise_multiplier"),
        ({"noise_multiplier": 0.001}, "noise_multiplier"),
        ({"sampling_rate": 1.0, "expected_cohort": 50_000.0}, "sampling_rate"),
        ({"sampling_rate": 0.001}, "sampling_rate"),
        ({"expected_cohort": 99.0}, "expected_cohort"),
        ({"expected_cohort": 1.0}, "expected_cohort"),
        ({"period_start": AT - timedelta(hours=1)}, "period"),  # a fresh "period" every round
        ({"period_start": PERIOD + timedelta(days=1)}, "period"),
        (  # a spec of the previous period, replayed
            {"period_start": PERIOD - timedelta(days=30), "deadline": PERIOD - timedelta(hours=1)},
            "period",
        ),
    ],
)
def test_the_ledger_refuses_a_mechanism_other_than_the_policys(
    eu: Region, change: dict[str, Any], rule: str
) -> None:
    spec = _eu_round(**change)
    check_spec(spec, eu)  # within the policy's limits as far as the spec's own claims go
    with pytest.raises(SpecRefused) as error:
        check_budget(spec, eu, history=[], dim=DIM, now=AT)
    assert error.value.rule == rule
    assert error.value.code == "spec_outside_policy"
    assert "'eu-r1'" in str(error.value)


def test_the_period_is_the_devices_not_the_specs(eu: Region) -> None:
    # The spec names the period that was current when it was signed; the device's clock has
    # moved into the next one, so it refuses (the new period's rounds name the new start).
    with pytest.raises(SpecRefused) as error:
        check_budget(_eu_round(), eu, history=[], dim=DIM, now=PERIOD + timedelta(days=30))
    assert error.value.rule == "period"
    assert "2026-10-04T00:00:00+00:00" in str(error.value)
    assert "2026-11-03T00:00:00+00:00" in str(error.value)


@pytest.fixture(scope="module")
def all_in() -> Region:
    """Every device in every round (q = 1), z = 1: one round costs about 4.73 at delta 1e-5, two
    about 7.08 and three about 9.01 (RDP; tests/device/test_device_ledger.py recomputes them
    independently, by RDP and by PLD). Budget 6 a period; cap 8 over 365 days."""
    policy = policy_where_all_take_part(epsilon=6.0, noise_multiplier=1.0, accountant="rdp",
                                        device_cap={"epsilon": 8.0, "window": "365d"})  # fmt: skip
    return policy.region("eu")


def _all_in_round(region: Region, now: datetime, round_id: str, **overrides: Any) -> Any:
    return _eu_round(round_id=round_id, sampling_rate=1.0, expected_cohort=1000.0,
                     delta=1e-5, period_start=period_start_for(now, region),
                     deadline=now + timedelta(hours=1), **overrides)  # fmt: skip


def _past(region: Region, round_id: str, at: datetime) -> Charge:
    """What the device's ledger holds for a round it was charged for at ``at``."""
    return charge_for(_all_in_round(region, at, round_id), dim=DIM, at=at)


def test_the_budget_counts_the_rounds_of_this_period_only(all_in: Region) -> None:
    spec = _all_in_round(all_in, AT, "now")
    assert check_budget(spec, all_in, history=[], dim=DIM, now=AT).round_id == "now"
    earlier = _past(all_in, "earlier", AT - timedelta(days=40))  # last period: not this budget
    assert earlier.period_start == PERIOD - timedelta(days=30)
    assert check_budget(spec, all_in, history=[earlier], dim=DIM, now=AT).round_id == "now"
    same = _past(all_in, "same", PERIOD + timedelta(hours=3))
    with pytest.raises(SpecRefused) as error:
        check_budget(spec, all_in, history=[same], dim=DIM, now=AT)
    assert (error.value.rule, error.value.code) == ("epsilon", "budget_exhausted")
    # The spec's own claim (epsilon_after 0.1) is not what the device goes by.
    assert "from 4.729 to 7.079" in str(error.value) and "claims 0.1" in str(error.value)


def test_a_round_already_charged_costs_nothing_more(all_in: Region) -> None:
    spec = _all_in_round(all_in, AT, "r1")
    first = check_budget(spec, all_in, history=[], dim=DIM, now=AT)
    # Retried after a crash: the ledger holds it already, so it is not charged twice ...
    again = check_budget(spec, all_in, history=[first], dim=DIM, now=AT + timedelta(minutes=5))
    assert again == replace(first, at=AT + timedelta(minutes=5))
    # ... while another round of the period is (and two do not fit in its budget of 6).
    with pytest.raises(SpecRefused, match="budget of 6"):
        check_budget(_all_in_round(all_in, AT, "r2"), all_in, history=[first], dim=DIM, now=AT)


def test_the_device_cap_counts_every_period_in_its_window(all_in: Region) -> None:
    spec = _all_in_round(all_in, AT, "now")
    two_periods = [_past(all_in, "p1", AT - timedelta(days=100)),
                   _past(all_in, "p2", AT - timedelta(days=40))]  # fmt: skip
    with pytest.raises(SpecRefused) as error:
        check_budget(spec, all_in, history=two_periods, dim=DIM, now=AT)
    assert (error.value.rule, error.value.code) == ("device_cap", "budget_exhausted")
    assert "365 days to 9.011" in str(error.value)
    # Rounds that left the window no longer count.
    old = [_past(all_in, "o1", AT - timedelta(days=400)), two_periods[1]]
    assert check_budget(spec, all_in, history=old, dim=DIM, now=AT).round_id == "now"
