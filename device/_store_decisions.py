"""The store's decisions: the policy engine that makes them, the device's decision log that
keeps them, and which user each one is about (``decision_subjects``, so that an access export
finds a user's decisions and erasure unties them)."""

from __future__ import annotations

import secrets
from typing import Any

from sottovoce.device._store_file import StoreFile
from sottovoce.policy import Decision, DecisionEngine, DecisionLog, Policy

__all__ = ["DecisionTrail", "Noted"]

Noted = dict[tuple[str, str], tuple[str, str]]
"""Per (action, user hash), the (reason, policy hash) of the routine decision last logged."""


class DecisionTrail:
    """Decides by policy and logs what was decided."""

    def __init__(self, file: StoreFile, *, policy: Policy, region_id: str) -> None:
        self._file = file
        self.engine = DecisionEngine(policy, region_id, clock=file.clock,
                                     digest_key=bytes.fromhex(file.meta("digest_key")))  # fmt: skip
        self.log = DecisionLog(file.conn)
        # Routine decisions (allowed appends, personalization) are logged only when their
        # reason or policy changes, or the log would become a listening timeline kept for
        # years; this remembers what was logged last (only once it is committed).
        self.noted: Noted = {}

    def inputs(self, action: str, ref: int | None, **details: Any) -> dict[str, Any]:
        """What a decision is about; only its keyed digest enters the log.

        The subject is the user's random key from their row (erasure deletes it, and with it
        any way to tie the log to them); an unregistered user gets a one-off key.
        """
        subject = None
        if ref is not None:
            row = self._file.conn.execute("SELECT subject FROM users WHERE user_ref = ?", (ref,))
            subject = row.fetchone()[0]
        return {"action": action, "subject": subject or secrets.token_hex(16), **details}

    def record(self, decision: Decision, ref: int | None) -> None:
        """Append ``decision`` to the log (inside the caller's write), tied to user ``ref``."""
        index = self.log.append(decision)
        if ref is not None:
            self._file.conn.execute(
                "INSERT INTO decision_subjects (idx, user_ref) VALUES (?, ?)", (index, ref)
            )
