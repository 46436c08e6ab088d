"""The tamper-evident decision log: an append-only Merkle log in SQL tables with signed checkpoints.

Each entry is a :class:`Decision` in RFC 8785 canonical JSON; its leaf hash is RFC 9162's
``SHA-256(0x00 || entry)``. A ``CompactRange`` (the tree's right frontier, O(log n) hashes) is
kept so appends cost O(log n) and the root is always at hand. Checkpoints ("the log had N
entries and this root") are signed as C2SP signed notes with Ed25519.

The log lives in tables of a database the caller owns (a device's SQLite file; a region's SQLite
file or PostgreSQL database, see :mod:`sottovoce._database`), so a device appends a decision in the
same transaction as the action it decided (a store can never have done something its log does
not show). :meth:`DecisionLog.verify` re-derives everything from the entries alone and compares
with the signed checkpoints and, crucially, with a checkpoint the auditor kept: rewriting
history and re-signing with the log's own key is caught only by an earlier checkpoint held
outside the log.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime

from sottovoce._database import Connection, json_text, table_exists
from sottovoce._sqlite import write_transaction
from sottovoce.policy._checkpoint import (
    Checkpoint,
    CheckpointSigner,
    parse_verifier_key,
)
from sottovoce.policy._decision import REASONS, Action, Decision, Outcome
from sottovoce.policy._errors import PolicyError
from sottovoce.policy._merkle import (
    CompactRange,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_from_leaf_hashes,
    verify_inclusion,
)
from sottovoce.policy._verify import PRUNED, VerifyReport, verify_log

__all__ = ["DecisionLog", "InclusionProof", "LogError", "VerifyReport"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS decision_log (
    idx INTEGER PRIMARY KEY,
    entry TEXT NOT NULL,
    leaf BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS decision_log_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS decision_log_checkpoints (
    size INTEGER PRIMARY KEY,
    root BLOB NOT NULL,
    note TEXT NOT NULL
);
"""


class LogError(PolicyError):
    """The decision log cannot do what was asked (no signing key, index out of range...)."""

    code = "log_error"


@dataclass(frozen=True)
class InclusionProof:
    index: int
    size: int
    leaf_hash: bytes
    proof: tuple[bytes, ...]
    root: bytes

    def verify(self) -> None:
        verify_inclusion(self.leaf_hash, self.index, self.size, self.proof, self.root)


class DecisionLog:
    """A decision log in ``conn``'s database. Appends join the caller's transaction."""

    def __init__(self, conn: Connection, *, signer: CheckpointSigner | None = None) -> None:
        self._conn = conn
        meta = dict(conn.execute("SELECT key, value FROM decision_log_meta").fetchall())
        if "origin" not in meta:
            raise LogError("this database has no decision log (create it with DecisionLog.create)")
        self.origin: str = meta["origin"]
        self.verifier_key: str = meta["verifier_key"]
        self._signer = signer
        if signer is None and "signing_key" in meta:
            signer = CheckpointSigner.from_private_bytes(
                parse_verifier_key(self.verifier_key)[0], bytes.fromhex(meta["signing_key"])
            )
            self._signer = signer
        if self._signer is not None and self._signer.verifier_key != self.verifier_key:
            raise LogError(f"the signing key is not the key this log is signed with (its "
                           f"verifier key is {self.verifier_key})")  # fmt: skip

    @classmethod
    def create(
        cls,
        conn: Connection,
        *,
        origin: str,
        signer: CheckpointSigner,
        keep_key: bool = False,
    ) -> DecisionLog:
        """Create the log's tables; ``keep_key`` stores the signing key alongside (devices)."""
        with write_transaction(conn, name="decision_log_schema"):
            _script(conn, _SCHEMA)
        rows = [("origin", origin), ("verifier_key", signer.verifier_key)]
        if keep_key:
            rows.append(("signing_key", signer.private_bytes().hex()))
        conn.executemany("INSERT INTO decision_log_meta (key, value) VALUES (?, ?)"
                         " ON CONFLICT (key) DO NOTHING", rows)  # fmt: skip
        return cls(conn, signer=signer)

    @property
    def can_sign(self) -> bool:
        """Whether this log holds a signing key (a device's keeps its own; an aggregator's is
        given its region's signing key)."""
        return self._signer is not None

    def with_signer(self, signer: CheckpointSigner) -> DecisionLog:
        """The same log, signing checkpoints with ``signer`` (it must match the log's key)."""
        return DecisionLog(self._conn, signer=signer)

    def transaction(self) -> AbstractContextManager[None]:
        """A write transaction for callers that own no other (e.g. the audit CLI)."""
        return write_transaction(self._conn)

    @staticmethod
    def exists(conn: Connection) -> bool:
        return table_exists(conn, "decision_log_meta")

    # -- writing ---------------------------------------------------------------------------
    def append(self, decision: Decision) -> int:
        """Append a decision (inside the caller's transaction); returns its index."""
        # The tree state is read inside the caller's transaction every time, never cached:
        # a rolled-back transaction or another connection's append must not skew it.
        entry = decision.canonical()
        leaf = leaf_hash(entry)
        tree = self._tree()
        index = tree.size
        self._conn.execute(
            "INSERT INTO decision_log (idx, entry, leaf) VALUES (?, ?, ?)",
            (index, entry.decode(), leaf),
        )
        tree.append(leaf)
        self._conn.execute(
            "INSERT INTO decision_log_meta (key, value) VALUES ('frontier', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (_dump(tree),),
        )
        return index

    def prune(self, before: datetime) -> int:
        """Remove the text of entries decided before ``before`` (retention), keeping hashes.

        Entries are pruned oldest first and only as a prefix, so verification can tell
        retention from tampering; returns how many entries were pruned now.
        """
        pruned = 0
        while True:
            batch = self._conn.execute(
                "SELECT idx, entry FROM decision_log WHERE entry != ? ORDER BY idx LIMIT 256",
                (PRUNED,),
            ).fetchall()
            old = [i for i, e in batch if Decision.model_validate_json(e).at < before]
            self._conn.executemany(
                "UPDATE decision_log SET entry = ? WHERE idx = ?", [(PRUNED, i) for i in old]
            )
            pruned += len(old)
            if len(old) < len(batch) or not batch:
                return pruned

    def pruned_total(self) -> int:
        """How many of the oldest entries retention has emptied."""
        row = self._conn.execute("SELECT count(*) FROM decision_log WHERE entry = ?", (PRUNED,))
        return int(row.fetchone()[0])

    def checkpoint(self) -> bytes:
        """Sign and store a checkpoint of the log as it is now; returns the signed note."""
        if self._signer is None:
            raise LogError("this log keeps no signing key: give it its owner's key "
                           "(DecisionLog.with_signer)")  # fmt: skip
        tree = self._tree()
        point = Checkpoint(origin=self.origin, size=tree.size, root=tree.root())
        note = self._signer.sign(point)
        self._conn.execute(
            "INSERT INTO decision_log_checkpoints (size, root, note) VALUES (?, ?, ?)"
            " ON CONFLICT (size) DO UPDATE SET root = excluded.root, note = excluded.note",
            (point.size, point.root, note.decode()),
        )
        return note

    def _tree(self) -> CompactRange:
        row = self._conn.execute(
            "SELECT value FROM decision_log_meta WHERE key = 'frontier'"
        ).fetchone()
        return _restore(row[0]) if row else CompactRange()

    # -- reading ---------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._tree().size

    def root(self) -> bytes:
        return self._tree().root()

    def entry(self, index: int) -> bytes:
        row = self._conn.execute("SELECT entry FROM decision_log WHERE idx = ?", (index,))
        found = row.fetchone()
        if found is None:
            raise LogError(f"no entry {index}; the log has {self.size}")
        return str(found[0]).encode()

    def leaf(self, index: int) -> bytes:
        """The stored leaf hash of entry ``index`` (kept even when retention emptied it)."""
        row = self._conn.execute("SELECT leaf FROM decision_log WHERE idx = ?", (index,))
        found = row.fetchone()
        if found is None:
            raise LogError(f"no entry {index}; the log has {self.size}")
        return bytes(found[0])

    def decision(self, index: int) -> Decision:
        return Decision.model_validate_json(self.entry(index))

    def latest_checkpoint(self) -> bytes | None:
        row = self._conn.execute(
            "SELECT note FROM decision_log_checkpoints ORDER BY size DESC LIMIT 1"
        ).fetchone()
        return None if row is None else str(row[0]).encode()

    def query(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        region: str | None = None,
        action: str | None = None,
        outcome: str | None = None,
        reason: str | None = None,
    ) -> Iterator[tuple[int, Decision]]:
        """Decisions matching every filter given, in log order.

        The filters are checked first: an unknown action, outcome or reason code, a region id
        that cannot be one, a time without a zone, or ``since`` not before ``until`` raise
        ``LogError`` (a filter that can never match is a mistake, not an empty answer).
        """
        _check_filters(since=since, until=until, region=region, action=action, outcome=outcome,
                       reason=reason)  # fmt: skip
        where, args = [], []
        for key, value in (("region", region), ("action", action), ("outcome", outcome),
                           ("reason", reason)):  # fmt: skip
            if value is not None:
                where.append(f"{json_text(self._conn, 'entry', key)} = ?")
                args.append(value)
        sql = "SELECT idx, entry FROM decision_log"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return self._matching(self._conn.execute(sql + " ORDER BY idx", args), since, until)

    @staticmethod
    def _matching(
        rows: Iterable[tuple[int, str]], since: datetime | None, until: datetime | None
    ) -> Iterator[tuple[int, Decision]]:
        for index, entry in rows:
            if entry == PRUNED:
                continue
            decision = Decision.model_validate_json(entry)
            if since is not None and decision.at < since:
                continue
            if until is not None and decision.at >= until:
                continue
            yield index, decision

    def _leaves(self, size: int) -> list[bytes]:
        rows = self._conn.execute("SELECT leaf FROM decision_log WHERE idx < ? ORDER BY idx",
                                  (size,)).fetchall()  # fmt: skip
        if len(rows) != size:
            raise LogError(f"the log has {len(rows)} entries, not {size}")
        return [bytes(r[0]) for r in rows]

    def prove(self, index: int, *, size: int | None = None) -> InclusionProof:
        """An inclusion proof of entry ``index`` in the tree of ``size`` (default: now)."""
        size = self.size if size is None else size
        if not 0 <= index < size <= self.size:
            raise LogError(f"cannot prove entry {index} in a tree of {size} (log has {self.size})")
        leaves = self._leaves(size)
        return InclusionProof(index, size, leaves[index], tuple(inclusion_proof(leaves, index)),
                              root_from_leaf_hashes(leaves))  # fmt: skip

    def consistency(self, size1: int, size2: int | None = None) -> list[bytes]:
        size2 = self.size if size2 is None else size2
        if not 0 <= size1 <= size2 <= self.size:
            raise LogError(f"cannot prove {size1} -> {size2} (log has {self.size})")
        return consistency_proof(self._leaves(size2), size1)

    # -- auditing --------------------------------------------------------------------------
    def verify(
        self,
        *,
        verifier_key: str | None = None,
        kept: bytes | None = None,
        key_from: str = "the key you pinned",
    ) -> VerifyReport:
        """Check the whole log from its entries alone (see :mod:`._verify`).

        ``verifier_key`` pins the key checkpoints must be signed with (default: the one the log
        records, which an insider could replace; an auditor should pass the published key). A
        pinned key that is empty or malformed raises ``CheckpointError``: it never falls back
        to the log's own. ``key_from`` says in words where the pinned key came from. ``kept``
        is a signed checkpoint the auditor saved earlier.
        """
        return verify_log(self._conn, origin=self.origin, recorded_key=self.verifier_key,
                          tree_state=self._tree, verifier_key=verifier_key, kept=kept,
                          key_from=key_from)  # fmt: skip


_REGION_ID = re.compile(r"^[a-z][a-z0-9-]{0,31}$")  # a policy's region ids


def _check_filters(
    *,
    since: datetime | None,
    until: datetime | None,
    region: str | None,
    action: str | None,
    outcome: str | None,
    reason: str | None,
) -> None:
    """Raise ``LogError`` for a query filter that can never match a decision."""
    for name, value, known in (("action", action, {a.value for a in Action}),
                               ("outcome", outcome, {o.value for o in Outcome}),
                               ("reason code", reason, set(REASONS))):  # fmt: skip
        if value is not None and value not in known:
            raise LogError(f"unknown {name} {value!r}; known: {', '.join(sorted(known))}")
    if region is not None and not _REGION_ID.fullmatch(region):
        raise LogError(f"{region!r} is not a region id (lower-case letters, digits and '-')")
    for name, moment in (("since", since), ("until", until)):
        if moment is not None and moment.utcoffset() is None:
            raise LogError(f"the time {name} {moment.isoformat()} has no time zone")
    if since is not None and until is not None and not since < until:
        raise LogError(f"--since {since.isoformat()} is not before --until {until.isoformat()}: "
                       "no decision can match")  # fmt: skip


def _dump(tree: CompactRange) -> str:
    return json.dumps([tree.size, [h.hex() for h in tree.frontier]])


def _restore(text: str) -> CompactRange:
    size, frontier = json.loads(text)
    return CompactRange.restore(int(size), [bytes.fromhex(h) for h in frontier])


def _script(conn: Connection, script: str) -> None:
    """Run DDL statements inside the caller's open transaction (executescript would commit)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)
