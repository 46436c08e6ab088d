"""Verification of a decision log: everything re-derived from the entries alone.

:meth:`DecisionLog.verify <sottovoce.policy.DecisionLog.verify>` calls :func:`verify_log`, which
reads the log's tables (never writes them), rebuilds the Merkle tree from the stored entries and
compares it with the tree state the log keeps, with every signed checkpoint it stores and with a
checkpoint the auditor kept. The :class:`VerifyReport` says what was checked as well as what
failed: a log whose entries agree with each other but which no signature vouches for is
consistent, not verified (a rewritten log is consistent too).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sottovoce._database import Connection
from sottovoce.policy._checkpoint import Checkpoint, open_checkpoint, parse_verifier_key
from sottovoce.policy._decision import Decision
from sottovoce.policy._errors import CheckpointError, ProofError
from sottovoce.policy._merkle import (
    CompactRange,
    consistency_proof,
    leaf_hash,
    verify_consistency,
)

__all__ = ["PRUNED", "VerifyReport", "verify_log"]

PRUNED = ""  # the text of an entry whose retention ran out


@dataclass
class VerifyReport:
    """What verification checked and found.

    ``ok``: no problem was found (the entries, the tree state and every signature agree).
    ``verified``: ``ok`` *and* at least one signature was checked (a stored checkpoint or a
    kept one): entries that agree with each other prove nothing until a signature vouches for
    them, so a log with no checkpoint is consistent but not verified.
    """

    size: int = 0  # entries stored (and re-hashed)
    root: bytes = b""
    checkpoints: int = 0  # stored checkpoints whose signature verified
    latest: Checkpoint | None = None
    kept: Checkpoint | None = None
    problems: list[str] = field(default_factory=list)
    pruned: int = 0  # oldest entries whose text retention removed (their hashes remain)
    expected: int = 0  # entries the log records having (its tree state, its highest index)
    stored_checkpoints: int = 0
    verifier_key: str = ""  # the key checkpoints were checked with
    key_from: str = "the key the log records"  # where that key came from, in words

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def signed(self) -> bool:
        """Whether any signature was checked (a stored checkpoint's, or the kept one's)."""
        return self.checkpoints > 0 or self.kept is not None

    @property
    def verified(self) -> bool:
        return self.ok and self.signed

    @property
    def unsigned(self) -> int:
        """Entries after the latest signed checkpoint (not yet covered by a signature)."""
        return self.size - (self.latest.size if self.latest else 0)

    def checks(self) -> list[tuple[str, str]]:
        """What was checked, one ``(what, sentence)`` per kind of evidence, for people."""
        if self.size == self.expected:
            entries = f"re-hashed all {self.size} into the tree"
        else:
            entries = f"re-hashed the {self.size} stored (the log records {self.expected})"
        key = f"{self.key_from} ({_short(self.verifier_key)})"
        if self.stored_checkpoints:
            signatures = (f"{self.checkpoints} of {self.stored_checkpoints} stored checkpoints "
                          f"verify with {key}")  # fmt: skip
        elif self.kept is None:
            signatures = (
                "no signature was checked: the log holds no signed checkpoint and no kept "
                "checkpoint was given, so nothing vouches for its entries (sign one with "
                "`sottovoce audit checkpoint`, keep it, verify against it)"
            )
        else:
            signatures = f"the log holds no signed checkpoint; your kept one verifies with {key}"
        found: list[tuple[str, str]] = [("entries", entries), ("signatures", signatures)]
        if self.kept is not None:
            extends = "the log extends it" if self.ok else "see the problems"
            found.append(("kept checkpoint", f"size {self.kept.size}, {extends}"))
        return found


def verify_log(
    conn: Connection,
    *,
    origin: str,
    recorded_key: str,
    tree_state: Callable[[], CompactRange],
    verifier_key: str | None,
    kept: bytes | None,
    key_from: str,
) -> VerifyReport:
    """Verify the log in ``conn`` named ``origin``, whose tables record ``recorded_key`` and
    whose ``tree_state`` (raising ``ValueError`` or ``TypeError`` if unreadable) is the tree it
    keeps; the other arguments are :meth:`DecisionLog.verify`'s."""
    return _Verifier(conn, origin, recorded_key, tree_state).verify(
        verifier_key=verifier_key, kept=kept, key_from=key_from
    )


@dataclass(frozen=True)
class _Verifier:
    """One verification's inputs; its methods add to the report they are given."""

    _conn: Connection
    origin: str
    verifier_key: str
    _tree: Callable[[], CompactRange]

    def verify(
        self, *, verifier_key: str | None, kept: bytes | None, key_from: str
    ) -> VerifyReport:
        # A pinned key is parsed first: an empty or malformed one raises, never falls back.
        report = VerifyReport(verifier_key=self.verifier_key)
        if verifier_key is None:
            try:
                parse_verifier_key(self.verifier_key)
            except CheckpointError as error:
                report.problems.append(f"the verifier key the log records is malformed: {error}")
        else:
            parse_verifier_key(verifier_key)
            report.verifier_key, report.key_from = verifier_key.strip(), key_from
            if report.verifier_key != self.verifier_key:
                report.problems.append(
                    "the log records another verifier key than the one you pinned "
                    f"({_short(self.verifier_key)}): its key was replaced, or it is another log"
                )
        vkey = report.verifier_key
        kept_point = None
        if kept is not None:
            kept_point = self._open(kept, vkey, "the kept checkpoint", report.problems)
        rows = self._conn.execute("SELECT size FROM decision_log_checkpoints")
        sizes = {int(r[0]) for r in rows}
        if kept_point is not None:
            sizes.add(kept_point.size)
        roots, stored_end = self._replay(report, sizes)
        self._check_tree_state(report, stored_end)
        self._check_checkpoints(report, vkey, roots)
        if kept_point is not None:
            report.kept = kept_point
            report.problems.extend(self._check_kept(kept_point, report, roots))
        return report

    def _replay(self, report: VerifyReport, sizes: set[int]) -> tuple[dict[int, bytes], int]:
        """Rebuild the tree from the stored entries; returns its root at each size in ``sizes``
        and the index after the last stored entry."""
        problems = report.problems
        roots: dict[int, bytes] = {0: CompactRange().root()}
        tree = CompactRange()
        justified = 0  # emptied entries that logged retention purges account for
        following = 0  # the index the next stored entry should have
        kept_text = False  # whether an entry with its text came before
        rows = self._conn.execute("SELECT idx, entry, leaf FROM decision_log ORDER BY idx")
        for index, entry, stored_leaf in rows:
            if index < following:
                problems.append(f"entry {index} has an impossible index")
            elif index > following:
                problems.append(_missing(following, index - 1))
            following = max(following, index + 1)
            if entry == PRUNED:
                # Retention removed the text and kept the hash: the tree still verifies, the
                # content no longer can. Only the oldest entries may be pruned.
                leaf = bytes(stored_leaf)
                report.pruned += 1
                if kept_text:
                    problems.append(f"entry {index} was emptied but newer than kept entries")
            else:
                kept_text = True
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
        return roots, following

    def _check_tree_state(self, report: VerifyReport, stored_end: int) -> None:
        """Compare the stored tree state (updated on every append) with the entries."""
        try:
            state = self._tree()
        except (ValueError, TypeError):
            report.problems.append("the stored tree state is unreadable")
            report.expected = stored_end
            return
        report.expected = max(stored_end, state.size)
        if state.size > stored_end:
            cut = _missing(stored_end, state.size - 1)
            report.problems.append(
                f"{cut}: the log's tree state records {state.size} entries, its end was cut off"
            )
        elif state.size < stored_end:
            report.problems.append(
                f"entries {state.size}..{stored_end - 1} are stored beyond the log's tree state: "
                "they were added outside the log"
            )
        elif report.size == state.size and state.root() != report.root:
            report.problems.append("the stored tree state does not match the entries")

    def _check_checkpoints(self, report: VerifyReport, vkey: str, roots: dict[int, bytes]) -> None:
        problems = report.problems
        for size, note in self._conn.execute(
            "SELECT size, note FROM decision_log_checkpoints ORDER BY size"
        ):
            report.stored_checkpoints += 1
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
        leaves = [bytes(r[0]) for r in self._conn.execute(
            "SELECT leaf FROM decision_log ORDER BY idx LIMIT ?", (report.size,))]  # fmt: skip
        try:
            proof = consistency_proof(leaves, kept.size)
            verify_consistency(kept.size, report.size, kept.root, report.root, proof)
        except (ProofError, ValueError) as error:
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


def _missing(first: int, last: int) -> str:
    if first == last:
        return f"entry {first} is missing"
    return f"entries {first}..{last} are missing"


def _short(vkey: str) -> str:
    """A verifier key's name and key ID, which identify it in a sentence."""
    return "+".join(vkey.split("+")[:2])


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
