"""The fast training paths equal the plain ones they replace, bit for bit.

Examples: ``reference_examples`` is the definition written the obvious way: replay every
event, build each labelled event's rows with ``assemble`` from the live state, update the taste
through ``derive``, and cut to the most recent ``limit`` rows at the end. ``build_examples``
skips rows that the cut drops and batches the history columns; it must not change a float.

Steps: ``Ranker.train_batches`` checks its inputs once and runs many steps; it must give what
``train_step`` on each batch gives, and refuse what ``train_step`` refuses, changing nothing.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import numpy.typing as npt
import pytest
from conftest import NOW, StoreFactory

from sottovoce._demo import listen, make_catalog
from sottovoce.device import EventStore
from sottovoce.device._derive import (
    OUTCOMES,
    SESSION_GAP_MS,
    Counters,
    Fact,
    Taste,
    derive,
    is_play,
)
from sottovoce.device._features import (
    Candidates,
    History,
    Snapshot,
    apply_context,
    assemble,
    features,
    features_of_many,
)
from sottovoce.device._ranker import FEATURES, Ranker, RankerError
from sottovoce.device._training import Catalog, Examples, build_examples, label
from sottovoce.policy import example_policy


class _Histories(Mapping[str, History]):
    def __init__(self, counters: dict[str, Counters]) -> None:
        self._counters = counters

    def __getitem__(self, key: str) -> History:
        c = self._counters[key]
        return History(c.plays, c.completions, c.skips, c.early_skips, c.feedback,
                       c.last_played_ts if c.last_played_ts is not None else -1)  # fmt: skip

    def __iter__(self) -> Iterator[str]:
        return iter(self._counters)

    def __len__(self) -> int:
        return len(self._counters)


def reference_examples(facts: Sequence[Fact], catalog: Catalog, *, negatives: int = 4,
                       limit: int = 2_000, seed: int = 0) -> Examples:  # fmt: skip
    rng = random.Random(seed)
    pool = sorted(catalog)
    rows: list[npt.NDArray[np.float32]] = []
    labels: list[float] = []
    weights: list[float] = []
    tracks: dict[str, Counters] = {}
    artists: dict[str, Counters] = {}
    taste: Taste | None = None
    session_end = -(2**62)
    session: dict[str, dict[str, int]] = {"skips": {}, "plays": {}}
    totals = {"skips": 0, "plays": 0}
    context: tuple[str, str, str, int] | None = None
    for fact in sorted(facts, key=lambda f: (f.ts, f.seq)):
        if fact.context is not None:
            context = (*fact.context, fact.ts)
        if fact.ts - session_end > SESSION_GAP_MS:
            session = {"skips": {}, "plays": {}}
            totals = {"skips": 0, "plays": 0}
        session_end = fact.ts
        verdict = label(fact) if fact.track is not None else None
        if verdict is not None and fact.track is not None:
            snap = Snapshot(now=fact.ts, tracks=_Histories(tracks), artists=_Histories(artists),
                            taste=None if taste is None else taste.mean(),
                            session_skips=totals["skips"], session_plays=totals["plays"],
                            session_artist_skips=session["skips"],
                            session_artist_plays=session["plays"])  # fmt: skip
            apply_context(snap, context)
            chosen = [fact.track]
            if verdict[0] == 1.0 and pool:
                others = [t for t in rng.sample(pool, min(len(pool), negatives + 1))
                          if t != fact.track]  # fmt: skip
                chosen += others[:negatives]
            info = [catalog.get(t) for t in chosen]
            artists_of = [fact.artist] + [i[0] if i else None for i in info[1:]]
            rows.append(assemble(snap, chosen, artists_of, [i[1] if i else None for i in info]))
            labels += [verdict[0]] + [0.0] * (len(chosen) - 1)
            weights += [verdict[1]] + [1.0] * (len(chosen) - 1)
        if fact.track is not None and fact.type in OUTCOMES:
            tracks.setdefault(fact.track, Counters()).add(fact)
            if fact.artist is not None:
                artists.setdefault(fact.artist, Counters()).add(fact)
            kind = "skips" if fact.type == "skip" else None
            if fact.type == "play_end" and is_play(fact.ms_played, fact.duration_ms):
                kind = "plays"
            if kind is not None:
                totals[kind] += 1
                if fact.artist is not None:
                    session[kind][fact.artist] = session[kind].get(fact.artist, 0) + 1
        known = catalog.get(fact.track) if fact.track is not None else None
        step = derive([fact], {fact.track: known[1]} if fact.track and known else {})
        for piece in step.taste.values():
            taste = piece if taste is None else taste.merge(piece)
    if not rows:
        empty = np.zeros((0, FEATURES), dtype=np.float32)
        return Examples(empty, np.zeros(0, np.float32), np.zeros(0, np.float32))
    return Examples(np.concatenate(rows)[-limit:], np.array(labels, np.float32)[-limit:],
                    np.array(weights, np.float32)[-limit:])  # fmt: skip


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Fact], Catalog]:
    tracks, rows = make_catalog(random.Random(1))
    store = EventStore.open(tmp_path_factory.mktemp("examples") / "d.db",
                            policy=example_policy(), region="us", clock=lambda: NOW)  # fmt: skip
    store.upsert_catalog(rows)
    events = listen(random.Random(2), "ann", tracks, {2, 5}, 1_500)
    for n, event in enumerate(events):  # dislikes, and tracks the catalog does not know
        if event["type"] == "like" and n % 3 == 0:
            event["type"] = "dislike"
        if event["type"] == "play_end" and n % 41 == 0:
            event["track_id"] = f"not-in-the-catalog-{n % 2}"
    store.append_many(events)
    try:
        return store.facts("ann"), store.catalog()
    finally:
        store.close()


def test_the_demo_history_has_every_kind_of_label(history: tuple[list[Fact], Catalog]) -> None:
    kinds = {label(f) for f in history[0] if f.track is not None} - {None}
    assert kinds == {(1.0, 1.0), (0.0, 1.0), (1.0, 2.0), (0.0, 2.0)}


@pytest.mark.parametrize("limit", [1, 7, 333, 2_000, 100_000])
@pytest.mark.parametrize("seed", [0, 3])
def test_examples_equal_the_plain_replay(
    history: tuple[list[Fact], Catalog], limit: int, seed: int
) -> None:
    facts, catalog = history
    got = build_examples(facts, catalog, limit=limit, seed=seed)
    want = reference_examples(facts, catalog, limit=limit, seed=seed)
    assert len(got) == len(want) == min(limit, len(reference_examples(facts, catalog, limit=10**9,
                                                                      seed=seed)))  # fmt: skip
    for part in ("x", "y", "w"):
        assert np.array_equal(getattr(got, part), getattr(want, part)), part


def test_the_rows_of_many_snapshots_equal_a_features_call_each() -> None:
    rng = np.random.default_rng(8)
    snapshots, counts = [], [3, 1, 5, 2, 4, 1]
    for n, count in enumerate(counts):
        snapshot = Snapshot(now=1_000 * n, taste=None if n in (0, 3) else rng.standard_normal(20),
                            session_skips=n, session_plays=2 * n)  # fmt: skip
        apply_context(snapshot, ("car", "cellular", "07:30", 0) if n % 2 else None)
        snapshots.append((snapshot, count))
    rows = sum(counts)
    items = rng.standard_normal((rows, 16))
    skips = np.zeros(rows)
    skips[[4, 5]] = [1.0, 3.0]  # one event in a session with skips of its artists, others not
    candidates = Candidates(items, rng.random((rows, 8)), rng.random((rows, 8)), skips,
                            np.zeros(rows))  # fmt: skip
    got = features_of_many(snapshots, candidates)
    want, start = [], 0
    for snapshot, count in snapshots:
        part = Candidates(*(column[start : start + count] for column in candidates))
        want.append(features(snapshot, part))
        start += count
    assert got.dtype == np.float32 and np.array_equal(got, np.concatenate(want))
    nothing = Candidates(*(column[:0] for column in candidates))
    assert features_of_many([], nothing).shape == (0, FEATURES)


def test_order_of_facts_does_not_matter_and_empty_inputs_give_no_rows(
    history: tuple[list[Fact], Catalog],
) -> None:
    facts, catalog = history
    shuffled = list(facts)
    random.Random(4).shuffle(shuffled)
    assert np.array_equal(build_examples(shuffled, catalog, limit=50).x,
                          build_examples(facts, catalog, limit=50).x)  # fmt: skip
    assert len(build_examples([], catalog)) == 0
    no_catalog = build_examples(facts, {}, limit=10**9)
    assert np.array_equal(no_catalog.x, reference_examples(facts, {}, limit=10**9).x)
    with pytest.raises(ValueError, match="limit"):
        build_examples(facts, catalog, limit=0)


def test_a_store_history_gives_the_same_examples_through_the_personalizer(
    open_store: StoreFactory,
) -> None:
    from sottovoce.device._personalize import Personalizer

    tracks, rows = make_catalog(random.Random(5))
    store = open_store("us")
    store.upsert_catalog(rows)
    store.append_many(listen(random.Random(6), "bo", tracks, {1}, 400))
    got = Personalizer(store).examples("bo", seed=9, limit=120)
    want = reference_examples(store.facts("bo"), store.catalog(), seed=9, limit=120)
    assert np.array_equal(got.x, want.x) and np.array_equal(got.y, want.y)


def _data(n: int = 60, seed: int = 0) -> tuple[npt.NDArray[np.float32], ...]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, FEATURES)).astype(np.float32)
    y = (rng.random(n) < 0.4).astype(np.float32)
    w = rng.uniform(0.5, 2.0, n).astype(np.float32)
    return x, y, w


def test_train_batches_equals_a_train_step_per_batch() -> None:
    x, y, w = _data()
    picks = np.array([np.random.default_rng(s).choice(60, 32, replace=False) for s in range(7)])
    one, many = Ranker.load(), Ranker.load()
    want = [one.train_step(x[p], y[p], w[p], lr=3e-3) for p in picks]
    got = many.train_batches(x, y, w, picks, lr=3e-3)
    assert got.tolist() == want
    assert np.array_equal(one.get_state(), many.get_state())
    unweighted = Ranker.load().train_batches(x, y, None, picks, lr=3e-3)
    ones = Ranker.load().train_batches(x, y, np.ones(60, np.float32), picks, lr=3e-3)
    assert unweighted.tolist() == ones.tolist()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda x, y, w, p: (np.where(np.arange(60)[:, None] == 5, np.nan, x), y, w, p), "x:"),
        (lambda x, y, w, p: (x, y + 1.5, w, p), "y:"),
        (lambda x, y, w, p: (x, y, -w, p), "w:"),
        (lambda x, y, w, p: (x, y, np.where(np.arange(60) < 32, 0, w), p[:, :32] % 32), "w:"),
        (lambda x, y, w, p: (x, y, w, p + 60), "batches:"),
        (lambda x, y, w, p: (x, y, w, p.astype(np.float32)), "batches:"),
        (lambda x, y, w, p: (x, y, w, p[0]), "batches:"),
        (lambda x, y, w, p: (x[:, :5], y, w, p), "x:"),
    ],
)
def test_train_batches_refuses_what_train_step_refuses_and_changes_nothing(
    change: object, message: str
) -> None:
    ranker = Ranker.load()
    before = ranker.get_state()
    x, y, w = _data()
    picks = np.array([np.arange(32), np.arange(28, 60)])
    with pytest.raises(RankerError, match=message):
        ranker.train_batches(*change(x, y, w, picks), lr=3e-3)  # type: ignore[operator]
    with pytest.raises(RankerError, match="lr"):
        ranker.train_batches(x, y, w, picks, lr=float("nan"))
    assert np.array_equal(ranker.get_state(), before)
