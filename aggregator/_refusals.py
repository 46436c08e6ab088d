"""How many refusals the service logs one by one, and the count of the rest (pure, no I/O).

Every answer the aggregator gives is a decision in its tamper-evident log, and a refusal costs
its sender nothing: without a bound, anyone who can reach the service could grow the log (and
the aggregator's file) by one entry per junk request. :class:`RefusalBudget` bounds it with two
token buckets: each source (the client's address) may have ``per_source`` refusals logged one
by one, refilled at ``per_source_per_minute``, and all sources together ``total``, refilled at
``total_per_minute``. A refusal beyond either bucket is answered exactly as before (same status,
same code) but only counted; the service writes the counts as one decision per action and
reason, with ``metrics["refusals"]`` (:meth:`RegionAggregator.log_refusal_counts`), at every
schedule tick and when it stops. So the log grows by at most ``total`` entries plus
``total_per_minute`` a minute plus one entry per reason and tick, whatever is sent, and every
refusal is still accounted for in a verifiable entry.

Accepted uploads and enrollments never spend from the buckets. Sources are remembered in a
bounded table (``max_sources``, least recently refused dropped first): a forgotten source
starts again with a full bucket, which the total bucket still bounds.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Final

__all__ = ["RefusalBudget", "RefusalLimit", "RefusalTally"]

_MINUTE: Final = 60.0


@dataclass(frozen=True)
class RefusalLimit:
    """How many refusals are logged one by one (see the module docstring)."""

    per_source: int = 20
    per_source_per_minute: float = 6.0
    total: int = 200
    total_per_minute: float = 60.0
    max_sources: int = 10_000

    def __post_init__(self) -> None:
        if not (self.per_source >= 1 and self.total >= 1 and self.max_sources >= 1):
            raise ValueError("refusal buckets hold at least one refusal and one source")
        if not (self.per_source_per_minute >= 0 and self.total_per_minute >= 0):
            raise ValueError("refusal refill rates are not negative")


@dataclass
class _Bucket:
    level: float
    at: float  # monotonic seconds of the last refill

    def refill(self, now: float, capacity: int, per_minute: float) -> None:
        elapsed = max(0.0, now - self.at)
        self.level = min(float(capacity), self.level + elapsed * per_minute / _MINUTE)
        self.at = now


class RefusalBudget:
    """The buckets of a :class:`RefusalLimit`; ``now`` is monotonic seconds, given by the caller."""

    def __init__(self, limit: RefusalLimit, *, now: float) -> None:
        self.limit = limit
        self._total = _Bucket(float(limit.total), now)
        self._sources: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, source: str, *, now: float) -> bool:
        """Whether a refusal from ``source`` now is logged on its own; if so it is spent from
        both buckets (give it back with :meth:`give_back` if the request was not refused)."""
        limit = self.limit
        bucket = self._sources.pop(source, None) or _Bucket(float(limit.per_source), now)
        self._sources[source] = bucket  # most recently seen last
        while len(self._sources) > limit.max_sources:
            self._sources.popitem(last=False)
        bucket.refill(now, limit.per_source, limit.per_source_per_minute)
        self._total.refill(now, limit.total, limit.total_per_minute)
        if bucket.level < 1 or self._total.level < 1:
            return False
        bucket.level -= 1
        self._total.level -= 1
        return True

    def give_back(self, source: str) -> None:
        """Return what :meth:`take` spent for a request that was not refused after all."""
        limit = self.limit
        bucket = self._sources.get(source)
        if bucket is not None:
            bucket.level = min(float(limit.per_source), bucket.level + 1)
        self._total.level = min(float(limit.total), self._total.level + 1)


class RefusalTally:
    """Refusals answered but not logged one by one, by (action, reason)."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str]] = Counter()

    def count(self, action: str, reason: str) -> None:
        self._counts[action, reason] += 1

    def __len__(self) -> int:
        return sum(self._counts.values())

    def drain(self) -> dict[tuple[str, str], int]:
        """The counts so far; the tally starts again from zero."""
        counts = dict(self._counts)
        self._counts.clear()
        return counts
