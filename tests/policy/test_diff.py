from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from sottovoce.policy import Policy, policy_from_data
from sottovoce.policy._diff import Change, diff_policies, format_diff

Edit = Callable[[dict[str, Any]], object]

NEW_KEY = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="  # 32 zero bytes: valid, not a real key


def _edited(policy: Policy, edit: Edit) -> Policy:
    """A copy of ``policy`` with one edit applied to its JSON form, validated again."""
    data = copy.deepcopy(policy.model_dump(mode="json"))
    edit(data)
    return policy_from_data(data)


def _region(data: dict[str, Any], region_id: str) -> dict[str, Any]:
    return next(r for r in data["regions"] if r["id"] == region_id)


def _eu(data: dict[str, Any]) -> dict[str, Any]:
    return _region(data, "eu")


def _only(changes: list[Change]) -> Change:
    assert len(changes) == 1, changes
    return changes[0]


def test_identical_policies_have_no_changes(policy: Policy) -> None:
    same = _edited(policy, lambda d: None)
    assert diff_policies(policy, same) == []
    text = format_diff([], policy, same)
    assert "no differences" in text
    assert policy.hash in text


def test_durations_compare_by_meaning_not_spelling(policy: Policy) -> None:
    respelled = _edited(policy, lambda d: _eu(d)["retention"].update(raw_events="720h"))
    assert diff_policies(policy, respelled) == []


def test_change_reads_as_path_values_and_severity(policy: Policy) -> None:
    new = _edited(policy, lambda d: _eu(d)["retention"].update(raw_events="14d"))
    change = _only(diff_policies(policy, new))
    assert change == Change("regions[eu].retention.raw_events", "30d", "14d", "changed", "stricter")
    assert str(change) == "regions[eu].retention.raw_events: 30d -> 14d (stricter)"


@pytest.mark.parametrize(
    ("edit", "path"),
    [
        (lambda d: _eu(d)["retention"].update(raw_events="2w"), "regions[eu].retention.raw_events"),
        (lambda d: _eu(d)["retention"].update(aggregator_deltas="12h"), "regions[eu].retention"),
        (lambda d: _eu(d)["privacy"].update(epsilon=2.0), "regions[eu].privacy.epsilon"),
        (lambda d: _eu(d)["privacy"].update(delta=5e-7), "regions[eu].privacy.delta"),
        (lambda d: _eu(d)["privacy"].update(clipping_norm=0.5), "regions[eu].privacy.clipping"),
        (lambda d: _eu(d)["privacy"].update(min_cohort=50), "regions[eu].privacy.min_cohort"),
        (lambda d: _eu(d)["privacy"].update(noise_multiplier=1.5), "regions[eu].privacy.noise"),
        (
            lambda d: _region(d, "us")["privacy"].update(
                device_cap={"epsilon": 9, "window": "365d"}
            ),
            "regions[us].privacy.device_cap",
        ),  # a cap where there was none
        (
            lambda d: _eu(d)["privacy"]["device_cap"].update(epsilon=12.0),
            "regions[eu].privacy.device_cap.epsilon",
        ),
        (
            lambda d: _eu(d)["privacy"]["device_cap"].update(window="730d"),
            "regions[eu].privacy.device_cap.window",
        ),
        (lambda d: _eu(d)["age"].update(minimum_age=18), "regions[eu].age.minimum_age"),
        (lambda d: _region(d, "us")["age"].update(unknown_age="deny"), "regions[us].age"),
        (lambda d: _region(d, "us")["consent"].update(analytics="opt_in"), "regions[us].consent"),
    ],
)
def test_stricter_one_way_looser_the_other(policy: Policy, edit: Edit, path: str) -> None:
    new = _edited(policy, edit)
    forward, backward = _only(diff_policies(policy, new)), _only(diff_policies(new, policy))
    assert forward.path.startswith(path)
    assert (forward.kind, forward.severity) == ("changed", "stricter")
    assert (backward.kind, backward.severity) == ("changed", "looser")
    assert (backward.before, backward.after) == (forward.after, forward.before)


def test_retention_durations_are_not_compared_as_text(policy: Policy) -> None:
    new = _edited(
        policy, lambda d: _eu(d)["retention"].update(outbox="36h", aggregator_deltas="2d")
    )
    severities = {c.path: c.severity for c in diff_policies(policy, new)}
    # "36h" > "7d" and "2d" > "1d" as text; as durations one is shorter and one longer.
    assert severities == {
        "regions[eu].retention.outbox": "stricter",
        "regions[eu].retention.aggregator_deltas": "looser",
    }


@pytest.mark.parametrize(
    ("edit", "path", "before", "after"),
    [
        (lambda d: d.update(name="renamed"), "name", "sottovoce-example", "renamed"),
        (lambda d: d.update(version="2027.1.0"), "version", "2026.12.0", "2027.1.0"),
        (lambda d: _eu(d).update(name="EEA"), "regions[eu].name", "European Economic Area", "EEA"),
        (
            lambda d: _eu(d)["aggregator"].update(endpoint="https://eu2.example.org"),
            "regions[eu].aggregator.endpoint",
            "https://eu.aggregator.example.org",
            "https://eu2.example.org",
        ),
        (
            lambda d: _eu(d)["privacy"].update(accountant="rdp"),
            "regions[eu].privacy.accountant",
            "prv",
            "rdp",
        ),
        # The period's guarantee is epsilon and delta (each with a direction above); how many
        # devices a region expects, and how often each joins a round, only shape its spending.
        (
            lambda d: _eu(d)["privacy"].update(population=40_000),
            "regions[eu].privacy.population",
            50_000,
            40_000,
        ),
        (
            lambda d: _eu(d)["privacy"].update(sampling_rate=0.004),
            "regions[eu].privacy.sampling_rate",
            0.002,
            0.004,
        ),
        (
            lambda d: _eu(d)["aggregator"]["public_keys"][0].update(key=NEW_KEY),
            "regions[eu].aggregator.public_keys[eu-hpke-2026-11].key",
            "gdiWR9Wt5o/9zvnSrp9dFlHnypkMUAgw45/9+ZGS9FI=",
            NEW_KEY,
        ),
    ],
)
def test_other_changes_are_neutral(
    policy: Policy, edit: Edit, path: str, before: object, after: object
) -> None:
    new = _edited(policy, edit)
    assert diff_policies(policy, new) == [Change(path, before, after, "changed", "neutral")]


def _canada(data: dict[str, Any]) -> None:
    region = copy.deepcopy(_region(data, "us"))
    region.update(id="ca", name="Canada", jurisdictions=["CA"])
    data["regions"].append(region)


def test_region_added_and_removed(policy: Policy) -> None:
    new = _edited(policy, _canada)
    added = _only(diff_policies(policy, new))
    assert (added.path, added.kind, added.severity, added.before) == (
        "regions[ca]",
        "added",
        "neutral",
        None,
    )
    assert isinstance(added.after, dict) and added.after["name"] == "Canada"
    assert str(added) == "regions[ca]: added (neutral)"

    removed = _only(diff_policies(new, policy))
    assert (removed.path, removed.kind, removed.severity, removed.after) == (
        "regions[ca]",
        "removed",
        "neutral",
        None,
    )


def test_jurisdictions_compare_as_sets(policy: Policy) -> None:
    def edit(data: dict[str, Any]) -> None:
        countries = _eu(data)["jurisdictions"]
        countries.remove("NO")
        countries.reverse()
        countries.insert(3, "CH")

    changes = diff_policies(policy, _edited(policy, edit))
    assert changes == [
        Change("regions[eu].jurisdictions", "NO", None, "removed", "neutral"),
        Change("regions[eu].jurisdictions", None, "CH", "added", "neutral"),
    ]
    assert str(changes[1]) == "regions[eu].jurisdictions: added CH (neutral)"


def test_key_rotation_matches_keys_by_kid(policy: Policy) -> None:
    def rotate(data: dict[str, Any]) -> None:
        keys = _eu(data)["aggregator"]["public_keys"]
        keys[0] = {"kid": "eu-hpke-2026-12", "use": "hpke", "key": NEW_KEY}

    changes = diff_policies(policy, _edited(policy, rotate))
    prefix = "regions[eu].aggregator.public_keys"
    assert [(c.path, c.kind, c.severity) for c in changes] == [
        (f"{prefix}[eu-hpke-2026-11]", "removed", "neutral"),
        (f"{prefix}[eu-hpke-2026-12]", "added", "neutral"),
    ]
    assert changes[1].after == {"kid": "eu-hpke-2026-12", "use": "hpke", "key": NEW_KEY}


def test_reordering_keys_is_a_change_because_the_first_key_is_current(policy: Policy) -> None:
    def add_and_reorder(data: dict[str, Any]) -> None:
        keys = _eu(data)["aggregator"]["public_keys"]
        keys.append({"kid": "eu-hpke-2026-12", "use": "hpke", "key": NEW_KEY})
        keys.reverse()  # the new hpke key becomes the one devices seal to

    new = _edited(policy, add_and_reorder)
    assert new.region("eu").key("hpke").kid == "eu-hpke-2026-12"
    changes = diff_policies(policy, new)
    assert changes[-1] == Change(
        "regions[eu].aggregator.public_keys",
        ["eu-hpke-2026-11", "eu-sign-2026-11"],
        ["eu-sign-2026-11", "eu-hpke-2026-11"],
        "changed",
        "neutral",
    )
    assert len(changes) == 2


def test_reordering_regions_is_no_change(policy: Policy) -> None:
    reordered = _edited(policy, lambda d: d["regions"].reverse())
    assert reordered.hash != policy.hash
    assert diff_policies(policy, reordered) == []
    assert "no differences in content" in format_diff([], policy, reordered)


def test_changes_come_in_document_order(policy: Policy) -> None:
    def edit(data: dict[str, Any]) -> None:
        data["regions"].reverse()
        data["version"] = "2027.1.0"
        _region(data, "us")["age"]["minimum_age"] = 16
        _eu(data)["privacy"]["epsilon"] = 3.0
        _canada(data)

    changes = diff_policies(policy, _edited(policy, edit))
    assert [c.path for c in changes] == [
        "version",
        "regions[eu].privacy.epsilon",
        "regions[us].age.minimum_age",
        "regions[ca]",
    ]


def test_format_diff_has_header_lines_and_tally(policy: Policy) -> None:
    def edit(data: dict[str, Any]) -> None:
        data["version"] = "2027.1.0"
        _eu(data)["retention"]["raw_events"] = "14d"
        _region(data, "us")["privacy"]["epsilon"] = 10.0

    new = _edited(policy, edit)
    lines = format_diff(diff_policies(policy, new), policy, new).splitlines()
    assert lines[0] == f"--- sottovoce-example 2026.12.0 (sha256 {policy.hash})"
    assert lines[1] == f"+++ sottovoce-example 2027.1.0 (sha256 {new.hash})"
    assert [line.strip() for line in lines[2:-1]] == [
        "version: 2026.12.0 -> 2027.1.0 (neutral)",
        "regions[eu].retention.raw_events: 30d -> 14d (stricter)",
        "regions[us].privacy.epsilon: 8.0 -> 10.0 (looser)",
    ]
    assert lines[-1] == "3 changes: 1 stricter, 1 looser, 1 neutral"
