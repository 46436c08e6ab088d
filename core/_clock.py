"""Time as an argument: the one place that reads the wall clock.

Everything that decides retention, budget periods, rounds, deadlines or expiry takes "now" from
a :data:`Clock` (a function returning a timezone-aware ``datetime``) that its caller passes in.
Library code defaults to :func:`system_clock`; the process edges (the CLI and the aggregator
service) build theirs with :func:`clock_from_env`, so a test or an operator can run a whole
process on another calendar: ``SOTTOVOCE_NOW=2026-11-02T09:00:00Z sottovoce device ingest ...``
(or ``sottovoce --now ...``) starts the clock at that instant, and it then advances in real
time, so deadlines and timeouts still pass.

::

    SottovoceError
    └── ClockError   clock_invalid: SOTTOVOCE_NOW / --now is not an ISO 8601 time with a zone
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Final

from sottovoce._errors import SottovoceError

__all__ = ["NOW_ENV", "Clock", "ClockError", "clock_from_env", "parse_now", "system_clock"]

Clock = Callable[[], datetime]
"""A function returning the current time, timezone-aware."""

NOW_ENV: Final = "SOTTOVOCE_NOW"


class ClockError(SottovoceError):
    """A clock setting that is not a timezone-aware ISO 8601 time."""

    code = "clock_invalid"


def system_clock() -> datetime:
    """The wall clock, in UTC."""
    return datetime.now(UTC)


def parse_now(text: str) -> datetime:
    """An ISO 8601 time with a zone (``2026-11-02T09:00:00Z``), as UTC; else ``ClockError``."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ClockError(
            f"{text[:64]!r} is not an ISO 8601 time (e.g. 2026-11-02T09:00:00Z)"
        ) from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise ClockError(f"{text[:64]!r} has no time zone; add one, e.g. Z or +01:00")
    return value.astimezone(UTC)


class _StartedAt:
    """A clock that reads ``start`` at construction and then advances in real (monotonic) time."""

    def __init__(self, start: datetime) -> None:
        self._start = start
        self._origin = time.monotonic()

    def __call__(self) -> datetime:
        return self._start + timedelta(seconds=time.monotonic() - self._origin)

    def __repr__(self) -> str:
        return f"clock started at {self._start.isoformat()}"


def clock_from_env(now: str | None = None, *, environ: Mapping[str, str] | None = None) -> Clock:
    """The clock for a process: ``now`` if given, else ``$SOTTOVOCE_NOW``, else the wall clock.

    Only process edges call this; library code takes a clock as an argument.
    """
    text = now if now is not None else (os.environ if environ is None else environ).get(NOW_ENV)
    if text is None or not text.strip():
        return system_clock
    return _StartedAt(parse_now(text))
