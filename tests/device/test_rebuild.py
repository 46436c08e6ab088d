"""Derived state maintained batch by batch equals derived state rebuilt from the stored events.

Events arrive in any order (offline devices upload late), in batches of any size, with replays;
the incremental merge (SQL upserts, interval merging of sessions, decayed taste sums) must agree
with deriving everything at once.
"""

from __future__ import annotations

import itertools
import math
import sqlite3
import tempfile
from contextlib import closing
from datetime import timedelta
from pathlib import Path
from typing import Any

from conftest import NOW, T0
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sottovoce.device import EventStore
from sottovoce.policy import example_policy

LATER = T0 + timedelta(days=3)  # after every event a stream holds
TRACKS = ["t0", "t1", "t2", "t3", "t4", "t-uncatalogued"]
KINDS = ["play_start", "play_end", "pause", "resume", "skip", "seek", "like", "dislike",
         "search", "navigate", "context"]  # fmt: skip


@st.composite
def event_streams(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[int]]:
    n = draw(st.integers(1, 60))
    events = []
    for i in range(n):
        kind = draw(st.sampled_from(KINDS))
        user = draw(st.sampled_from(["u1", "u2"]))
        # minutes over two days, so idle gaps and out-of-order arrivals both happen
        ts = T0 + timedelta(minutes=draw(st.integers(0, 2 * 24 * 60)),
                            milliseconds=draw(st.integers(0, 999)))  # fmt: skip
        event: dict[str, Any] = {"type": kind, "event_id": f"e{i}", "user_id": user,
                                 "ts": ts.isoformat()}  # fmt: skip
        if kind in KINDS[:8]:
            event["track_id"] = draw(st.sampled_from(TRACKS))
            if draw(st.booleans()):
                event["artist_id"] = draw(st.sampled_from(["a0", "a1"]))
        if kind == "play_start":
            event["duration_ms"] = draw(st.integers(1, 400_000))
        elif kind == "play_end":
            event["duration_ms"] = draw(st.integers(1, 400_000))
            event["ms_played"] = draw(st.integers(0, 450_000))
        elif kind in ("pause", "resume", "skip"):
            event["position_ms"] = draw(st.integers(0, 400_000))
        elif kind == "seek":
            event.update(from_ms=draw(st.integers(0, 9)), to_ms=draw(st.integers(0, 9)))
        elif kind == "search":
            event["query"] = "q"
        elif kind == "navigate":
            event["screen"] = "home"
        elif kind == "context":
            event.update(device_type=draw(st.sampled_from(["phone", "car"])), network="wifi",
                         local_time="12:00")  # fmt: skip
        events.append(event)
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=8)))
    return events, cuts


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=event_streams(), replays=st.lists(st.integers(0, 59), max_size=5))
def test_incremental_equals_rebuilt(
    stream: tuple[list[dict[str, Any]], list[int]], replays: list[int]
) -> None:
    events, cuts = stream
    with tempfile.TemporaryDirectory() as tmp:
        # The device's clock reads after the last event: the stream spans two days from T0.
        store = EventStore.open(
            Path(tmp) / "d.db", policy=example_policy(), region="us", clock=lambda: LATER
        )
        try:
            store.upsert_catalog(
                {"track_id": f"t{i}", "artist_id": f"a{i % 2}", "vector": [i, 1.0 - i, 0.5]}
                for i in range(5)
            )
            bounds = [0, *cuts, len(events)]
            for start, end in itertools.pairwise(bounds):
                if start < end:
                    store.append_many(events[start:end])
            store.append_many([events[i] for i in replays if i < len(events)])
            incremental = store.derived_state()
            assert store.rebuild_derived() == len(events)
            rebuilt = store.derived_state()
            assert _same(incremental, rebuilt), (incremental, rebuilt)
            n_sessions = len(incremental["sessions"])
            assert sum(s["events"] for s in incremental["sessions"]) == len(events)
            assert n_sessions >= 1
        finally:
            store.close()


def test_rebuild_keeps_nothing_the_events_do_not_support(tmp_path: Path) -> None:
    store = EventStore.open(
        tmp_path / "d.db", policy=example_policy(), region="us", clock=lambda: NOW
    )
    store.append({"type": "like", "event_id": "x", "user_id": "u", "track_id": "t",
                  "ts": T0.isoformat()})  # fmt: skip
    with closing(sqlite3.connect(store.path)) as other:  # another process, say
        other.execute("DELETE FROM events")
        other.commit()
    assert store.rebuild_derived() == 0
    assert all(rows == [] for rows in store.derived_state().values())
    store.close()
