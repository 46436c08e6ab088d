"""The rerank path's faster steps give what the plain computation gives, bit for bit.

``_arrange`` (guards, then seeded exploration) is held equal to the plain-list version it
replaced, on arbitrary scores, dislikes, artists and options; a whole rerank is held equal,
item by item (type, track, score, reason, explored), to one rebuilt from the snapshot's
features, the model, the reasons and that plain version; the catalog-row lookup equals a
dictionary ``get`` per candidate, with unknown candidates too.
"""

from __future__ import annotations

import math
import random
from datetime import datetime, timedelta

import numpy as np
import numpy.typing as npt
import pytest
from conftest import T0, Events, StoreFactory
from hypothesis import given, settings
from hypothesis import strategies as st
from store_peek import peek

from sottovoce._demo import listen, make_catalog
from sottovoce.device._features import assemble
from sottovoce.device._personalize import Personalizer
from sottovoce.device._rerank import _REASONS, RankedItem, RerankOptions, _arrange, _reasons
from sottovoce.device._store_ranking import _lookup


def plain_arrange(
    scores: list[float], disliked: list[bool], fresh: list[bool], artists: list[int],
    options: RerankOptions,
) -> tuple[list[int], set[int]]:  # fmt: skip
    """The guards and exploration on Python lists, one candidate at a time."""
    n = len(scores)
    ranked = sorted(range(n), key=lambda i: -scores[i])  # stable, as numpy's stable argsort
    k = min(options.top_k, n - sum(disliked))
    top: list[int] = []
    per_artist: dict[int, int] = {}
    for i in ranked:
        if len(top) == k:
            break
        capped = artists[i] >= 0 and per_artist.get(artists[i], 0) >= options.max_per_artist
        if disliked[i] or capped:
            continue
        top.append(i)
        if artists[i] >= 0:
            per_artist[artists[i]] = per_artist.get(artists[i], 0) + 1
    rest = [i for i in ranked if i not in top and not disliked[i]]
    if len(top) < k:  # too few artists to honour the cap: fill in score order
        fill = rest[: k - len(top)]
        top = sorted(top + fill, key=ranked.index)
        rest = [i for i in rest if i not in fill]
    before = list(top)
    explored = plain_explore(top, rest, fresh, artists, options)
    if explored:
        displaced = [i for i in before if i not in top]
        rest = displaced + [i for i in rest if i not in explored]
    return top + rest + [i for i in ranked if disliked[i]], explored


def plain_explore(top: list[int], rest: list[int], fresh: list[bool], artists: list[int],
                  options: RerankOptions) -> set[int]:  # fmt: skip
    slots = math.floor(options.explore_share * len(top))
    first = min(2, len(top))
    if not slots or len(top) <= first:
        return set()
    pool = [i for i in rest if fresh[i]]
    rng = random.Random(options.seed)
    counts: dict[int, int] = {}

    def bump(i: int, by: int) -> None:
        if artists[i] >= 0:
            counts[artists[i]] = counts.get(artists[i], 0) + by

    for i in top:
        bump(i, 1)
    explored: set[int] = set()
    for place in rng.sample(range(first, len(top)), min(slots, len(top) - first)):
        bump(top[place], -1)
        full = {a for a, c in counts.items() if c >= options.max_per_artist}
        fits = [i for i in pool if artists[i] not in full]
        if not fits:
            bump(top[place], 1)
            continue
        pick = rng.choice(fits)
        pool.remove(pick)
        top[place] = pick
        explored.add(pick)
        bump(pick, 1)
    return explored


@st.composite
def candidates(draw: st.DrawFn) -> tuple[list[float], list[bool], list[bool], list[int]]:
    n = draw(st.integers(1, 60))
    scores = draw(st.lists(st.sampled_from([-1.0, -0.5, 0.0, 0.25, 0.5, 2.0]), min_size=n,
                           max_size=n))  # fmt: skip
    disliked = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    fresh = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    artists = draw(st.lists(st.integers(-1, draw(st.integers(0, 8))), min_size=n, max_size=n))
    return scores, disliked, fresh, artists


@settings(max_examples=400, deadline=None)
@given(candidates(), st.integers(1, 12), st.integers(1, 3), st.sampled_from([0, 0.1, 0.2, 0.3]),
       st.integers(0, 2**16))  # fmt: skip
def test_arrange_equals_the_plain_computation(
    drawn: tuple[list[float], list[bool], list[bool], list[int]], top_k: int, cap: int,
    share: float, seed: int,
) -> None:  # fmt: skip
    scores, disliked, fresh, artists = drawn
    options = RerankOptions(top_k=top_k, max_per_artist=cap, explore_share=share, seed=seed)
    order, explored = _arrange(np.array(scores), np.array(disliked), np.array(fresh),
                               np.array(artists, dtype=np.int64), options)  # fmt: skip
    assert (order.tolist(), explored) == plain_arrange(scores, disliked, fresh, artists, options)


def test_lookup_equals_a_get_per_key() -> None:
    index = {f"t{i}": i for i in range(50)}
    for keys in (["t3", "t1", "t49"], ["t3", "nope", "t1"], ["t7"], ["nope"], [], ["t2", "t2"]):
        expected = [index.get(k, -1) for k in keys]
        found, complete = _lookup(index, keys)
        assert found.dtype == np.int64 and found.tolist() == expected
        assert complete == (-1 not in expected)


def _now(personalizer: Personalizer) -> datetime:
    ((last,),) = peek(personalizer.store, "SELECT max(ts) FROM events")
    return datetime.fromtimestamp(last / 1000, tz=T0.tzinfo) + timedelta(minutes=1)


OPTIONS = [
    RerankOptions(seed=1),
    RerankOptions(seed=7, top_k=20, explore_share=0.3, max_per_artist=1),
    RerankOptions(explore_share=0.0),
]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("later", [timedelta(0), timedelta(hours=3)], ids=["session", "after"])
def test_a_rerank_equals_the_plain_computation_item_by_item(
    open_store: StoreFactory, options: RerankOptions, later: timedelta
) -> None:
    tracks, rows = make_catalog(random.Random(3))
    store = open_store("us")
    store.upsert_catalog(rows)
    store.append_many(listen(random.Random(5), "ann", tracks, {0, 1}, 1_500))
    personalizer = Personalizer(store)
    ids = [t.track_id for t in tracks]
    events = Events("ann")
    events.clock = _now(personalizer)
    store.append_many([events("skip", track_id=ids[0], artist_id=tracks[0].artist_id,
                              position_ms=1_000),
                       events("dislike", track_id=ids[1], artist_id=None)])  # fmt: skip
    pool = [*random.Random(9).sample(ids, 300), "not-in-catalog", ids[0], ids[1]]
    now = _now(personalizer) + later
    ranking = personalizer.rerank("ann", pool, now=now, options=options)

    snapshot, artists, vectors = store.snapshot("ann", pool, now=now)
    x = assemble(snapshot, pool, artists, vectors)
    codes = {a: n for n, a in enumerate(dict.fromkeys(a for a in artists if a))}
    skips = [snapshot.session_artist_skips.get(a, 0) if a else 0 for a in artists]
    scores: npt.NDArray[np.float64] = personalizer.ranker.infer(x).astype(np.float64)
    scores = scores - options.session_skip_penalty * np.array(skips, dtype=np.float64)
    fresh = [bool(x[i, 57] > 0 and skips[i] == 0) for i in range(len(pool))]  # never played
    order, explored = plain_arrange(scores.tolist(), [bool(v > 0) for v in x[:, 55]], fresh,
                                    [codes[a] if a else -1 for a in artists], options)  # fmt: skip
    reasons = _reasons(x)
    expected = [RankedItem(pool[i], float(scores[i]),
                           _REASONS[0] if i in explored else _REASONS[reasons[i]], i in explored)
                for i in order]  # fmt: skip
    assert all(type(item) is RankedItem for item in ranking.items)
    assert list(ranking.items) == expected
    assert any(skips) == (not later) and x[:, 55].any()  # the session's skip, the dislike
