"""The generic adapter: any dataset as a CSV of interactions (play logs, play counts, ratings),
with an optional CSV of item features, read into a :class:`~._data.Dataset`.

Malformed rows stop the load with a :class:`~._data.DatasetError` naming the file, the line and
the field, or, when the caller asks (``skip_bad_rows=True``), are skipped and counted in
``Dataset.skipped`` (and logged once on the ``sottovoce.sim`` logger).
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from sottovoce.sim._data import (
    EVENT_TYPES,
    BadRow,
    Dataset,
    DatasetError,
    Interaction,
    SkippedRows,
    Vector,
    check_id,
    number,
)

log = logging.getLogger("sottovoce.sim")

COLUMNS = ("user_id", "item_id", "timestamp", "event_type", "value")
"""The interactions CSV's columns: the first two are required, the others optional."""

REPORTED_BAD_ROWS = 10
"""Skipped rows reported by line number and reason (all of them are counted)."""

_UNIX = re.compile(r"\d+(\.\d*)?")
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, kept as surrogates

RowParser = Callable[[int, list[str]], tuple[str, Interaction]]


def load_interactions_csv(
    path: Path | str,
    *,
    item_features: Path | str | None = None,
    name: str | None = None,
    skip_bad_rows: bool = False,
) -> Dataset:
    """Any dataset as a UTF-8 CSV whose header names ``user_id`` and ``item_id`` and, optionally
    (in any order), ``timestamp`` and one of ``event_type`` or ``value``. For example
    ``user_id,item_id,timestamp,event_type``, ``user_id,item_id,timestamp,value`` or just
    ``user_id,item_id``.

    - ids: 1 to 100 characters, no whitespace;
    - ``timestamp``: empty or absent when unknown, ISO 8601 (naive ones are read as UTC), or
      Unix time as a number: seconds, or milliseconds when it has 13 or more digits;
    - ``event_type``: one of ``play``, ``complete``, ``skip``, ``like``, ``dislike``;
    - ``value``: a number above 0 that says how much: a play count, a rating on any scale
      whose values are above 0 (1-5 stars, 0.5-5, 1-10) or any weight. Every row is a
      ``play`` of its item with that weight, whatever the number: a rated item is an item the
      user chose, which is what the holdout asks models to predict (the usual implicit-feedback
      reading of rating data). Nothing is guessed from the scale (a low rating and a small
      play count look the same), so no rating becomes a ``dislike``: a file that knows its
      dislikes says so with ``event_type``. 0 and negative values are malformed (a play count
      of nothing, or the bottom of a 0-10 scale? fix them, or skip them);
    - without ``event_type`` and ``value``, every row is one play.

    A user may have any number of rows; repeated (user, item) rows are kept, each an
    interaction. ``item_features`` is an optional CSV ``item_id[,artist_id],f1,f2,...``: one row
    per item, numeric features, used as the item vectors; its items join the catalog even if
    nobody interacted with them. Without it, vectors are derived from training interactions
    (``build_item_vectors``) and items have no artist.

    A malformed row (wrong number of fields, a bad id, timestamp, event type or value, bytes
    that are not UTF-8) raises :class:`DatasetError` naming the file, its 1-based line (the
    header is line 1) and the field. With ``skip_bad_rows`` such rows are left out instead:
    ``Dataset.skipped`` counts them and lists the first ten, and one warning on the
    ``sottovoce.sim`` logger says so. A missing file, a bad header, no good row at all and
    every problem of ``item_features`` are errors either way.
    """
    path = Path(path)
    tally = _Tally(path, skip=skip_bad_rows)
    header, rows = _read_csv(path, tally)
    parse = _row_parser(path, _columns(path, header))
    per_user: dict[str, list[Interaction]] = defaultdict(list)
    for line, row in rows:
        try:
            user, interaction = parse(line, row)
        except DatasetError as error:
            tally.bad(error)
            continue
        per_user[user].append(interaction)
    skipped = tally.result()
    if not per_user:
        also = f" ({replace(skipped, path=None)})" if skipped.count else ""
        raise DatasetError(f"no interaction rows{also}", path=path)
    if skipped.count:
        log.warning("%s", skipped)
    vectors: dict[str, Vector] = {}
    artists: dict[str, str | None] = {}
    if item_features is not None:
        vectors, artists = _load_features(Path(item_features))
    return Dataset.build(
        name or path.stem,
        per_user,
        catalog=vectors,
        artists=artists,
        item_vectors=vectors,
        skipped=skipped,
    )


class _Tally:
    """Where a malformed row goes: raised (the default) or counted and skipped."""

    def __init__(self, path: Path, *, skip: bool) -> None:
        self.path, self.skip = path, skip
        self.count = 0
        self.first: list[BadRow] = []

    def bad(self, error: DatasetError) -> None:
        if not self.skip:
            raise error
        self.count += 1
        if len(self.first) < REPORTED_BAD_ROWS:
            self.first.append(BadRow(error.line or 0, error.field, error.reason))

    def result(self) -> SkippedRows:
        return SkippedRows(self.count, tuple(self.first), self.path if self.count else None)


def _columns(path: Path, header: list[str]) -> dict[str, int]:
    """The position of each known column; anything else in the header is an error."""
    names = [h.lower() for h in header]
    expected = (
        "the header must be user_id,item_id with optional timestamp and event_type or value "
        f"columns (in any order), not {','.join(header)}"
    )
    if not {"user_id", "item_id"} <= set(names) or set(names) - set(COLUMNS):
        raise DatasetError(expected, path=path, line=1)
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise DatasetError(f"the column {twice} appears twice", path=path, line=1)
    if {"event_type", "value"} <= set(names):
        raise DatasetError(
            "use event_type or value, not both (value is a play count or a rating; "
            "event_type says what happened)",
            path=path,
            line=1,
        )
    return {n: position for position, n in enumerate(names)}


def _row_parser(path: Path, columns: dict[str, int]) -> RowParser:
    """A function from (line, fields) to (user, interaction) that raises for a bad row."""
    width = len(columns)
    user_at, item_at = columns["user_id"], columns["item_id"]
    time_at, type_at, value_at = (columns.get(n) for n in ("timestamp", "event_type", "value"))
    valid: set[str] = set()  # ids already checked: a dataset repeats its ids many times over

    def parse(line: int, row: list[str]) -> tuple[str, Interaction]:
        if len(row) != width:
            raise DatasetError(f"expected {width} fields, got {len(row)}", path=path, line=line)
        user, item = row[user_at], row[item_at]
        if user not in valid:
            valid.add(check_id(user, path=path, line=line, name="user_id"))
        if item not in valid:
            valid.add(check_id(item, path=path, line=line, name="item_id"))
        ts = None if time_at is None else _timestamp(row[time_at], path=path, line=line)
        if type_at is not None:
            kind = row[type_at]
            if kind not in EVENT_TYPES:
                raise DatasetError(
                    f"{kind!r} is not one of {', '.join(EVENT_TYPES)}",
                    path=path,
                    line=line,
                    field="event_type",
                )
            return user, Interaction(item, ts, kind)
        if value_at is None:
            return user, Interaction(item, ts, "play")
        value = number(row[value_at], path=path, line=line, name="value")
        if value <= 0:
            raise DatasetError(
                f"a value must be a positive weight (a play count or a rating above 0), not "
                f"{row[value_at]!r}",
                path=path,
                line=line,
                field="value",
            )
        return user, Interaction(item, ts, "play", value)

    return parse


def _timestamp(value: str, *, path: Path, line: int) -> int | None:
    if not value:
        return None
    if value.isdigit() and value.isascii():  # the common case: whole Unix seconds or ms
        return int(value) * (1 if len(value) >= 13 else 1000)
    try:
        if _UNIX.fullmatch(value):
            digits = len(value.split(".", maxsplit=1)[0])
            return int(float(value) * (1 if digits >= 13 else 1000))
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, OverflowError):
        raise DatasetError(
            f"not a timestamp (ISO 8601 or Unix time): {value!r}",
            path=path,
            line=line,
            field="timestamp",
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _load_features(path: Path) -> tuple[dict[str, Vector], dict[str, str | None]]:
    vectors: dict[str, Vector] = {}
    artists: dict[str, str | None] = {}
    header, rows = _read_csv(path, _Tally(path, skip=False))
    if not header or header[0] != "item_id":
        raise DatasetError("the header must start with item_id", path=path, line=1)
    first = 2 if len(header) > 1 and header[1] == "artist_id" else 1
    names = header[first:]
    if not names:
        raise DatasetError("no feature columns after item_id", path=path, line=1)
    for line, row in rows:
        if len(row) != len(header):
            raise DatasetError(
                f"expected {len(header)} fields, got {len(row)}", path=path, line=line
            )
        item = check_id(row[0], path=path, line=line, name="item_id")
        if item in vectors:
            raise DatasetError(
                f"item {item!r} appears twice", path=path, line=line, field="item_id"
            )
        if first == 2:
            artists[item] = (
                check_id(row[1], path=path, line=line, name="artist_id") if row[1] else None
            )
        vectors[item] = np.array(
            [
                number(v, path=path, line=line, name=n)
                for n, v in zip(names, row[first:], strict=True)
            ]
        )
    if not vectors:
        raise DatasetError("no item rows", path=path)
    return vectors, artists


def _read_csv(path: Path, tally: _Tally) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """The header and the (line number, stripped fields) rows of a UTF-8 CSV file; blank lines
    are left out. Lines that are not UTF-8 or not CSV go to ``tally``."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DatasetError(
            f"cannot read: {error.strerror}", path=path, code="dataset_missing"
        ) from None
    lossy = False
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        if not tally.skip or line == 1:
            raise DatasetError(f"not UTF-8 text ({error.reason})", path=path, line=line) from None
        text, lossy = raw.decode("utf-8-sig", errors="surrogateescape"), True
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader, [])]
    except csv.Error as error:
        raise DatasetError(f"unreadable CSV header: {error}", path=path, line=1) from None
    if not header:
        raise DatasetError("empty file (a header is required)", path=path, line=1)
    return header, _numbered(path, reader, tally, lossy=lossy)


def _numbered(
    path: Path, reader: Any, tally: _Tally, *, lossy: bool
) -> Iterator[tuple[int, list[str]]]:
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:  # the reader goes on with the next line
            tally.bad(DatasetError(f"unreadable CSV: {error}", path=path, line=reader.line_num))
            continue
        if not row:
            continue
        if lossy and any(_UNDECODABLE.search(v) for v in row):
            tally.bad(DatasetError("not UTF-8 text", path=path, line=reader.line_num))
            continue
        yield reader.line_num, list(map(str.strip, row))
