"""Any interactions CSV, as an outside user brings it (issue 16): ratings instead of play counts,
a user with thousands of rows, timestamps in every form or none, and a few malformed rows."""

from __future__ import annotations

import logging
import random
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import NOW, StoreFactory

from sottovoce._cli_simulate import _notes
from sottovoce.policy import Purpose
from sottovoce.sim._datasets import (
    BadRow,
    DatasetError,
    Interaction,
    load_interactions_csv,
    sample_users,
)
from sottovoce.sim._evaluate import MAX_INTERACTIONS, device_events, split_holdout

HEAVY = "heavy"
HEAVY_ROWS = 5_000
T = 1_700_000_000  # Unix seconds of the first rating

# (line, field, what is wrong); the header is line 1, the good rows come first
BAD_ROWS = [
    ("casual03,m7,1700000000,x", "value", "not a number"),
    ("casual03,m7,1700000000,0", "value", "a value must be a positive weight"),
    ("casual03,m7,1700000000", None, "expected 4 fields, got 3"),
    ("casual 03,m7,1700000000,4", "user_id", "without whitespace"),
    ("casual03,m7,yesterday,4", "timestamp", "not a timestamp"),
]


def write_ratings(folder: Path, *, bad: bool = True) -> tuple[Path, list[int]]:
    """A MovieLens-like ratings CSV (1 to 5 stars as ``value``): 20 casual users with 15
    ratings each, times as Unix seconds, Unix milliseconds or ISO 8601; one user with 5,000
    ratings; then, with ``bad``, the malformed rows of BAD_ROWS. Returns the path and the bad
    rows' line numbers."""
    rng = random.Random(16)
    rows = ["user_id,item_id,timestamp,value"]
    for u in range(20):
        for k in range(15):
            when = T + 86_400 * u + 600 * k
            iso = datetime.fromtimestamp(when, UTC).isoformat()
            stamp = [str(when), str(when * 1000), iso][k % 3]
            rows.append(f"casual{u:02d},m{rng.randrange(300)},{stamp},{rng.randint(1, 5)}")
    for k in range(HEAVY_ROWS):  # a binge: most of it within hours
        rows.append(f"{HEAVY},m{k % 1_500},{T + 30 * k},{rng.randint(1, 5)}")
    lines = []
    if bad:
        for text, _, _ in BAD_ROWS:
            rows.append(text)
            lines.append(len(rows))
    path = folder / "ratings.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path, lines


@pytest.fixture
def ratings(tmp_path: Path) -> tuple[Path, list[int]]:
    return write_ratings(tmp_path)


def test_a_malformed_row_is_a_typed_error_naming_line_and_field(
    ratings: tuple[Path, list[int]],
) -> None:
    path, lines = ratings
    with pytest.raises(DatasetError, match="not a number") as caught:
        load_interactions_csv(path)
    error = caught.value
    assert (error.path, error.line, error.field) == (path, lines[0], "value")
    assert error.code == "dataset_invalid"
    assert str(error).startswith(f"{path}, line {lines[0]}, field 'value': ")


def test_skip_bad_rows_skips_and_counts_them(
    ratings: tuple[Path, list[int]], caplog: pytest.LogCaptureFixture
) -> None:
    path, lines = ratings
    with caplog.at_level(logging.WARNING, logger="sottovoce.sim"):
        data = load_interactions_csv(path, skip_bad_rows=True)
    assert data.skipped.count == len(BAD_ROWS) and data.skipped.path == path
    assert [b.line for b in data.skipped.first] == lines
    for bad, (_, field, reason) in zip(data.skipped.first, BAD_ROWS, strict=True):
        assert bad.field == field and reason in bad.reason
    assert [r.getMessage() for r in caplog.records] == [str(data.skipped)]
    assert str(data.skipped).startswith(f"{path}: skipped 5 malformed rows (line {lines[0]}, ")
    # the good rows are all there: every rating is a play weighted by its stars
    assert len(data.users) == 21 and data.size == 20 * 15 + HEAVY_ROWS
    assert len(data.interactions[HEAVY]) == HEAVY_ROWS
    rows = [r for u in data.users for r in data.interactions[u]]
    assert {r.event_type for r in rows} == {"play"} and {r.value for r in rows} == {1, 2, 3, 4, 5}
    casual = data.interactions["casual00"]
    assert [r.timestamp for r in casual[:3]] == [T * 1000, (T + 600) * 1000, (T + 1200) * 1000]
    # a sample of users keeps the load's report
    assert sample_users(data, 10, seed=1).skipped == data.skipped
    assert "skipped=5" in repr(data)


def test_only_the_first_bad_rows_are_listed(tmp_path: Path) -> None:
    rows = ["user_id,item_id", "ann,a", *[f"ann,a,{n}" for n in range(30)]]
    path = tmp_path / "plays.csv"
    path.write_text("\n".join(rows) + "\n")
    data = load_interactions_csv(path, skip_bad_rows=True)
    assert data.skipped.count == 30 and len(data.skipped.first) == 10
    assert data.skipped.first[0] == BadRow(3, None, "expected 2 fields, got 3")
    assert str(data.skipped).endswith("; ...)")
    path.write_text("user_id,item_id\nann\nbob,b,c\n")
    with pytest.raises(DatasetError, match=r"no interaction rows \(.*skipped 2 malformed rows"):
        load_interactions_csv(path, skip_bad_rows=True)


def test_the_heavy_user_replays_into_a_real_store(
    ratings: tuple[Path, list[int]], open_store: StoreFactory
) -> None:
    data = load_interactions_csv(ratings[0], skip_bad_rows=True)
    split = split_holdout(data, seed=0)
    train = split.train[HEAVY]
    assert len(train) > MAX_INTERACTIONS
    days = 28.0
    events = device_events(HEAVY, train, artists=data.artists, end=NOW, days=days, seed=1)
    times = [e["ts"] for e in events]
    assert times == sorted(times)
    assert (NOW - timedelta(days=days)).isoformat() <= times[0] and times[-1] <= NOW.isoformat()
    played = [e["track_id"] for e in events if e["type"] == "play_start"]
    newest = sorted(train, key=lambda r: r.timestamp or 0)[-MAX_INTERACTIONS:]
    # only the most recent interactions, each with its full 1 + log4(stars) plays
    assert set(played) == {r.item for r in newest}
    assert len(played) == sum(1 + (int(r.value).bit_length() - 1) // 2 for r in newest)
    store = open_store("us")
    store.set_age(HEAVY, 30)
    store.grant(HEAVY, Purpose.PERSONALIZATION)
    for start in range(0, len(events), 2_000):
        result = store.append_many(events[start : start + 2_000])
        assert result.accepted == len(events[start : start + 2_000]) and not result.expired_ids


@pytest.mark.parametrize("timed", [True, False])
def test_any_number_of_interactions_fits_any_window(timed: bool) -> None:
    rows = [
        Interaction(f"t{n % 97}", T * 1000 + n if timed else None, kind, 1_000.0)
        for n, kind in enumerate(["play", "complete", "skip", "like"] * 2_500)
    ]
    for days in (2.0, 3.5, 28.0):
        events = device_events("u", rows, artists={}, end=NOW, days=days)
        times = [e["ts"] for e in events]
        assert times == sorted(times) and len(times) > 500
        assert (NOW - timedelta(days=days)).isoformat() <= times[0] <= times[-1]
        assert times[-1] <= NOW.isoformat()


HEADERS = [
    ("user_id,item_id\nann,a\nann,b\n", [("a", None, "play", 1.0), ("b", None, "play", 1.0)]),
    ("user_id,item_id,timestamp\nann,a,1700000000\n", [("a", T * 1000, "play", 1.0)]),
    ("value,user_id,item_id\n4.5,ann,a\n", [("a", None, "play", 4.5)]),
    ("item_id,user_id,event_type\na,ann,like\n", [("a", None, "like", 1.0)]),
    ("User_ID,Item_ID,Value\nann,a,3\n", [("a", None, "play", 3.0)]),
]


@pytest.mark.parametrize(("text", "expected"), HEADERS)
def test_headers_name_their_columns_in_any_order(
    tmp_path: Path, text: str, expected: list[tuple[str, int | None, str, float]]
) -> None:
    path = tmp_path / "any.csv"
    path.write_text(text)
    assert load_interactions_csv(path).interactions["ann"] == tuple(
        Interaction(*row) for row in expected
    )


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("user_id,item_id,rating", "the header must be user_id,item_id with optional"),
        ("user_id,timestamp,value", "the header must be"),
        ("user_id,item_id,value,value", "the column value appears twice"),
        ("user_id,item_id,event_type,value", "use event_type or value, not both"),
    ],
)
def test_a_bad_header_is_an_error_even_when_skipping(
    tmp_path: Path, header: str, message: str
) -> None:
    path = tmp_path / "any.csv"
    path.write_text(f"{header}\n")
    with pytest.raises(DatasetError, match=message) as caught:
        load_interactions_csv(path, skip_bad_rows=True)
    assert caught.value.line == 1


def test_rows_that_are_not_utf8_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes(b"user_id,item_id\nann,a\nann,caf\xe9\nbob,b\n")
    data = load_interactions_csv(path, skip_bad_rows=True)
    assert data.users == ("ann", "bob") and data.items == ("a", "b")
    assert data.skipped.first == (BadRow(3, None, "not UTF-8 text"),)


def _sottovoce(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "sottovoce", "simulate", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_the_cli_names_the_bad_row_and_how_to_skip_it(
    ratings: tuple[Path, list[int]], tmp_path: Path
) -> None:
    path, lines = ratings
    done = _sottovoce("--csv", str(path), "--workdir", str(tmp_path / "sim"), "--users", "10")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    message = " ".join(done.stderr.split())
    assert f"line {lines[0]}, field 'value'" in message and "--skip-bad-rows" in message
    nothing = tmp_path / "nothing.csv"
    nothing.write_text("user_id,item_id\nann\n")
    done = _sottovoce("--csv", str(nothing), "--skip-bad-rows", "--workdir", str(tmp_path / "s"))
    assert done.returncode == 2 and "skipped 1 malformed row" in done.stderr
    done = _sottovoce("--split", "sideways")
    assert done.returncode == 2 and "sideways" in done.stderr


def test_the_cli_prints_what_a_load_skipped(
    ratings: tuple[Path, list[int]], capsys: pytest.CaptureFixture[str]
) -> None:
    with _notes():
        data = load_interactions_csv(ratings[0], skip_bad_rows=True)
    assert f"skipped {data.skipped.count} malformed rows" in capsys.readouterr().out
