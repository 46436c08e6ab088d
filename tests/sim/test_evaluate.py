"""Holdout, candidate pools, metrics, baselines, and a dataset's user replayed into a device."""

from __future__ import annotations

import math
import random
from collections import Counter
from datetime import timedelta

import numpy as np
import pytest
from conftest import NOW, StoreFactory
from sim_helpers import lastfm, lastfm_slice, tiny

from sottovoce.device import Personalizer, is_completion
from sottovoce.device._collaborator import listening as device_listening
from sottovoce.policy import Purpose
from sottovoce.sim._datasets import Dataset, Interaction, build_item_vectors
from sottovoce.sim._device_feed import MAX_PLAYS, listening
from sottovoce.sim._evaluate import (
    Pool,
    PopularityRanker,
    RandomRanker,
    candidate_pool,
    candidate_pools,
    catalog_items,
    device_events,
    evaluate,
    hr_at_k,
    mrr,
    ndcg_at_k,
    split_holdout,
)

# --- Holdout ---------------------------------------------------------------------------------


def test_holdout_takes_a_fifth_of_each_users_positives() -> None:
    data = tiny(users=8)
    few = Dataset.build(
        "few",
        {
            **data.interactions,
            "short": (Interaction("i1", None, "play"), Interaction("i2", None, "play")),
        },
    )
    split = split_holdout(few, fraction=0.2, seed=1)
    assert "short" not in split.heldout and split.train["short"] == few.interactions["short"]
    assert split.evaluated == tuple(f"u{n}" for n in range(8))
    for user, held in split.heldout.items():
        positives = few.positives(user)
        assert held < positives and len(held) == 2  # round(0.2 * 10)
        assert not held & {r.item for r in split.train[user]}
        assert len(split.train[user]) == len(few.interactions[user]) - 2  # the skip stays
        assert split.touched[user] == few.touched(user)
    assert split.heldout_pairs() == {(u, i) for u, items in split.heldout.items() for i in items}


def test_holdout_is_deterministic_per_user() -> None:
    data = tiny(users=8)
    one, two = split_holdout(data, seed=3), split_holdout(data, seed=3)
    assert one.heldout == two.heldout and one.heldout != split_holdout(data, seed=4).heldout
    fewer = Dataset.build("fewer", {u: data.interactions[u] for u in ("u2", "u5")})
    assert split_holdout(fewer, seed=3).heldout == {u: one.heldout[u] for u in ("u2", "u5")}


def test_holdout_edges() -> None:
    data = Dataset.build(
        "two",
        {
            "a": (
                Interaction("x", None, "like"),
                Interaction("y", None, "complete"),
                Interaction("z", None, "dislike"),
            )
        },
    )
    split = split_holdout(data, fraction=0.9, min_items=2)
    assert len(split.heldout["a"]) == 1 and split.heldout["a"] < {"x", "y"}  # one stays
    with pytest.raises(ValueError, match="fraction"):
        split_holdout(data, fraction=1.0)
    with pytest.raises(ValueError, match="min_items"):
        split_holdout(data, min_items=1)


def test_holdout_on_lastfm() -> None:
    data = lastfm()
    split = split_holdout(data, seed=0)
    small = [u for u in data.users if len(data.interactions[u]) < 5]
    assert len(split.evaluated) == len(data.users) - len(small) and small
    assert all(
        len(split.heldout[u]) == 10 for u in split.evaluated if len(data.interactions[u]) == 50
    )


# --- Candidate pools -------------------------------------------------------------------------


def test_pools_hold_every_held_out_item_and_only_untouched_negatives() -> None:
    data = lastfm_slice(30)
    split = split_holdout(data, seed=0)
    pools = candidate_pools(split, universe=data.items, negatives=100, seed=5)
    assert [p.user for p in pools] == list(split.evaluated)
    for pool in pools:
        negatives = set(pool.candidates) - pool.relevant
        assert pool.relevant == split.heldout[pool.user] <= set(pool.candidates)
        assert len(negatives) == 100 and len(pool.candidates) == len(set(pool.candidates))
        assert not negatives & split.touched[pool.user]
    again = candidate_pools(split, universe=data.items, negatives=100, seed=5)
    assert again == pools
    assert candidate_pools(split, universe=data.items, negatives=100, seed=6) != pools
    # held-out items are spread through the list, not in front
    first = [pool.candidates.index(min(pool.relevant)) for pool in pools]
    assert len(set(first)) > 5


def test_pool_from_a_small_universe_takes_what_is_left() -> None:
    data = tiny(users=8, items=30)
    split = split_holdout(data, seed=0)
    pool = candidate_pool(split, "u0", universe=data.items, negatives=100, rng=random.Random(1))
    untouched = set(data.items) - data.touched("u0")
    assert set(pool.candidates) == untouched | pool.relevant  # all 19 untouched items
    assert len(pool.candidates) == len(untouched) + 2
    with pytest.raises(ValueError, match="no held-out items"):
        candidate_pool(split, "nobody", universe=data.items, rng=random.Random(1))


# --- Metrics ---------------------------------------------------------------------------------


def test_metrics_by_hand() -> None:
    ranked = ["a", "b", "c", "d", "e"]
    relevant = {"b", "e"}
    assert hr_at_k(ranked, relevant, 1) == 0.0 and hr_at_k(ranked, relevant, 2) == 1.0
    # DCG@3 = 1/log2(3); ideal DCG over min(3, 2) = 2 hits = 1 + 1/log2(3)
    assert ndcg_at_k(ranked, relevant, 3) == pytest.approx(0.386852807)
    # DCG@5 adds 1/log2(6) for "e" at rank 5
    assert ndcg_at_k(ranked, relevant, 5) == pytest.approx(0.624050520)
    assert mrr(ranked, relevant) == 0.5
    # more relevant items than k: the ideal is k hits
    assert ndcg_at_k(["a", "x", "b"], {"a", "b", "c"}, 2) == pytest.approx(
        1 / (1 + 1 / math.log2(3))
    )
    assert ndcg_at_k(["a", "b"], {"a", "b"}, 10) == 1.0
    assert (hr_at_k(ranked, {"z"}), ndcg_at_k(ranked, {"z"}), mrr(ranked, {"z"})) == (0, 0, 0)
    assert ndcg_at_k(ranked, set()) == 0.0


def test_evaluate_averages_over_users() -> None:
    pools = [
        Pool("u1", ("a", "b", "c"), frozenset({"a"})),
        Pool("u2", ("a", "b", "c"), frozenset({"c"})),
    ]
    result = evaluate(lambda user, candidates: list(candidates), pools, k=2)
    assert result == pytest.approx({"hr@2": 0.5, "ndcg@2": 0.5, "mrr": (1 + 1 / 3) / 2})
    assert set(evaluate(lambda u, c: c, pools)) == {"hr@10", "ndcg@10", "mrr"}
    with pytest.raises(ValueError, match="not a permutation"):
        evaluate(lambda user, candidates: list(candidates)[:2], pools)
    with pytest.raises(ValueError, match="no pools"):
        evaluate(lambda user, candidates: candidates, [])


def test_popularity_counts_training_only() -> None:
    train = {
        "u1": (Interaction("a", None, "play"), Interaction("b", None, "skip")),
        "u2": (Interaction("a", None, "like"), Interaction("b", None, "dislike")),
        "u3": (Interaction("c", None, "play"),),
    }
    ranker = PopularityRanker(train)
    assert ranker.counts == Counter({"a": 2, "c": 1})  # skips and dislikes are not popularity
    assert ranker("u9", ["d", "b", "c", "a"]) == ["a", "c", "d", "b"]  # ties keep their order
    shuffled = RandomRanker(seed=1)("u1", list("abcdefgh"))
    assert shuffled == RandomRanker(seed=1)("u1", list("abcdefgh")) and sorted(shuffled) == list(
        "abcdefgh"
    )


def test_popularity_beats_random_on_lastfm() -> None:
    data = lastfm()
    split = split_holdout(data, seed=0)
    pools = candidate_pools(split, universe=data.items, seed=0)
    chance = evaluate(RandomRanker(seed=0), pools)
    popular = evaluate(PopularityRanker(split.train), pools)
    # ~10 relevant among ~110: a random top 10 holds at least one about 1 - 0.9^10 of the time
    assert 0.58 < chance["hr@10"] < 0.69 and 0.07 < chance["ndcg@10"] < 0.12
    assert popular["ndcg@10"] > chance["ndcg@10"] + 0.3 and popular["mrr"] > chance["mrr"] + 0.3


# --- Into a device store -----------------------------------------------------------------------


def test_lastfm_user_replays_into_a_real_store(open_store: StoreFactory) -> None:
    data = lastfm_slice(5)
    split = split_holdout(data, seed=0)
    user = split.evaluated[0]
    vectors = build_item_vectors(data, train=split.train)
    events = device_events(user, split.train[user], artists=data.artists, end=NOW, seed=1)
    assert events == device_events(user, split.train[user], artists=data.artists, end=NOW, seed=1)
    plays = {row.item: min(MAX_PLAYS, 1 + int(math.log(row.value, 4) + 1e-9))
             for row in split.train[user]}  # fmt: skip
    assert 2 * sum(plays.values()) < len(events) < 3 * sum(plays.values())  # start, end; context
    store = open_store("eu")
    store.set_age(user, 30)
    store.grant(user, Purpose.PERSONALIZATION)
    store.upsert_catalog(catalog_items(data, vectors))
    result = store.append_many(events)
    assert result.accepted == len(events) and not result.expired_ids
    artists = {row["artist_id"]: row for row in store.derived_state(user)["artist_stats"]}
    for item, expected in plays.items():
        assert (artists[item]["plays"], artists[item]["completions"]) == (expected,) * 2
    # what the simulator scores with is what the device counts
    assert device_listening(store, user) == listening(split.train[user]) == plays
    assert not set(artists) & split.heldout[user]
    examples = Personalizer(store).examples(user)
    assert len(examples) > 100 and 0.1 < float(examples.y.mean()) < 0.5


def test_timed_interactions_keep_their_order(open_store: StoreFactory) -> None:
    rows = [
        Interaction("song-3", 1_700_000_000_000 + 3_600_000 * 24 * 200, "like"),
        Interaction("song-1", 1_700_000_000_000, "complete"),
        Interaction("song-2", 1_700_000_000_000 + 3_600_000, "skip"),
        Interaction("song-4", 1_700_000_000_000 + 7_200_000, "dislike"),
    ]
    events = device_events("ann", rows, artists={"song-1": "band"}, end=NOW, days=10)
    kinds = [(e["type"], e.get("track_id")) for e in events]
    assert kinds == [
        ("context", None),
        ("play_start", "song-1"),
        ("play_end", "song-1"),
        ("play_start", "song-2"),
        ("skip", "song-2"),
        ("play_end", "song-2"),
        ("dislike", "song-4"),
        ("context", None),
        ("like", "song-3"),
    ]
    times = [e["ts"] for e in events]
    assert times == sorted(times) and times[0] >= (NOW - timedelta(days=10)).isoformat()
    assert events[1]["artist_id"] == "band" and "artist_id" not in events[3]
    ended = events[2]
    assert is_completion(ended["ms_played"], ended["duration_ms"])
    assert events[5]["ms_played"] < 30_000  # an early skip: a negative example
    store = open_store("us")
    store.set_age("ann", 30)
    assert store.append_many(events).accepted == len(events)
    assert device_listening(store, "ann") == listening(rows, days=10) == {"song-1": 1, "song-3": 1}
    # more than fits in the days: fewer plays each, then only the newest, never an error
    many = [Interaction(f"x{n % 50}", None, "play", 2.0 ** (n % 9)) for n in range(2_000)]
    heavy = device_events("bob", many, artists={}, end=NOW, days=2)
    assert heavy and heavy[-1]["ts"] <= NOW.isoformat()
    assert heavy[0]["ts"] >= (NOW - timedelta(days=2)).isoformat()
    store.set_age("bob", 30)
    assert store.append_many(heavy).accepted == len(heavy)
    counted = listening(many, days=2)
    assert device_listening(store, "bob") == counted and sum(counted.values()) < len(many)


def test_catalog_items_fill_missing_vectors() -> None:
    data = tiny(users=2, items=12)
    vectors = {"i0": np.ones(16), "i1": np.zeros(16)}
    rows = catalog_items(data, vectors)
    assert [r["track_id"] for r in rows] == list(data.items)
    assert rows[0]["vector"] == [1.0] * 16 and rows[5]["vector"] == [0.0] * 16
    assert catalog_items(data, vectors, items=["i1"])[0] == {
        "track_id": "i1",
        "artist_id": None,
        "vector": [0.0] * 16,
    }


def test_a_time_split_holds_out_each_users_latest_items() -> None:
    rows = {
        "u1": tuple(Interaction(f"i{n}", 1_000 + n, "play", 1.0) for n in range(10)),
        "u2": tuple(Interaction(f"i{n}", 5_000 - n, "play", 1.0) for n in range(10)),
    }
    data = Dataset.build("timed", rows)
    split = split_holdout(data, fraction=0.2, by="time")
    assert split.heldout == {"u1": frozenset({"i8", "i9"}), "u2": frozenset({"i0", "i1"})}
    untimed = Dataset.build("untimed", {"u": tuple(Interaction(f"i{n}", None, "play", 1.0)
                                                   for n in range(6))})  # fmt: skip
    with pytest.raises(ValueError, match="timestamp"):
        split_holdout(untimed, by="time")
