"""A store writer for the crash test: appends a seeded event stream until it is killed.

Usage: ``python tests/device/crash_writer.py DB_PATH ACK_PATH SEED``

``tests/device/test_crash.py`` starts this script, kills it with SIGKILL at a random moment and
then checks the store. After every append returns, the writer adds the ids of that append to
ACK_PATH (one per line, fsynced), so the ack file never claims more than the store acknowledged.

Every event is a pure function of ``(seed, index)`` and its id spells both (``e<seed>-<index>``),
so a writer restarted on the same file with a new seed can replay events of earlier writers,
whether or not they were stored before the kill, without ever changing an event's content.
"""

from __future__ import annotations

import os
import random
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from store_peek import peek

from sottovoce.device import EventStore
from sottovoce.policy import example_policy

USERS = ("u1", "u2", "u3", "u4")
TRACKS = 40  # t0..t39; only the first CATALOG_TRACKS have catalog vectors and known artists
CATALOG_TRACKS = 30
ARTISTS = 10
DIM = 8
MAX_EVENTS = 200_000  # the cap: a writer nobody kills stops here
BASE = datetime(2026, 11, 1, tzinfo=UTC)
# The store's clock. Event i lies about 21.75 s * i after BASE (see ``event``), so the whole
# capped stream (about 50.4 days) stays behind the clock, and within the US raw-event retention
# (180 days): a fast writer never runs into the store's clock-skew refusal.
NOW = BASE + timedelta(days=60)
EVENT_ID = re.compile(r"e(\d+)-(\d+)")
# Relative frequencies; play_end, skip, like and dislike feed statistics and taste.
TYPES = {
    "play_end": 30, "play_start": 14, "skip": 10, "like": 7, "dislike": 4, "pause": 5,
    "resume": 5, "seek": 5, "search": 6, "navigate": 6, "context": 8,
}  # fmt: skip
TRACK_TYPES = frozenset(TYPES) - {"search", "navigate", "context"}


def catalog() -> list[dict[str, Any]]:
    """The same catalog for every writer, so restarts on one file never change a vector."""
    rng = random.Random("catalog")
    return [
        {
            "track_id": f"t{i}",
            "artist_id": f"a{i % ARTISTS}",
            "vector": [rng.uniform(-1.0, 1.0) for _ in range(DIM)],
        }
        for i in range(CATALOG_TRACKS)
    ]


def event_id(seed: int, index: int) -> str:
    return f"e{seed}-{index}"


def event(seed: int, index: int) -> dict[str, Any]:
    """Event ``index`` of the stream of ``seed``: always the same dict for the same arguments."""
    rng = random.Random(f"{seed}:{index}")
    kind = rng.choices(list(TYPES), weights=list(TYPES.values()))[0]
    # Streams of different seeds overlap in time, and events arrive up to 10 minutes out of
    # order, so sessions of one writer merge into sessions of another; every 400 events a
    # 45-minute gap starts a new session.
    ms = index * 15_000 + (index // 400) * 45 * 60_000 + (seed % 3) * 3_600_000
    ms += rng.randrange(-600_000, 600_000)
    out: dict[str, Any] = {
        "type": kind,
        "event_id": event_id(seed, index),
        "user_id": rng.choice(USERS),
        "ts": (BASE + timedelta(milliseconds=max(ms, 0))).isoformat(),
    }
    if kind in TRACK_TYPES:
        track = rng.randrange(TRACKS)
        out["track_id"] = f"t{track}"
        if rng.random() < 0.7:  # otherwise the store looks the artist up in the catalog
            out["artist_id"] = f"a{track % ARTISTS}"
    duration = rng.choice((20_000, 61_000, 180_000, 240_000, 420_000))
    if kind == "play_end":
        # Around the play (30 s or half) and completion (90%) thresholds, and anywhere.
        out["ms_played"] = rng.choice(
            (0, 29_999, 30_000, duration // 2, int(duration * 0.9), duration,
             rng.randrange(duration + 1))
        )  # fmt: skip
        out["duration_ms"] = duration
    elif kind == "play_start":
        out["duration_ms"] = duration
    elif kind in ("skip", "pause", "resume"):
        out["position_ms"] = rng.randrange(duration)
    elif kind == "seek":
        out["from_ms"], out["to_ms"] = rng.randrange(duration), rng.randrange(duration)
    elif kind == "search":
        out["query"] = rng.choice(("jazz", "lo-fi beats", "bach cello", "running mix"))
    elif kind == "navigate":
        out["screen"] = rng.choice(("home", "library", "search", "now_playing"))
    elif kind == "context":
        out["device_type"] = rng.choice(("phone", "tablet", "desktop", "car", "speaker"))
        out["network"] = rng.choice(("wifi", "cellular", "offline"))
        out["local_time"] = f"{rng.randrange(24):02d}:{rng.randrange(60):02d}"
    return out


def stored_streams(store: EventStore) -> dict[int, int]:
    """For each earlier writer's seed, the highest index of its events in the store."""
    highest: dict[int, int] = {}
    for (ident,) in peek(store, "SELECT event_id FROM events"):
        match = EVENT_ID.fullmatch(ident)
        if match is None:
            raise SystemExit(f"unexpected event id in the store: {ident!r}")
        seed, index = int(match[1]), int(match[2])
        highest[seed] = max(highest.get(seed, -1), index)
    return highest


def batch(
    rng: random.Random, seed: int, start: int, earlier: dict[int, int]
) -> list[int | tuple[int, int]]:
    """The next append: new indices from ``start`` on, mixed with replays of earlier events.

    Returns new indices of this stream as ints and replays as ``(seed, index)`` pairs.
    """
    size = 1 if rng.random() < 0.4 else rng.choice((rng.randint(2, 10), rng.randint(2, 200)))
    items: list[int | tuple[int, int]] = list(range(start, start + size))
    if rng.random() < 0.3:
        for _ in range(rng.randint(1, 5)):
            if earlier and rng.random() < 0.5:
                # An earlier writer's event: possibly stored, possibly lost before its ack
                # (then it is new here), possibly beyond what it ever reached.
                other = rng.choice(sorted(earlier))
                items.append((other, rng.randint(0, earlier[other] + 3)))
            elif start > 0:
                items.append((seed, rng.randrange(start)))
    if rng.random() < 0.05:
        items.append(rng.choice(items))  # the same event twice in one batch
    rng.shuffle(items)
    return items


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    db_path, ack_path, seed = Path(argv[1]), Path(argv[2]), int(argv[3])
    rng = random.Random(seed)
    # The ack file exists from here on: the test times its kill from that moment.
    with (
        ack_path.open("a", encoding="utf-8") as acks,
        EventStore.open(db_path, policy=example_policy(), region="us", clock=lambda: NOW) as store,
    ):
        store.upsert_catalog(catalog())
        earlier = {s: top for s, top in stored_streams(store).items() if s != seed}
        index = 0
        while index < MAX_EVENTS:
            items = batch(rng, seed, index, earlier)
            events = [
                event(seed, item) if isinstance(item, int) else event(*item) for item in items
            ]
            if len(events) == 1 and rng.random() < 0.5:
                store.append(events[0])
            else:
                store.append_many(events)
            acks.write("".join(f"{e['event_id']}\n" for e in events))
            acks.flush()
            os.fsync(acks.fileno())
            index = max([index] + [item + 1 for item in items if isinstance(item, int)])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
