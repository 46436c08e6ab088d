"""The decision log: proofs, checkpoints, and every kind of tampering an insider could try."""

from __future__ import annotations

import base64
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sottovoce.policy import (
    CheckpointSigner,
    DecisionEngine,
    DecisionLog,
    LogError,
    Policy,
    Purpose,
    leaf_hash,
    open_checkpoint,
    verify_consistency,
    verify_inclusion,
)
from sottovoce.policy import ConsentState as State


class Clock:
    """Every decision seven minutes after the last, from a fixed start (never the wall clock)."""

    def __init__(self, start: datetime = datetime(2026, 11, 1, tzinfo=UTC)) -> None:
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(minutes=7)
        return self.now


@pytest.fixture
def signer() -> CheckpointSigner:
    return CheckpointSigner.generate("test-log")


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(tmp_path / "log.db", isolation_level=None)
    yield conn
    conn.close()


def _fill(
    conn: sqlite3.Connection, signer: CheckpointSigner, policy: Policy, n: int
) -> DecisionLog:
    log = DecisionLog.create(conn, origin="example.org/test-log", signer=signer)
    engine = DecisionEngine(policy, "eu", digest_key=b"k" * 32, clock=Clock())
    for i in range(n):
        state = State(choices={Purpose.PERSONALIZATION: i % 3 != 0}, age=30)
        log.append(engine.store_events(state, inputs={"i": i}))
    return log


def test_proofs_verify_against_checkpoints(
    conn: sqlite3.Connection, signer: CheckpointSigner, policy: Policy
) -> None:
    log = _fill(conn, signer, policy, 13)
    first = open_checkpoint(log.checkpoint(), signer.verifier_key)
    _fill_more(log, policy, 8)
    second = open_checkpoint(log.checkpoint(), signer.verifier_key)
    assert (first.size, second.size) == (13, 21)
    for index in (0, 7, 12, 20):
        proof = log.prove(index)
        assert proof.leaf_hash == leaf_hash(log.entry(index)) and proof.root == second.root
        verify_inclusion(proof.leaf_hash, index, second.size, list(proof.proof), second.root)
    verify_consistency(13, 21, first.root, second.root, log.consistency(13))
    report = log.verify(kept=log_note(first, signer))
    assert report.ok, report.problems
    assert (report.size, report.checkpoints, report.unsigned) == (21, 2, 0)


def log_note(point: object, signer: CheckpointSigner) -> bytes:
    from sottovoce.policy import Checkpoint

    assert isinstance(point, Checkpoint)
    return signer.sign(point)


def _fill_more(log: DecisionLog, policy: Policy, n: int) -> None:
    engine = DecisionEngine(policy, "us", digest_key=b"k" * 32,
                            clock=Clock(datetime(2026, 11, 3, tzinfo=UTC)))  # fmt: skip
    for i in range(n):
        log.append(engine.purge(deleted={"events": i}, inputs={"n": i}))


@pytest.fixture
def sealed(
    conn: sqlite3.Connection, signer: CheckpointSigner, policy: Policy
) -> tuple[DecisionLog, bytes]:
    """A log of 20 decisions with a checkpoint the auditor kept, then 5 more, signed again."""
    log = _fill(conn, signer, policy, 20)
    kept = log.checkpoint()
    _fill_more(log, policy, 5)
    log.checkpoint()
    assert log.verify(kept=kept).ok
    return log, kept


def _problems(log: DecisionLog, kept: bytes | None = None) -> str:
    report = log.verify(kept=kept)
    assert not report.ok
    return " | ".join(report.problems)


def test_a_flipped_byte_is_detected(
    sealed: tuple[DecisionLog, bytes], conn: sqlite3.Connection
) -> None:
    log, _ = sealed
    conn.execute("UPDATE decision_log SET entry = replace(entry, 'deny', 'allo') WHERE idx = 3")
    assert "entry 3 does not match its stored leaf hash" in _problems(log)
    # fixing the stored leaf hash too does not help: the signed roots no longer match
    entry = conn.execute("SELECT entry FROM decision_log WHERE idx = 3").fetchone()[0]
    conn.execute("UPDATE decision_log SET leaf = ? WHERE idx = 3", (leaf_hash(entry.encode()),))
    assert "no longer match the signed checkpoint" in _problems(log)


def test_a_deleted_entry_is_detected(
    sealed: tuple[DecisionLog, bytes], conn: sqlite3.Connection
) -> None:
    log, _ = sealed
    conn.execute("DELETE FROM decision_log WHERE idx = 5")
    assert "entry 5 is missing" in _problems(log)


def test_an_inserted_entry_is_detected(
    sealed: tuple[DecisionLog, bytes], conn: sqlite3.Connection
) -> None:
    log, _ = sealed
    conn.execute("UPDATE decision_log SET idx = idx + 1000 WHERE idx >= 10")
    conn.execute("UPDATE decision_log SET idx = idx - 999 WHERE idx >= 1000")
    forged = conn.execute("SELECT entry, leaf FROM decision_log WHERE idx = 2").fetchone()
    conn.execute("INSERT INTO decision_log (idx, entry, leaf) VALUES (10, ?, ?)", forged)
    assert "no longer match the signed checkpoint" in _problems(log)


def test_reordered_entries_are_detected(
    sealed: tuple[DecisionLog, bytes], conn: sqlite3.Connection
) -> None:
    log, _ = sealed
    a = conn.execute("SELECT entry, leaf FROM decision_log WHERE idx = 1").fetchone()
    b = conn.execute("SELECT entry, leaf FROM decision_log WHERE idx = 2").fetchone()
    conn.execute("UPDATE decision_log SET entry = ?, leaf = ? WHERE idx = 1", b)
    conn.execute("UPDATE decision_log SET entry = ?, leaf = ? WHERE idx = 2", a)
    assert "no longer match the signed checkpoint" in _problems(log)


def test_truncation_is_detected(
    sealed: tuple[DecisionLog, bytes], conn: sqlite3.Connection
) -> None:
    log, kept = sealed
    conn.execute("DELETE FROM decision_log WHERE idx >= 22")
    assert "only 22 remain" in _problems(log)
    # an insider who also removes the checkpoints and the tree state is caught by the kept one
    conn.execute("DELETE FROM decision_log WHERE idx >= 15")
    conn.execute("DELETE FROM decision_log_checkpoints")
    _restate(conn)
    assert log.verify().ok, "without an outside checkpoint, truncation cannot be seen"
    assert "it was truncated" in _problems(log, kept)


def test_rewritten_history_under_a_fresh_checkpoint_is_caught_by_a_kept_one(
    sealed: tuple[DecisionLog, bytes], conn: sqlite3.Connection, policy: Policy
) -> None:
    log, kept = sealed
    # the insider holds the log's key: rewrites entry 4, recomputes everything, re-signs
    engine = DecisionEngine(policy, "eu", digest_key=b"k" * 32, clock=Clock())
    forged = engine.store_events(State(choices={Purpose.PERSONALIZATION: True}, age=30),
                                 inputs={"i": "forged"}).canonical()  # fmt: skip
    conn.execute("UPDATE decision_log SET entry = ?, leaf = ? WHERE idx = 4",
                 (forged.decode(), leaf_hash(forged)))  # fmt: skip
    conn.execute("DELETE FROM decision_log_checkpoints")
    _restate(conn)
    log.checkpoint()
    assert log.verify().ok, "internally consistent after re-signing"
    assert "history was rewritten" in _problems(log, kept)


def test_checkpoints_must_be_signed_by_the_pinned_key(sealed: tuple[DecisionLog, bytes]) -> None:
    log, kept = sealed
    other = CheckpointSigner.generate("test-log")
    report = log.verify(verifier_key=other.verifier_key)
    replaced, *rest = report.problems
    assert "the log records another verifier key than the one you pinned" in replaced
    assert rest and all("does not verify" in p for p in rest)
    assert log.verify(verifier_key=log.verifier_key, kept=kept).ok


def test_unsigned_tail_is_reported(sealed: tuple[DecisionLog, bytes], policy: Policy) -> None:
    log, _ = sealed
    _fill_more(log, policy, 3)
    report = log.verify()
    assert report.ok and report.unsigned == 3


def test_query_and_misuse(sealed: tuple[DecisionLog, bytes]) -> None:
    log, _ = sealed
    denied = list(log.query(outcome="deny"))
    assert [i for i, _ in denied] == [0, 3, 6, 9, 12, 15, 18]
    assert all(d.reason == "consent_missing" for _, d in denied)
    assert len(list(log.query(region="us", action="purge_retention"))) == 5
    since = log.decision(10).at
    assert [i for i, _ in log.query(since=since, region="eu")] == list(range(10, 20))
    with pytest.raises(LogError):
        log.prove(25)
    with pytest.raises(LogError):
        log.entry(99)
    nosigner = DecisionLog(log._conn)
    with pytest.raises(LogError, match="no signing key"):
        nosigner.checkpoint()


def test_proof_bytes_round_trip_through_base64(sealed: tuple[DecisionLog, bytes]) -> None:
    log, _ = sealed
    proof = log.prove(3)
    wire = [base64.b64encode(p).decode() for p in proof.proof]
    verify_inclusion(proof.leaf_hash, 3, proof.size, [base64.b64decode(p) for p in wire],
                     proof.root)  # fmt: skip


def _restate(conn: sqlite3.Connection) -> None:
    """What an insider does after editing entries: recompute the stored tree state."""
    import json

    from sottovoce.policy._merkle import CompactRange

    tree = CompactRange()
    for (leaf,) in conn.execute("SELECT leaf FROM decision_log ORDER BY idx"):
        tree.append(bytes(leaf))
    conn.execute("UPDATE decision_log_meta SET value = ? WHERE key = 'frontier'",
                 (json.dumps([tree.size, [h.hex() for h in tree.frontier]]),))  # fmt: skip


def test_retention_prunes_old_entry_text_and_the_tree_still_verifies(
    sealed: tuple[DecisionLog, bytes], conn: sqlite3.Connection, policy: Policy
) -> None:
    log, kept = sealed
    cutoff = log.decision(8).at
    assert log.prune(cutoff) == 8 and log.prune(cutoff) == 0
    assert "8 entries are emptied but logged retention purges account for 0" in _problems(log)
    engine = DecisionEngine(policy, "eu", digest_key=b"k" * 32,
                            clock=Clock(datetime(2026, 11, 4, tzinfo=UTC)))  # fmt: skip
    log.append(engine.purge(deleted={}, inputs={}, log_pruned_total=log.pruned_total()))
    report = log.verify(kept=kept)
    assert report.ok, report.problems
    assert report.pruned == 8 and report.size == 26
    assert [i for i, _ in log.query()][:1] == [8]
    # emptying a newer entry is not retention
    conn.execute("UPDATE decision_log SET entry = '' WHERE idx = 12")
    assert "emptied but newer than kept entries" in _problems(log)
    # nor is wiping the log from the start, purge decisions included
    conn.execute("UPDATE decision_log SET entry = ''")
    assert "26 entries are emptied but logged retention purges account for 0" in _problems(log)
