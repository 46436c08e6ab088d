"""One region's aggregator: a façade over the parts that share its database connection.

Data flow step 6, read top to bottom: :class:`RegionAggregator` builds one
:class:`~._round_state.RegionContext` (the connection, the region's policy, its
:class:`~._signer.RegionSigner`, the decision engine and log, the privacy ledger, the clock) and
composes three parts over it:

- :class:`~._round_state.RoundTables`: the rounds, running sums and releases tables;
- :class:`~._rounds.Rounds`: enrollment, opening a round under the budget, publishing it,
  sweeping the rounds whose deadline passed and what retention bounds;
- :class:`~._uploads.Uploads`: a verdict for every upload and erasure, in groups of one durable
  transaction each.

Each public method below hands its call to one of them. The region's private keys are held by
the signer alone: nothing here returns them. The HTTP service (:mod:`._app`) is a thin layer
over this class.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TypeVar

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sottovoce._database import Connection, backend_of
from sottovoce._errors import SottovoceError
from sottovoce._sqlite import write_transaction
from sottovoce.aggregator._ledger import PrivacyLedger
from sottovoce.aggregator._round_state import (
    RegionContext,
    RoundInfo,
    RoundTables,
    Verdict,
    _utc_now,
)
from sottovoce.aggregator._rounds import Rounds
from sottovoce.aggregator._schema import migrate
from sottovoce.aggregator._signer import RegionSigner
from sottovoce.aggregator._upload_group import Upload
from sottovoce.aggregator._uploads import Uploads
from sottovoce.policy import DecisionEngine, DecisionLog, Policy
from sottovoce.sync import ModelRelease, SealedDelta, SignedRoundSpec
from sottovoce.sync._budget import Mechanism

__all__ = ["RegionAggregator"]

T = TypeVar("T")


class RegionAggregator:
    """Rounds, uploads and releases of one region, stored in ``conn``'s database (an SQLite
    connection, or :func:`~._postgres.open_database`'s PostgreSQL one).

    ``base_weights`` are the model's weights before any release (version 0). A release is the
    previous release plus the round's noised mean (``accumulate``, for models trained by
    deltas), or the round's noised mean alone (``accumulate=False``: a model whose rounds release
    statistics, such as the collaborative model's counts and factor sums). Central noise is
    the exact discrete Gaussian from the OS CSPRNG; ``rng``, a seeded generator, replaces it
    with a seeded stand-in for simulations and tests only (see :mod:`sottovoce.sync._noise`).
    The signing and HPKE keys must be the region's keys in ``policy``, since devices check and
    seal against those. Opening migrates the database's schema (:mod:`._schema`) and logs the
    policy if it is new to the region.
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
        the_region = policy.region(region)
        base = np.zeros(dim) if base_weights is None else np.asarray(base_weights, np.float64)
        if base.shape != (dim,) or not np.all(np.isfinite(base)):
            raise ValueError(f"base_weights must be {dim} finite numbers")
        signer = RegionSigner(the_region, signing_key=signing_key, hpke_key=hpke_key)
        engine = DecisionEngine(policy, region, digest_key=signer.digest_key(), clock=clock)
        if backend_of(conn) == "sqlite":
            # Running sums and pseudonyms that are deleted must not linger in free pages.
            conn.execute("PRAGMA secure_delete=ON")
        migrate(conn)
        origin = f"sottovoce.aggregator/{region}"
        checkpoints = signer.checkpoint_signer(origin)
        with write_transaction(conn, name="open_region"):
            if DecisionLog.exists(conn):
                log = DecisionLog(conn, signer=checkpoints)
            else:
                log = DecisionLog.create(conn, origin=origin, signer=checkpoints, keep_key=False)
            _follow(conn, policy, engine, log)
        self._ctx = RegionContext(
            conn=conn, region=the_region, signer=signer, engine=engine, log=log,
            ledger=PrivacyLedger(conn, region=the_region), clock=clock, model_id=model_id,
            dim=dim, base=base, accumulate=accumulate,
            # This process's name for its running sums (round_partials, see ._schema).
            worker=secrets.token_hex(8), rng=rng,
        )  # fmt: skip
        self._tables = RoundTables(self._ctx)
        self._rounds = Rounds(self._ctx, self._tables)
        self._uploads = Uploads(self._ctx, self._tables, self._rounds)

    def close(self) -> None:
        """Close the database connection (the aggregator is unusable after)."""
        self._ctx.conn.close()

    @property
    def log(self) -> DecisionLog:
        return self._ctx.log

    @property
    def ledger(self) -> PrivacyLedger:
        return self._ctx.ledger

    # -- enrollment --------------------------------------------------------------------------

    def enroll(self, device_key_b64: str, period: str, *, record: bool = True) -> None:
        self._rounds.enroll(device_key_b64, period, record=record)

    def refuse_enrollment(self, code: str) -> None:
        self._rounds.refuse_enrollment(code)

    def enrollable_periods(self) -> tuple[str, str, str]:
        return self._rounds.enrollable_periods()

    # -- rounds and releases -----------------------------------------------------------------

    def open_round(
        self,
        *,
        deadline: datetime,
        noise_multiplier: float | None = None,
        sampling_rate: float | None = None,
    ) -> SignedRoundSpec:
        return self._rounds.open_round(deadline=deadline, noise_multiplier=noise_multiplier,
                                       sampling_rate=sampling_rate)  # fmt: skip

    def round_mechanism(self, noise_multiplier: float | None = None) -> Mechanism:
        return self._rounds.round_mechanism(noise_multiplier)

    def sweep(self, now: datetime | None = None) -> list[str]:
        return self._rounds.sweep(now)

    def current_round(self) -> SignedRoundSpec | None:
        return self._tables.current_round()

    def round(self, round_id: str) -> RoundInfo | None:
        return self._tables.round(round_id)

    def latest_version(self) -> int:
        return self._tables.latest_version()

    def latest_release(self) -> ModelRelease | None:
        return self._tables.latest_release()

    # -- uploads and erasures ----------------------------------------------------------------

    def accept(self, body: bytes, idempotency_key: str, *, record: bool = True) -> Verdict:
        return self._uploads.accept(body, idempotency_key, record=record)

    def accept_many(
        self, uploads: Sequence[Upload], *, parsed: Sequence[SealedDelta | None] = ()
    ) -> list[Verdict | Exception]:
        return self._uploads.accept_many(uploads, parsed=parsed)

    def erase(self, body: bytes, *, record: bool = True) -> Verdict:
        return self._uploads.erase(body, record=record)

    def refuse(
        self, body: bytes, idempotency_key: str, code: str, *, record: bool = True
    ) -> Verdict:
        return self._uploads.refuse(body, idempotency_key, code, record=record)

    def refuse_too_large(
        self, idempotency_key: str, size: int | None, *, record: bool = True
    ) -> Verdict:
        return self._uploads.refuse_too_large(idempotency_key, size, record=record)

    def log_refusal_counts(self, counts: Mapping[tuple[str, str], int]) -> int:
        return self._uploads.log_refusal_counts(counts)

    # -- group commit of other writes --------------------------------------------------------

    def write_many(self, calls: Sequence[Callable[[RegionAggregator], T]]) -> list[T | Exception]:
        """Run write calls (such as :meth:`enroll`) in ONE durable transaction, each in its own
        savepoint; returns each one's result, or the exception it raised (its writes rolled
        back, the others' kept: a call that must keep a refusal's logged decision, as
        :meth:`enroll`'s caller does, catches the refusal and returns it). If the commit
        fails, this raises and none of them counts."""
        results: list[T | Exception] = []
        conn = self._ctx.conn
        with write_transaction(conn, name="writes"):
            for call in calls:
                try:
                    with write_transaction(conn, name="write"):
                        results.append(call(self))
                except (SottovoceError, ValueError) as error:
                    if not conn.in_transaction:  # the database ended the whole group
                        raise
                    results.append(error)
        return results


def _follow(conn: Connection, policy: Policy, engine: DecisionEngine, log: DecisionLog) -> None:
    """Record which policy the region now enforces: a first policy, or a change, is an
    ``apply_policy`` decision, signed at once (inside the caller's transaction)."""
    row = conn.execute("SELECT value FROM service_meta WHERE key = 'policy_hash'")
    previous = (row.fetchone() or (None,))[0]
    if previous == policy.hash:
        return
    conn.execute(
        "INSERT INTO service_meta (key, value) VALUES ('policy_hash', ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (policy.hash,),
    )
    inputs = {"policy": policy.hash, "previous": previous}
    log.append(engine.apply_policy(previous=previous, inputs=inputs))
    log.checkpoint()
