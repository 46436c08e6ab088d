"""What derived state means: plays, completions, skips, feedback, sessions, taste, context."""

from __future__ import annotations

import math

import pytest
from conftest import Events, StoreFactory

from sottovoce.device import EventStore, is_completion, is_play


@pytest.fixture
def store(open_store: StoreFactory) -> EventStore:
    store = open_store("us")
    store.upsert_catalog(
        [
            {"track_id": "t1", "artist_id": "a1", "vector": [1.0, 0.0]},
            {"track_id": "t2", "artist_id": "a1", "vector": [0.0, 1.0]},
            {"track_id": "t3", "artist_id": "a2", "vector": [1.0, 1.0]},
        ]
    )
    return store


def _track(store: EventStore, track: str) -> dict[str, object]:
    return next(r for r in store.derived_state()["track_stats"] if r["track_id"] == track)


def test_a_one_second_play_is_not_a_thirty_second_play(store: EventStore, events: Events) -> None:
    store.append_many([
        events("play_end", track_id="t1", ms_played=1_000, duration_ms=200_000),
        events("play_end", track_id="t2", ms_played=30_000, duration_ms=200_000),
    ])  # fmt: skip
    one, thirty = _track(store, "t1"), _track(store, "t2")
    assert (one["plays"], one["ms_played"]) == (0, 1_000)
    assert (thirty["plays"], thirty["ms_played"]) == (1, 30_000)
    assert one["last_played_ts"] is None and thirty["last_played_ts"] is not None


def test_play_and_completion_thresholds() -> None:
    assert not is_play(29_999, 200_000) and is_play(30_000, 200_000)
    assert is_play(20_000, 40_000) and not is_play(19_999, 40_000)  # half of a short track
    assert not is_completion(179_999, 200_000) and is_completion(180_000, 200_000)


def test_skips_early_and_late(store: EventStore, events: Events) -> None:
    store.append_many([events("skip", position_ms=3_000), events("skip", position_ms=95_000)])
    row = _track(store, "t1")
    assert (row["skips"], row["early_skips"]) == (2, 1)


def test_starts_pauses_and_seeks_count_only_toward_sessions(
    store: EventStore, events: Events
) -> None:
    store.append_many([events("play_start"), events("pause"), events("resume"), events("seek")])
    state = store.derived_state()
    assert state["track_stats"] == [] and state["sessions"][0]["events"] == 4


def test_latest_feedback_wins_by_time_not_arrival(store: EventStore, events: Events) -> None:
    like = events("like", track_id="t1")
    dislike = events("dislike", track_id="t1")
    store.append(dislike)
    store.append(like)  # arrives later but happened earlier
    row = _track(store, "t1")
    assert (row["likes"], row["dislikes"], row["feedback"]) == (1, 1, -1)


def test_artist_stats_aggregate_tracks_and_use_the_catalog(
    store: EventStore, events: Events
) -> None:
    store.append_many([
        events("play_end", track_id="t1", artist_id="a1"),
        events("play_end", track_id="t2", artist_id=None),  # artist from the catalog
        events("dislike", track_id="t3", artist_id=None),
        events("play_end", track_id="unknown", artist_id=None),
    ])  # fmt: skip
    artists = {r["artist_id"]: r for r in store.derived_state()["artist_stats"]}
    assert artists["a1"]["plays"] == 2 and artists["a1"]["completions"] == 2
    assert artists["a2"]["feedback"] == -1
    assert set(artists) == {"a1", "a2"}
    assert _track(store, "t2")["artist_id"] == "a1"


def test_sessions_split_on_idle_gap_and_merge_when_bridged(
    store: EventStore, events: Events
) -> None:
    first = [events("play_end", after=60) for _ in range(3)]
    second = [events("play_end", after=40 * 60), events("skip", after=60)]
    store.append_many(first + second)
    sessions = store.derived_state()["sessions"]
    assert [(s["events"], s["plays"], s["skips"]) for s in sessions] == [(3, 3, 0), (2, 1, 1)]
    # an event that arrives late, in the gap, within 30 minutes of both: one session
    bridge = dict(events("like"), ts=first[-1]["ts"].replace("09:03:", "09:23:"))
    store.append(bridge)
    sessions = store.derived_state()["sessions"]
    assert [(s["events"], s["plays"]) for s in sessions] == [(6, 4)]


def test_taste_is_a_decayed_mean_of_engaged_items(store: EventStore, events: Events) -> None:
    store.append_many([
        events("play_end", track_id="t1"),  # completed: weight 1.5
        events("play_end", track_id="t2", after=6 * 3600),  # one half-life later: 1.5
        events("skip", track_id="t3"),  # skips do not pull taste
    ])  # fmt: skip
    (taste,) = store.derived_state()["taste"]
    # t1 has decayed to half: mean = (0.75 * [1, 0] + 1.5 * [0, 1]) / 2.25
    assert taste["vector"] == pytest.approx([1 / 3, 2 / 3])
    assert taste["weight"] == pytest.approx(2.25)
    store.append(events("like", track_id="t3"))
    (taste,) = store.derived_state()["taste"]
    decay = math.exp(-20 / (6 * 3600) * math.log(2))  # the like is 20 s after t2
    w = [0.75 * decay, 1.5 * decay, 2.0]
    expected = [(w[0] + w[2]) / sum(w), (w[1] + w[2]) / sum(w)]
    assert taste["vector"] == pytest.approx(expected)


def test_latest_context_is_kept(store: EventStore, events: Events) -> None:
    late = events("context", device_type="car", network="cellular", local_time="18:05")
    early = dict(events("context", device_type="desktop"), ts="2026-11-01T08:00:00+00:00")
    store.append_many([late, early])
    (ctx,) = store.derived_state()["context"]
    assert (ctx["device_type"], ctx["network"]) == ("car", "cellular")
    assert ctx["local_time"] == "18:05:00"
