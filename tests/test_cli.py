"""The ``sottovoce`` command, run as a real process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import NOW, T0

from sottovoce.cli import app
from sottovoce.policy import example_policy, example_policy_path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI as a process, on the tests' calendar (``SOTTOVOCE_NOW``), not the wall clock."""
    env = {**os.environ, "SOTTOVOCE_NOW": NOW.isoformat()}
    return subprocess.run(
        [sys.executable, "-m", "sottovoce", *args],
        input=stdin, capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip


def test_policy_check_show_hash() -> None:
    checked = run("policy", "check", str(example_policy_path()))
    assert checked.returncode == 0 and example_policy().hash in checked.stdout
    assert run("policy", "hash", str(example_policy_path())).stdout.strip() == (
        example_policy().hash
    )
    shown = run("policy", "show")
    assert shown.returncode == 0
    assert "opt_in" in shown.stdout and "opt_out" in shown.stdout and "30d" in shown.stdout
    canonical = run("policy", "show", "--json").stdout.strip()
    assert json.loads(canonical)["name"] == "sottovoce-example"


def test_invalid_policy_exits_2_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    text = example_policy_path().read_text().replace("epsilon: 4.0", "epsilon: -4.0")
    bad.write_text(text)
    result = run("policy", "check", str(bad))
    assert result.returncode == 2
    assert "[invalid_policy]" in result.stderr
    assert "regions[0].privacy.epsilon" in result.stderr and "greater_than" in result.stderr


def test_device_commands_end_to_end(tmp_path: Path) -> None:
    store = str(tmp_path / "d.db")
    events = [
        {"type": "play_end", "event_id": f"e{i}", "user_id": "ann", "track_id": "t1",
         "ts": (T0 + timedelta(minutes=i)).isoformat(), "ms_played": 90_000,
         "duration_ms": 100_000}
        for i in range(3)
    ]  # fmt: skip
    lines = "\n".join(json.dumps(e) for e in events) + "\n"
    refused = run("device", "ingest", store, "-", "--region", "eu", stdin=lines)
    assert refused.returncode == 2 and "[age_restricted]" in refused.stderr
    assert run("device", "age", store, "--user", "ann", "--region", "eu", "30").returncode == 0
    granted = run("device", "consent", store, "personalization", "-u", "ann", "-r", "eu")
    assert granted.returncode == 0, granted.stderr
    ingested = run("device", "ingest", store, "-", "--region", "eu", stdin=lines + lines)
    assert ingested.returncode == 0, ingested.stderr
    assert "stored 3 new events (3 replays ignored, 0 past retention not kept)" in ingested.stdout
    exported = json.loads(run("device", "export", store, "-u", "ann", "-r", "eu").stdout)
    assert len(exported["events"]) == 3 and exported["derived"]["track_stats"][0]["plays"] == 3
    assert run("device", "purge", store, "-r", "eu").returncode == 0
    erased = run("device", "erase", store, "-u", "ann", "-r", "eu")
    assert erased.returncode == 0 and "erased" in erased.stdout
    wrong = run("device", "consent", store, "snooping", "-u", "ann", "-r", "eu")
    assert wrong.returncode == 2 and "snooping" in wrong.stderr


def test_a_bad_json_line_keeps_what_came_before(tmp_path: Path) -> None:
    store = str(tmp_path / "d.db")
    good = json.dumps({"type": "like", "event_id": "a", "user_id": "u", "track_id": "t",
                       "ts": T0.isoformat()})  # fmt: skip
    result = run("device", "ingest", store, "-", "-r", "us", "--batch", "1",
                 stdin=f"{good}\n{{oops\n")  # fmt: skip
    assert result.returncode == 2 and "line 2" in result.stderr and "stored 1" in result.stderr
    exported = json.loads(run("device", "export", store, "-u", "u", "-r", "us").stdout)
    assert [e["event_id"] for e in exported["events"]] == ["a"]


def test_bad_event_line_is_reported(tmp_path: Path) -> None:
    store = str(tmp_path / "d.db")
    bad = json.dumps({"type": "play_end", "event_id": "x", "user_id": "u", "ts": "nope"})
    result = run("device", "ingest", store, "-", "--region", "us", stdin=bad + "\n")
    assert result.returncode == 2
    assert "[invalid_event_batch]" in result.stderr and "ts:" in result.stderr


def test_demo_runs(tmp_path: Path) -> None:
    result = run("device-demo", "--workdir", str(tmp_path / "demo"), "--events", "300")
    assert result.returncode == 0, result.stderr
    assert "first event refused" in result.stdout and "[consent_missing]" in result.stdout
    assert "derived state per device" in result.stdout
    assert (tmp_path / "demo" / "alice-access-export.json").exists()


def _commands() -> list[str]:
    import typer.main

    group = typer.main.get_command(app)
    names = []
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        subs = getattr(command, "commands", None)
        names += [f"{name} {sub}" for sub in subs] if subs else [name]
    return sorted(names)


@pytest.mark.parametrize("command", _commands())
def test_every_command_is_documented(command: str) -> None:
    readme = (ROOT / "README.md").read_text()
    assert re.search(rf"sottovoce {command}\b", readme), f"README does not mention {command!r}"
    assert run(*command.split(), "--help").returncode == 0
