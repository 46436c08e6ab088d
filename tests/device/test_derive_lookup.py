"""The append path's derivation asks the catalog only for the vectors it needs, and derives
what it derived with the whole catalog at hand.

``derive_batch`` takes a source of vectors (the store's catalog, which loads what it is asked
for) instead of a mapping of every batch track's vector; on generated batches, above and below
``SMALL_BATCH``, with tracks in and out of the catalog, it gives exactly the rows
``derive_columns`` and ``derive`` give with the whole catalog.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sottovoce.device._derive import Fact, FactBatch, Vector, derive
from sottovoce.device._derive_columns import SMALL_BATCH, derive_batch, derive_columns

CATALOG = {f"t{i}": np.array([i, 1.0 - i, 0.5]) for i in range(4)}
KINDS = ["play_start", "play_end", "skip", "like", "dislike", "context"]


@st.composite
def batches(draw: st.DrawFn) -> list[Fact]:
    facts = []
    for seq in range(1, draw(st.integers(1, 3 * SMALL_BATCH)) + 1):
        kind = draw(st.sampled_from(KINDS))
        track = None if kind == "context" else draw(st.sampled_from([*CATALOG, "t-unknown"]))
        facts.append(Fact(
            seq=seq, user=draw(st.sampled_from([1, 2])), type=kind,
            ts=draw(st.integers(0, 10)) * 60_000, track=track,
            artist=draw(st.sampled_from([None, "a0", "a1"])) if track else None,
            ms_played=draw(st.integers(0, 300_000)) if kind == "play_end" else 0,
            duration_ms=draw(st.integers(1, 300_000)) if kind == "play_end" else 0,
            position_ms=draw(st.integers(0, 60_000)) if kind == "skip" else 0,
            context=("phone", "wifi", "08:30:00") if kind == "context" else None,
        ))  # fmt: skip
    return facts


class Catalog:
    """Hands out the vectors asked for (of those it has), as the store's catalog loads them."""

    def __init__(self) -> None:
        self.asked: set[str] = set()

    def __call__(self, track_ids: Sequence[str | None]) -> Mapping[str, Vector]:
        wanted = set(filter(None, track_ids))
        self.asked |= wanted
        return {t: v for t, v in CATALOG.items() if t in wanted}


@settings(max_examples=200, deadline=None)
@given(facts=batches())
def test_asking_for_what_weighs_derives_what_the_whole_catalog_derives(
    facts: list[Fact],
) -> None:
    catalog = Catalog()
    got = derive_batch(FactBatch.of(facts), catalog)
    if len(facts) < SMALL_BATCH:
        expected = derive(facts, CATALOG).rows()
    else:
        expected = derive_columns(FactBatch.of(facts), lambda _: CATALOG)
    assert (got.tracks, got.artists, got.runs, got.context) == (
        expected.tracks, expected.artists, expected.runs, expected.context)  # fmt: skip
    assert got.taste.keys() == expected.taste.keys()
    for user, taste in expected.taste.items():
        mine = got.taste[user]
        assert (mine.ref, mine.weight) == (taste.ref, taste.weight)
        assert np.array_equal(mine.total, taste.total)
    if len(facts) >= SMALL_BATCH:  # the column-wise path asks only for tracks that weigh
        weighing = {f.track for f in facts if f.type in {"like", "play_end"}}
        assert catalog.asked <= weighing
