"""Times as ISO 8601 text, a whole column at once: which of a few shapes the texts share, and
their instants in epoch milliseconds, read from the digits with numpy in exact integer
arithmetic (no datetime per value). Used by the plain event reader (:mod:`._plain_events`),
which takes a batch only when every time is in the same shape; pure functions, no I/O.

A text is read as pydantic reads it (a Gregorian date, a time of day before 24:00:00 without
leap seconds, an offset under 24 hours of whole minutes under 60); anything else gives
``None``, and pydantic reads, and refuses, the batch.
"""

from __future__ import annotations

from calendar import isleap
from collections.abc import Container, Sequence
from datetime import date
from itertools import repeat

import numpy as np

__all__ = ["instants", "shaped"]

_DIGITS = bytes.maketrans(b"0123456789", b"0" * 10)
_ZERO = ord("0")
_MONTH_DAYS = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], dtype=np.int64)
# From the calendar itself: days before each month's first (in a common and a leap year), and
# for each year from 1900 to 2199 days from 1970-01-01 to its first day, and whether it leaps.
_BEFORE_MONTH = np.array([[date(y, m, 1).timetuple().tm_yday - 1 for m in range(1, 13)]
                          for y in (2001, 2004)], dtype=np.int64)  # fmt: skip
_FIRST_YEAR = 1900
_YEARS = range(_FIRST_YEAR, 2200)
_NEW_YEAR = np.array([date(y, 1, 1).toordinal() - date(1970, 1, 1).toordinal() for y in _YEARS])
_LEAP = np.array([isleap(y) for y in _YEARS])


def shaped(values: Sequence[str], shapes: Container[bytes]) -> tuple[bytes, str] | None:
    """The one shape (each digit written 0) of all ``values``, if it is one of ``shapes``,
    and their text, a value a line; ``None`` if they differ or hold anything but ASCII."""
    text = "\n".join(values)
    if not values or not text.isascii():
        return None
    shape = values[0].encode().translate(_DIGITS)
    if shape not in shapes:
        return None
    # A value holding the separator would add a line: the texts could not be equal.
    if text.encode().translate(_DIGITS) != b"\n".join(repeat(shape, len(values))):
        return None
    return shape, text


def instants(text: str, shape: bytes, *, low: int, high: int) -> tuple[list[int], bool] | None:
    """The instants of the lines of ``text`` (all in ``shape``: a date, ``T``, a time of day
    to the second, maybe six digits of microseconds, then ``Z`` or an offset ±HH:MM) in epoch
    milliseconds, rounded down, and whether every offset is zero; ``None`` if any text is not
    a real time, any instant is outside [``low``, ``high``), or some offsets are zero and
    others not."""
    width = len(shape) + 1
    count = (len(text) + 1) // width
    raw = np.frombuffer((text + "\n").encode("ascii"), dtype=np.uint8).reshape(count, width)
    zone = 26 if shape[19:20] == b"." else 19
    # Two-digit numbers in one pass: century, year of century, month, day, hour, minute,
    # second, then the offset's hours and minutes.
    tens = [0, 2, 5, 8, 11, 14, 17] + ([zone + 1, zone + 4] if shape[zone] != ord("Z") else [])
    pairs = raw[:, tens].astype(np.int64) * 10 + raw[:, [t + 1 for t in tens]] - 11 * _ZERO
    year, month, day = pairs[:, 0] * 100 + pairs[:, 1], pairs[:, 2], pairs[:, 3]
    highest = pairs[:, 4:].max(axis=0).tolist()  # hour, minute, second, offset hh, mm
    if any(h > limit for h, limit in zip(highest, (23, 59, 59, 23, 59), strict=False)):
        return None
    since = year - _FIRST_YEAR
    if since.min() < 0 or since.max() >= len(_NEW_YEAR) or month.min() < 1 or month.max() > 12:
        return None  # a year the tables lack: pydantic's to read
    leap = _LEAP[since]
    if day.min() < 1 or (day > _MONTH_DAYS[month - 1] + (leap & (month == 2))).any():
        return None
    days = _NEW_YEAR[since] + _BEFORE_MONTH[leap.astype(np.intp), month - 1] + day - 1
    ms = (days * 86_400 + pairs[:, 4] * 3600 + pairs[:, 5] * 60 + pairs[:, 6]) * 1000
    if zone == 26:
        fraction = raw[:, 20:26].astype(np.int64) - _ZERO
        ms += fraction[:, 0] * 100 + fraction[:, 1] * 10 + fraction[:, 2]
    zero = True
    if len(tens) > 7:
        offset = pairs[:, 7] * 60 + pairs[:, 8]
        zeros = int(np.count_nonzero(offset == 0))
        if zeros not in (0, count):
            return None
        zero = zeros == count
        ms -= offset * (-60_000 if shape[zone] == ord("-") else 60_000)
    if ms.min() < low or ms.max() >= high:
        return None
    return ms.tolist(), zero
