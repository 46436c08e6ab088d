"""``sottovoce audit`` and ``sottovoce policy diff`` run as real processes on a real store."""

from __future__ import annotations

import base64
import csv
import io
import json
import sqlite3
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import NOW, T0, Events

from sottovoce.device import EventStore
from sottovoce.policy import (
    AgeRestricted,
    CheckpointSigner,
    Policy,
    Purpose,
    example_policy_path,
    open_checkpoint,
    verify_inclusion,
)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sottovoce", *args], capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip


@pytest.fixture
def store_path(tmp_path: Path, policy: Policy) -> Path:
    """An EU device store with a refusal, consent, events, an export, a purge (checkpoint)."""
    path = tmp_path / "eu.db"
    store = EventStore.open(path, policy=policy, region="eu", clock=lambda: NOW)
    events = Events("ann")
    with pytest.raises(AgeRestricted):
        store.append(events("like"))
    store.set_age("ann", 30)
    store.grant("ann", Purpose.PERSONALIZATION)
    store.append_many([events("play_end"), events("skip")])
    store.export_user("ann")
    store.purge_expired(now=T0 + timedelta(days=1))
    store.append(events("like"))
    store.close()
    return path


def test_verify_ok_then_tampered(store_path: Path, tmp_path: Path) -> None:
    result = run("audit", "verify", str(store_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verified" in result.stdout and "7 entries" in result.stdout
    assert "0 entries after it are not yet signed" in result.stdout
    kept = tmp_path / "kept.note"
    signed = run("audit", "checkpoint", str(store_path), "-o", str(kept))
    assert signed.returncode == 0 and kept.read_bytes().startswith(b"sottovoce.device/")
    conn = sqlite3.connect(store_path)
    conn.execute("UPDATE decision_log SET entry = replace(entry, 'deny', 'allo') WHERE idx = 1")
    conn.commit()
    conn.close()
    bad = run("audit", "verify", str(store_path), "--checkpoint", str(kept))
    assert bad.returncode == 1 and "NOT verified" in bad.stdout
    assert "entry 1 does not match its stored leaf hash" in bad.stdout


def test_verify_with_a_pinned_key(store_path: Path) -> None:
    conn = sqlite3.connect(store_path)
    vkey = conn.execute("SELECT value FROM decision_log_meta WHERE key = 'verifier_key'")
    published = vkey.fetchone()[0]
    conn.close()
    assert run("audit", "verify", str(store_path), "--key", published).returncode == 0
    other = (
        published.split("+")[0] + "+00000000+" + base64.b64encode(b"\x01" + b"\x07" * 32).decode()
    )
    assert run("audit", "verify", str(store_path), "--key", other).returncode == 2  # malformed
    another = CheckpointSigner.generate(published.split("+")[0]).verifier_key
    assert run("audit", "verify", str(store_path), "--key", another).returncode == 1


def test_query_formats(store_path: Path) -> None:
    table = run("audit", "query", str(store_path), "--outcome", "deny")
    assert (
        table.returncode == 0 and "age_restricted" in table.stdout and "1 decisions" in table.stdout
    )
    lines = run("audit", "query", str(store_path), "--format", "jsonl").stdout.splitlines()
    actions = [json.loads(line)["action"] for line in lines]
    assert actions == ["apply_policy", "store_events", "record_consent", "record_consent",
                       "store_events", "export", "purge_retention"]  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(run("audit", "query", str(store_path), "-f", "csv",
                                               "--action", "store_events").stdout)))  # fmt: skip
    assert [r["outcome"] for r in rows] == ["deny", "allow"]
    late = run("audit", "query", str(store_path), "--since", "2100-01-01", "-f", "jsonl")
    assert late.stdout.strip() == ""


def test_prove_against_a_kept_checkpoint(store_path: Path, tmp_path: Path) -> None:
    kept = tmp_path / "kept.note"
    run("audit", "checkpoint", str(store_path), "-o", str(kept))
    result = run("audit", "prove", str(store_path), "4", "--checkpoint", str(kept))
    assert result.returncode == 0, result.stderr
    proof = json.loads(result.stdout)
    conn = sqlite3.connect(store_path)
    vkey = conn.execute("SELECT value FROM decision_log_meta WHERE key = 'verifier_key'").fetchone()
    point = open_checkpoint(kept.read_bytes(), vkey[0])
    verify_inclusion(base64.b64decode(proof["leaf_hash"]), 4, point.size,
                     [base64.b64decode(p) for p in proof["proof"]], point.root)  # fmt: skip
    assert proof["entry"]["action"] == "store_events"
    shown = run("audit", "show", str(store_path), "4")
    assert json.loads(shown.stdout)["leaf_hash"] == base64.b64decode(proof["leaf_hash"]).hex()


def test_missing_log_is_a_clear_error(tmp_path: Path) -> None:
    result = run("audit", "verify", str(tmp_path / "nope.db"))
    assert result.returncode == 2 and "[log_error]" in result.stderr
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).execute("CREATE TABLE x (y)")
    assert "holds no decision log" in run("audit", "verify", str(empty)).stderr


def test_report_is_written(store_path: Path, tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    result = run("audit", "report", str(store_path), "-o", str(target))
    assert result.returncode == 0, result.stderr
    html = target.read_text()
    assert html.startswith("<!DOCTYPE html>") or html.lower().startswith("<!doctype html>")
    assert "<svg" in html and "age_restricted" in html


def test_policy_diff(tmp_path: Path) -> None:
    new = tmp_path / "new.yaml"
    new.write_text(example_policy_path().read_text().replace("raw_events: 30d", "raw_events: 14d"))
    result = run("policy", "diff", str(example_policy_path()), str(new))
    assert result.returncode == 0, result.stderr
    assert "regions[eu].retention.raw_events: 30d -> 14d (stricter)" in result.stdout
