"""Ingest benchmark: events/s through EventStore against plain sqlite3 on the same rows.

Prints one JSON object. ``events_per_s_batched`` is validation + consent check + dedupe + insert
+ derived state (sessions, per-track/artist stats, taste vector) per batch transaction;
``raw_sqlite_events_per_s`` is ``sqlite3.executemany`` of the very rows the store wrote, into a
table of the same schema and indexes, with the same journal and sync settings and batch size,
measured in the same run. Each side runs ``--trials`` times (3), alternated with the other, each
trial on fresh files; the figures are the trials' medians (the ratio: the median of each trial's
ratio to its own raw inserts), and ``ratio_trials`` lists every trial's. One trial alone varies
more than the code does: the raw side measured 170,000 to 259,000 rows/s in runs of one hour, and
one trial's ratio read 0.28 to 0.48. The workload is one device: two users (a shared device) whose
listening follows a Zipf law over a 5,000-track catalog with 16-dimensional vectors.

Time is an argument: the store's clock follows the workload (before each append it reads the
time of the latest event handed over, as a device's clock would), so what the bench measures
does not depend on today's date; with the wall clock, events older than the raw-event
retention were dropped instead of stored (``events_stored`` says how many were stored).

The ratio has a ceiling well below 1: besides the very rows the raw side inserts, each stored
event upserts its track's and artist's counters and commits them. The store inserts its rows 64
to a statement (``device/_many_rows.py``), which SQLite takes faster than ``executemany`` takes
them one at a time (about 1.9 µs an event against 2.8), but the counters' upserts (about 1.3 µs,
also many rows a statement, with the statement journal they need kept in memory: see that
module) and the larger commit (about 1) leave SQLite's own work at about 4.5 µs an event against
the raw side's 2.8: about 0.6 with no Python at all. Python takes the rest, about 4 µs: reading
the batch (checking every field, writing each canonical JSON body; ``device/_plain_events.py``
does for plain dicts what pydantic's validation and serializers did, in about 1.9 µs where they
took about 4) and derivation (about 1.4) most of it. Measured on a quiet 2-core machine, three
runs alternated with counter upserts of one row a statement: 111,000-121,000 events/s, 0.31-0.38
of raw inserts in the same runs (107,000-110,000 and 0.30-0.32 with one row a statement).

``--profile N`` also prints, to stderr, the N functions the batched appends spent most time in
(cProfile, which slows what it watches: compare stages with each other, not with the figures).

Usage: ``python bench/ingest.py [--events N] [--batch B] [--profile N]``.
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import pstats
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from _common import percentile

from sottovoce.device import EventStore
from sottovoce.policy import Purpose, example_policy

TRACKS, ARTISTS, DIM, USERS = 5_000, 500, 16, 2
START = datetime(2026, 11, 1, tzinfo=UTC)
# Listening is repetitive: track popularity on one device follows a Zipf law (s = 1).
_CUMULATIVE = list(itertools.accumulate(1 / (rank + 1) for rank in range(TRACKS)))


def make_events(n: int, *, seed: int, prefix: str) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    events: list[dict[str, Any]] = []
    clock = {u: START for u in range(USERS)}
    for i in range(n):
        user = rng.randrange(USERS)
        clock[user] += timedelta(seconds=rng.randint(5, 400))
        track = rng.choices(range(TRACKS), cum_weights=_CUMULATIVE)[0]
        base = {"event_id": f"{prefix}{i}", "user_id": f"user-{user}", "device_id": "dev-1",
                "ts": clock[user].isoformat(), "track_id": f"t{track}",
                "artist_id": f"a{track % ARTISTS}"}  # fmt: skip
        kind = rng.random()
        if kind < 0.45:
            duration = rng.randint(90_000, 400_000)
            played = rng.choice([rng.randint(0, 30_000), duration, rng.randint(0, duration)])
            events.append({**base, "type": "play_end", "ms_played": played,
                           "duration_ms": duration})  # fmt: skip
        elif kind < 0.75:
            events.append({**base, "type": "play_start", "duration_ms": 200_000})
        elif kind < 0.9:
            events.append({**base, "type": "skip", "position_ms": rng.randint(0, 60_000)})
        elif kind < 0.95:
            events.append({**base, "type": rng.choice(["like", "dislike"])})
        else:
            events.append({"event_id": f"{prefix}{i}", "user_id": f"user-{user}",
                           "ts": clock[user].isoformat(), "type": "context",
                           "device_type": "phone", "network": "wifi",
                           "local_time": "08:30"})  # fmt: skip
    return events


class WorkloadClock:
    """The device's clock during the workload: the time of the latest event handed over."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


def open_store(path: Path, durability: str, clock: WorkloadClock) -> EventStore:
    store = EventStore.open(path, policy=example_policy(), region="eu", durability=durability,  # type: ignore[arg-type]
                            clock=clock)  # fmt: skip
    rng = random.Random(1)
    store.upsert_catalog(
        {"track_id": f"t{t}", "artist_id": f"a{t % ARTISTS}",
         "vector": [rng.uniform(-1, 1) for _ in range(DIM)]}
        for t in range(TRACKS)
    )  # fmt: skip
    for user in range(USERS):
        store.set_age(f"user-{user}", 30)
        store.grant(f"user-{user}", Purpose.PERSONALIZATION)
    return store


def latest(events: list[dict[str, Any]]) -> datetime:
    return max(datetime.fromisoformat(e["ts"]) for e in events)


def measure(
    workdir: Path, *, n: int, batch: int, singles: int, durability: str, profile: int = 0
) -> dict[str, Any]:
    events = make_events(n, seed=7, prefix="b")
    clock = WorkloadClock()
    store = open_store(workdir / f"store-{durability}.db", durability, clock)
    batches = [(events[i : i + batch], latest(events[i : i + batch])) for i in range(0, n, batch)]
    profiler = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    for chunk, moment in batches:
        clock.now = moment
        store.append_many(chunk)
    batched = n / (time.perf_counter() - t0)
    if profiler is not None:
        profiler.disable()
        print(f"batched appends, durability={durability}, by own time:", file=sys.stderr)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(profile)

    lat = []
    # The single appends continue the listening where the batches ended.
    offset = clock.now - START
    for event in make_events(singles, seed=8, prefix="s"):
        event["ts"] = (datetime.fromisoformat(event["ts"]) + offset).isoformat()
        clock.now = datetime.fromisoformat(event["ts"])
        t = time.perf_counter()
        store.append(event)
        lat.append((time.perf_counter() - t) * 1000)
    lat.sort()
    store.close()
    stored = sqlite3.connect(store.path)  # read back as anyone would: the store hands out none
    rows = stored.execute(
        "SELECT seq, event_id, user_ref, type, ts, track_id, artist_id, body FROM events "
        "WHERE event_id LIKE 'b%' ORDER BY seq"
    ).fetchall()
    schema = [r[0] for r in stored.execute(
        "SELECT sql FROM sqlite_master WHERE tbl_name = 'events' AND sql IS NOT NULL")]  # fmt: skip
    stored.close()

    raw = sqlite3.connect(workdir / f"raw-{durability}.db", isolation_level=None)
    raw.execute("PRAGMA journal_mode=WAL")
    raw.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
    raw.execute("PRAGMA cache_size=-8192")  # as the store sets it
    raw.execute("PRAGMA wal_autocheckpoint=0")  # the store checkpoints off the append path
    for sql in schema:
        raw.execute(sql)
    t0 = time.perf_counter()
    for i in range(0, len(rows), batch):
        raw.execute("BEGIN IMMEDIATE")
        raw.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows[i : i + batch])
        raw.execute("COMMIT")
    raw_rate = len(rows) / (time.perf_counter() - t0)
    raw.close()
    return {
        "events_stored": len(rows),
        "events_per_s_batched": round(batched),
        "raw_sqlite_events_per_s": round(raw_rate),
        "ratio_vs_raw": round(batched / raw_rate, 3),
        "single_append_p50_ms": round(statistics.median(lat), 3),
        "single_append_p99_ms": round(percentile(lat, 0.99), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--singles", type=int, default=2_000)
    parser.add_argument("--trials", type=int, default=3,
                        help="runs of each side, alternated; the medians are reported")  # fmt: skip
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the batched appends' N costliest functions")  # fmt: skip
    args = parser.parse_args()
    if args.trials < 1:
        parser.error("--trials must be at least 1")
    runs: dict[str, list[dict[str, Any]]] = {"normal": [], "full": []}
    for trial in range(args.trials):
        for durability, trials in runs.items():
            with tempfile.TemporaryDirectory() as tmp:
                trials.append(measure(Path(tmp), n=args.events, batch=args.batch,
                                      singles=args.singles, durability=durability,
                                      profile=args.profile if trial == 0 else 0))  # fmt: skip
    normal, full = (_medians(runs[d]) for d in ("normal", "full"))
    result = {
        "events": args.events,
        "batch": args.batch,
        "trials": args.trials,
        "profiled": bool(args.profile),
        "durability": "normal",
        **normal,
        **{f"{k}_full": v for k, v in full.items()},
        "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version,
    }
    print(json.dumps(result))


def _medians(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the trials (the ratio: the median of the trials' own ratios,
    each measured against the raw inserts of its own trial), and every trial's ratio."""
    out = {k: statistics.median(t[k] for t in trials) for k in trials[0]}
    out["ratio_trials"] = [t["ratio_vs_raw"] for t in trials]
    return out


if __name__ == "__main__":
    main()
