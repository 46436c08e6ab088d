"""An upload on its way to a verdict, and a group of them sharing one transaction.

The statements an upload's checks read (:data:`UNDER_LOCK`: everything an accepted upload
checks again under the write lock, in one round trip) and :func:`prior_verdict`, what a key's
stored row answers, are here too.

:class:`Pending` is an upload once everything that needs no write is done (parsed, checked,
opened, or answered from what is stored); :class:`Group` is this worker's running sums while a
group of uploads is decided in one durable transaction (group commit, see
:meth:`._uploads.Uploads.accept_many`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from sottovoce.aggregator._partial_sum import PartialSum
from sottovoce.aggregator._round_state import RoundTables, Verdict, _Refusal
from sottovoce.sync import OpenedDelta, RoundSpec, SealedDelta

__all__ = [
    "TAKEN_BY_KEY",
    "TAKEN_BY_PSEUDONYM",
    "UNDER_LOCK",
    "Group",
    "Pending",
    "Upload",
    "prior_verdict",
]

Upload = tuple[bytes, str, bool]  # (sealed delta as uploaded, idempotency key, record)


@dataclass(frozen=True)
class Pending:
    """An upload once everything that needs no write is done (see ``accept_many``)."""

    key: str
    digest: str
    record: bool
    answer: Verdict | None = None  # the whole answer: nothing to write
    refusal: _Refusal | None = None  # a refusal to store and log
    key_taken: bool = False  # other content under an accepted key: log the refusal
    sealed: SealedDelta | None = None
    spec: RoundSpec | None = None
    delta: npt.NDArray[np.floating[Any]] | None = None

    def answered(self, verdict: Verdict) -> Pending:
        return replace(self, answer=verdict)

    def refused(
        self, code: str, *, refusal: _Refusal | None = None, key_taken: bool = False
    ) -> Pending:
        if not self.record:  # answered, neither stored nor logged one by one
            return replace(self, answer=Verdict(code, key_taken=key_taken))
        return replace(self, refusal=refusal, key_taken=key_taken)

    def opened(self, sealed: SealedDelta, spec: RoundSpec, opened: OpenedDelta) -> Pending:
        return replace(self, sealed=sealed, spec=spec, delta=opened.delta)


class Group:
    """This worker's running sums during one group's transaction: each round's is read once,
    kept in memory while the group's uploads are added, and written once (``store``) before
    the commit. A failed upload leaves it as it was (``update`` comes after its writes)."""

    def __init__(self, tables: RoundTables, worker: str) -> None:
        self._tables = tables
        self._worker = worker
        self._sums: dict[str, PartialSum] = {}
        self._dirty: set[str] = set()

    def partial(self, round_id: str) -> PartialSum:
        if round_id not in self._sums:
            self._sums[round_id] = self._tables.partial_of(round_id, self._worker)
        return self._sums[round_id]

    def update(self, round_id: str, partial: PartialSum) -> None:
        self._sums[round_id] = partial
        self._dirty.add(round_id)

    def closed(self, round_id: str) -> None:
        self._sums.pop(round_id, None)
        self._dirty.discard(round_id)

    def store(self) -> None:
        for round_id in sorted(self._dirty):
            self._tables.store_partial(round_id, self._worker, self._sums[round_id])


# Once per round by pseudonym and by enrolled key: a device that changed its secret still has
# one enrolled key, so it still contributes once. Two lookups, each on its own partial unique
# index (an OR would scan the round).
TAKEN_BY_PSEUDONYM: Final = (
    "EXISTS (SELECT 1 FROM contributions WHERE round_id = ? AND pseudonym = ? AND status = 200)"
)
TAKEN_BY_KEY: Final = (
    "EXISTS (SELECT 1 FROM contributions WHERE round_id = ? AND device_key = ?"
    " AND status = 200 AND device_key IS NOT NULL)"
)
# What an accepted upload checks again under the write lock: what its idempotency key has
# stored, whether its round is still open, and whether the device already contributed.
UNDER_LOCK: Final = (
    "SELECT (SELECT body_sha256 FROM contributions WHERE idempotency_key = ?),"
    " (SELECT code FROM contributions WHERE idempotency_key = ?),"
    f" (SELECT state FROM rounds WHERE round_id = ?), {TAKEN_BY_PSEUDONYM}, {TAKEN_BY_KEY}"
)


def prior_verdict(stored_sha256: str | None, code: str | None, digest: str) -> Verdict | None:
    """What a key's stored row (its body's digest and code, ``None`` for no row) answers an
    upload of ``digest``: the stored answer to the same body, a refusal for other content under
    a key that was accepted (``key_taken``), or ``None``: decide (see the module docstring)."""
    if stored_sha256 is None or code is None:
        return None
    if str(stored_sha256) == digest:
        return Verdict(str(code))
    if code not in ("within_policy", "erased"):
        return None  # only refused so far: this other body is decided on its merits
    # Not stored: the key stays bound to the content it accepted.
    return Verdict("malformed", key_taken=True)
