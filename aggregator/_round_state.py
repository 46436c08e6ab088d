"""What the parts of :class:`~sottovoce.aggregator.RegionAggregator` share: the values its
answers are made of (:class:`Verdict`, :class:`RoundInfo`), the :class:`RegionContext` every part
is given (one connection, the decision engine and log, the ledger, the clock, the region's
signer), and :class:`RoundTables`, every read and write of the rounds, running sums and
releases tables (:mod:`._schema`).

The aggregator is composed, not inherited: :mod:`._aggregator` builds one context and hands it
to :class:`RoundTables`, :class:`~._rounds.Rounds` (enrollment, opening, publishing, sweeping)
and :class:`~._uploads.Uploads` (deciding on uploads and erasures).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt

from sottovoce._database import Connection
from sottovoce.aggregator._errors import AggregatorError
from sottovoce.aggregator._ledger import PrivacyLedger
from sottovoce.aggregator._partial_sum import AggregationError, PartialSum
from sottovoce.aggregator._signer import RegionSigner
from sottovoce.policy import DecisionEngine, DecisionLog, Region
from sottovoce.policy._reasons import reason
from sottovoce.sync import ModelRelease, RoundSpec, SignedRoundSpec

_IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


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


@functools.lru_cache(maxsize=64)
def stored_spec(text: str) -> SignedRoundSpec:
    """A round's stored signed spec, parsed once per process: a round's row is written once,
    with the spec it was opened with, and a parsed spec is frozen, so every upload and spec
    fetch of a round shares one parse (the text is the key: another text is parsed anew)."""
    return SignedRoundSpec.from_wire(text)


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


@dataclass(frozen=True)
class RegionContext:
    """What every part of one region's aggregator is given (built by :mod:`._aggregator`).

    ``worker``: this process's name for its running sums (``round_partials``); ``base``: the
    model's weights before any release; ``accumulate``: a release is the previous one plus
    the round's noised mean (else the noised mean alone: a model whose rounds release
    statistics); ``rng``: ``None`` for deployment noise (the OS CSPRNG's discrete Gaussian),
    a seeded generator for simulations and tests only.
    """

    conn: Connection
    region: Region
    signer: RegionSigner
    engine: DecisionEngine
    log: DecisionLog
    ledger: PrivacyLedger
    clock: Callable[[], datetime]
    model_id: str
    dim: int
    base: npt.NDArray[np.float64]
    accumulate: bool
    worker: str
    rng: np.random.Generator | None


class RoundTables:
    """Rounds, running sums and releases as the database holds them (no decisions here)."""

    def __init__(self, ctx: RegionContext) -> None:
        self._conn = ctx.conn
        self._dim = ctx.dim
        self._worker = ctx.worker

    def current_round(self) -> SignedRoundSpec | None:
        """The open round's signed spec, if a round is open."""
        row = self._conn.execute("SELECT spec FROM rounds WHERE state = 'open'").fetchone()
        return None if row is None else stored_spec(row[0])

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
            signed_spec=stored_spec(spec),
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

    def end(self, round_id: str, state: str, now: datetime) -> None:
        """Mark a round ended and delete its running sums (inside the caller's write)."""
        self._conn.execute(
            "UPDATE rounds SET state = ?, partial = NULL, closed_at = ? WHERE round_id = ?",
            (state, _iso(now), round_id),
        )
        self._conn.execute("DELETE FROM round_partials WHERE round_id = ?", (round_id,))

    # -- running sums: one per round and worker process (see ._schema) -----------------------

    def partial_of(self, round_id: str, worker: str) -> PartialSum:
        """One worker's running sum of a round (empty before its first delta)."""
        row = self._conn.execute(
            "SELECT partial FROM round_partials WHERE round_id = ? AND worker = ?",
            (round_id, worker),
        ).fetchone()
        return PartialSum.empty(self._dim) if row is None else PartialSum.from_bytes(row[0])

    def store_partial(self, round_id: str, worker: str, partial: PartialSum) -> None:
        self._conn.execute(
            "INSERT INTO round_partials (round_id, worker, partial, count) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (round_id, worker) DO UPDATE SET partial = excluded.partial,"
            " count = excluded.count",
            (round_id, worker, partial.to_bytes(), partial.count),
        )

    def round_sum(self, round_id: str, *, own: PartialSum | None = None) -> PartialSum:
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


def _iso(value: datetime) -> str:
    # One fixed-width UTC spelling, so text order is time order (as in the ledger).
    return value.astimezone(UTC).isoformat(timespec="microseconds")
