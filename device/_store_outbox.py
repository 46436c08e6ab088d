"""Ranker weights and the outbox of sealed deltas: the store implements
``sottovoce.sync.Outbox``."""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sottovoce.device._rows import (
    from_ms,
    to_ms,
)
from sottovoce.device._sqlite import guarded
from sottovoce.device._store_core import ModelWeights, StoreCore
from sottovoce.policy import (
    Action,
    Decision,
    PrivacyMode,
)
from sottovoce.sync import Charge, Mechanism, OutboxItem, SealedDelta, SpecRefused


class OutboxPart(StoreCore):
    """Model weights, local rounds and the outbox."""

    def save_model(
        self, slot: str, *, model_id: str, version: int, weights: npt.NDArray[np.floating[Any]],
        state: npt.NDArray[np.floating[Any]] | None = None, user_id: str | None = None,
    ) -> None:  # fmt: skip
        """Store ranker weights (and optimizer state) in one write: readers see old or new.

        A model trained on a user's history (``user_id`` given) is their data: withdrawal,
        erasure and retention treat it like the rest of their derived state.
        """
        with self._write():
            ref = None if user_id is None else self._ref(user_id, create=True)
            self._conn.execute(
                "INSERT OR REPLACE INTO model_state (slot, user_ref, model_id, version, weights, "
                "state, updated_ts) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (slot, ref, model_id, version, np.asarray(weights, dtype=np.float32).tobytes(),
                 None if state is None else np.asarray(state, dtype=np.float32).tobytes(),
                 to_ms(self._clock())),
            )  # fmt: skip

    @guarded("reading model weights")
    def load_model(self, slot: str) -> ModelWeights | None:
        row = self._conn.execute(
            "SELECT model_id, version, weights, state FROM model_state WHERE slot = ?", (slot,)
        ).fetchone()
        if row is None:
            return None
        state = None if row[3] is None else np.frombuffer(row[3], dtype=np.float32)
        return ModelWeights(row[0], row[1], np.frombuffer(row[2], dtype=np.float32), state)

    def contribution(
        self, user_id: str, round_id: str, *, refused: SpecRefused | None = None
    ) -> Decision:
        """May the user's training go into this round? ``refused`` is the device's own
        refusal of the round spec. A refusal is logged here; an allowance is logged with the
        round it allowed (:meth:`record_round`)."""
        ref = self._ref(user_id, create=False)
        inputs = self._inputs("contribute_delta", ref, round=round_id)
        if refused is not None:
            decision = self._engine.spec_refused(refused.code, inputs=inputs, detail=str(refused))
        else:
            state = self._consent_state(ref, self.user_hash(user_id))
            decision = self._engine.contribute_delta(state, inputs=inputs)
        if not decision.allowed:
            with self._write():
                self._log(decision, ref)
        return decision

    def device_secret(self) -> bytes:
        """The device's secret: keys its pseudonyms and round sampling; never leaves it."""
        return bytes.fromhex(self._meta("device_secret"))

    def signing_key(self, period: str) -> Ed25519PrivateKey:
        """The device's Ed25519 key for a period (made on first use; one per period)."""
        with self._write():
            self._conn.execute(
                "INSERT OR IGNORE INTO device_keys (period, signing_key) VALUES (?, ?)",
                (period, secrets.token_hex(32)),
            )
            row = self._conn.execute(
                "SELECT signing_key FROM device_keys WHERE period = ?", (period,)
            ).fetchone()
        return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(row[0]))

    @guarded("reading the privacy ledger")
    def privacy_history(self, region: str) -> list[Charge]:
        """The device's privacy ledger for a region: every round it was charged for."""
        rows = self._conn.execute(
            "SELECT round_id, period_start_ts, noise_multiplier, sampling_rate, sensitivity, "
            "charged_ts, mode FROM privacy_spend WHERE region = ? ORDER BY charged_ts", (region,)
        )  # fmt: skip
        return [Charge(round_id, region, from_ms(start), Mechanism(z, q, c), from_ms(at),
                       PrivacyMode(mode))
                for round_id, start, z, q, c, at, mode in rows]  # fmt: skip

    def charge(self, charge: Charge) -> None:
        """Add a round to the device's privacy ledger (once per round)."""
        with self._write():
            self._insert_charge(charge)

    def _insert_charge(self, charge: Charge) -> None:
        m = charge.mechanism
        self._conn.execute(
            "INSERT OR IGNORE INTO privacy_spend (region, round_id, mode, period_start_ts, "
            "noise_multiplier, sampling_rate, sensitivity, charged_ts) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (charge.region, charge.round_id, charge.mode.value, to_ms(charge.period_start),
             m.noise_multiplier, m.sampling_rate, m.sensitivity, to_ms(charge.at)),
        )  # fmt: skip

    def record_round(
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
        """Record a local round: the personal model, its sealed delta in the outbox, the
        decision and (local mode) the round's privacy charge, in one transaction (a crash leaves
        all of them or none).

        The decision is logged with what is queued to leave the device (round, model version,
        budget period, size, deadline): facts an auditor can match against the round, never
        the delta, its pseudonym or its idempotency key."""
        now = to_ms(self._clock())
        wire = sealed.to_wire()
        queued: dict[str, str | int] = {
            "round": sealed.round_id, "model_version": sealed.model_version,
            "period": sealed.period, "bytes": len(wire),
            "deadline": deadline.isoformat(timespec="seconds"),
        }  # fmt: skip
        decision = decision.model_copy(update={"metrics": {**decision.metrics, **queued}})
        with self._write("queuing a model update"):
            if charge is not None:
                self._insert_charge(charge)
            ref = self._ref(user_id, create=True)
            self._conn.execute(
                "INSERT OR REPLACE INTO model_state (slot, user_ref, model_id, version, weights, "
                "state, updated_ts) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (f"local:{self.user_hash(user_id)}", ref, model.model_id, model.version,
                 model.weights.astype(np.float32).tobytes(), state.astype(np.float32).tobytes(),
                 now),
            )  # fmt: skip
            self._conn.execute(
                "INSERT INTO outbox (idempotency_key, user_ref, region, round_id, deadline_ts, "
                "body, state, attempts, next_attempt_ts, created_ts) "
                "VALUES (?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?)",
                (sealed.idempotency_key, ref, sealed.region, sealed.round_id, to_ms(deadline),
                 wire, now, now),
            )  # fmt: skip
            self._log(decision, ref)

    @guarded("reading the outbox")
    def due(self, *, now: datetime, limit: int = 100) -> list[OutboxItem]:
        rows = self._conn.execute(
            "SELECT idempotency_key, region, round_id, deadline_ts, body, attempts FROM outbox "
            "WHERE state = 'pending' AND next_attempt_ts <= ? ORDER BY created_ts LIMIT ?",
            (to_ms(now), limit),
        )
        return [OutboxItem(key, region, round_id, from_ms(deadline), bytes(body), attempts)
                for key, region, round_id, deadline, body, attempts in rows]  # fmt: skip

    def attempted(self, key: str, *, now: datetime, retry_at: datetime) -> None:
        with self._write():
            self._conn.execute(
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
        with self._write("recording an upload's outcome"):
            row = self._conn.execute(
                "SELECT user_ref, round_id, length(body), attempts, created_ts FROM outbox "
                "WHERE idempotency_key = ? AND state = 'pending'", (key,)
            ).fetchone()  # fmt: skip
            if row is None:
                return
            self._conn.execute(
                "UPDATE outbox SET state = ?, reason = ?, done_ts = ? WHERE idempotency_key = ?",
                (state, reason, to_ms(now), key),
            )
            ref, round_id, size, attempts, created = row
            metrics: dict[str, str | int] = {
                "round": round_id, "bytes": size, "retries": attempts,
                "queued_at": from_ms(created).isoformat(timespec="seconds"),
            }  # fmt: skip
            # The same inputs as the decision that queued it: one digest ties the two entries.
            inputs = self._inputs("contribute_delta", ref, round=round_id)
            code, fill = "delta_acknowledged", {}
            if reason is not None:
                code, fill = "delta_dropped", {"cause": reason}
                metrics["cause"] = reason
            decision = self._engine.decide(Action.CONTRIBUTE_DELTA, code, inputs=inputs,
                                           metrics=metrics, round=round_id, **fill)  # fmt: skip
            self._log(decision, ref)

    @guarded("reading the outbox")
    def in_outbox(self, key: str) -> bool:
        """Whether a delta with this idempotency key was queued (in any state)."""
        row = self._conn.execute("SELECT 1 FROM outbox WHERE idempotency_key = ?", (key,))
        return row.fetchone() is not None

    @guarded("reading the outbox")
    def outbox_states(self) -> dict[str, int]:
        """How many deltas are in each state."""
        rows = self._conn.execute("SELECT state, count(*) FROM outbox GROUP BY state")
        return {state: int(n) for state, n in rows}
