"""Deciding on uploads: every sealed delta gets a logged verdict, and an accepted one is added
to its round's running sum; a device can take back a pending delta (erasure).

An idempotency key binds to the first content *accepted* under it: a replay of that content gets
its first answer, other content under the key is refused (``malformed``, with ``key_taken``). A
refused attempt binds nothing: a replay of the same refused body gets the same answer, and a
different body under the same key (a device's retry after a corrupted first attempt) is decided
on its merits.

Every method returns a :class:`~._round_state.Verdict` (a reason code, whether the delta was
added, the release it completed); the service maps verdicts to HTTP.

Every method that can refuse takes ``record``: ``False`` leaves a refusal out of the log and out
of the stored answers (the service then counts it into one logged decision per reason, see
:mod:`._refusals` and :meth:`Uploads.log_refusal_counts`); an acceptance is always logged.

A part of :class:`~sottovoce.aggregator.RegionAggregator` (see :mod:`._aggregator`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import replace

from sottovoce._errors import SottovoceError
from sottovoce._sqlite import write_transaction
from sottovoce.aggregator._round_state import (
    _IDEMPOTENCY_KEY,
    RegionContext,
    RoundTables,
    Verdict,
    _iso,
    _Refusal,
    stored_spec,
    stored_status,
)
from sottovoce.aggregator._rounds import Rounds
from sottovoce.aggregator._upload_group import (
    TAKEN_BY_KEY,
    TAKEN_BY_PSEUDONYM,
    UNDER_LOCK,
    Group,
    Pending,
    Upload,
    prior_verdict,
)
from sottovoce.policy import Action, PrivacyMode
from sottovoce.sync import (
    OpenedDelta,
    RoundSpec,
    SealedDelta,
    SyncError,
    period_label,
)

__all__ = ["Upload", "Uploads"]


class Uploads:
    """Uploads and erasures of pending deltas."""

    def __init__(self, ctx: RegionContext, tables: RoundTables, rounds: Rounds) -> None:
        self._ctx = ctx
        self._tables = tables
        self._rounds = rounds
        self._conn, self._log, self._engine = ctx.conn, ctx.log, ctx.engine
        self._clock, self._region, self._worker = ctx.clock, ctx.region, ctx.worker

    def accept(self, body: bytes, idempotency_key: str, *, record: bool = True) -> Verdict:
        """Decide on one uploaded sealed delta (one write transaction)."""
        (result,) = self.accept_many([(body, idempotency_key, record)])
        if isinstance(result, Exception):
            raise result
        return result

    def accept_many(
        self, uploads: Sequence[Upload], *, parsed: Sequence[SealedDelta | None] = ()
    ) -> list[Verdict | Exception]:
        """Decide on uploads that arrived together, in ONE durable write transaction (group
        commit: one fsync for all of them); returns each one's verdict, in order, or the
        exception its decision raised (that upload's writes are rolled back, the others'
        kept). Nothing is acknowledged before the commit: if it fails, this raises and none
        of the uploads counts.

        Each upload is ``(body, idempotency_key, record)``. Parsing, decryption and
        verification happen first, outside the transaction (on PostgreSQL other workers write
        meanwhile); everything they read is checked again under the write lock. The running
        sum this worker keeps for a round is read once and written once per group.

        ``parsed``, if given, holds each body already parsed by the caller (``None`` where it
        did not parse): each must be ``SealedDelta.from_wire`` of exactly that body, which is
        not checked again (the service's Worker passes the parse its route made of the body).
        """
        known = list(parsed) or [None] * len(uploads)
        if len(known) != len(uploads):
            raise ValueError(f"{len(known)} parsed bodies for {len(uploads)} uploads")
        pending = [self._prepare(body, key, record=record, sealed=sealed)
                   for (body, key, record), sealed in zip(uploads, known, strict=True)]  # fmt: skip
        if all(p.answer is not None for p in pending):  # replays only: nothing to write
            return [p.answer for p in pending if p.answer is not None]
        results: list[Verdict | Exception] = []
        group = Group(self._tables, self._worker)
        with write_transaction(self._conn, name="accept"):
            for item in pending:
                try:
                    with write_transaction(self._conn, name="upload"):
                        results.append(self._apply(item, group))
                except (SottovoceError, ValueError) as error:
                    if not self._conn.in_transaction:  # the database ended the whole group
                        raise
                    results.append(error)
            group.store()
        return results

    def _prepare(
        self, body: bytes, idempotency_key: str, *, record: bool, sealed: SealedDelta | None
    ) -> Pending:
        """Everything about an upload that needs no write: the stored answer to a replay, a
        refusal, or the opened delta (decrypted and verified)."""
        digest = hashlib.sha256(body).hexdigest()
        pending = Pending(idempotency_key, digest, record)
        prior = self._prior(idempotency_key, digest)
        if prior is not None:
            if prior.key_taken and record:
                return pending.refused(prior.code, key_taken=True)
            return pending.answered(prior)
        try:
            sealed, spec = self._precheck(body, idempotency_key, sealed)
            return pending.opened(sealed, spec, self._open(sealed, spec))
        except _Refusal as refusal:
            return pending.refused(refusal.code, refusal=refusal)
        except SyncError as error:
            assert sealed is not None  # _precheck turns its own SyncErrors into refusals
            failed = _Refusal(error.code, round_id=sealed.round_id, pseudonym=sealed.pseudonym)
            return pending.refused(error.code, refusal=failed)

    def _apply(self, item: Pending, group: Group) -> Verdict:
        """The writes of one prepared upload (inside the group's transaction)."""
        if item.answer is not None:
            return item.answer
        if item.key_taken:
            inputs = {"idempotency_key": item.key, "body_sha256": item.digest}
            self._log.append(self._engine.accept_delta(inputs=inputs, refusal="malformed"))
            return Verdict("malformed", key_taken=True)
        if item.refusal is not None:
            # Under the lock: another worker may have just accepted this very upload.
            prior = self._prior(item.key, item.digest)
            if prior is not None and not prior.key_taken:
                return prior
            return self._refuse(item.key, item.digest, item.refusal, record=item.record)
        assert item.sealed is not None and item.spec is not None and item.delta is not None
        sealed, spec, now = item.sealed, item.spec, self._clock()
        # Checked again under the write lock, in one statement (a round trip each is what
        # the lock is held for on PostgreSQL): a concurrent upload, worker or sweep may have won.
        stored, code, state, taken_by_pseudonym, taken_by_key = self._conn.execute(
            UNDER_LOCK,
            (item.key, item.key, spec.round_id, spec.round_id, sealed.pseudonym, spec.round_id,
             sealed.device_key),
        ).fetchone()  # fmt: skip
        prior = prior_verdict(stored, code, item.digest)
        if prior is not None:
            if prior.key_taken and item.record:
                return self._apply(replace(item, key_taken=True), group)
            return prior
        refused = None
        if state != "open" or now >= spec.deadline:
            refused = _Refusal("round_closed", round_id=spec.round_id, pseudonym=sealed.pseudonym)
        elif taken_by_pseudonym or taken_by_key:
            refused = _Refusal("duplicate_contribution", round_id=spec.round_id,
                               pseudonym=sealed.pseudonym)  # fmt: skip
        if refused is not None:
            return self._refuse(item.key, item.digest, refused, record=item.record)
        partial = group.partial(spec.round_id).add(item.delta)
        if stored is not None:  # a refused earlier attempt under this key gives way
            self._conn.execute(
                "DELETE FROM contributions WHERE idempotency_key = ? AND status != 200"
                " AND code != 'erased'",
                (item.key,),
            )
        self._conn.execute(
            "INSERT INTO contributions (idempotency_key, round_id, pseudonym, device_key,"
            " body_sha256, status, code, at, partial_key)"
            " VALUES (?, ?, ?, ?, ?, 200, 'within_policy', ?, ?)",
            (
                item.key,
                spec.round_id,
                sealed.pseudonym,
                sealed.device_key,
                item.digest,
                _iso(now),
                self._worker,
            ),
        )
        self._conn.execute(
            "UPDATE rounds SET count = count + 1 WHERE round_id = ?", (spec.round_id,)
        )
        inputs = {"idempotency_key": item.key, "body_sha256": item.digest}
        self._log.append(self._engine.accept_delta(inputs=inputs))
        # Local mode closes at its minimum cohort (each upload carries its own noise);
        # central mode never closes early: truncating the cohort would let one device
        # displace another and double the sensitivity. It closes at the deadline.
        release = None
        total = None
        if spec.mode is PrivacyMode.LOCAL:
            total = self._tables.round_sum(spec.round_id, own=partial)
        if total is not None and total.count >= spec.min_cohort:
            release = self._rounds.publish(spec, total, now)
            group.closed(spec.round_id)
        else:
            group.update(spec.round_id, partial)  # only once every write above succeeded
        return Verdict("within_policy", added=True, release=release)

    def _open(self, sealed: SealedDelta, spec: RoundSpec) -> OpenedDelta:
        """Decrypt and verify ``sealed`` for its round (raises the ``SyncError`` it fails)."""
        return self._ctx.signer.open_delta(sealed, spec, dim=self._ctx.dim)

    def _prior(self, idempotency_key: str, digest: str) -> Verdict | None:
        """The stored answer to this key and body, a refusal for other content under a key
        that was accepted (``key_taken``, logged when applied), or ``None``: decide (see the
        module docstring)."""
        row = self._conn.execute(
            "SELECT body_sha256, code FROM contributions WHERE idempotency_key = ?",
            (idempotency_key,),
        ).fetchone()
        return None if row is None else prior_verdict(row[0], row[1], digest)

    def _precheck(
        self, body: bytes, idempotency_key: str, sealed: SealedDelta | None
    ) -> tuple[SealedDelta, RoundSpec]:
        """The envelope checks before decryption (``sealed``: the body, if already parsed);
        raises ``_Refusal``."""
        if not _IDEMPOTENCY_KEY.match(idempotency_key):
            raise _Refusal("malformed")
        if sealed is None:
            try:
                sealed = SealedDelta.from_wire(body)
            except SyncError as error:
                raise _Refusal(error.code) from None
        refuse = {"round_id": sealed.round_id, "pseudonym": sealed.pseudonym}
        if sealed.idempotency_key != idempotency_key:
            raise _Refusal("malformed", **refuse)
        # Residency first: another region's device is never enrolled here, and saying so
        # would hide the real reason.
        if sealed.region != self._region.id:
            raise _Refusal("wrong_region", **refuse)
        enrolled = self._conn.execute(
            "SELECT 1 FROM enrollments WHERE device_key = ? AND period = ?",
            (sealed.device_key, sealed.period),
        ).fetchone()
        if enrolled is None:
            raise _Refusal("not_enrolled", **refuse)
        info = self._tables.round(sealed.round_id)
        if info is None or info.state != "open" or self._clock() >= info.spec.deadline:
            raise _Refusal("round_closed", **refuse)
        if sealed.period != period_label(info.spec):
            # A key enrolled for another period (an old one) does not count for this round.
            raise _Refusal("not_enrolled", **refuse)
        self._check_duplicate(sealed.round_id, sealed.pseudonym, sealed.device_key)
        return sealed, info.spec

    def _check_duplicate(self, round_id: str, pseudonym: str, device_key: str) -> None:
        by_pseudonym, by_key = self._conn.execute(
            f"SELECT {TAKEN_BY_PSEUDONYM}, {TAKEN_BY_KEY}",
            (round_id, pseudonym, round_id, device_key),
        ).fetchone()
        if by_pseudonym or by_key:
            raise _Refusal("duplicate_contribution", round_id=round_id, pseudonym=pseudonym)

    def _refuse(
        self, idempotency_key: str, digest: str, refusal: _Refusal, *, record: bool
    ) -> Verdict:
        if not record:
            return Verdict(refusal.code)
        inputs = {"idempotency_key": idempotency_key, "body_sha256": digest}
        with write_transaction(self._conn, name="refuse"):
            if _IDEMPOTENCY_KEY.match(idempotency_key):
                # Kept so a retry of the same upload gets the same answer; a later body under
                # the key replaces it (a refusal binds nothing, see the module docstring).
                # Never over an accepted row (a concurrent writer may have just stored one).
                self._conn.execute(
                    "INSERT INTO contributions (idempotency_key, round_id, pseudonym,"
                    " body_sha256, status, code, at) VALUES (?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (idempotency_key) DO UPDATE SET round_id = excluded.round_id,"
                    " pseudonym = excluded.pseudonym, body_sha256 = excluded.body_sha256,"
                    " status = excluded.status, code = excluded.code, at = excluded.at"
                    " WHERE contributions.status != 200 AND contributions.code != 'erased'",
                    (
                        idempotency_key,
                        refusal.round_id,
                        refusal.pseudonym,
                        digest,
                        stored_status(refusal.code),
                        refusal.code,
                        _iso(self._clock()),
                    ),
                )
            self._log.append(self._engine.accept_delta(inputs=inputs, refusal=refusal.code))
        return Verdict(refusal.code)

    # -- erasure -----------------------------------------------------------------------------

    def erase(self, body: bytes, *, record: bool = True) -> Verdict:
        """Take a pending delta back out of its round (``user_request``), or refuse to.

        A delta is pending while its round is open: it is in the running sum, not yet in a
        release. The device shows it is its own by presenting the sealed delta it uploaded
        (only that device and this aggregator ever had those bytes); the aggregator opens it
        again, subtracts it from the running sum and unlinks the round's records from its
        pseudonym. The upload's idempotency key then answers ``erased``, so a stray
        retry cannot put the delta back. Once the round has closed there is nothing pending:
        a published round's deltas are part of its (noised) release, an abandoned round's
        sum is gone (``nothing_pending``). Every answer is a logged ``erase`` decision.
        """
        digest = hashlib.sha256(body).hexdigest()
        try:
            sealed = SealedDelta.from_wire(body)
        except SyncError as error:
            return self._erase_refused({"body_sha256": digest}, error.code, record=record)
        inputs = {"idempotency_key": sealed.idempotency_key, "body_sha256": digest}
        if sealed.region != self._region.id:
            return self._erase_refused(inputs, "wrong_region", record=record)
        with write_transaction(self._conn, name="erase"):
            row = self._conn.execute(
                "SELECT c.round_id, r.spec, c.partial_key FROM contributions c JOIN rounds r"
                " ON r.round_id = c.round_id WHERE c.idempotency_key = ? AND c.status = 200"
                " AND c.body_sha256 = ? AND c.pseudonym = ? AND r.state = 'open'",
                (sealed.idempotency_key, digest, sealed.pseudonym),
            ).fetchone()
            if row is None:
                return self._erase_refused(inputs, "nothing_pending", record=record)
            round_id, spec_json, worker = row
            # It opened when it was accepted; the same key and spec open it again. It is taken
            # out of the running sum it went into (another worker's, maybe).
            opened = self._open(sealed, stored_spec(spec_json).spec)
            partial = self._tables.partial_of(round_id, worker).remove(opened.delta)
            self._tables.store_partial(round_id, worker, partial)
            self._conn.execute(
                "UPDATE rounds SET count = count - 1 WHERE round_id = ?", (round_id,)
            )
            unlinked = self._conn.execute(
                "UPDATE contributions SET pseudonym = NULL, device_key = NULL, status = ?,"
                " code = 'erased'"
                " WHERE round_id = ? AND pseudonym = ?",
                (stored_status("erased"), round_id, sealed.pseudonym),
            ).rowcount
            deleted = {"pending_deltas": 1, "pseudonym_records": unlinked}
            self._log.append(self._engine.erase(deleted=deleted, inputs=inputs))
        return Verdict("user_request")

    def _erase_refused(self, inputs: dict[str, str], code: str, *, record: bool) -> Verdict:
        if record:
            with write_transaction(self._conn, name="erase_refused"):
                self._log.append(self._engine.erase(deleted={}, inputs=inputs, refusal=code))
        return Verdict(code)

    def refuse(
        self, body: bytes, idempotency_key: str, code: str, *, record: bool = True
    ) -> Verdict:
        """Refuse and log an upload the HTTP layer found wrong before deciding, e.g. a body
        for another round than its path names. Not remembered under its idempotency key: the
        same body sent to the right path is still decided on its merits."""
        if record:
            inputs = {"idempotency_key": idempotency_key,
                      "body_sha256": hashlib.sha256(body).hexdigest()}  # fmt: skip
            with write_transaction(self._conn, name="refuse_request"):
                self._log.append(self._engine.accept_delta(inputs=inputs, refusal=code))
        return Verdict(code)

    def refuse_too_large(
        self, idempotency_key: str, size: int | None, *, record: bool = True
    ) -> Verdict:
        """Log the refusal of an upload the service would not read (above its body limit)."""
        if record:
            inputs = {"idempotency_key": idempotency_key, "bytes": -1 if size is None else size}
            with write_transaction(self._conn, name="refuse_too_large"):
                self._log.append(self._engine.accept_delta(inputs=inputs, refusal="too_large"))
        return Verdict("too_large")

    def log_refusal_counts(self, counts: Mapping[tuple[str, str], int]) -> int:
        """Log refusals that were answered but not logged one by one: one decision per
        (action, reason) with ``metrics["refusals"]``, the count; returns how many entries.

        Their ``inputs_digest`` binds the action, reason, count and time, nothing a device sent
        (see :mod:`._refusals` for when the service counts instead of logging)."""
        entries = [(Action(action), reason, n) for (action, reason), n in sorted(counts.items())
                   if n > 0]  # fmt: skip
        if not entries:
            return 0
        at = _iso(self._clock())
        with write_transaction(self._conn, name="refusal_counts"):
            for action, reason, n in entries:
                inputs = {"counted": action.value, "reason": reason, "refusals": n, "at": at}
                self._log.append(self._engine.decide(action, reason, inputs=inputs,
                                                     metrics={"refusals": n}))  # fmt: skip
        return len(entries)
