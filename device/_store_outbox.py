"""The outbox of sealed deltas (``outbox``): :meth:`DeviceOutbox.queue` records a local round,
and the rest is what :class:`sottovoce.sync.Outbox` asks of it for the uploader (due items, an
attempt, an acknowledgement, a drop). Each outcome is a logged decision, so the device's log
says what became of every update that was to leave it. A finished update's row keeps its round,
state and size until retention; its sealed body is deleted when it finishes.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import numpy.typing as npt

from sottovoce.device._rows import from_ms, to_ms
from sottovoce.device._sqlite import guarded
from sottovoce.device._store_decisions import DecisionTrail
from sottovoce.device._store_file import StoreFile
from sottovoce.device._store_ledger import DeviceLedger
from sottovoce.device._store_models import Models
from sottovoce.device._store_users import Users
from sottovoce.device._store_values import ModelWeights
from sottovoce.policy import Action, Decision
from sottovoce.sync import Charge, OutboxItem, SealedDelta

__all__ = ["DeviceOutbox"]


class DeviceOutbox:
    """The ``outbox`` table; implements :class:`sottovoce.sync.Outbox`."""

    def __init__(
        self, file: StoreFile, *, users: Users, trail: DecisionTrail, models: Models,
        ledger: DeviceLedger,
    ) -> None:  # fmt: skip
        self._file, self._users, self._trail = file, users, trail
        self._models, self._ledger = models, ledger

    def queue(
        self,
        user_id: str,
        *,
        sealed: SealedDelta,
        deadline: datetime,
        model: ModelWeights,
        state: npt.NDArray[np.float32],
        decision: Decision,
        charge: Charge | None = None,
    ) -> None:
        """Queue a local round: the personal model, its sealed delta, the decision and (local
        mode) the round's privacy charge, in one transaction (a crash leaves all or none).

        The decision is logged with what is queued to leave the device (round, model version,
        budget period, size, deadline): facts an auditor can match against the round, never
        the delta, its pseudonym or its idempotency key."""
        now = to_ms(self._file.clock())
        wire = sealed.to_wire()
        queued: dict[str, str | int] = {
            "round": sealed.round_id, "model_version": sealed.model_version,
            "period": sealed.period, "bytes": len(wire),
            "deadline": deadline.isoformat(timespec="seconds"),
        }  # fmt: skip
        decision = decision.model_copy(update={"metrics": {**decision.metrics, **queued}})
        with self._file.write("queuing a model update"):
            if charge is not None:
                self._ledger.put(charge)
            ref = self._users.ref(user_id, create=True)
            personal = ModelWeights(model.model_id, model.version, model.weights, state)
            self._models.put(f"local:{self._users.hash(user_id)}", ref, personal, at_ms=now)
            self._file.conn.execute(
                "INSERT INTO outbox (idempotency_key, user_ref, region, round_id, deadline_ts, "
                "body, bytes, state, attempts, next_attempt_ts, created_ts) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?)",
                (sealed.idempotency_key, ref, sealed.region, sealed.round_id, to_ms(deadline),
                 wire, len(wire), now, now),
            )  # fmt: skip
            self._trail.record(decision, ref)

    @guarded("reading the outbox")
    def due(self, *, now: datetime, limit: int = 100) -> list[OutboxItem]:
        """Pending items whose next attempt is due, oldest first."""
        rows = self._file.conn.execute(
            "SELECT idempotency_key, region, round_id, deadline_ts, body, attempts FROM outbox "
            "WHERE state = 'pending' AND next_attempt_ts <= ? ORDER BY created_ts LIMIT ?",
            (to_ms(now), limit),
        )
        return [OutboxItem(key, region, round_id, from_ms(deadline), bytes(body), attempts)
                for key, region, round_id, deadline, body, attempts in rows]  # fmt: skip

    def attempted(self, key: str, *, now: datetime, retry_at: datetime) -> None:
        """A failed attempt: try again no earlier than ``retry_at``."""
        with self._file.write():
            self._file.conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt_ts = ? "
                "WHERE idempotency_key = ? AND state = 'pending'", (to_ms(retry_at), key)
            )  # fmt: skip

    def acknowledge(self, key: str, *, now: datetime) -> None:
        """The aggregator took the delta: logged (``delta_acknowledged``) for its user."""
        self._finish(key, "acknowledged", None, now)

    def drop(self, key: str, *, reason: str, now: datetime) -> None:
        """The delta will never count (``reason``: the aggregator's refusal, ``round_closed`` or
        ``deadline_passed``): logged (``delta_dropped``) for its user."""
        self._finish(key, "dropped", reason, now)

    def _finish(self, key: str, state: str, reason: str | None, now: datetime) -> None:
        # Only a pending delta moves on: an acknowledgement never turns into a drop or back.
        # The sealed body goes (it is never sent again, and only the aggregator can open it);
        # its size stays for the user's access export.
        conn = self._file.conn
        with self._file.write("recording an upload's outcome"):
            row = conn.execute(
                "SELECT user_ref, round_id, bytes, attempts, created_ts FROM outbox "
                "WHERE idempotency_key = ? AND state = 'pending'", (key,)
            ).fetchone()  # fmt: skip
            if row is None:
                return
            conn.execute(
                "UPDATE outbox SET state = ?, reason = ?, done_ts = ?, body = X'' "
                "WHERE idempotency_key = ?",
                (state, reason, to_ms(now), key),
            )
            ref, round_id, size, attempts, created = row
            metrics: dict[str, str | int] = {
                "round": round_id, "bytes": size, "retries": attempts,
                "queued_at": from_ms(created).isoformat(timespec="seconds"),
            }  # fmt: skip
            # The same inputs as the decision that queued it: one digest ties the two entries.
            inputs = self._trail.inputs("contribute_delta", ref, round=round_id)
            code, fill = "delta_acknowledged", {}
            if reason is not None:
                code, fill = "delta_dropped", {"cause": reason}
                metrics["cause"] = reason
            decision = self._trail.engine.decide(Action.CONTRIBUTE_DELTA, code, inputs=inputs,
                                                 metrics=metrics, round=round_id,
                                                 **fill)  # fmt: skip
            self._trail.record(decision, ref)

    @guarded("reading the outbox")
    def contains(self, key: str) -> bool:
        """Whether a delta with this idempotency key was queued (in any state)."""
        row = self._file.conn.execute("SELECT 1 FROM outbox WHERE idempotency_key = ?", (key,))
        return row.fetchone() is not None

    @guarded("reading the outbox")
    def states(self) -> dict[str, int]:
        """How many deltas are in each state."""
        rows = self._file.conn.execute("SELECT state, count(*) FROM outbox GROUP BY state")
        return {state: int(n) for state, n in rows}
