"""Reranking with the real TFLite ranker over a real store: guards, reasons, session awareness."""

from __future__ import annotations

import copy
import pickle
import random
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from conftest import T0, Events, StoreFactory
from store_peek import own_connection, peek

from sottovoce._demo import listen, make_catalog
from sottovoce.device import DeviceError, EventStore, _store_catalog
from sottovoce.device._features import assemble, features
from sottovoce.device._personalize import Personalizer, RankedItem, Ranking, RerankOptions


@pytest.fixture(scope="module")
def catalog() -> tuple[list, list]:  # type: ignore[type-arg]
    return make_catalog(random.Random(3))


@pytest.fixture
def listened(open_store: StoreFactory, catalog: tuple[list, list]) -> Personalizer:  # type: ignore[type-arg]
    """A US device whose user has a month of listening, mostly ambient and jazz."""
    tracks, rows = catalog
    store = open_store("us")
    store.upsert_catalog(rows)
    store.append_many(listen(random.Random(5), "ann", tracks, {0, 1}, 1_500))
    return Personalizer(store)


def _now(store: EventStore) -> datetime:
    ((last,),) = peek(store, "SELECT max(ts) FROM events")
    return datetime.fromtimestamp(last / 1000, tz=T0.tzinfo) + timedelta(minutes=1)


def test_without_consent_the_app_order_comes_back(open_store: StoreFactory) -> None:
    store = open_store("eu")
    personalizer = Personalizer(store)
    ranking = personalizer.rerank("bob", ["t3", "t1", "t2"])
    assert not ranking.personalized and ranking.track_ids == ["t3", "t1", "t2"]
    assert "not personalized" in ranking.note and "age" in ranking.note
    personalizer.rerank("bob", ["t1"])  # a second refusal is not logged again
    reasons = [d.reason for _, d in store.decisions.query(action="personalize")]
    assert reasons == ["age_restricted"]


def test_disliked_tracks_never_reach_the_top_k(listened: Personalizer, catalog: tuple) -> None:  # type: ignore[type-arg]
    tracks = [t.track_id for t in catalog[0]]
    hated = tracks[:5]
    events = Events("ann")
    events.clock = _now(listened.store)
    listened.store.append_many([events("dislike", track_id=t, artist_id=None) for t in hated])
    for seed in range(5):
        ranking = listened.rerank("ann", tracks[:60], options=RerankOptions(seed=seed,
                                  explore_share=0.3))  # fmt: skip
        top = ranking.track_ids[:10]
        assert not set(top) & set(hated)
        assert set(ranking.track_ids[-5:]) == set(hated)
        assert all(i.reason == "you disliked this" for i in ranking.items[-5:])


def test_at_most_n_per_artist_in_the_top_k(listened: Personalizer, catalog: tuple) -> None:  # type: ignore[type-arg]
    tracks = catalog[0]
    candidates = [t.track_id for t in tracks if t.genre == 0][:40]  # 5 artists x 8 tracks
    options = RerankOptions(max_per_artist=2, explore_share=0)
    ranking = listened.rerank("ann", candidates, options=options)
    artist = {t.track_id: t.artist_id for t in tracks}
    top = [artist[t] for t in ranking.track_ids[:10]]
    assert max(top.count(a) for a in set(top)) <= 2
    assert sorted(ranking.track_ids) == sorted(candidates)


def test_exploration_is_bounded_and_reproducible(listened: Personalizer, catalog: tuple) -> None:  # type: ignore[type-arg]
    candidates = [t.track_id for t in catalog[0][:200]]
    options = RerankOptions(top_k=10, explore_share=0.2, seed=11)
    first = listened.rerank("ann", candidates, options=options)
    again = listened.rerank("ann", candidates, options=options)
    assert first.track_ids == again.track_ids
    explored = [i for i, item in enumerate(first.items) if item.explored]
    assert len(explored) == 2 and all(2 <= i < 10 for i in explored)
    assert all(first.items[i].reason == "something new to explore" for i in explored)
    others = {tuple(listened.rerank("ann", candidates, options=RerankOptions(
        explore_share=0.2, seed=s)).track_ids[:10]) for s in range(6)}  # fmt: skip
    assert len(others) > 1
    none = listened.rerank("ann", candidates, options=RerankOptions(explore_share=0))
    assert not any(item.explored for item in none.items)
    artist = {t.track_id: t.artist_id for t in catalog[0]}
    for seed in range(30):  # exploration never breaks the artist cap, and explores new tracks
        ranking = listened.rerank("ann", candidates, options=RerankOptions(
            explore_share=0.3, seed=seed))  # fmt: skip
        top = [artist[t] for t in ranking.track_ids[:10]]
        assert max(top.count(a) for a in set(top)) <= 2
        played = {r["track_id"] for r in listened.store.derived_state("ann")["track_stats"]}
        assert not {i.track_id for i in ranking.items if i.explored} & played
    with pytest.raises(ValueError, match="explore_share"):
        RerankOptions(explore_share=0.5)


def test_skipping_an_artist_pushes_its_tracks_down_in_the_next_rerank(
    listened: Personalizer,
    catalog: tuple,  # type: ignore[type-arg]
) -> None:
    tracks = catalog[0]
    artist = "ambient-0"
    mine = [t.track_id for t in tracks if t.artist_id == artist]
    candidates = mine[3:] + [t.track_id for t in tracks if t.genre in (0, 1) and
                             t.artist_id != artist][:30]  # fmt: skip
    now = _now(listened.store)
    options = RerankOptions(explore_share=0, max_per_artist=10)
    before = listened.rerank("ann", candidates, now=now, options=options).track_ids
    events = Events("ann")
    events.clock = now
    listened.store.append_many([
        events("skip", track_id=t, artist_id=artist, position_ms=4_000) for t in mine[:3]
    ])  # fmt: skip
    later = now + timedelta(minutes=1)
    after = listened.rerank("ann", candidates, now=later, options=options)
    rank_before = sum(before.index(t) for t in mine[3:]) / len(mine[3:])
    rank_after = sum(after.track_ids.index(t) for t in mine[3:]) / len(mine[3:])
    assert rank_after > rank_before + 5
    moved = [i for i in after.items if i.track_id in mine[3:]]
    assert all(i.reason == "lower: you skipped this artist just now" for i in moved)
    # a new session (after the idle gap) forgets the session's skips
    fresh = listened.rerank("ann", candidates, now=later + timedelta(hours=2), options=options)
    assert not any(i.reason.startswith("lower") for i in fresh.items)


def test_a_rankings_items_are_built_when_read_and_hold_what_was_decided(
    listened: Personalizer,
    catalog: tuple,  # type: ignore[type-arg]
) -> None:
    candidates = [t.track_id for t in catalog[0][:200]]
    options = RerankOptions(explore_share=0.2, seed=4)
    ranking = listened.rerank("ann", candidates, options=options)
    ids = ranking.track_ids  # read before the items: from the decided order
    candidates.reverse()  # the app's list changes once the call returned
    items = ranking.items
    assert [i.track_id for i in items] == ids and ranking.track_ids == ids
    assert sorted(ids) == sorted(candidates) and ranking.items is items  # built once
    assert sum(i.explored for i in items) == 2
    assert all(isinstance(i, RankedItem) and isinstance(i.score, float) for i in items)
    eager = Ranking(items, personalized=True)
    assert eager == ranking and hash(eager) == hash(ranking) and eager.track_ids == ids
    assert ranking != Ranking(items, personalized=False) and ranking != Ranking(items[1:], True)
    assert repr(ranking).startswith("Ranking(items=(RankedItem(")
    with pytest.raises(AttributeError, match="immutable"):
        ranking.personalized = False  # type: ignore[misc]
    fresh = listened.rerank("ann", candidates, options=options)  # items not built yet
    for copied in (pickle.loads(pickle.dumps(fresh)), copy.deepcopy(fresh), copy.copy(fresh)):
        assert copied == ranking and copied.items == items and copied.track_ids == ids
    again = listened.rerank("ann", list(reversed(candidates)), options=options)
    assert again.items == items  # the same call decides the same ranking


def test_reasons_come_from_history(listened: Personalizer, catalog: tuple) -> None:  # type: ignore[type-arg]
    track = catalog[0][200].track_id
    events = Events("ann")
    events.clock = _now(listened.store)
    listened.store.append(events("like", track_id=track, artist_id=None))
    ranking = listened.rerank("ann", [track, catalog[0][1].track_id])
    reasons = {i.track_id: i.reason for i in ranking.items}
    assert reasons[track] == "you liked this"


def test_feature_assembly_is_not_a_query_per_candidate(
    listened: Personalizer,
    catalog: tuple,  # type: ignore[type-arg]
) -> None:
    tracks = [t.track_id for t in catalog[0]]
    listened.rerank("ann", tracks[:300])  # logs the personalize decision, warms the catalog
    statements: list[str] = []
    own_connection(listened.store).set_trace_callback(statements.append)
    counts = []
    for n in (20, 300):
        statements.clear()
        listened.rerank("ann", tracks[:n])
        counts.append(len(statements))
    own_connection(listened.store).set_trace_callback(None)
    assert counts[0] == counts[1] <= 12, statements


def test_unknown_tracks_still_rank(listened: Personalizer) -> None:
    ranking = listened.rerank("ann", ["not-in-catalog-1", "not-in-catalog-2"])
    assert sorted(ranking.track_ids) == ["not-in-catalog-1", "not-in-catalog-2"]
    assert listened.rerank("ann", []).items == ()


def test_release_swaps_weights_atomically(listened: Personalizer, tmp_path: Path) -> None:
    weights = listened.ranker.get_weights() * 0.5
    model = listened.ranker.model_id
    listened.install_verified_weights(weights, version=3, model_id=model)
    again = Personalizer(listened.store)
    assert again.version == 3
    again.rerank("ann", ["x"])  # loads the serving weights (no personal model yet)
    assert (again.ranker.get_weights() == weights).all()
    with pytest.raises(DeviceError, match="finite"):
        listened.install_verified_weights(weights[:-1], version=4, model_id=model)
    with pytest.raises(DeviceError, match="not newer"):
        # a replay or downgrade
        listened.install_verified_weights(weights, version=3, model_id=model)
    with pytest.raises(DeviceError, match="release is for model"):
        listened.install_verified_weights(weights, version=5, model_id="0" * 64)
    assert Personalizer(listened.store).version == 3


def test_a_write_by_another_connection_is_seen_at_once(
    listened: Personalizer,
    catalog: tuple,
    tmp_path: Path,  # type: ignore[type-arg]
) -> None:
    tracks = [t.track_id for t in catalog[0][:40]]
    options = RerankOptions(explore_share=0)
    first = listened.rerank("ann", tracks, options=options).track_ids[0]
    other = EventStore.open(listened.store.path, policy=listened.store.policy, region="us",
                            clock=lambda: _now(listened.store))  # fmt: skip
    events = Events("ann")
    events.clock = _now(listened.store)
    other.append(events("dislike", track_id=first, artist_id=None))
    other.close()
    assert first not in listened.rerank("ann", tracks, options=options).track_ids[:10]


# -- the whole catalog -------------------------------------------------------------------------
def test_ranking_the_catalog_is_reranking_all_of_it(
    listened: Personalizer,
    catalog: tuple,  # type: ignore[type-arg]
) -> None:
    store = listened.store
    events = Events("ann")
    events.clock = _now(store)
    tracks = [t.track_id for t in catalog[0]]
    store.append_many([
        events("dislike", track_id=tracks[7], artist_id=None),
        events("skip", track_id=tracks[9], artist_id=None, position_ms=2_000),
    ])  # fmt: skip
    now = _now(store)
    listened.rerank("ann", tracks[:50], now=now)  # part of the catalog cached, in another order
    for options in (RerankOptions(seed=3), RerankOptions(seed=4, top_k=25, explore_share=0.3,
                                                         max_per_artist=1)):  # fmt: skip
        whole = listened.rank_catalog("ann", now=now, options=options)
        assert [i.track_id for i in whole.items] != tracks, "ranked, not in catalog order"
        assert whole == listened.rerank("ann", list(store.catalog()), now=now, options=options)
        for chunk_size in (1, 7, 10_000):  # the runtime's kernels differ a little by batch size
            chunked = listened.rank_catalog("ann", now=now, options=options,
                                            chunk_size=chunk_size)  # fmt: skip
            assert chunked.track_ids == whole.track_ids
            assert [i.score for i in chunked.items] == pytest.approx(
                [i.score for i in whole.items], abs=1e-5)  # fmt: skip
        shelf = listened.rank_catalog("ann", now=now, options=options, limit=12)
        assert shelf.items == whole.items[:12]
    assert len(whole.items) == len(tracks) and any(i.explored for i in whole.items[:25])
    assert whole.items[-1].reason == "you disliked this"


def test_the_catalog_in_the_apps_order_without_consent(open_store: StoreFactory) -> None:
    store = open_store("eu")  # no age, no consent: not personalized
    store.upsert_catalog({"track_id": t, "vector": [1.0, 0.0]} for t in ("b", "c", "a"))
    ranking = Personalizer(store).rank_catalog("bob", limit=2)
    assert not ranking.personalized and ranking.track_ids == ["a", "b"]
    with pytest.raises(ValueError, match="chunk_size"):
        Personalizer(store).rank_catalog("bob", chunk_size=0)
    empty = open_store("us", name="empty.db")  # opt-out region: personalized, nothing to rank
    assert Personalizer(empty).rank_catalog("bob") == Ranking((), personalized=True)


def test_features_from_the_stores_arrays_equal_assembled_ones(
    listened: Personalizer,
    catalog: tuple,  # type: ignore[type-arg]
) -> None:
    """Ranking gathers feature columns from arrays the store caches; training and the
    simulator assemble them from the snapshot's mappings. Both must give the same rows."""
    store = listened.store
    tracks = [t.track_id for t in catalog[0]]
    events = Events("ann")
    events.clock = _now(store)
    store.append_many([
        events("skip", track_id=tracks[0], artist_id=None, position_ms=1_000),
        events("like", track_id="not-in-catalog", artist_id="an-artist-only-ann-knows"),
        events("play_end", track_id=tracks[1], artist_id=None),
        events("context", device_type="car", network="cellular", local_time="23:50"),
    ])  # fmt: skip
    candidates = [*tracks[:120:3], "not-in-catalog", "nowhere", tracks[0], tracks[1]]
    for user, now in (("ann", _now(store)), ("ann", _now(store) + timedelta(hours=3)),
                      ("nobody", _now(store))):  # fmt: skip
        snapshot, inputs = store.ranking_inputs(user, candidates, now=now)
        x = features(snapshot, inputs.chunk(0, len(candidates)))
        state, artists, vectors = store.snapshot(user, candidates, now=now)
        assert np.array_equal(x, assemble(state, candidates, artists, vectors))
        halves = [inputs.chunk(0, 20), inputs.chunk(20, len(candidates))]
        assert np.array_equal(x, np.concatenate([features(snapshot, c) for c in halves]))


def test_a_catalog_too_large_to_cache_whole_is_loaded_as_needed(
    open_store: StoreFactory,
    catalog: tuple,  # type: ignore[type-arg]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_store_catalog, "WHOLE_CATALOG", 10)
    tracks, rows = catalog
    store = open_store("us")
    store.upsert_catalog(rows)
    store.append_many(listen(random.Random(6), "ann", tracks, {2}, 300))
    personalizer = Personalizer(store)
    ids = [t.track_id for t in tracks]
    now = _now(store)
    for candidates in (ids[200:230], ids[::-7], ids[100:260]):  # the cache grows in between
        snapshot, inputs = store.ranking_inputs("ann", candidates, now=now)
        state, artists, vectors = store.snapshot("ann", candidates, now=now)
        x = features(snapshot, inputs.chunk(0, len(candidates)))
        assert np.array_equal(x, assemble(state, candidates, artists, vectors))
    options = RerankOptions(seed=8)
    whole = personalizer.rank_catalog("ann", now=now, options=options)
    assert whole == personalizer.rerank("ann", sorted(ids), now=now, options=options)
