"""What every part of :class:`~sottovoce.aggregator.RegionAggregator` shares: its database
tables (:mod:`._schema`), keys, decision engine and log, and the read side of rounds and releases.

The aggregator is assembled from parts (like the device's ``EventStore``): this base,
:mod:`._uploads` (deciding on uploads and erasures) and :mod:`._rounds` (enrollment, opening,
closing and sweeping rounds).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sottovoce._database import Connection, backend_of
from sottovoce._sqlite import write_transaction
from sottovoce.aggregator._errors import AggregatorError
from sottovoce.aggregator._ledger import PrivacyLedger
from sottovoce.aggregator._partial_sum import AggregationError, PartialSum
from sottovoce.aggregator._schema import migrate
from sottovoce.policy import (
    CheckpointSigner,
    DecisionEngine,
    DecisionLog,
    Policy,
)
from sottovoce.policy._reasons import reason
from sottovoce.sync import (
    ModelRelease,
    RoundSpec,
    SignedRoundSpec,
)
from sottovoce.sync._wire import b64encode

_IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_PERIOD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,31}$")
_DIGEST_TAG: Final = b"sottovoce/aggregator/decision-digest/v1"


class RoundStillOpen(AggregatorError):
    """A round cannot open while another is open: each round trains the latest release."""

    code = "round_open"


@dataclass(frozen=True)
class Verdict:
    """The aggregator's answer to one upload or erasure, as a domain value (no HTTP here: the
    service maps it, see :func:`sottovoce.aggregator._edge.status_of`).

    ``code`` is a reason code of the registry (``sottovoce.policy._reasons``); ``added``: this
    call put the delta into its round's running sum (a replay of an accepted upload is not
    added again); ``release``: the model release this call published, when the delta completed
    a local-mode round; ``key_taken``: refused because its idempotency key already accepted
    other content.
    """

    code: str
    added: bool = False
    release: ModelRelease | None = None
    key_taken: bool = False

    @property
    def accepted(self) -> bool:
        """Whether the answer is an allow (a delta counted, or taken back on request)."""
        return reason(self.code).outcome == "allow"


def stored_status(code: str) -> int:
    """The ``status`` column of a stored answer (the ``contributions`` table keeps each
    answer's HTTP status, as its files always have; ``status = 200`` marks an accepted delta
    in its indexes), from the registry of reason codes."""
    status = reason(code).status
    if status is None:
        raise ValueError(f"{code!r} is not an answer to an upload")
    return status


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


class RoundsBase:
    """Rounds, uploads and releases of one region, stored in ``conn``'s database.

    ``base_weights`` are the model's weights before any release (version 0). A release is the
    previous release plus the round's noised mean (``accumulate``, for models trained by
    deltas), or the round's noised mean alone (``accumulate=False``: a model whose rounds release
    statistics, such as the collaborative model's counts and factor sums). Central noise is
    the exact discrete Gaussian from the OS CSPRNG; ``rng``, a seeded generator, replaces it
    with a seeded stand-in for simulations and tests only (see :mod:`sottovoce.sync._noise`).
    The signing and HPKE keys must be the region's keys in ``policy``, since devices check and
    seal against those.
    """

    def __init__(
        self,
        conn: Connection,
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
        accumulate: bool = True,
    ) -> None:
        self._conn = conn
        self._accumulate = accumulate
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
        self._rng = rng  # None: deployment noise (OS CSPRNG, discrete Gaussian)
        self._kid = self._matching_kid()
        raw = signing_key.private_bytes_raw()
        digest_key = hmac.new(raw, _DIGEST_TAG, hashlib.sha256).digest()
        self._engine = DecisionEngine(policy, region, digest_key=digest_key, clock=clock)
        origin = f"sottovoce.aggregator/{region}"
        signer = CheckpointSigner.from_private_bytes(origin, raw)
        if backend_of(conn) == "sqlite":
            # Running sums and pseudonyms that are deleted must not linger in free pages.
            conn.execute("PRAGMA secure_delete=ON")
        # This process's running sums (see ._schema, round_partials): its own name per process.
        self._worker = secrets.token_hex(8)
        migrate(conn)
        with write_transaction(conn, name="rounds_schema"):
            if DecisionLog.exists(conn):
                self._log = DecisionLog(conn, signer=signer)
            else:
                self._log = DecisionLog.create(conn, origin=origin, signer=signer, keep_key=False)
            self._follow(policy)
        self._ledger = PrivacyLedger(conn, region=self._region)

    def _follow(self, policy: Policy) -> None:
        """Record which policy the region now enforces: a first policy, or a change, is an
        ``apply_policy`` decision, signed at once (inside the caller's transaction)."""
        row = self._conn.execute("SELECT value FROM service_meta WHERE key = 'policy_hash'")
        previous = (row.fetchone() or (None,))[0]
        if previous == policy.hash:
            return
        self._conn.execute(
            "INSERT INTO service_meta (key, value) VALUES ('policy_hash', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (policy.hash,),
        )
        inputs = {"policy": policy.hash, "previous": previous}
        self._log.append(self._engine.apply_policy(previous=previous, inputs=inputs))
        self._log.checkpoint()

    def close(self) -> None:
        """Close the database connection (the aggregator is unusable after)."""
        self._conn.close()

    @property
    def log(self) -> DecisionLog:
        return self._log

    @property
    def ledger(self) -> PrivacyLedger:
        return self._ledger

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

    def latest_version(self) -> int:
        """The newest release's version (0 before the first), without reading its weights."""
        row = self._conn.execute("SELECT max(version) FROM releases").fetchone()
        return 0 if row[0] is None else int(row[0])

    def latest_release(self) -> ModelRelease | None:
        row = self._conn.execute(
            "SELECT body FROM releases ORDER BY version DESC LIMIT 1"
        ).fetchone()
        return None if row is None else ModelRelease.from_wire(row[0])

    def _end(self, round_id: str, state: str, now: datetime) -> None:
        self._conn.execute(
            "UPDATE rounds SET state = ?, partial = NULL, closed_at = ? WHERE round_id = ?",
            (state, _iso(now), round_id),
        )
        self._conn.execute("DELETE FROM round_partials WHERE round_id = ?", (round_id,))

    # -- running sums: one per round and worker process (see ._schema) -----------------------

    def _partial_of(self, round_id: str, worker: str) -> PartialSum:
        """One worker's running sum of a round (empty before its first delta)."""
        row = self._conn.execute(
            "SELECT partial FROM round_partials WHERE round_id = ? AND worker = ?",
            (round_id, worker),
        ).fetchone()
        return PartialSum.empty(self._dim) if row is None else PartialSum.from_bytes(row[0])

    def _store_partial(self, round_id: str, worker: str, partial: PartialSum) -> None:
        self._conn.execute(
            "INSERT INTO round_partials (round_id, worker, partial, count) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (round_id, worker) DO UPDATE SET partial = excluded.partial,"
            " count = excluded.count",
            (round_id, worker, partial.to_bytes(), partial.count),
        )

    def _round_sum(self, round_id: str, *, own: PartialSum | None = None) -> PartialSum:
        """The round's running sum: every worker's, merged (each checksum checked by
        ``PartialSum.from_bytes``); ``own`` stands for this worker's stored one."""
        total = PartialSum.empty(self._dim) if own is None else own
        rows = self._conn.execute(
            "SELECT worker, partial, count FROM round_partials WHERE round_id = ? ORDER BY worker",
            (round_id,),
        ).fetchall()
        for worker, blob, count in rows:
            if own is not None and worker == self._worker:
                continue
            part = PartialSum.from_bytes(blob)
            if part.count != int(count):
                raise AggregationError(f"round {round_id}: worker {worker}'s stored count does "
                                       "not match its running sum")  # fmt: skip
            total = total.merge(part)
        return total

    def _close(self, spec: RoundSpec, partial: PartialSum, now: datetime) -> ModelRelease | None:
        raise NotImplementedError  # RegionAggregator publishes

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
