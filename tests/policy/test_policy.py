from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from sottovoce.policy import (
    ConsentMode,
    DataClass,
    DeviceCap,
    InvalidPolicy,
    Policy,
    PrivacyMode,
    Purpose,
    UnknownRegion,
    example_policy,
    example_policy_path,
    load_policy,
    parse_policy,
    policy_from_data,
)


def _data() -> dict[str, Any]:
    """The example policy as plain JSON data, to break one rule at a time."""
    return example_policy().model_dump(mode="json")


def _rules(data: dict[str, Any]) -> set[tuple[str, str]]:
    with pytest.raises(InvalidPolicy) as caught:
        policy_from_data(data)
    return {(p.field, p.rule) for p in caught.value.problems}


def test_example_has_two_regions_that_differ(policy: Policy) -> None:
    eu, us = policy.region("eu"), policy.region("us")
    assert eu.consent[Purpose.PERSONALIZATION] is ConsentMode.OPT_IN
    assert us.consent[Purpose.PERSONALIZATION] is ConsentMode.OPT_OUT
    assert eu.ttl(DataClass.RAW_EVENTS) < us.ttl(DataClass.RAW_EVENTS)
    assert eu.age.minimum_age > us.age.minimum_age
    assert eu.privacy.mode is PrivacyMode.CENTRAL
    assert policy.region_for("de") is eu and policy.region_for("NO") is eu
    assert policy.region_for("US") is us


def test_models_are_frozen(policy: Policy) -> None:
    with pytest.raises(Exception, match="frozen"):
        policy.region("eu").privacy.epsilon = 100.0  # type: ignore[misc]


def test_hash_is_of_canonical_form_not_of_text(policy: Policy, tmp_path: Path) -> None:
    as_json = tmp_path / "policy.json"
    # same document: JSON instead of YAML, other key order, other duration spelling
    data = _data()
    data["regions"][0]["retention"]["raw_events"] = "P30D"
    as_json.write_text(json.dumps(dict(reversed(list(data.items()))), indent=4))
    assert load_policy(as_json).hash == policy.hash
    data["regions"][0]["retention"]["raw_events"] = "31d"
    assert policy_from_data(data).hash != policy.hash
    assert len(policy.hash) == 64


def test_norway_is_a_country_not_false() -> None:
    text = example_policy_path().read_text()
    assert " NO]" in text.replace("\n", " ") or "NO]" in text
    assert "NO" in parse_policy(text).region("eu").jurisdictions


@pytest.mark.parametrize(
    ("change", "field", "rule"),
    [
        (
            lambda d: d["regions"][0]["privacy"].update(epsilon=0),
            "regions[0].privacy.epsilon",
            "greater_than",
        ),
        (
            lambda d: d["regions"][0]["privacy"].update(mode="distributed"),
            "regions[0].privacy.mode",
            "enum",
        ),
        (
            lambda d: d["regions"][1]["consent"].update(analytics="maybe"),
            "regions[1].consent.analytics",
            "enum",
        ),
        (lambda d: d["regions"][0]["consent"].pop("analytics"), "regions[0]", "all_purposes"),
        (lambda d: d["regions"][0]["retention"].pop("outbox"), "regions[0]", "all_data_classes"),
        (
            lambda d: d["regions"][0]["retention"].update(outbox="0d"),
            "regions[0].retention.outbox",
            "positive_duration",
        ),
        (
            lambda d: d["regions"][0]["retention"].update(outbox="soon"),
            "regions[0].retention.outbox",
            "time_delta_parsing",
        ),
        (lambda d: d["regions"][1].update(id="eu"), "(document)", "unique_region_ids"),
        (
            lambda d: d["regions"][1]["jurisdictions"].append("DE"),
            "(document)",
            "disjoint_jurisdictions",
        ),
        (
            lambda d: d["regions"][1]["jurisdictions"].append("usa"),
            "regions[1].jurisdictions[1]",
            "iso3166_alpha2",
        ),
        (
            lambda d: d["regions"][0]["aggregator"]["public_keys"][0].update(key="AAAA"),
            "regions[0].aggregator.public_keys[0].key",
            "key_length",
        ),
        (
            lambda d: d["regions"][0]["aggregator"]["public_keys"][1].update(use="hpke"),
            "regions[0].aggregator",
            "key_uses",
        ),
        (
            lambda d: d["regions"][0]["privacy"].update(delta=0.1),
            "regions[0].privacy",
            "delta_below_population",
        ),
        (  # EU: at most 0.1 / 50,000 = 2e-6
            lambda d: d["regions"][0]["privacy"].update(delta=2.1e-6),
            "regions[0].privacy",
            "delta_below_population",
        ),
        (  # a smaller population with the same delta is fine; a larger one is not
            lambda d: d["regions"][1]["privacy"].update(population=200_000),
            "regions[1].privacy",
            "delta_below_population",
        ),
        (  # EU: 0.0004 x 50,000 = 20 devices a round, below its minimum cohort of 25
            lambda d: d["regions"][0]["privacy"].update(sampling_rate=0.0004),
            "regions[0].privacy",
            "expected_cohort",
        ),
        (  # US: 0.001 x 19,000 = 19, below 20 (delta 1e-6 is within 0.1 / 19,000)
            lambda d: d["regions"][1]["privacy"].update(population=19_000),
            "regions[1].privacy",
            "expected_cohort",
        ),
        (
            lambda d: d["regions"][0]["privacy"].pop("population"),
            "regions[0].privacy.population",
            "missing",
        ),
        (
            lambda d: d["regions"][0]["privacy"].update(population=1),
            "regions[0].privacy.population",
            "greater_than_equal",
        ),
        (
            lambda d: d["regions"][0]["privacy"].pop("sampling_rate"),
            "regions[0].privacy.sampling_rate",
            "missing",
        ),
        (
            lambda d: d["regions"][0]["privacy"].update(sampling_rate=0),
            "regions[0].privacy.sampling_rate",
            "greater_than",
        ),
        (
            lambda d: d["regions"][1]["privacy"].update(sampling_rate=1.01),
            "regions[1].privacy.sampling_rate",
            "less_than_equal",
        ),
        (
            lambda d: d["regions"][0]["privacy"].pop("noise_multiplier"),
            "regions[0].privacy.noise_multiplier",
            "missing",
        ),
        (
            lambda d: d["regions"][0]["privacy"].update(noise_multiplier=0),
            "regions[0].privacy.noise_multiplier",
            "greater_than",
        ),
        (
            lambda d: d["regions"][0]["privacy"]["device_cap"].update(epsilon=0),
            "regions[0].privacy.device_cap.epsilon",
            "greater_than",
        ),
        (
            lambda d: d["regions"][0]["privacy"]["device_cap"].update(window="0d"),
            "regions[0].privacy.device_cap.window",
            "positive_duration",
        ),
        (
            lambda d: d["regions"][0]["privacy"]["device_cap"].update(window="a year"),
            "regions[0].privacy.device_cap.window",
            "time_delta_parsing",
        ),
        (
            lambda d: d["regions"][0]["privacy"]["device_cap"].pop("window"),
            "regions[0].privacy.device_cap.window",
            "missing",
        ),
        (
            lambda d: d["regions"][0]["privacy"]["device_cap"].update(periods=12),
            "regions[0].privacy.device_cap.periods",
            "extra_forbidden",
        ),
        (
            lambda d: d["regions"][0]["privacy"].update(min_cohort=1),
            "regions[0].privacy.min_cohort",
            "greater_than_equal",
        ),
        (
            lambda d: d["regions"][0]["age"].update(minimum_age=40),
            "regions[0].age.minimum_age",
            "less_than_equal",
        ),
        (lambda d: d["regions"][0].update(colour="blue"), "regions[0].colour", "extra_forbidden"),
        (
            lambda d: d["regions"][0]["aggregator"].update(endpoint="https://eu.example.org/v1/"),
            "regions[0].aggregator.endpoint",
            "endpoint_root",
        ),
        (lambda d: d.update(schema_version=2), "schema_version", "literal_error"),
        (lambda d: d.update(regions=[]), "regions", "too_short"),
    ],
)
def test_invalid_policy_names_field_and_rule(change: Any, field: str, rule: str) -> None:
    data = _data()
    change(data)
    assert (field, rule) in _rules(data)


def test_example_fixes_each_regions_mechanism(policy: Policy) -> None:
    eu, us = policy.region("eu").privacy, policy.region("us").privacy
    assert (eu.population, eu.sampling_rate, eu.noise_multiplier) == (50_000, 0.002, 1.0)
    assert (us.population, us.sampling_rate, us.noise_multiplier) == (100_000, 0.001, 0.8)
    assert eu.expected_cohort == pytest.approx(100.0) and us.expected_cohort == pytest.approx(100.0)
    assert eu.delta == us.delta == 1e-6
    assert eu.device_cap == DeviceCap(epsilon=16.0, window=timedelta(days=365))
    assert us.device_cap is None  # the cap is optional


def test_the_mechanism_rules_hold_at_their_bounds() -> None:
    data = _data()
    eu, us = data["regions"][0]["privacy"], data["regions"][1]["privacy"]
    eu.update(delta=0.1 / 50_000)  # exactly 0.1 / population
    us.update(population=20_000)  # 0.001 x 20,000 = 20: exactly the minimum cohort
    del eu["device_cap"]
    policy = policy_from_data(data)
    assert policy.region("eu").privacy.delta == 2e-6
    assert policy.region("eu").privacy.device_cap is None
    assert policy.region("us").privacy.expected_cohort == 20.0
    us.update(min_cohort=21)
    assert _rules(data) == {("regions[1].privacy", "expected_cohort")}
    us.update(min_cohort=20)
    eu.update(delta=2e-6 * (1 + 1e-9))
    assert _rules(data) == {("regions[0].privacy", "delta_below_population")}


def test_error_message_lists_every_problem() -> None:
    data = _data()
    data["regions"][0]["privacy"]["epsilon"] = -1
    data["regions"][1]["age"]["unknown_age"] = "perhaps"
    with pytest.raises(InvalidPolicy) as caught:
        policy_from_data(data, source="p.yaml")
    text = str(caught.value)
    assert "in p.yaml (2 problems)" in text
    assert "regions[0].privacy.epsilon" in text and "regions[1].age.unknown_age" in text
    assert caught.value.code == "invalid_policy"


def test_syntax_and_io_errors_are_typed(tmp_path: Path) -> None:
    with pytest.raises(InvalidPolicy, match="yaml_syntax"):
        parse_policy("regions: [unclosed")
    with pytest.raises(InvalidPolicy, match="json_syntax"):
        parse_policy("{", format="json")
    with pytest.raises(InvalidPolicy, match="mapping"):
        parse_policy("- a list")
    with pytest.raises(InvalidPolicy, match="cannot read"):
        load_policy(tmp_path / "missing.yaml")


def test_unknown_region_is_typed(policy: Policy) -> None:
    with pytest.raises(UnknownRegion, match="known: eu, us"):
        policy.region("apac")
    with pytest.raises(UnknownRegion):
        policy.region_for("JP")


def test_nested_mappings_are_read_only_too(policy: Policy) -> None:
    region = policy.region("eu")
    with pytest.raises(TypeError):
        region.consent[Purpose.PERSONALIZATION] = ConsentMode.OPT_OUT  # type: ignore[index]
    with pytest.raises(TypeError):
        region.retention[DataClass.RAW_EVENTS] = region.retention[DataClass.AUDIT_LOG]  # type: ignore[index]
    assert policy_from_data(policy.model_dump(mode="json")).hash == policy.hash
