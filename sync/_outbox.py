"""The outbox's states and the uploader's decisions, as pure code (no I/O).

Data flow position: a local round's sealed delta is written to the device's outbox in the same
transaction that records the round (the device store implements :class:`Outbox`); the
transport (:mod:`.transport`) takes what is due, sends it with its idempotency key, and turns
each response into an :data:`AttemptOutcome` with :func:`decide`. The states only move forward:

    pending ──send──▶ pending (attempts + 1, next attempt later) ──ack──▶ acknowledged
        └──────────────── round closed / deadline passed / refused ────▶ dropped

An acknowledged delta is never sent again; a dropped one never at all. Because the key is the
same on every attempt, a delta the aggregator received but whose acknowledgement was lost is
acknowledged again (the aggregator answers a repeated key with its first answer), not counted
twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Protocol

from sottovoce.policy._reasons import REASON_CODES


class DeltaState(StrEnum):
    """Where a sealed delta is in the outbox (the diagram above): it only moves forward."""

    PENDING = "pending"
    ACKNOWLEDGED = "acknowledged"
    DROPPED = "dropped"


@dataclass(frozen=True)
class OutboxItem:
    """One sealed delta waiting in the outbox."""

    idempotency_key: str
    region: str
    round_id: str
    deadline: datetime
    body: bytes  # SealedDelta.to_wire()
    attempts: int = 0


class Outbox(Protocol):
    """What the uploader needs from wherever the outbox is kept (the device store)."""

    def due(self, *, now: datetime, limit: int = 100) -> list[OutboxItem]:
        """Pending items whose next attempt is due, oldest first."""
        ...

    def attempted(self, key: str, *, now: datetime, retry_at: datetime) -> None:
        """Record a failed attempt; try again no earlier than ``retry_at``."""
        ...

    def acknowledge(self, key: str, *, now: datetime) -> None: ...

    def drop(self, key: str, *, reason: str, now: datetime) -> None: ...


@dataclass(frozen=True)
class Acknowledged:
    pass


@dataclass(frozen=True)
class RetryAt:
    at: datetime


@dataclass(frozen=True)
class Drop:
    reason: str  # a stable code: round_closed, deadline_passed, or the aggregator's refusal


AttemptOutcome = Acknowledged | RetryAt | Drop
"""What :func:`decide` makes of one upload attempt: done, try again at a time, or drop it."""

# Refusals that no retry can fix: the delta is dropped (with the aggregator's reason code).
# The registry of reason codes says which they are (its ``final`` column).
FINAL_REFUSALS = frozenset(r.code for r in REASON_CODES if r.final)
MAX_BACKOFF = timedelta(hours=6)


def backoff(attempts: int, *, base: timedelta = timedelta(seconds=30)) -> timedelta:
    """How long to wait after ``attempts`` failed attempts (exponential, capped)."""
    wait: timedelta = base * (2 ** min(attempts, 20))
    return min(wait, MAX_BACKOFF)


def decide(
    item: OutboxItem,
    *,
    now: datetime,
    status: int | None,
    code: str | None = None,
    retry_after: timedelta | None = None,
) -> AttemptOutcome:
    """What to do after an attempt: ``status`` is the HTTP status (``None``: no response)."""
    if status is not None and 200 <= status < 300:
        return Acknowledged()
    if code in FINAL_REFUSALS or status in (404, 410):
        return Drop(code or "round_closed")
    if now >= item.deadline:
        return Drop("deadline_passed")
    wait = retry_after if retry_after is not None else backoff(item.attempts)
    return RetryAt(min(now + wait, item.deadline))
