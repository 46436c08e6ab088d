"""The tamper-evident decision log: an append-only Merkle log in SQLite with signed checkpoints.

Each entry is a :class:`Decision` in RFC 8785 canonical JSON; its leaf hash is RFC 9162's
``SHA-256(0x00 || entry)``. A ``CompactRange`` (the tree's right frontier, O(log n) hashes) is
kept so appends cost O(log n) and the root is always at hand. Checkpoints ("the log had N
entries and this root") are signed as C2SP signed notes with Ed25519.

The log lives in tables of a SQLite file the caller owns, so a device appends a decision in the
same transaction as the action it decided (a store can never have done something its log does
not show). :meth:`DecisionLog.verify` re-derives everything from the entries alone and compares
with the signed checkpoints and, crucially, with a checkpoint the auditor kept: rewriting
history and re-signing with the log's own key is caught only by an earlier checkpoint held
outside the log.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime

from sottovoce._sqlite import write_transaction
from sottovoce.policy._checkpoint import (
    Checkpoint,
    CheckpointSigner,
    open_checkpoint,
    parse_verifier_key,
)
from sottovoce.policy._decision import Decision
from sottovoce.policy._errors import CheckpointError, PolicyError, ProofError
from sottovoce.policy._merkle import (
    CompactRange,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)

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


_PRUNED = ""  # the text of an entry whose retention ran out


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


@dataclass
class VerifyReport:
    """What verification found. ``ok`` only if there are no problems."""

    size: int = 0
    root: bytes = b""
    checkpoints: int = 0
    latest: Checkpoint | None = None
    kept: Checkpoint | None = None
    problems: list[str] = field(default_factory=list)
    pruned: int = 0  # oldest entries whose text retention removed (their hashes remain)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def unsigned(self) -> int:
        """Entries after the latest signed checkpoint (not yet covered by a signature)."""
        return self.size - (self.latest.size if self.latest else 0)


class DecisionLog:
    """A decision log in ``conn``'s database. Appends join the caller's transaction."""

    def __init__(self, conn: sqlite3.Connection, *, signer: CheckpointSigner | None = None) -> None:
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
            raise LogError("the signing key does not match the log's verifier key")

    @classmethod
    def create(
        cls,
        conn: sqlite3.Connection,
        *,
        origin: str,
        signer: CheckpointSigner,
        keep_key: bool = False,
    ) -> DecisionLog:
        """Create the log's tables; ``keep_key`` stores the signing key alongside (devices)."""
        conn.executescript(_SCHEMA) if not conn.in_transaction else _script(conn, _SCHEMA)
        rows = [("origin", origin), ("verifier_key", signer.verifier_key)]
        if keep_key:
            rows.append(("signing_key", signer.private_bytes().hex()))
        conn.executemany("INSERT OR IGNORE INTO decision_log_meta (key, value) VALUES (?, ?)", rows)
        return cls(conn, signer=signer)

    def with_signer(self, signer: CheckpointSigner) -> DecisionLog:
        """The same log, signing checkpoints with ``signer`` (it must match the log's key)."""
        return DecisionLog(self._conn, signer=signer)

    def transaction(self) -> AbstractContextManager[None]:
        """A write transaction for callers that own no other (e.g. the audit CLI)."""
        return write_transaction(self._conn)

    @staticmethod
    def exists(conn: sqlite3.Connection) -> bool:
        found = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'decision_log_meta'"
        ).fetchone()
        return found is not None

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
            "INSERT OR REPLACE INTO decision_log_meta (key, value) VALUES ('frontier', ?)",
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
                (_PRUNED,),
            ).fetchall()
            old = [i for i, e in batch if Decision.model_validate_json(e).at < before]
            self._conn.executemany(
                "UPDATE decision_log SET entry = ? WHERE idx = ?", [(_PRUNED, i) for i in old]
            )
            pruned += len(old)
            if len(old) < len(batch) or not batch:
                return pruned

    def pruned_total(self) -> int:
        """How many of the oldest entries retention has emptied."""
        row = self._conn.execute("SELECT count(*) FROM decision_log WHERE entry = ?", (_PRUNED,))
        return int(row.fetchone()[0])

    def checkpoint(self) -> bytes:
        """Sign and store a checkpoint of the log as it is now; returns the signed note."""
        if self._signer is None:
            raise LogError("no signing key for this log; pass a CheckpointSigner")
        tree = self._tree()
        point = Checkpoint(origin=self.origin, size=tree.size, root=tree.root())
        note = self._signer.sign(point)
        self._conn.execute(
            "INSERT OR REPLACE INTO decision_log_checkpoints (size, root, note) VALUES (?, ?, ?)",
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
        """Decisions matching every filter given, in log order."""
        where, args = [], []
        for key, value in (("region", region), ("action", action), ("outcome", outcome),
                           ("reason", reason)):  # fmt: skip
            if value is not None:
                where.append(f"json_extract(entry, '$.{key}') = ?")
                args.append(value)
        sql = "SELECT idx, entry FROM decision_log"
        if where:
            sql += " WHERE " + " AND ".join(where)
        for index, entry in self._conn.execute(sql + " ORDER BY idx", args):
            if entry == _PRUNED:
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
    def verify(self, *, verifier_key: str | None = None, kept: bytes | None = None) -> VerifyReport:
        """Check the whole log from its entries alone. See the module docstring.

        ``verifier_key`` pins the key checkpoints must be signed with (default: the one the log
        records, which an insider could replace; an auditor should pass the published key).
        ``kept`` is a signed checkpoint the auditor saved earlier.
        """
        vkey = verifier_key or self.verifier_key
        report = VerifyReport()
        kept_point = None
        if kept is not None:
            kept_point = self._open(kept, vkey, "the kept checkpoint", report.problems)
        rows = self._conn.execute("SELECT size FROM decision_log_checkpoints")
        sizes = {int(r[0]) for r in rows}
        if kept_point is not None:
            sizes.add(kept_point.size)
        roots = self._replay(report, sizes)
        try:
            stored = self._tree()
            if (stored.size, stored.root()) != (report.size, report.root):
                report.problems.append("the stored tree state does not match the entries")
        except (ValueError, TypeError):
            report.problems.append("the stored tree state is unreadable")
        self._check_checkpoints(report, vkey, roots)
        if kept_point is not None:
            report.kept = kept_point
            report.problems.extend(self._check_kept(kept_point, report, roots))
        return report

    def _replay(self, report: VerifyReport, sizes: set[int]) -> dict[int, bytes]:
        """Rebuild the tree from the entries; returns its root at each size in ``sizes``."""
        problems = report.problems
        roots: dict[int, bytes] = {0: CompactRange().root()}
        tree = CompactRange()
        justified = 0  # emptied entries that logged retention purges account for
        rows = self._conn.execute("SELECT idx, entry, leaf FROM decision_log ORDER BY idx")
        for index, entry, stored_leaf in rows:
            if index != tree.size:
                problems.append(f"entry {tree.size} is missing (next stored index is {index})")
            if entry == _PRUNED:
                # Retention removed the text and kept the hash: the tree still verifies, the
                # content no longer can. Only the oldest entries may be pruned.
                leaf = bytes(stored_leaf)
                report.pruned += 1
                if report.pruned != tree.size + 1:
                    problems.append(f"entry {index} was emptied but newer than kept entries")
            else:
                data = str(entry).encode()
                leaf = leaf_hash(data)
                if leaf != bytes(stored_leaf):
                    problems.append(f"entry {index} does not match its stored leaf hash")
                problems.extend(_entry_problems(index, data))
                justified = max(justified, _pruned_claim(data))
            if len(leaf) != len(leaf_hash(b"")):
                problems.append(f"entry {index} has a malformed stored hash")
                leaf = leaf_hash(b"")
            tree.append(leaf)
            if tree.size in sizes:
                roots[tree.size] = tree.root()
        report.size, report.root = tree.size, tree.root()
        if report.pruned > justified:
            problems.append(f"{report.pruned} entries are emptied but logged retention purges "
                            f"account for {justified}")  # fmt: skip
        return roots

    def _check_checkpoints(self, report: VerifyReport, vkey: str, roots: dict[int, bytes]) -> None:
        problems = report.problems
        for size, note in self._conn.execute(
            "SELECT size, note FROM decision_log_checkpoints ORDER BY size"
        ):
            point = self._open(str(note).encode(), vkey, f"checkpoint at size {size}", problems)
            if point is None:
                continue
            report.checkpoints += 1
            if point.size != size:
                problems.append(f"checkpoint stored at size {size} says size {point.size}")
            elif point.size > report.size:
                problems.append(f"a signed checkpoint covers {point.size} entries; "
                                f"only {report.size} remain (entries were removed)")  # fmt: skip
            elif roots.get(point.size) != point.root:
                problems.append(f"entries 0..{point.size - 1} no longer match the signed "
                                f"checkpoint at size {point.size} (altered, inserted, removed "
                                "or reordered)")  # fmt: skip
            else:
                report.latest = point

    def _check_kept(
        self, kept: Checkpoint, report: VerifyReport, roots: dict[int, bytes]
    ) -> list[str]:
        if kept.origin != self.origin:
            return [f"the kept checkpoint is for log {kept.origin!r}, not {self.origin!r}"]
        if kept.size > report.size:
            return [f"the log has {report.size} entries but the kept checkpoint shows "
                    f"{kept.size}: it was truncated"]  # fmt: skip
        # Prove the current tree extends the kept one, as an auditor without the entries would.
        try:
            proof = self.consistency(kept.size, report.size)
            verify_consistency(kept.size, report.size, kept.root, report.root, proof)
        except (ProofError, LogError) as error:
            return [f"the log is not an extension of the kept checkpoint at size {kept.size}: "
                    f"history was rewritten ({error})"]  # fmt: skip
        if roots.get(kept.size) != kept.root:
            return [f"entries 0..{kept.size - 1} differ from the kept checkpoint"]
        return []

    def _open(self, note: bytes, vkey: str, what: str, problems: list[str]) -> Checkpoint | None:
        try:
            return open_checkpoint(note, vkey, origin=self.origin)
        except CheckpointError as error:
            problems.append(f"{what} does not verify: {error}")
            return None


def _entry_problems(index: int, data: bytes) -> list[str]:
    try:
        decision = Decision.model_validate_json(data)
    except ValueError:
        return [f"entry {index} is not a valid decision"]
    if decision.canonical() != data:
        return [f"entry {index} is not in canonical form"]
    return []


def _pruned_claim(data: bytes) -> int:
    """The prune count a retention-purge entry vouches for (0 for other entries)."""
    try:
        decision = Decision.model_validate_json(data)
    except ValueError:
        return 0
    if decision.action != "purge_retention":
        return 0
    claim = decision.metrics.get("log_pruned_total", 0)
    return claim if isinstance(claim, int) and not isinstance(claim, bool) else 0


def _dump(tree: CompactRange) -> str:
    return json.dumps([tree.size, [h.hex() for h in tree.frontier]])


def _restore(text: str) -> CompactRange:
    size, frontier = json.loads(text)
    return CompactRange.restore(int(size), [bytes.fromhex(h) for h in frontier])


def _script(conn: sqlite3.Connection, script: str) -> None:
    """Run DDL statements inside the caller's open transaction (executescript would commit)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)
