"""The device's blend of the collaborative model with the catalog's item vectors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import NOW, consenting, hit_rate, policy_where_all_take_part

from sottovoce.device import DeviceError, EventStore
from sottovoce.device._blend import BETAS, Blend
from sottovoce.device._collaborative import CollaborativeModel, Layout, collaborative_upload
from sottovoce.device._collaborator import Collaborator, advance, listening
from sottovoce.policy import Purpose

CATALOG = tuple(f"t{n}" for n in range(60))
CLUSTERS, SIZE = 6, 10  # t0..t9 go together, t10..t19, ...


def _listeners(users: int = 600, seed: int = 0) -> tuple[list[list[str]], list[str]]:
    """Each user listens to 5 of their cluster's 10 items and one of the 60 at random; one of
    the cluster's is held out."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for u in range(users):
        own = rng.choice(SIZE, size=5, replace=False) + SIZE * (u % CLUSTERS)
        items = [CATALOG[i] for i in own]
        train.append([*items[1:], CATALOG[rng.integers(len(CATALOG))]])
        held.append(items[0])
    return train, held


def _fit(histories: list[list[str]], layout: Layout, rounds: int = 2) -> CollaborativeModel:
    model = None
    for _ in range(rounds):
        total = sum(collaborative_upload(model, layout, h, clipping_norm=1.0) for h in histories)
        model = advance(model, layout, np.asarray(total) / len(histories), noise_std=0.0)
    assert model is not None
    return model


def _vectors(informative: bool, seed: int = 2) -> np.ndarray[Any, Any]:
    """Each item's cluster, blurred (``informative``), or vectors that say nothing of it."""
    rng = np.random.default_rng(seed)
    if informative:
        return np.repeat(np.eye(CLUSTERS), SIZE, axis=0) + 0.3 * rng.standard_normal((60, 6))
    return rng.standard_normal((60, 6))


@pytest.fixture(scope="module")
def fitted() -> tuple[CollaborativeModel, list[list[str]], list[str]]:
    """A rank-2 model of six clusters: it cannot tell them all apart; their vectors can."""
    train, held = _listeners()
    return _fit(train, Layout(CATALOG, table=60, rank=2)), train, held


def test_content_that_says_what_goes_together_ranks_held_out_items_higher(fitted: Any) -> None:
    model, train, held = fitted
    blend = Blend(model, _vectors(informative=True))
    assert blend.agrees
    alone = hit_rate(model.scores, train, held, model.layout, k=5)
    assert (
        hit_rate(blend.scores, train, held, model.layout, k=5) > alone + 0.25
    )  # 0.74 against 0.41
    weights = [blend.weight(items) for items in train]
    assert np.mean(weights) > 0 and max(weights) <= BETAS.max()


def test_content_that_says_nothing_leaves_the_models_scores_as_they_are(fitted: Any) -> None:
    model, train, _ = fitted
    blend = Blend(model, _vectors(informative=False))
    assert not blend.agrees
    for items in train[:50]:
        assert blend.weight(items) == 0.0
        assert np.array_equal(blend.scores(items), model.scores(items))


def test_the_weight_is_the_users_own_and_the_same_for_the_same_history(fitted: Any) -> None:
    model, train, _ = fitted
    blend = Blend(model, _vectors(informative=True))
    assert blend.weight(train[0]) == blend.weight(list(reversed(train[0])))
    assert blend.weight([]) == 0.0
    assert blend.weight(["not-in-the-catalog"]) == 0.0


def test_the_table_stays_above_every_other_item() -> None:
    train, _ = _listeners()
    model = _fit(train, Layout(CATALOG, table=20, rank=2))
    blend = Blend(model, _vectors(informative=True))
    assert blend.agrees and len(model.table) < len(CATALOG)
    for items in train[:30]:
        scores = blend.scores(items)
        assert scores[model.table].min() > np.delete(scores, model.table).max()


def test_content_needs_one_vector_per_catalog_item(fitted: Any) -> None:
    model, _, _ = fitted
    with pytest.raises(DeviceError, match="one vector per catalog item"):
        Blend(model, np.zeros((59, 6)))
    with pytest.raises(DeviceError, match="one vector per catalog item"):
        Blend(model, np.zeros(60))


def test_a_device_blends_the_model_with_its_own_catalog(tmp_path: Path, fitted: Any) -> None:
    model, _, _ = fitted
    store = EventStore.open(tmp_path / "device.db", policy=policy_where_all_take_part(),
                            region="us", clock=lambda: NOW)  # fmt: skip
    try:
        consenting(store, "u1", Purpose.PERSONALIZATION)
        for n, track in enumerate(("t1", "t2", "t3", "t4")):
            store.append({"event_id": f"e{n}", "user_id": "u1", "type": "play_end",
                          "ts": NOW.isoformat(), "track_id": track, "ms_played": 200_000,
                          "duration_ms": 200_000})  # fmt: skip
        vectors = _vectors(informative=True)
        store.upsert_catalog({"track_id": t, "vector": vectors[n].tolist()}
                             for n, t in enumerate(CATALOG[:50]))  # fmt: skip
        device = Collaborator(store, model.layout)
        device.model = model  # as if installed from releases
        items = listening(store, "u1")
        content = np.vstack([vectors[:50], np.zeros((10, 6))])  # t50..t59: not in the catalog
        expected = Blend(model, content).scores(items)
        assert np.allclose(device.scores("u1"), expected, atol=1e-6)  # float32 in the store
        assert np.array_equal(device.scores("u1", content=False), model.scores(items))
        assert not np.allclose(expected, model.scores(items))
    finally:
        store.close()
