"""Local training inside the TFLite model on the user's own history."""

from __future__ import annotations

import math
import random
from datetime import datetime

import numpy as np
import pytest
from conftest import StoreFactory, fill_listening

from sottovoce._demo import listen, make_catalog
from sottovoce.device import EventStore
from sottovoce.device._derive import is_completion
from sottovoce.device._personalize import Eligibility, NotEligible, Personalizer, RerankOptions
from sottovoce.policy import AgeRestricted, ConsentMissing, Purpose

READY = Eligibility(charging=True, unmetered=True, idle=True)


def test_only_when_eligible_and_consented(open_store: StoreFactory) -> None:
    store = open_store("eu")
    personalizer = Personalizer(store)
    with pytest.raises(NotEligible, match="not charging, unmetered"):
        personalizer.local_round("ann", eligibility=Eligibility(False, False, True))
    with pytest.raises(AgeRestricted):
        personalizer.local_round("ann", eligibility=READY)
    store.set_age("ann", 30)
    store.grant("ann", Purpose.PERSONALIZATION)
    with pytest.raises(ConsentMissing, match="federated_training"):
        personalizer.local_round("ann", eligibility=READY)


def _ndcg(ranking: list[str], relevant: set[str], k: int = 10) -> float:
    gain = sum(1 / math.log2(i + 2) for i, t in enumerate(ranking[:k]) if t in relevant)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(k, len(relevant))))
    return gain / ideal if ideal else 0.0


def test_training_on_own_history_raises_held_out_ndcg(open_store: StoreFactory) -> None:
    tracks, rows = make_catalog(random.Random(1))
    stream = listen(random.Random(2), "ann", tracks, {2, 5}, 3_000)
    cut = int(len(stream) * 0.8)
    # The device's clock reads the time of the last event it keeps; the rest is to come.
    latest = max(datetime.fromisoformat(e["ts"]) for e in stream[:cut])
    store: EventStore = open_store("us", clock=lambda: latest)
    store.upsert_catalog(rows)
    store.append_many(stream[:cut])
    held_out = {e["track_id"] for e in stream[cut:] if e["type"] == "play_end"
                and is_completion(e["ms_played"], e["duration_ms"])}  # fmt: skip
    rng = random.Random(3)
    others = [t.track_id for t in tracks if t.track_id not in held_out]
    candidates = sorted(held_out) + rng.sample(others, 100)
    rng.shuffle(candidates)
    options = RerankOptions(explore_share=0, max_per_artist=10)

    personalizer = Personalizer(store)
    before = _ndcg(personalizer.rerank("ann", candidates, options=options).track_ids, held_out)
    store.grant("ann", Purpose.FEDERATED_TRAINING)
    result = personalizer.local_round("ann", eligibility=READY, steps=300, seed=0)
    after_ranker = Personalizer(store)  # serves the stored local model
    after = _ndcg(after_ranker.rerank("ann", candidates, options=options).track_ids, held_out)
    assert result.examples > 500 and result.loss_after < result.loss_before
    assert after > before + 0.1, (before, after)
    served = after_ranker.ranker.get_weights()
    assert np.allclose(result.delta, served - personalizer.global_weights, atol=1e-6)
    assert result.base_version == 0


def test_examples_use_state_before_each_event(open_store: StoreFactory) -> None:
    tracks, rows = make_catalog(random.Random(1))
    store = open_store("us")
    store.upsert_catalog(rows)
    track = tracks[0]
    base = {"user_id": "u", "track_id": track.track_id, "artist_id": track.artist_id,
            "duration_ms": track.duration_ms}  # fmt: skip
    store.append_many([
        {**base, "type": "play_end", "event_id": "a", "ts": "2026-11-01T10:00:00+00:00",
         "ms_played": track.duration_ms},
        {**base, "type": "play_end", "event_id": "b", "ts": "2026-11-01T10:10:00+00:00",
         "ms_played": track.duration_ms},
    ])  # fmt: skip
    examples = Personalizer(store).examples("u")
    positives = examples.x[examples.y == 1]
    from sottovoce.device._features import TRACK

    assert positives.shape[0] == 2
    assert positives[0, TRACK + 7] == 1.0  # first time: never played before
    assert positives[1, TRACK] == pytest.approx(math.log1p(1))  # second: one play before


@pytest.fixture
def trainee(open_store: StoreFactory) -> tuple[EventStore, list[str]]:
    """A US store where ann has listened a while and consents to training; her track ids."""
    store: EventStore = open_store("us")
    tracks = fill_listening(store, "ann", events=600)
    return store, [t.track_id for t in tracks]


def test_a_removed_personal_model_stops_serving_at_once(
    trainee: tuple[EventStore, list[str]],
) -> None:
    store, tracks = trainee
    personalizer = Personalizer(store)
    personalizer.local_round("ann", eligibility=READY, steps=50)
    personalizer.rerank("ann", tracks[:1])
    assert not np.array_equal(personalizer.ranker.get_weights(), personalizer.global_weights)
    store.withdraw("ann", Purpose.PERSONALIZATION)  # deletes the personal model with the rest
    store.grant("ann", Purpose.PERSONALIZATION)
    personalizer.rerank("ann", tracks[:1])
    assert np.array_equal(personalizer.ranker.get_weights(), personalizer.global_weights)
    assert store.load_model(f"local:{store.user_hash('ann')}") is None


def test_the_personal_model_is_in_the_access_export(
    trainee: tuple[EventStore, list[str]],
) -> None:
    store, _ = trainee
    assert store.export_user("ann")["personal_models"] == []
    Personalizer(store).local_round("ann", eligibility=READY, steps=5)
    (model,) = store.export_user("ann")["personal_models"]
    assert model["parameters"] == 20_737 and model["version"] == 0
    store.erase_user("ann")
    assert store.count("model_state") == 0
