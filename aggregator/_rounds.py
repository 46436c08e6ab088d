"""A round's life in one region (:class:`Rounds`, a part of
:class:`~sottovoce.aggregator.RegionAggregator`, see :mod:`._aggregator`; no HTTP here).

Data flow step 6: the aggregator opens a round under the privacy ledger's budget and
signs its spec, takes sealed deltas (bytes as uploaded, with the upload's idempotency key),
decides on each by policy, opens and verifies the accepted ones with
:func:`~sottovoce.sync.open_delta`, adds them to the round's :class:`PartialSum` and drops
them. How a round ends depends on the privacy mode (docs/privacy.md):

- central: the round stays open until its deadline, then :meth:`Rounds.sweep` closes
  it: every on-time contribution's sum, rounded to a fixed-point grid, plus discrete Gaussian
  noise, divided by the fixed expected cohort, whatever the count (no truncation, so one device
  moves the sum by at most C: the Poisson-sampled Gaussian the ledger charges);
- local: every upload carries its own noise; the round closes at its minimum cohort with the
  mean, or is abandoned at its deadline (no count logged).

Each publication steps the privacy ledger and signs a :class:`~sottovoce.sync.ModelRelease`
(through the region's signer, :mod:`._signer`).

Restart safety: every acknowledged delta changes the stored running sum, its contribution row
and its ``accept_delta`` decision in one write transaction (uploads arriving together share one,
see :meth:`RegionAggregator.accept_many`), so a crash either shows all three or none; an upload
repeated with the same idempotency key gets the first answer and is counted once. Individual
deltas are never stored, only running sums (one per worker process, merged at the close); they
are deleted when the round is published or abandoned (the un-noised sum is more revealing than
the release).

Tables (versioned migrations in :mod:`._schema`, next to the privacy ledger and the decision
log)::

    enrollments     device_key PK, period, enrolled_at
    rounds          round_id PK, spec (signed spec, wire JSON), state open|published|abandoned,
                    count, opened_at, closed_at (partial: unused since schema version 2)
    round_partials  round_id, worker PK, partial (PartialSum.to_bytes()), count: deleted at
                    the close
    contributions   idempotency_key PK, round_id, pseudonym, device_key, body_sha256, status,
                    code, at, partial_key (at most one accepted row per round and pseudonym,
                    and per round and device key: unique indexes)
    releases        version PK, model_id, body (ModelRelease wire JSON), created

::

    AggregatorError
    ├── RoundOverBudget  (from the ledger) the round would exceed the period's epsilon budget
    └── RoundStillOpen   round_open: a round is already open; one round at a time
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime, time

import numpy as np

from sottovoce._sqlite import write_transaction
from sottovoce.aggregator._ed25519 import is_device_key
from sottovoce.aggregator._ledger import RoundOverBudget
from sottovoce.aggregator._partial_sum import PartialSum, central_release
from sottovoce.aggregator._round_state import (
    RegionContext,
    RoundInfo,
    RoundStillOpen,
    RoundTables,
    Verdict,
    _iso,
    stored_spec,
)
from sottovoce.policy import (
    DataClass,
    PrivacyMode,
)
from sottovoce.sync import (
    ModelRelease,
    RoundSpec,
    SignedRoundSpec,
)
from sottovoce.sync._budget import Mechanism, mechanism
from sottovoce.sync._wire import b64decode, b64encode

__all__ = ["RoundInfo", "RoundStillOpen", "Rounds", "Verdict"]


class Rounds:
    """Enrollment, and a round's life: opening it under the budget, publishing it, sweeping
    the rounds whose deadline passed and what retention bounds."""

    def __init__(self, ctx: RegionContext, tables: RoundTables) -> None:
        self._ctx = ctx
        self._tables = tables
        self._conn, self._log, self._engine = ctx.conn, ctx.log, ctx.engine
        self._ledger, self._clock, self._region = ctx.ledger, ctx.clock, ctx.region

    # -- enrollment and rounds ---------------------------------------------------------------

    def enroll(self, device_key_b64: str, period: str, *, record: bool = True) -> None:
        """Enroll a device's per-period Ed25519 public key (the HTTP layer checks tokens).

        The key must be one a device could have made (:func:`._ed25519.is_device_key`), in
        canonical base64; the period must be one of the policy's budget periods open for
        enrollment: the current one or an adjacent one (:meth:`enrollable_periods`). Every
        answer is a logged ``enroll_device`` decision (a refusal only with ``record``); a
        refusal raises ``ValueError`` after its decision is committed, with a message that
        quotes at most a short prefix of what was sent and never names another period."""
        inputs = {"device_key": device_key_b64[:64], "period": period[:64]}
        refusal: ValueError | None = None
        with write_transaction(self._conn, name="enroll"):
            try:
                self._check_enrollment(device_key_b64, period)
            except ValueError as error:
                refusal = error
                if record:
                    self._log.append(self._engine.enroll_device(inputs=inputs, refusal="malformed"))
            else:
                self._conn.execute(
                    "INSERT INTO enrollments (device_key, period, enrolled_at)"
                    " VALUES (?, ?, ?) ON CONFLICT (device_key) DO NOTHING",
                    (device_key_b64, period, _iso(self._clock())),
                )
                self._log.append(self._engine.enroll_device(inputs=inputs))
        if refusal is not None:  # raised once the refusal's decision is committed
            raise refusal

    def refuse_enrollment(self, code: str) -> None:
        """Log an enrollment the HTTP layer refused before deciding (no or a wrong token)."""
        with write_transaction(self._conn, name="enroll_refused"):
            self._log.append(self._engine.enroll_device(inputs={"token": code}, refusal=code))

    def enrollable_periods(self) -> tuple[str, str, str]:
        """The labels of the budget periods a key can be enrolled for now: the previous, the
        current and the next (as ``sottovoce.sync.period_label`` spells a period's start)."""
        start = self._ledger.period_start_for(self._clock())
        length = self._region.privacy.period
        before, now, after = (_period_label(start + k * length) for k in (-1, 0, 1))
        return before, now, after

    def _check_enrollment(self, device_key_b64: str, period: str) -> None:
        problem = device_key_problem(device_key_b64)
        if problem is not None:
            raise ValueError(problem)
        if period not in self.enrollable_periods():
            raise ValueError(
                f"the period {_quoted(period)} is not a budget period of region "
                f"{self._region.id} open for enrollment (a device enrolls for the period of the "
                "round it joins)"
            )
        row = self._conn.execute(
            "SELECT period FROM enrollments WHERE device_key = ?", (device_key_b64,)
        ).fetchone()
        if row is not None and row[0] != period:
            # Devices make a new key every period; moving a key to another period would let
            # whoever holds a token lock that key's device out of its rounds. Which period
            # the key has is not said: a refusal must not reveal where a key exists.
            raise ValueError("the device key is already enrolled for another period")

    def open_round(
        self,
        *,
        deadline: datetime,
        noise_multiplier: float | None = None,
        sampling_rate: float | None = None,
    ) -> SignedRoundSpec:
        """Open and sign a round, if the period's budget allows it (else ``RoundOverBudget``).

        The mechanism comes from the region's policy: its sampling rate and expected cohort,
        and a noise multiplier no lower than the policy's (default: the policy's).
        ``sampling_rate``, if given, must be the policy's (devices refuse any other). The round
        trains the latest release (version 0: the base weights).
        """
        privacy = self._region.privacy
        used = self.round_mechanism(noise_multiplier)
        z = used.noise_multiplier
        if sampling_rate is not None and sampling_rate != privacy.sampling_rate:
            raise ValueError(f"the policy fixes the sampling rate at {privacy.sampling_rate:g}; "
                             f"devices refuse a round at {sampling_rate:g}")  # fmt: skip
        q = privacy.sampling_rate
        now = self._clock()
        if deadline <= now:
            raise ValueError("a round's deadline must be in the future")
        with write_transaction(self._conn, name="open_round"):
            # An expired round that no sweep has ended yet must not block the next one.
            self._end_expired(now)
            if self._tables.current_round() is not None:
                raise RoundStillOpen("a round is already open; wait for it to close or expire")
            start = self._ledger.period_start_for(now)
            # A round belongs to the budget period it opens in and ends with it at the latest
            # (devices refuse a round that outlasts its period).
            deadline = min(deadline, start + privacy.period)
            spent = self._ledger.spent(start)
            after = self._ledger.epsilon_if(used.noise_multiplier, used.sampling_rate,
                                            sensitivity=used.sensitivity,
                                            period_start=start)  # fmt: skip
            number = self._conn.execute("SELECT count(*) FROM rounds").fetchone()[0] + 1
            round_id = f"{self._region.id}-{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{number}"
            inputs = {"round_id": round_id, "noise_multiplier": z, "sampling_rate": q,
                      "sensitivity": used.sensitivity}  # fmt: skip
            decision = self._engine.open_round(
                inputs=inputs, epsilon_spent=spent, epsilon_after=after
            )
            self._log.append(decision)
            signed = None
            if decision.allowed:
                signed = self._new_round(round_id, noise_multiplier=z, deadline=deadline,
                                         spent=spent, after=after, start=start,
                                         now=now)  # fmt: skip
            self._log.checkpoint()
        if signed is None:  # refused: the decision is committed before the error is raised
            raise RoundOverBudget(
                region=self._region.id,
                period_start=start,
                epsilon_after=after,
                budget=privacy.epsilon,
                spent=spent,
            )
        return signed

    def round_mechanism(self, noise_multiplier: float | None = None) -> Mechanism:
        """What a round of the policy's mechanism is charged as, with ``noise_multiplier``
        (default: the policy's least; a lower one is a ``ValueError``: devices refuse it)."""
        privacy = self._region.privacy
        z = privacy.noise_multiplier if noise_multiplier is None else float(noise_multiplier)
        if not z >= privacy.noise_multiplier:
            raise ValueError(f"the noise multiplier {z:g} is below the policy's minimum of "
                             f"{privacy.noise_multiplier:g}")  # fmt: skip
        return mechanism(privacy.mode, noise_multiplier=z,
                         sampling_rate=privacy.sampling_rate, dim=self._ctx.dim)  # fmt: skip

    def _new_round(
        self,
        round_id: str,
        *,
        noise_multiplier: float,
        deadline: datetime,
        spent: float,
        after: float,
        start: datetime,
        now: datetime,
    ) -> SignedRoundSpec:
        privacy = self._region.privacy
        latest = self._tables.latest_release()
        spec = RoundSpec(
            round_id=round_id,
            region=self._region.id,
            model_id=self._ctx.model_id,
            model_version=0 if latest is None else latest.version,
            mode=privacy.mode,
            clipping_norm=privacy.clipping_norm,
            noise_multiplier=noise_multiplier,
            sampling_rate=privacy.sampling_rate,
            min_cohort=privacy.min_cohort,
            expected_cohort=privacy.expected_cohort,
            deadline=deadline,
            epsilon_spent=spent,
            epsilon_after=after,
            delta=privacy.delta,
            period_start=start,
        )
        signed = self._ctx.signer.sign_round_spec(spec)
        self._conn.execute(
            "INSERT INTO rounds (round_id, spec, state, count, opened_at)"
            " VALUES (?, ?, 'open', 0, ?)",
            (round_id, signed.to_wire().decode(), _iso(now)),
        )
        return signed

    # -- closing -----------------------------------------------------------------------------

    def publish(self, spec: RoundSpec, partial: PartialSum, now: datetime) -> ModelRelease | None:
        """Publish the round (inside the caller's write transaction); returns the release, or
        ``None`` when the round was abandoned instead."""
        central = spec.mode is PrivacyMode.CENTRAL
        if central:
            update = central_release(partial.total, clipping_norm=spec.clipping_norm,
                                     noise_multiplier=spec.noise_multiplier,
                                     expected_cohort=spec.expected_cohort,
                                     rng=self._ctx.rng)  # fmt: skip
        else:
            update = partial.mean()  # local mode: every device already added all of the noise
        inputs = {"round_id": spec.round_id, "version": spec.model_version + 1}
        try:
            used = self.round_mechanism(spec.noise_multiplier)
            epsilon = self._ledger.charge_round(
                spec.round_id, used.noise_multiplier, used.sampling_rate,
                sensitivity=used.sensitivity, period_start=spec.period_start, at=now,
            )  # fmt: skip
        except RoundOverBudget:
            # The policy changed under an open round: it must not be published.
            self._tables.end(spec.round_id, "abandoned", now)
            self._log.append(self._engine.round_abandoned(
                inputs=inputs, reason="budget_exhausted",
                epsilon_spent=self._ledger.spent(spec.period_start)))  # fmt: skip
            self._log.checkpoint()
            return None
        if self._ctx.accumulate:
            latest = self._tables.latest_release()
            base = self._ctx.base
            previous = base if latest is None else latest.weights_array().astype(np.float64)
            update = previous + update
        release = self._ctx.signer.sign_release(
            model_id=self._ctx.model_id, version=spec.model_version + 1, weights=update, created=now
        )
        self._conn.execute(
            "INSERT INTO releases (version, model_id, body, created) VALUES (?, ?, ?, ?)",
            (release.version, release.model_id, release.to_wire().decode(), _iso(now)),
        )
        self._tables.end(spec.round_id, "published", now)
        if central:
            decision = self._engine.publish_release(
                inputs=inputs, epsilon_spent=epsilon, expected_cohort=spec.expected_cohort
            )
        else:
            decision = self._engine.publish_release(
                inputs=inputs, epsilon_spent=epsilon, cohort=partial.count
            )
        self._log.append(decision)
        self._log.checkpoint()
        return release

    # -- retention ---------------------------------------------------------------------------

    def sweep(self, now: datetime | None = None) -> list[str]:
        """End the rounds whose deadline has passed (central: publish; local: abandon) and purge
        what retention bounds; returns the ids of the rounds it ended.

        Contribution rows (pseudonyms, answers) go after the ``aggregator_deltas`` retention,
        except those of a still-open round, which its once-per-round check needs. Decision
        log entries are pruned after the ``audit_log`` retention, not the deltas': the
        decisions are the audit trail and hold no personal data.
        """
        now = self._clock() if now is None else now
        retention = self._region.retention
        with write_transaction(self._conn, name="sweep"):
            ended = self._end_expired(now)
            deleted: dict[str, int] = {}
            cutoff = retention.get(DataClass.AGGREGATOR_DELTAS)
            if cutoff is not None:
                cursor = self._conn.execute(
                    "DELETE FROM contributions WHERE at < ? AND (round_id IS NULL OR round_id"
                    " NOT IN (SELECT round_id FROM rounds WHERE state = 'open'))",
                    (_iso(now - cutoff),),
                )
                deleted["contributions"] = cursor.rowcount
            audit = retention.get(DataClass.AUDIT_LOG)
            if audit is not None:
                deleted["decisions"] = self._log.prune(now - audit)
            if any(deleted.values()):
                self._log.append(
                    self._engine.purge(
                        deleted=deleted,
                        inputs={"at": _iso(now)},
                        log_pruned_total=self._log.pruned_total(),
                    )
                )
            if ended or any(deleted.values()):
                self._log.checkpoint()
        return ended

    def _end_expired(self, now: datetime) -> list[str]:
        """End the open rounds whose deadline has passed (inside the caller's write)."""
        ended: list[str] = []
        rows = self._conn.execute("SELECT round_id, spec FROM rounds WHERE state = 'open'")
        for round_id, spec_json in rows.fetchall():
            spec = stored_spec(spec_json).spec
            if now < spec.deadline:
                continue
            if spec.mode is PrivacyMode.CENTRAL:
                self.publish(spec, self._tables.round_sum(round_id), now)
            else:
                self._tables.end(round_id, "abandoned", now)
                self._log.append(self._engine.round_abandoned(
                    inputs={"round_id": round_id}, reason="cohort_not_met",
                    epsilon_spent=self._ledger.spent(spec.period_start)))  # fmt: skip
            ended.append(round_id)
        return ended


def _period_label(start: datetime) -> str:
    # The spelling of sottovoce.sync.period_label: the date, or the full UTC time when the
    # period does not start at midnight.
    start = start.astimezone(UTC)
    return start.date().isoformat() if start.time() == time(0) else f"{start:%Y-%m-%dT%H:%M:%SZ}"


def _quoted(value: str, limit: int = 24) -> str:
    """``value`` for a message: a short prefix, so an answer never echoes a large field."""
    return repr(value if len(value) <= limit else value[:limit] + "…")


@functools.lru_cache(maxsize=4096)
def device_key_problem(device_key_b64: str) -> str | None:
    """What is wrong with a device key as enrollment receives it (base64), or ``None``.

    Pure, and remembered for the last 4,096 keys: the service checks a key before its
    enrollment waits for the region's write lock (:func:`._ed25519.is_device_key` takes half
    a millisecond), so the check under the lock finds the verdict already made."""
    try:
        raw = b64decode(device_key_b64)
    except ValueError:
        return "the device key is not standard base64"
    if len(raw) != 32:
        return "a device key is a 32-byte Ed25519 public key"
    if b64encode(raw) != device_key_b64:
        return "the device key is not in canonical base64 (one spelling per key)"
    if not is_device_key(raw):
        return (
            "the device key is not an Ed25519 public key a device could have made (not a "
            "point of the curve's prime-order group: a small-order or malformed key)"
        )
    return None
