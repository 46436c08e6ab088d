"""Which policies governed an aggregator's decisions: every policy it opens its database with is
logged as ``apply_policy`` (with its hash, name and version, and the one it replaced), and the
audit report names them, instead of "unknown".

The region's keys and policy come from ``sottovoce aggregator keygen``; an operator's policy
change is a new policy file with the same keys; what the auditor sees comes from ``sottovoce
audit``, run through the console script's entry point.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import open_keygen_region, run_cli

from sottovoce.policy import load_policy

run = run_cli


@pytest.fixture
def region(tmp_path: Path) -> Path:
    code, _, err = run("aggregator", "keygen", "-r", "eu", "--out", str(tmp_path / "region"),
                       "--profile", "dev")  # fmt: skip
    assert code == 0, err
    return tmp_path / "region"


def _changed(region: Path) -> Path:
    """The operator's next policy: the same keys, a shorter retention, a new version."""
    data = json.loads((region / "policy.json").read_text())
    data["version"] = "2026.12.1"
    data["regions"][0]["retention"]["aggregator_deltas"] = "12h"
    path = region / "policy-2.json"
    path.write_text(json.dumps(data))
    return path


def test_every_policy_the_aggregator_opens_with_is_logged_once(
    region: Path, tmp_path: Path
) -> None:
    db = tmp_path / "aggregator-eu.db"
    first, second = load_policy(region / "policy.json"), load_policy(_changed(region))
    for policy in (first, first, second, second, first):
        open_keygen_region(db, region, policy)
    code, out, err = run("audit", "query", str(db), "--action", "apply_policy", "-f", "jsonl")
    assert code == 0, err
    applied = [json.loads(line) for line in out.splitlines()]
    assert [(a["policy_hash"], a["metrics"]["previous_policy_hash"]) for a in applied] == [
        (first.hash, "none"), (second.hash, first.hash), (first.hash, second.hash)]  # fmt: skip
    assert [a["metrics"]["policy_version"] for a in applied] == ["2026.12.0", "2026.12.1",
                                                                 "2026.12.0"]  # fmt: skip
    assert {a["metrics"]["policy_name"] for a in applied} == {first.name}
    assert applied[1]["sentence"] == (f"Policy {second.hash[:16]} now applies "
                                      f"(before: {first.hash[:16]}).")  # fmt: skip
    # Each change is covered by a signature at once, with the key the policy publishes.
    code, out, _ = run("audit", "verify", str(db), "--policy", str(region / "policy.json"))
    assert code == 0, out
    assert "0 entries after it are not yet signed" in out


def test_the_report_names_the_policies_that_governed_the_period(
    region: Path, tmp_path: Path
) -> None:
    db = tmp_path / "aggregator-eu.db"
    first, second = load_policy(region / "policy.json"), load_policy(_changed(region))
    open_keygen_region(db, region, first)
    open_keygen_region(db, region, second)
    report = tmp_path / "report.html"
    code, out, err = run("audit", "report", str(db), "-o", str(report))
    assert code == 0 and out.startswith("verified"), out + err
    html = report.read_text()
    section = html.split('<section id="policies">', 1)[1].split("</section>", 1)[0]
    assert "unknown" not in section
    assert f"{first.name} 2026.12.0" in section and f"{first.name} 2026.12.1" in section
    assert first.hash in section and second.hash in section
    # In the order they applied, each until the next one.
    assert section.index(first.hash) < section.index(second.hash)
    assert "until the next policy" in section and "the latest in this log" in section
