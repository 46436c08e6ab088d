"""``sottovoce audit`` as an auditor meets it: what a verification checked, what it could not,
keys given the way operators have them, and filters that are checked rather than matched.

Each test runs the real command on a real log file (a device store, or an aggregator's
database made with the keys and policy ``sottovoce aggregator keygen`` writes).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import NOW, T0, Events, Ran, open_keygen_region, run_cli

from sottovoce.device import EventStore
from sottovoce.policy import (
    CheckpointSigner,
    DecisionEngine,
    DecisionLog,
    Policy,
    Purpose,
    example_policy,
    load_policy,
)

run = run_cli  # in this process; one test below runs a real one


def _verdict(result: Ran) -> str:
    return result.stdout.splitlines()[0] if result.stdout else ""


@pytest.fixture(scope="module")
def device_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A device store whose log holds one signed checkpoint (taken by a retention purge)."""
    path = tmp_path_factory.mktemp("device") / "eu.db"
    store = EventStore.open(path, policy=example_policy(), region="eu", clock=lambda: NOW)
    events = Events("ann")
    store.set_age("ann", 30)
    store.grant("ann", Purpose.PERSONALIZATION)
    store.append_many([events("play_end"), events("skip")])
    store.purge_expired(now=T0 + timedelta(days=1))
    store.withdraw("ann", Purpose.PERSONALIZATION)  # logged after the purge's checkpoint
    store.close()
    return path


@pytest.fixture
def store_path(device_log: Path, tmp_path: Path) -> Path:
    """A copy of ``device_log`` for this test to change."""
    return Path(shutil.copy(device_log, tmp_path / "eu.db"))


def _published_key(path: Path) -> str:
    conn = sqlite3.connect(path)
    (key,) = conn.execute(
        "SELECT value FROM decision_log_meta WHERE key = 'verifier_key'"
    ).fetchone()
    conn.close()
    return str(key)


def _rewrite_and_rekey(path: Path, policy: Policy, *, sign: bool = True) -> None:
    """What an insider holding the file does: a new history under a key of their own."""
    conn = sqlite3.connect(path, isolation_level=None)
    origin = conn.execute("SELECT value FROM decision_log_meta WHERE key = 'origin'").fetchone()[0]
    name = _published_key(path).split("+")[0]
    for table in ("decision_log", "decision_log_checkpoints", "decision_log_meta"):
        conn.execute(f"DELETE FROM {table}")
    log = DecisionLog.create(conn, origin=origin, signer=CheckpointSigner.generate(name))
    engine = DecisionEngine(policy, "eu", digest_key=b"k" * 32, clock=lambda: NOW)
    conn.execute("BEGIN")
    log.append(engine.apply_policy(previous=None, inputs={}))
    if sign:
        log.checkpoint()
    conn.execute("COMMIT")
    conn.close()


# -- finding 2: a key that pins nothing ----------------------------------------------------------


def test_an_empty_key_is_an_error_not_the_logs_own_key(store_path: Path, policy: Policy) -> None:
    _rewrite_and_rekey(store_path, policy)
    assert run("audit", "verify", str(store_path)).returncode == 0  # consistent, re-signed
    empty = subprocess.run([sys.executable, "-m", "sottovoce", "audit", "verify", str(store_path),
                            "--key", ""], capture_output=True, text=True, timeout=120,
                           check=False)  # fmt: skip
    assert empty.returncode == 2, empty.stdout
    assert "verified" not in empty.stdout
    assert "[bad_checkpoint]" in empty.stderr and "--key is empty" in empty.stderr
    blank = run("audit", "verify", str(store_path), "--key", "   ")
    assert blank.returncode == 2 and "--key is empty" in blank.stderr


@pytest.mark.parametrize(
    ("key", "says"),
    [
        ("not-a-key", "has the form <name>+<hex key ID>+<base64 key>"),
        ("sottovoce-device-x+zz+AQ==", "is not 8 hexadecimal digits"),
        ("sottovoce-device-x+00000000+AQ==", "not base64 of 0x01 and a 32-byte Ed25519 key"),
    ],
)
def test_a_malformed_key_is_an_error_before_anything_is_checked(
    store_path: Path, key: str, says: str
) -> None:
    result = run("audit", "verify", str(store_path), "--key", key)
    assert result.returncode == 2, result.stdout
    assert result.stdout == "" and says in result.stderr


def test_a_rewritten_log_fails_against_the_key_published_before(
    store_path: Path, policy: Policy
) -> None:
    published = _published_key(store_path)
    _rewrite_and_rekey(store_path, policy)
    result = run("audit", "verify", str(store_path), "--key", published)
    assert result.returncode == 1 and _verdict(result).startswith("NOT verified")
    assert "checkpoint at size 1 does not verify" in result.stdout
    assert "signatures: 0 of 1 stored checkpoints verify with the key you pinned" in result.stdout


def test_a_verification_that_checked_no_signature_says_so_and_fails(
    store_path: Path, policy: Policy
) -> None:
    _rewrite_and_rekey(store_path, policy, sign=False)
    result = run("audit", "verify", str(store_path))
    assert result.returncode == 1, result.stdout
    assert _verdict(result).startswith("NOT verified")
    assert "no signature was checked" in result.stdout
    assert "the log holds no signed checkpoint and no kept checkpoint was given" in result.stdout


# -- finding 14: say what was checked and what failed -------------------------------------------


def test_one_deleted_row_is_one_missing_entry(store_path: Path) -> None:
    conn = sqlite3.connect(store_path)
    size = conn.execute("SELECT count(*) FROM decision_log").fetchone()[0]
    conn.execute("DELETE FROM decision_log WHERE idx = 2")
    conn.commit()
    conn.close()
    result = run("audit", "verify", str(store_path))
    assert result.returncode == 1
    problems = [line for line in result.stdout.splitlines() if "problem:" in line]
    missing = [line for line in problems if "missing" in line]
    assert len(missing) == 1, result.stdout
    assert "entry 2 is missing" in missing[0]
    assert f"entries: re-hashed the {size - 1} stored (the log records {size})" in result.stdout


def test_a_block_of_deleted_rows_is_one_range(store_path: Path) -> None:
    conn = sqlite3.connect(store_path)
    conn.execute("DELETE FROM decision_log WHERE idx IN (1, 2, 3)")
    conn.commit()
    conn.close()
    result = run("audit", "verify", str(store_path))
    missing = [line for line in result.stdout.splitlines() if "missing" in line]
    assert len(missing) == 1 and "entries 1..3 are missing" in missing[0], result.stdout


def test_the_report_is_not_green_when_no_signature_was_checked(
    store_path: Path, policy: Policy, tmp_path: Path
) -> None:
    _rewrite_and_rekey(store_path, policy, sign=False)
    target = tmp_path / "report.html"
    result = run("audit", "report", str(store_path), "-o", str(target))
    assert result.returncode == 0 and result.stdout.startswith("NOT verified")
    html = target.read_text()
    assert '<p class="verdict ok">' not in html
    assert "no signature was checked" in html
    assert "Signed checkpoints verified</dt><dd" in html


def test_verify_lists_what_it_checked(store_path: Path, tmp_path: Path) -> None:
    kept = tmp_path / "kept.note"
    assert run("audit", "checkpoint", str(store_path), "-o", str(kept)).returncode == 0
    key = _published_key(store_path)
    result = run("audit", "verify", str(store_path), "--key", key, "--checkpoint", str(kept))
    assert result.returncode == 0, result.stdout + result.stderr
    assert _verdict(result).startswith("verified")
    size = DecisionLog(sqlite3.connect(store_path)).size
    assert f"entries: re-hashed all {size}" in result.stdout
    assert "signatures: 2 of 2 stored checkpoints verify with the key you pinned" in result.stdout
    assert f"kept checkpoint: size {size}, the log extends it" in result.stdout


# -- finding 14: audit query checks its filters --------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--action", "store_event"], "unknown action 'store_event'"),
        (["--outcome", "maybe"], "unknown outcome 'maybe'"),
        (["--reason", "consent_mising"], "unknown reason code 'consent_mising'"),
        (["--region", "EU west"], "is not a region id"),
        (["--until", "2026"], "--until: '2026' is not a date"),
        (["--since", "20261101"], "--since: '20261101' is not a date"),
        (["--since", "2026-12-01", "--until", "2026-11-01"], "--since 2026-12-01T00:00:00+00:00 "
         "is not before --until 2026-11-01T00:00:00+00:00"),
    ],
)  # fmt: skip
def test_query_refuses_filters_that_can_match_nothing(
    store_path: Path, args: list[str], says: str
) -> None:
    result = run("audit", "query", str(store_path), "-f", "jsonl", *args)
    assert result.returncode == 2, result.stdout
    assert result.stdout == "" and says in result.stderr


def test_query_takes_dates_and_zones_as_written(store_path: Path) -> None:
    every = run("audit", "query", str(store_path), "-f", "jsonl").stdout.splitlines()
    day = NOW.date().isoformat()
    same = run("audit", "query", str(store_path), "-f", "jsonl", "--since", day,
               "--until", (NOW + timedelta(days=1)).date().isoformat())  # fmt: skip
    assert same.returncode == 0 and same.stdout.splitlines() == every
    zoned = run("audit", "query", str(store_path), "-f", "jsonl", "--until",
                f"{day}T00:00:00+01:00")  # fmt: skip
    assert zoned.returncode == 0 and zoned.stdout == ""
    assert json.loads(every[0])["action"] == "apply_policy"


# -- finding 9: checkpoints signed with the key keygen wrote -------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``sottovoce aggregator keygen``'s keys and policy, and an aggregator's database on them."""
    home = tmp_path_factory.mktemp("region")
    made = run("aggregator", "keygen", "-r", "eu", "--out", str(home / "region"), "--profile",
               "dev")  # fmt: skip
    assert made.returncode == 0, made.stderr
    open_keygen_region(home / "aggregator-eu.db", home / "region",
                       load_policy(home / "region" / "policy.json"))  # fmt: skip
    return home


@pytest.fixture
def region(keys: Path, tmp_path: Path) -> Path:
    """The region's key directory; ``tmp_path/aggregator-eu.db`` is a fresh copy of its log."""
    shutil.copy(keys / "aggregator-eu.db", tmp_path / "aggregator-eu.db")
    return keys / "region"


def test_checkpoint_signs_with_the_pem_key_keygen_wrote(region: Path, tmp_path: Path) -> None:
    db, note = tmp_path / "aggregator-eu.db", tmp_path / "today.note"
    signed = run("audit", "checkpoint", str(db), "--key-file", str(region / "signing.pem"),
                 "-o", str(note))  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    assert note.read_text().startswith("sottovoce.aggregator/eu\n")
    checked = run("audit", "verify", str(db), "--policy", str(region / "policy.json"),
                  "--checkpoint", str(note))  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "with the key region eu's policy publishes" in checked.stdout


def test_checkpoint_says_which_key_it_needs(region: Path, tmp_path: Path) -> None:
    db = str(tmp_path / "aggregator-eu.db")
    none = run("audit", "checkpoint", db)
    assert none.returncode == 2 and "CheckpointSigner" not in none.stderr
    assert "keeps no signing key" in none.stderr and "signing.pem" in none.stderr
    hpke = run("audit", "checkpoint", db, "--key-file", str(region / "hpke.pem"))
    assert hpke.returncode == 2 and "X25519" in hpke.stderr and "not an Ed25519" in hpke.stderr
    junk = tmp_path / "junk.key"
    junk.write_text("hello\n")
    bad = run("audit", "checkpoint", db, "--key-file", str(junk))
    assert bad.returncode == 2 and "neither a PEM private key" in bad.stderr
    other = tmp_path / "other"
    assert run("aggregator", "keygen", "-r", "eu", "--out", str(other)).returncode == 0
    wrong = run("audit", "checkpoint", db, "--key-file", str(other / "signing.pem"))
    assert wrong.returncode == 2 and "is not the key this log is signed with" in wrong.stderr


def test_checkpoint_still_takes_a_hex_key(store_path: Path, tmp_path: Path) -> None:
    conn = sqlite3.connect(store_path)
    (raw,) = conn.execute(
        "SELECT value FROM decision_log_meta WHERE key = 'signing_key'"
    ).fetchone()
    conn.close()
    hexfile = tmp_path / "device.hex"
    hexfile.write_text(raw + "\n")
    assert run("audit", "checkpoint", str(store_path), "--key-file", str(hexfile)).returncode == 0


def test_verify_pins_the_key_the_policy_publishes(region: Path, tmp_path: Path) -> None:
    db = tmp_path / "aggregator-eu.db"
    signed = run("audit", "checkpoint", str(db), "--key-file", str(region / "signing.pem"))
    assert signed.returncode == 0, signed.stderr
    conn = sqlite3.connect(db)
    conn.execute("UPDATE decision_log_meta SET value = ? WHERE key = 'verifier_key'",
                 (CheckpointSigner.generate("sottovoce.aggregator/eu").verifier_key,))  # fmt: skip
    conn.commit()
    conn.close()
    result = run("audit", "verify", str(db), "--policy", str(region / "policy.json"))
    assert result.returncode == 1, result.stdout
    assert "the log records another verifier key than the one you pinned" in result.stdout
    both = run("audit", "verify", str(db), "--policy", str(region / "policy.json"), "--key", "x")
    assert both.returncode == 2 and "either --key or --policy" in both.stderr


def test_the_guides_recipe_derives_the_aggregators_key_from_the_policy(
    region: Path, tmp_path: Path
) -> None:
    """docs/compliance.md says where an aggregator's verifier key is; its recipe (standard
    library only) derives the key the log is signed with from the published policy."""
    guide = (Path(__file__).resolve().parents[1] / "docs" / "compliance.md").read_text()
    recipe = next(b for b in guide.split("```python\n")[1:] if "sottovoce.aggregator/" in b)
    script = tmp_path / "vkey.py"
    script.write_text(recipe.split("```", 1)[0])
    derived = subprocess.run(
        [sys.executable, str(script), str(region / "policy.json"), "eu"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    db = tmp_path / "aggregator-eu.db"
    assert derived.strip() == DecisionLog(sqlite3.connect(db)).verifier_key
    shown = run("audit", "verify", str(db), "--policy", str(region / "policy.json"))
    assert f"verifier key: {derived.strip()}" in shown.stdout
    assert "with the key region eu's policy publishes" in shown.stdout
    pinned = run("audit", "verify", str(db), "--key", derived.strip())
    assert pinned.returncode == 0 and "with the key you pinned" in pinned.stdout
