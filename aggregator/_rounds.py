"""One region's federated rounds, with all of their state in one SQLite file (no HTTP).

Data flow step 6: :class:`RegionAggregator` opens a round under the privacy ledger's budget and
signs its spec, takes sealed deltas (bytes as uploaded, with the upload's idempotency key),
decides on each by policy, opens and verifies the accepted ones with
:func:`~sottovoce.sync.open_delta`, adds them to the round's :class:`PartialSum` and drops
them, and closes the round when the spec's minimum cohort is met: mean, central noise, ledger
step, signed :class:`~sottovoce.sync.ModelRelease`. A round whose deadline passes first is
abandoned by :meth:`RegionAggregator.sweep`, never published. The HTTP service is a thin layer
over this class.

Restart safety: every acknowledged delta changes the stored running sum, its contribution row
and its ``accept_delta`` decision in one write transaction, so a crash either shows all three
or none; an upload repeated with the same idempotency key gets the first answer and is counted
once. Individual deltas are never stored, only the running sum; it is deleted when the round
is published or abandoned (the un-noised sum is more revealing than the release).

Tables (created if missing, next to the privacy ledger and the decision log)::

    enrollments    device_key PK, period, enrolled_at
    rounds         round_id PK, spec (signed spec, wire JSON), state open|published|abandoned,
                   partial (PartialSum.to_bytes(), NULL once closed), count, opened_at, closed_at
    contributions  idempotency_key PK, round_id, pseudonym, body_sha256, status, code, at
                   (at most one accepted row per round and pseudonym)
    releases       version PK, model_id, body (ModelRelease wire JSON), created

::

    SottovoceError
    ├── BudgetExceeded   (from the ledger) the round would exceed the period's epsilon budget
    └── RoundStillOpen   round_open: a round is already open; one round at a time
"""

from __future__ import annotations

import hashlib
import hmac
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sottovoce._errors import SottovoceError
from sottovoce._sqlite import write_transaction
from sottovoce.aggregator._ledger import BudgetExceeded, PrivacyLedger
from sottovoce.aggregator._partial_sum import PartialSum, central_noise
from sottovoce.policy import (
    Action,
    CheckpointSigner,
    DataClass,
    DecisionEngine,
    DecisionLog,
    Policy,
    PrivacyMode,
)
from sottovoce.sync import (
    ModelRelease,
    RoundSpec,
    SealedDelta,
    SignedRoundSpec,
    SyncError,
    open_delta,
    sign_release,
    sign_round_spec,
)
from sottovoce.sync._seal import device_noise_std
from sottovoce.sync._wire import b64decode, b64encode

__all__ = ["STATUS", "RegionAggregator", "RoundInfo", "RoundStillOpen"]

# HTTP status of every answer ``accept`` can give, by reason code.
STATUS: Final[dict[str, int]] = {
    "within_policy": 200,
    "unsupported_protocol": 400,
    "malformed": 400,
    "undecryptable": 400,
    "bad_signature": 400,
    "not_enrolled": 403,
    "wrong_region": 403,
    "duplicate_contribution": 409,
    "round_closed": 410,
    "wrong_model_version": 422,
    "non_finite": 422,
    "norm_exceeded": 422,
}

_IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_PERIOD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,31}$")
_DIGEST_TAG: Final = b"sottovoce/aggregator/decision-digest/v1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS enrollments (
    device_key TEXT PRIMARY KEY,
    period TEXT NOT NULL,
    enrolled_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round_id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'published', 'abandoned')),
    partial BLOB,
    count INTEGER NOT NULL DEFAULT 0,
    opened_at TEXT NOT NULL,
    closed_at TEXT
);
CREATE TABLE IF NOT EXISTS contributions (
    idempotency_key TEXT PRIMARY KEY,
    round_id TEXT,
    pseudonym TEXT,
    body_sha256 TEXT NOT NULL,
    status INTEGER NOT NULL,
    code TEXT NOT NULL,
    at TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS contributions_once
    ON contributions (round_id, pseudonym) WHERE status = 200;
CREATE TABLE IF NOT EXISTS releases (
    version INTEGER PRIMARY KEY,
    model_id TEXT NOT NULL,
    body TEXT NOT NULL,
    created TEXT NOT NULL
);
"""


class RoundStillOpen(SottovoceError):
    """A round cannot open while another is open: each round trains the latest release."""

    code = "round_open"


@dataclass(frozen=True)
class RoundInfo:
    """What is known about a round (never its running sum)."""

    round_id: str
    signed_spec: SignedRoundSpec
    state: str
    count: int
    opened_at: datetime
    closed_at: datetime | None

    @property
    def spec(self) -> RoundSpec:
        return self.signed_spec.spec


class _Refusal(Exception):
    """Internal: an upload refused with ``code``, before anything was counted."""

    def __init__(self, code: str, *, round_id: str | None = None, pseudonym: str | None = None):
        super().__init__(code)
        self.code = code
        self.round_id = round_id
        self.pseudonym = pseudonym


def _utc_now() -> datetime:
    return datetime.now(UTC)


class RegionAggregator:
    """Rounds, uploads and releases of one region, stored in ``conn``'s database.

    ``base_weights`` are the model's weights before any release (version 0); ``rng`` draws the
    central noise (default: a generator seeded from the OS). The signing and HPKE keys must be
    the region's keys in ``policy``, since devices check and seal against those.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        policy: Policy,
        region: str,
        signing_key: Ed25519PrivateKey,
        hpke_key: X25519PrivateKey,
        model_id: str,
        dim: int,
        base_weights: npt.ArrayLike | None = None,
        clock: Callable[[], datetime] = _utc_now,
        rng: np.random.Generator | None = None,
    ) -> None:
        self._conn = conn
        self._region = policy.region(region)
        self._signing_key = signing_key
        self._hpke_key = hpke_key
        self._model_id = model_id
        self._dim = dim
        base = np.zeros(dim) if base_weights is None else np.asarray(base_weights, np.float64)
        if base.shape != (dim,) or not np.all(np.isfinite(base)):
            raise ValueError(f"base_weights must be {dim} finite numbers")
        self._base = base
        self._clock = clock
        self._rng = rng if rng is not None else np.random.default_rng()
        self._kid = self._matching_kid()
        raw = signing_key.private_bytes_raw()
        digest_key = hmac.new(raw, _DIGEST_TAG, hashlib.sha256).digest()
        self._engine = DecisionEngine(policy, region, digest_key=digest_key, clock=clock)
        origin = f"sottovoce.aggregator/{region}"
        signer = CheckpointSigner.from_private_bytes(origin, raw)
        with write_transaction(conn, name="rounds_schema"):
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            if DecisionLog.exists(conn):
                self._log = DecisionLog(conn, signer=signer)
            else:
                self._log = DecisionLog.create(conn, origin=origin, signer=signer, keep_key=False)
        self._ledger = PrivacyLedger(conn, region=self._region)

    @property
    def log(self) -> DecisionLog:
        return self._log

    @property
    def ledger(self) -> PrivacyLedger:
        return self._ledger

    # -- enrollment and rounds ---------------------------------------------------------------

    def enroll(self, device_key_b64: str, period: str) -> None:
        """Enroll a device's per-period Ed25519 public key (the HTTP layer checks tokens)."""
        try:
            raw = b64decode(device_key_b64)
        except ValueError:
            raise ValueError("the device key is not standard base64") from None
        if len(raw) != 32:
            raise ValueError("a device key is a 32-byte Ed25519 public key")
        if not _PERIOD.match(period):
            raise ValueError(f"{period!r} is not a period label")
        with write_transaction(self._conn, name="enroll"):
            self._conn.execute(
                "INSERT OR REPLACE INTO enrollments (device_key, period, enrolled_at)"
                " VALUES (?, ?, ?)",
                (device_key_b64, period, _iso(self._clock())),
            )

    def open_round(
        self, *, noise_multiplier: float, sampling_rate: float, deadline: datetime
    ) -> SignedRoundSpec:
        """Open and sign a round, if the period's budget allows it (else ``BudgetExceeded``).

        The round's privacy parameters come from the region's policy; it trains the latest
        release (version 0: the base weights).
        """
        now = self._clock()
        if deadline <= now:
            raise ValueError("a round's deadline must be in the future")
        with write_transaction(self._conn, name="open_round"):
            # An expired round that no sweep has ended yet must not block the next one.
            self._abandon_expired(now)
            if self.current_round() is not None:
                raise RoundStillOpen("a round is already open; wait for it to close or expire")
            start = self._ledger.period_start_for(now)
            spent = self._ledger.spent(start)
            after = self._ledger.epsilon_if(noise_multiplier, sampling_rate, period_start=start)
            number = self._conn.execute("SELECT count(*) FROM rounds").fetchone()[0] + 1
            round_id = f"{self._region.id}-{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{number}"
            inputs = {
                "round_id": round_id,
                "noise_multiplier": noise_multiplier,
                "sampling_rate": sampling_rate,
            }
            decision = self._engine.open_round(
                inputs=inputs, epsilon_spent=spent, epsilon_after=after
            )
            self._log.append(decision)
            signed = None
            if decision.allowed:
                signed = self._new_round(
                    round_id,
                    noise_multiplier=noise_multiplier,
                    sampling_rate=sampling_rate,
                    deadline=deadline,
                    spent=spent,
                    after=after,
                    start=start,
                    now=now,
                )
            self._log.checkpoint()
        if signed is None:  # refused: the decision is committed before the error is raised
            raise BudgetExceeded(
                region=self._region.id,
                period_start=start,
                epsilon_after=after,
                budget=self._region.privacy.epsilon,
                spent=spent,
            )
        return signed

    def _new_round(
        self,
        round_id: str,
        *,
        noise_multiplier: float,
        sampling_rate: float,
        deadline: datetime,
        spent: float,
        after: float,
        start: datetime,
        now: datetime,
    ) -> SignedRoundSpec:
        privacy = self._region.privacy
        latest = self.latest_release()
        spec = RoundSpec(
            round_id=round_id,
            region=self._region.id,
            model_id=self._model_id,
            model_version=0 if latest is None else latest.version,
            mode=privacy.mode,
            clipping_norm=privacy.clipping_norm,
            noise_multiplier=noise_multiplier,
            sampling_rate=sampling_rate,
            min_cohort=privacy.min_cohort,
            deadline=deadline,
            epsilon_spent=spent,
            epsilon_after=after,
            delta=privacy.delta,
            period_start=start,
        )
        signed = sign_round_spec(spec, signing_key=self._signing_key, kid=self._kid)
        empty = PartialSum.empty(self._dim).to_bytes()
        self._conn.execute(
            "INSERT INTO rounds (round_id, spec, state, partial, count, opened_at)"
            " VALUES (?, ?, 'open', ?, 0, ?)",
            (round_id, signed.to_wire().decode(), empty, _iso(now)),
        )
        return signed

    def current_round(self) -> SignedRoundSpec | None:
        """The open round's signed spec, if a round is open."""
        row = self._conn.execute("SELECT spec FROM rounds WHERE state = 'open'").fetchone()
        return None if row is None else SignedRoundSpec.from_wire(row[0])

    def round(self, round_id: str) -> RoundInfo | None:
        row = self._conn.execute(
            "SELECT round_id, spec, state, count, opened_at, closed_at FROM rounds"
            " WHERE round_id = ?",
            (round_id,),
        ).fetchone()
        if row is None:
            return None
        rid, spec, state, count, opened, closed = row
        return RoundInfo(
            round_id=rid,
            signed_spec=SignedRoundSpec.from_wire(spec),
            state=state,
            count=int(count),
            opened_at=datetime.fromisoformat(opened),
            closed_at=None if closed is None else datetime.fromisoformat(closed),
        )

    def latest_release(self) -> ModelRelease | None:
        row = self._conn.execute(
            "SELECT body FROM releases ORDER BY version DESC LIMIT 1"
        ).fetchone()
        return None if row is None else ModelRelease.from_wire(row[0])

    # -- uploads -----------------------------------------------------------------------------

    def accept(self, body: bytes, idempotency_key: str) -> tuple[int, str]:
        """Decide on one uploaded sealed delta; returns (HTTP status, reason code)."""
        digest = hashlib.sha256(body).hexdigest()
        prior = self._prior(idempotency_key, digest)
        if prior is not None:
            return prior
        try:
            sealed, spec = self._precheck(body, idempotency_key)
            opened = open_delta(
                sealed,
                region=self._region.id,
                round_id=spec.round_id,
                model_version=spec.model_version,
                hpke_private_key=self._hpke_key,
                clipping_norm=spec.clipping_norm,
                noise_std=device_noise_std(spec),
                dim=self._dim,
            )
        except _Refusal as refusal:
            return self._refuse(idempotency_key, digest, refusal)
        except SyncError as error:
            failed = _Refusal(error.code, round_id=sealed.round_id, pseudonym=sealed.pseudonym)
            return self._refuse(idempotency_key, digest, failed)
        now = self._clock()
        with write_transaction(self._conn, name="accept"):
            # Checked again under the write lock: a concurrent upload or sweep may have won.
            prior = self._prior(idempotency_key, digest)
            if prior is not None:
                return prior
            try:
                partial = self._open_partial(spec, sealed.pseudonym, now)
            except _Refusal as refusal:
                return self._refuse(idempotency_key, digest, refusal)
            partial = partial.add(opened.delta)
            self._conn.execute(
                "INSERT INTO contributions (idempotency_key, round_id, pseudonym, body_sha256,"
                " status, code, at) VALUES (?, ?, ?, ?, 200, 'within_policy', ?)",
                (idempotency_key, spec.round_id, sealed.pseudonym, digest, _iso(now)),
            )
            self._conn.execute(
                "UPDATE rounds SET partial = ?, count = ? WHERE round_id = ?",
                (partial.to_bytes(), partial.count, spec.round_id),
            )
            inputs = {"idempotency_key": idempotency_key, "body_sha256": digest}
            self._log.append(self._engine.accept_delta(inputs=inputs))
            if partial.count >= spec.min_cohort:
                self._close(spec, partial, now)
        return 200, "within_policy"

    def _prior(self, idempotency_key: str, digest: str) -> tuple[int, str] | None:
        row = self._conn.execute(
            "SELECT body_sha256, status, code FROM contributions WHERE idempotency_key = ?",
            (idempotency_key,),
        ).fetchone()
        if row is None:
            return None
        if row[0] != digest:
            # Not recorded: the key stays bound to its first body.
            inputs = {"idempotency_key": idempotency_key, "body_sha256": digest}
            with write_transaction(self._conn, name="accept_conflict"):
                self._log.append(self._engine.accept_delta(inputs=inputs, refusal="malformed"))
            return 409, "malformed"
        return int(row[1]), str(row[2])

    def _precheck(self, body: bytes, idempotency_key: str) -> tuple[SealedDelta, RoundSpec]:
        """The envelope checks before decryption; raises ``_Refusal``."""
        if not _IDEMPOTENCY_KEY.match(idempotency_key):
            raise _Refusal("malformed")
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
        info = self.round(sealed.round_id)
        if info is None or info.state != "open" or self._clock() >= info.spec.deadline:
            raise _Refusal("round_closed", **refuse)
        self._check_duplicate(sealed.round_id, sealed.pseudonym)
        return sealed, info.spec

    def _check_duplicate(self, round_id: str, pseudonym: str) -> None:
        taken = self._conn.execute(
            "SELECT 1 FROM contributions WHERE round_id = ? AND pseudonym = ? AND status = 200",
            (round_id, pseudonym),
        ).fetchone()
        if taken is not None:
            raise _Refusal("duplicate_contribution", round_id=round_id, pseudonym=pseudonym)

    def _open_partial(self, spec: RoundSpec, pseudonym: str, now: datetime) -> PartialSum:
        """The round's running sum, if it still takes this pseudonym (inside the write)."""
        row = self._conn.execute(
            "SELECT state, partial FROM rounds WHERE round_id = ?", (spec.round_id,)
        ).fetchone()
        if row is None or row[0] != "open" or now >= spec.deadline:
            raise _Refusal("round_closed", round_id=spec.round_id, pseudonym=pseudonym)
        self._check_duplicate(spec.round_id, pseudonym)
        return PartialSum.from_bytes(row[1])

    def _refuse(self, idempotency_key: str, digest: str, refusal: _Refusal) -> tuple[int, str]:
        status = STATUS[refusal.code]
        inputs = {"idempotency_key": idempotency_key, "body_sha256": digest}
        with write_transaction(self._conn, name="refuse"):
            if _IDEMPOTENCY_KEY.match(idempotency_key):
                # Kept so a retry of the same upload gets the same answer.
                self._conn.execute(
                    "INSERT OR IGNORE INTO contributions (idempotency_key, round_id, pseudonym,"
                    " body_sha256, status, code, at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        idempotency_key,
                        refusal.round_id,
                        refusal.pseudonym,
                        digest,
                        status,
                        refusal.code,
                        _iso(self._clock()),
                    ),
                )
            self._log.append(self._engine.accept_delta(inputs=inputs, refusal=refusal.code))
        return status, refusal.code

    # -- closing -----------------------------------------------------------------------------

    def _close(self, spec: RoundSpec, partial: PartialSum, now: datetime) -> None:
        """Publish the round (inside the caller's write transaction)."""
        mean = partial.mean()
        if spec.mode is PrivacyMode.CENTRAL:
            # cohort = min_cohort, fixed by the spec, and count == min_cohort here: the
            # fixed-denominator estimator that central_noise's sensitivity assumes.
            update = central_noise(
                mean,
                clipping_norm=spec.clipping_norm,
                noise_multiplier=spec.noise_multiplier,
                cohort=spec.min_cohort,
                rng=self._rng,
            )
        else:
            update = mean  # local mode: every device already added all of the noise
        inputs = {"round_id": spec.round_id, "version": spec.model_version + 1}
        try:
            epsilon = self._ledger.record_round(
                spec.round_id,
                spec.noise_multiplier,
                spec.sampling_rate,
                period_start=spec.period_start,
                at=now,
            )
        except BudgetExceeded as error:
            # The policy changed under an open round: it must not be published.
            self._end(spec.round_id, "abandoned", now)
            self._log.append(
                self._engine.decide(
                    Action.PUBLISH_RELEASE,
                    "budget_exhausted",
                    inputs=inputs,
                    metrics={"cohort": partial.count},
                    budget=error.budget,
                )
            )
            self._log.checkpoint()
            return
        latest = self.latest_release()
        previous = self._base if latest is None else latest.weights_array().astype(np.float64)
        release = sign_release(
            model_id=self._model_id,
            version=spec.model_version + 1,
            weights=previous + update,
            created=now,
            signing_key=self._signing_key,
            kid=self._kid,
        )
        self._conn.execute(
            "INSERT INTO releases (version, model_id, body, created) VALUES (?, ?, ?, ?)",
            (release.version, release.model_id, release.to_wire().decode(), _iso(now)),
        )
        self._end(spec.round_id, "published", now)
        self._log.append(
            self._engine.publish_release(inputs=inputs, cohort=partial.count, epsilon_spent=epsilon)
        )
        self._log.checkpoint()

    def _end(self, round_id: str, state: str, now: datetime) -> None:
        self._conn.execute(
            "UPDATE rounds SET state = ?, partial = NULL, closed_at = ? WHERE round_id = ?",
            (state, _iso(now), round_id),
        )

    # -- retention ---------------------------------------------------------------------------

    def sweep(self, now: datetime | None = None) -> list[str]:
        """Abandon expired rounds and purge what retention bounds; returns the abandoned ids.

        Contribution rows (pseudonyms, answers) go after the ``aggregator_deltas`` retention,
        except those of a still-open round, which its once-per-round check needs. Decision
        log entries are pruned after the ``audit_log`` retention, not the deltas': the
        decisions are the audit trail and hold no personal data.
        """
        now = self._clock() if now is None else now
        retention = self._region.retention
        with write_transaction(self._conn, name="sweep"):
            abandoned = self._abandon_expired(now)
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
            if abandoned or any(deleted.values()):
                self._log.checkpoint()
        return abandoned

    def _abandon_expired(self, now: datetime) -> list[str]:
        """Abandon the open rounds whose deadline has passed (inside the caller's write)."""
        abandoned: list[str] = []
        rows = self._conn.execute(
            "SELECT round_id, spec, count FROM rounds WHERE state = 'open'"
        ).fetchall()
        for round_id, spec_json, count in rows:
            spec = SignedRoundSpec.from_wire(spec_json).spec
            if now < spec.deadline:
                continue
            self._end(round_id, "abandoned", now)
            decision = self._engine.publish_release(
                inputs={"round_id": round_id},
                cohort=int(count),
                epsilon_spent=self._ledger.spent(spec.period_start),
            )
            self._log.append(decision)
            abandoned.append(round_id)
        return abandoned

    # -- keys --------------------------------------------------------------------------------

    def _matching_kid(self) -> str:
        """The policy's kid for our signing key; both keys must be the region's published ones."""
        raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
        signing = b64encode(self._signing_key.public_key().public_bytes(*raw))
        hpke = b64encode(self._hpke_key.public_key().public_bytes(*raw))
        keys = self._region.aggregator.public_keys
        if not any(k.use == "hpke" and k.key == hpke for k in keys):
            raise ValueError(f"the HPKE key is not one of region {self._region.id}'s keys")
        for key in keys:
            if key.use == "signing" and key.key == signing:
                return key.kid
        raise ValueError(f"the signing key is not one of region {self._region.id}'s keys")


def _iso(value: datetime) -> str:
    # One fixed-width UTC spelling, so text order is time order (as in the ledger).
    return value.astimezone(UTC).isoformat(timespec="microseconds")
