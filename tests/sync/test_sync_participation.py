"""The device's own check of a round spec against its policy, and its sampling coin."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sync_helpers import make_spec

from sottovoce.policy import Policy, PrivacyMode, Region
from sottovoce.sync import SpecRefused, UnsupportedProtocol, check_spec, sample_into_round


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
        ({"delta": 2e-5}, "delta", "spec_outside_policy"),
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
