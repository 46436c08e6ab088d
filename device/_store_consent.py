"""The user's consent and age, as the region's policy reads them, and the decisions that rest
on them: may the store keep a user's events, may their listening personalize, may their
training go into a round. A withdrawal (or an age below the region's minimum) purges, in the
same transaction, what the purpose covered; every choice is a logged decision.
"""

from __future__ import annotations

from datetime import datetime

from sottovoce.device._errors import InvalidInput
from sottovoce.device._rows import to_ms
from sottovoce.device._schema import DATA_TABLES
from sottovoce.device._sqlite import guarded
from sottovoce.device._store_decisions import DecisionTrail
from sottovoce.device._store_file import StoreFile
from sottovoce.device._store_users import Users
from sottovoce.device._store_values import PurgeReport
from sottovoce.policy import (
    PURPOSE_DATA,
    ConsentState,
    Decision,
    Policy,
    PolicyViolation,
    Purpose,
    consent_refusal,
)
from sottovoce.sync import SpecRefused

__all__ = ["Consent"]


class Consent:
    """The ``consent``, ``objections`` and age rows, and the decisions they decide."""

    def __init__(
        self, file: StoreFile, *, users: Users, trail: DecisionTrail, policy: Policy,
        region_id: str,
    ) -> None:  # fmt: skip
        self._file, self._users, self._trail = file, users, trail
        self._policy = policy
        self._region = policy.region(region_id)
        self._verdicts: dict[str, tuple[int, Decision]] = {}  # personalization, per user hash

    def state(self, ref: int | None, user_hash: str) -> ConsentState:
        """The user's choices (objections kept through erasure first, then their history)."""
        conn = self._file.conn
        objections = conn.execute(
            "SELECT purpose FROM objections WHERE user_hash = ?", (user_hash,)
        ).fetchall()
        choices = {Purpose(p): False for (p,) in objections}
        if ref is None:
            return ConsentState(choices=choices)
        rows = conn.execute(
            "SELECT purpose, granted FROM consent WHERE user_ref = ? ORDER BY id", (ref,)
        ).fetchall()
        choices.update((Purpose(p), bool(g)) for p, g in rows)
        age = conn.execute("SELECT age FROM users WHERE user_ref = ?", (ref,)).fetchone()
        return ConsentState(choices=choices, age=None if age is None else age[0])

    @guarded("reading the user's consent")
    def of(self, user_id: str) -> ConsentState:
        return self.state(self._users.ref(user_id, create=False), self._users.hash(user_id))

    def refusal(self, user_id: str, purpose: Purpose) -> PolicyViolation | None:
        """Why the region's policy forbids ``purpose`` for this user now, or ``None``."""
        return consent_refusal(self._region, purpose, self.of(user_id))

    def set_age(self, user_id: str, age: int) -> PurgeReport:
        """Record the user's declared age; below the region's minimum, purge what
        personalization covered."""
        if isinstance(age, bool) or not isinstance(age, int) or not 0 <= age <= 150:
            raise InvalidInput(f"age must be a whole number from 0 to 150, got {age!r}")
        deleted: dict[str, int] = {}
        with self._file.write():
            ref = self._users.ref(user_id, create=True)
            self._file.conn.execute("UPDATE users SET age = ? WHERE user_ref = ?", (age, ref))
            state = self.state(ref, self._users.hash(user_id))
            if consent_refusal(self._region, Purpose.PERSONALIZATION, state) is not None:
                deleted = self.purge_purpose(ref, Purpose.PERSONALIZATION)
            decision = self._trail.engine.record_age(
                state, inputs=self._trail.inputs("record_age", ref), deleted=deleted
            )
            self._trail.record(decision, ref)
        return PurgeReport(deleted)

    def record(
        self, user_id: str, purpose: Purpose, *, granted: bool, at: datetime | None
    ) -> PurgeReport:
        """Record a grant or a withdrawal; a withdrawal purges what ``purpose`` covered."""
        purpose = Purpose(purpose)
        deleted: dict[str, int] = {}
        at_ms = to_ms(at or self._file.clock())
        user_hash = self._users.hash(user_id)
        conn = self._file.conn
        with self._file.write():
            user = self._users.ref(user_id, create=True)
            conn.execute(
                "INSERT INTO consent (user_ref, purpose, granted, ts, policy_hash, region) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (user, purpose.value, int(granted), at_ms, self._policy.hash, self._region.id),
            )
            if granted:
                conn.execute("DELETE FROM objections WHERE user_hash = ? AND purpose = ?",
                             (user_hash, purpose.value))  # fmt: skip
            else:
                conn.execute(
                    "INSERT OR REPLACE INTO objections (user_hash, purpose, ts) VALUES (?, ?, ?)",
                    (user_hash, purpose.value, at_ms),
                )
                deleted = self.purge_purpose(user, purpose)
            inputs = self._trail.inputs("record_consent", user, purpose=purpose.value)
            decision = self._trail.engine.record_consent(
                purpose, granted=granted, inputs=inputs, deleted=deleted
            )
            self._trail.record(decision, user)
        return PurgeReport(deleted)

    def purge_purpose(self, ref: int, purpose: Purpose) -> dict[str, int]:
        """Delete the user's data that ``purpose`` covered (on withdrawal or age gating)."""
        deleted: dict[str, int] = {}
        for data_class in sorted(PURPOSE_DATA[purpose]):
            for table, _ in DATA_TABLES.get(data_class, ()):
                sql = f"DELETE FROM {table} WHERE user_ref = ?"
                deleted[table] = self._file.conn.execute(sql, (ref,)).rowcount
        return deleted

    def personalization(self, user_id: str) -> Decision:
        """May the user's listening personalize what they see? Logged when the answer changes.

        Reranking asks on every call; logging every call would grow the log with each screen
        the app shows, so a decision is appended only when it differs from the last one this
        store made for the user (and the first time).
        """
        user = self._users.hash(user_id)
        cached = self._verdicts.get(user)
        if cached is not None and cached[0] == self._file.generation():
            return cached[1]  # nothing was written since: the answer cannot have changed
        ref = self._users.ref(user_id, create=False)
        trail = self._trail
        decision = trail.engine.personalize(
            self.state(ref, user), inputs=trail.inputs("personalize", ref)
        )
        key, seen = ("personalize", user), (decision.reason, decision.policy_hash)
        if trail.noted.get(key) != seen:
            with self._file.write():
                trail.record(decision, ref)
            trail.noted[key] = seen
        self._verdicts[user] = (self._file.generation(), decision)
        return decision

    def contribution(
        self, user_id: str, round_id: str, *, refused: SpecRefused | None = None
    ) -> Decision:
        """May the user's training go into this round? ``refused`` is the device's own
        refusal of the round spec. A refusal is logged here; an allowance is logged with the
        round it allowed (:meth:`._store_outbox.DeviceOutbox.queue`)."""
        ref = self._users.ref(user_id, create=False)
        trail = self._trail
        inputs = trail.inputs("contribute_delta", ref, round=round_id)
        if refused is not None:
            decision = trail.engine.spec_refused(refused.code, inputs=inputs, detail=str(refused))
        else:
            state = self.state(ref, self._users.hash(user_id))
            decision = trail.engine.contribute_delta(state, inputs=inputs)
        if not decision.allowed:
            with self._file.write():
                trail.record(decision, ref)
        return decision
