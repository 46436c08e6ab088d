"""The collaborative model's arithmetic and a device's part in its rounds."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import (
    NOW,
    consenting,
    hit_rate,
    policy_publishing,
    policy_where_all_take_part,
    round_spec,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from sottovoce.device import DeviceError, EventStore
from sottovoce.device._collaborative import (
    CollaborativeModel,
    Layout,
    Statistic,
    _top,
    collaborative_upload,
    devices_gram,
    listening_weights,
    pool,
)
from sottovoce.device._collaborator import (
    SLOT,
    Collaborator,
    _pack,
    _unpack,
    advance,
    listening,
    noise_std,
)
from sottovoce.policy import Purpose
from sottovoce.sync import BadSignature, SpecRefused, sign_release

CATALOG = tuple(f"t{n}" for n in range(60))


def _planted(users: int = 240, clusters: int = 4, seed: int = 0) -> list[list[str]]:
    """Each user listens to 8 of its cluster's 15 items and one of the 60 at random: which
    items go together is all the structure there is."""
    rng = np.random.default_rng(seed)
    out = []
    for u in range(users):
        own = rng.choice(15, size=8, replace=False) + 15 * (u % clusters)
        out.append([CATALOG[i] for i in (*own, rng.integers(60))])
    return out


def _fit(histories: list[list[str]], layout: Layout, rounds: int = 3,
         noise: float = 0.0) -> CollaborativeModel:  # fmt: skip
    rng = np.random.default_rng(1)
    model = None
    for _ in range(rounds):
        total = sum(collaborative_upload(model, layout, h, clipping_norm=1.0) for h in histories)
        mean = (np.asarray(total) + rng.normal(0, noise, layout.dim)) / len(histories)
        std = noise / len(histories)
        model = advance(model, layout, mean, noise_std=std)
    assert model is not None
    return model


def test_every_upload_has_the_clipping_norm() -> None:
    layout = Layout(CATALOG, table=20, rank=4)
    histories = _planted()
    count = collaborative_upload(None, layout, histories[0], clipping_norm=2.5)
    assert np.linalg.norm(count) == pytest.approx(2.5)
    assert not count[layout.items :].any()  # the count round sends counts only
    model = _fit(histories, layout, rounds=1)
    factors = collaborative_upload(model, layout, histories[0], clipping_norm=2.5)
    assert np.linalg.norm(factors) == pytest.approx(2.5)
    assert not factors[: layout.items].any()  # factor rounds send no counts
    nothing = collaborative_upload(model, layout, ["not-in-the-catalog"], clipping_norm=2.5)
    assert not nothing.any()


def test_the_table_learns_which_items_go_together() -> None:
    """Held-out items of a user's cluster rank above the rest; a count alone cannot tell."""
    layout = Layout(CATALOG, table=60, rank=4)
    model = _fit(_planted(), layout)
    probe = [CATALOG[i] for i in (0, 1, 2, 3)]  # four items of cluster 0
    scores = model.scores(probe)
    cluster = scores[4:15].min()
    others = scores[15:].max()
    assert cluster > others


@given(st.dictionaries(st.sampled_from(CATALOG), st.integers(1, 1_000), min_size=1))
def test_an_items_weight_is_the_rank_of_how_much_the_user_listened(amounts: dict[str, int]) -> None:
    """From just above 1/2 (the least played) to 1 (the most); equal amounts weigh the same,
    and only the order counts: a log of the plays, or ten times them, weighs the same."""
    weights = listening_weights(amounts)
    assert set(weights) == set(amounts)
    assert all(0.5 < w <= 1.0 for w in weights.values())
    assert weights[max(amounts, key=amounts.__getitem__)] == 1.0
    for a, b in itertools.combinations(amounts, 2):
        assert (weights[a] < weights[b]) == (amounts[a] < amounts[b])
        assert (weights[a] == weights[b]) == (amounts[a] == amounts[b])
    assert listening_weights({i: np.log(n) + 3 for i, n in amounts.items()}) == weights
    assert listening_weights({i: 10 * n for i, n in amounts.items()}) == weights
    assert listening_weights(list(amounts)) == dict.fromkeys(amounts, 1.0)  # no amounts


def test_a_users_row_weighs_what_they_listen_to_most() -> None:
    """The row (what the device uploads and scores with) leans to the user's most played items:
    a user who plays cluster 1's items most gets their cluster ranked higher; the same items
    played evenly do not tell the clusters apart."""
    layout = Layout(CATALOG, table=60, rank=4)
    model = _fit(_planted(), layout)
    items = [CATALOG[i] for i in (0, 1, 2, 15, 16, 17)]  # three of cluster 0, three of cluster 1
    even = model.scores(items)
    assert abs(even[3:15].mean() - even[18:30].mean()) < 0.1 * np.ptp(even)
    leaning = model.scores({item: (9 if n >= 3 else 1) for n, item in enumerate(items)})
    gap = leaning[18:30].mean() - leaning[3:15].mean()
    assert gap > 0.1 * np.ptp(leaning)
    factors = collaborative_upload(model, layout, {i: 1 for i in items}, clipping_norm=1.0)
    assert np.array_equal(factors, collaborative_upload(model, layout, items, clipping_norm=1.0))
    count = collaborative_upload(None, layout, {items[0]: 9, items[1]: 1}, clipping_norm=1.0)
    assert count[0] == count[1] > 0  # the count round counts devices: each item once


def test_the_devices_gram_follows_from_their_uploads() -> None:
    """ALS needs the sum of the devices' u u' beside their c u': each device solved u against
    the same public table, so it follows from the sum of c u' alone, each device's scaling to
    the clipping norm included."""
    layout = Layout(CATALOG, table=30, rank=4)
    histories = _planted()
    model = _fit(histories, layout, rounds=2)
    k = len(model.table)
    expected = np.zeros((4, 4))
    total = np.zeros((k, 4))
    for history in histories:
        upload = collaborative_upload(model, layout, history, clipping_norm=1.0)
        b = layout.split(upload)[1][:k]
        u = model.user_vector(history)
        scale = 1.0 / np.linalg.norm(np.outer(model.row(history), u))  # to the clipping norm
        expected += scale * np.outer(u, u)
        total += b
    assert np.allclose(devices_gram(model.vectors, total), expected)
    assert not np.allclose(devices_gram(model.vectors * 2, total), expected)


def test_scores_keep_only_what_stands_above_the_noise() -> None:
    """The sketch of every factor round scores; its directions at or below the noise's edge
    are dropped, and with none left the table ranks by count."""
    layout = Layout(CATALOG, table=60, rank=4)
    clean = _fit(_planted(), layout, rounds=4)
    assert clean.sketch is not None and clean.sketch.shape == (60, 12)  # 3 factor rounds x 4
    assert clean.basis.shape == (60, 13)  # without noise every direction, the counts' too
    drowned = CollaborativeModel(layout, clean.counts, clean.table, clean.vectors, True,
                                 clean.sketch, noise=1e3)  # fmt: skip
    assert drowned.basis.shape == (60, 0)
    by_count = drowned.scores(["t0"])
    order = np.argsort(-clean.counts[clean.table], kind="stable")
    assert np.all(np.diff(by_count[clean.table][order]) <= 0)
    assert np.ptp(by_count[clean.table]) > 0  # by count, not one score for all


def test_each_direction_weighs_the_lesser_of_its_height_above_the_noise_and_a_ridge() -> None:
    """A direction's weight is min(1 - e^2/s^2, s^2/(s^2 + lambda)), lambda a tenth of the
    sketch's squared norm over the rank. Without noise the ridge alone weighs: the planted
    clusters' directions nearly whole, the sketch's weak ones (what few users share) nearly
    nothing; under noise the edge drops and shrinks them."""
    layout = Layout(CATALOG, table=60, rank=4)
    for noise in (0.0, 0.5):
        model = _fit(_planted(), layout, rounds=4, noise=noise)
        assert model.sketch is not None
        sketch = np.column_stack([model.counts[model.table], model.sketch])
        u, s, _ = np.linalg.svd(sketch, full_matrices=False)
        edge = model.noise * (np.sqrt(sketch.shape[0]) + np.sqrt(sketch.shape[1]))
        ridge = 0.1 * np.sum(s**2) / 4
        kept = s[s > edge]
        expected = np.minimum(1 - edge**2 / kept**2, kept**2 / (kept**2 + ridge))
        weights = np.sum(model.basis**2, axis=0)
        assert weights == pytest.approx(expected)
        assert np.allclose(np.abs(u[:, : len(kept)].T @ model.basis), np.diag(np.sqrt(expected)))
        if noise == 0.0:
            assert len(kept) == 13 and np.all(weights[:4] > 0.75) and np.all(weights[4:] < 0.1)
        else:
            assert len(kept) < 13  # the edge drops directions, and it shrinks some more
            assert np.any(1 - edge**2 / kept**2 < kept**2 / (kept**2 + ridge))


def test_the_count_release_is_a_column_of_the_sketch() -> None:
    """The count round's release over the table scores too: with factor releases that carry
    nothing, the one direction left is the counts'. The model keeps the count round's noise
    deviation, so the spectral edge covers that column too."""
    layout = Layout(CATALOG, table=60, rank=4)
    model = _fit(_planted(), layout, rounds=3)
    assert model.sketch is not None
    blank = CollaborativeModel(layout, model.counts, model.table, model.vectors, True,
                               np.zeros_like(model.sketch), noise=0.0)  # fmt: skip
    direction = blank.basis
    counts = model.counts[model.table]
    assert direction.shape == (60, 1)
    unit = direction[:, 0] / np.linalg.norm(direction[:, 0])
    assert abs(unit @ counts) == pytest.approx(np.linalg.norm(counts))
    noisy = _fit(_planted(), layout, rounds=1, noise=3.0)
    assert noisy.noise == pytest.approx(3.0 / 240)  # the count round's, kept for the sketch
    assert noisy.refit(np.zeros(layout.dim), noise_std=1e-3).noise == noisy.noise


def test_a_user_with_none_of_the_tables_items_gets_it_by_count() -> None:
    """Nothing to project: the table ranks by DP count, not one score for every item."""
    layout = Layout(CATALOG, table=30, rank=4)
    model = _fit(_planted(), layout, rounds=3)
    outside = [CATALOG[j] for j in range(len(CATALOG)) if j not in set(model.table.tolist())]
    assert outside and model.basis.shape[1]  # items beyond the table; directions to project on
    for items in (outside[:3], ["not-in-the-catalog"], []):
        scores = model.scores(items)
        table = scores[model.table]
        order = np.argsort(-model.counts[model.table], kind="stable")
        assert np.all(np.diff(table[order]) <= 0) and np.ptp(table) > 0
        assert table.min() > np.delete(scores, model.table).max()  # still above the rest


def _popularity_only(users: int = 800, seed: int = 0) -> tuple[list[list[str]], list[str]]:
    """Users who each draw a few items from one Zipf popularity and nothing else (no
    co-listening to learn), each with one held out."""
    rng = np.random.default_rng(seed)
    catalog = tuple(f"t{n}" for n in range(400))
    p = 1.0 / np.arange(1, len(catalog) + 1) ** 0.9
    train, held = [], []
    for _ in range(users):
        n = int(np.clip(rng.lognormal(1.6, 0.8), 2, 60)) + 1
        drawn = rng.choice(len(catalog), size=n, replace=False, p=p / p.sum())
        train.append([catalog[i] for i in drawn[1:]])
        held.append(catalog[drawn[0]])
    return train, held


def test_with_nothing_but_popularity_to_learn_a_user_leans_on_the_population() -> None:
    """Where co-listening says nothing, a user's few items projected alone rank the table by
    what they happen to share (0.14 hits in the top 10 here, popularity 0.41); the
    population's row, counted as one more of the user's items, brings the model near
    popularity, without noise and under it."""
    train, held = _popularity_only()
    layout = Layout(tuple(f"t{n}" for n in range(400)), table=200, rank=16)
    for noise in (0.0, 5.0):
        model = _fit(train, layout, rounds=5, noise=noise)
        popularity = hit_rate(lambda _, c=model.counts: c, train, held, layout)
        assert hit_rate(model.scores, train, held, layout) >= 0.75 * popularity
    # One more of the user's items: the prior's length is the projected row's over sqrt(n + 1).
    row = model.row(train[0])
    projected = model.basis @ (model.basis.T @ row)
    prior = model.projected(row) - projected
    n = np.count_nonzero(row)
    assert np.linalg.norm(prior) == pytest.approx(np.linalg.norm(projected) / np.sqrt(n + 1))
    rows = np.stack([model.row(items) for items in train[:5]])  # one per line, the same
    assert np.allclose(model.projected(rows), [model.projected(r) for r in rows])


@given(st.lists(st.sampled_from([-1.0, 0.0, 0.5, 2.0, float("nan")]) | st.floats(-5, 5),
                min_size=1, max_size=60), st.integers(1, 70))  # fmt: skip
def test_the_table_is_the_top_counts_ties_by_position(values: list[float], k: int) -> None:
    counts = np.array(values)
    assert np.array_equal(_top(counts, k), np.argsort(-counts, kind="stable")[:k])


def test_a_fitted_model_reads_back_from_its_packed_form() -> None:
    layout = Layout(CATALOG, table=60, rank=4)
    model = _fit(_planted(), layout, rounds=3, noise=0.5)
    again = _unpack(layout, _pack(model))
    assert again.fitted and again.noise == pytest.approx(model.noise, rel=1e-6)
    assert model.sketch is not None and again.sketch is not None
    assert np.allclose(again.sketch, model.sketch, rtol=1e-5, atol=1e-7)
    probe = ["t0", "t1", "t2"]
    assert np.allclose(again.scores(probe), model.scores(probe), atol=1e-4)


def test_noise_shrinks_the_table_to_items_that_clear_it() -> None:
    layout = Layout(CATALOG, table=60, rank=4)
    clean = _fit(_planted(), layout, rounds=1)
    noisy = _fit(_planted(), layout, rounds=1, noise=3.0)
    assert len(clean.table) == 60 > len(noisy.table) >= 1


def test_a_layout_is_checked() -> None:
    with pytest.raises(DeviceError, match="twice"):
        Layout(("a", "a"))
    with pytest.raises(DeviceError, match="rank"):
        Layout(CATALOG, rank=0)
    assert Layout(CATALOG).model_id != Layout(CATALOG, rank=8).model_id


def test_pooling_exact_means_gives_the_mean_over_everyone() -> None:
    rng = np.random.default_rng(0)
    eu, us = rng.random((30, 5)), rng.random((10, 5))
    pooled = pool([Statistic(eu.mean(0), 0.0, 30), Statistic(us.mean(0), 0.0, 10)])
    assert np.allclose(pooled.mean, np.vstack([eu, us]).mean(0))
    assert pooled.noise_std == 0.0 and pooled.cohort == 40


def test_pooling_noisy_releases_weighs_each_by_its_noise() -> None:
    """Inverse-variance weights: the pooled noise is below the quieter region's, and a region
    with nine times the variance counts a ninth as much."""
    quiet, loud = Statistic(np.ones(3), 0.1, 50), Statistic(np.zeros(3), 0.3, 50)
    pooled = pool([quiet, loud])
    assert np.allclose(pooled.mean, 0.9)
    assert pooled.noise_std == pytest.approx((0.1**-2 + 0.3**-2) ** -0.5)
    assert pooled.noise_std < quiet.noise_std
    assert pool([quiet]) is quiet
    with pytest.raises(DeviceError, match="no release"):
        pool([])


# -- on a device ---------------------------------------------------------------------------


@pytest.fixture
def device(tmp_path: Path) -> Iterator[tuple[EventStore, Any]]:
    """A US device whose user listened to t1 to t3 and then disliked t3, in a policy where
    every device takes part in every round."""
    policy = policy_where_all_take_part()
    store = EventStore.open(tmp_path / "device.db", policy=policy, region="us",
                            clock=lambda: NOW)  # fmt: skip
    consenting(store, "u1", Purpose.PERSONALIZATION, Purpose.FEDERATED_TRAINING)
    for n, track in enumerate(("t1", "t2", "t3")):
        store.append({"event_id": f"e{n}", "user_id": "u1", "type": "play_end",
                      "ts": NOW.isoformat(), "track_id": track, "ms_played": 200_000,
                      "duration_ms": 200_000})  # fmt: skip
    store.append({"event_id": "e9", "user_id": "u1", "type": "dislike", "ts": NOW.isoformat(),
                  "track_id": "t3"})  # fmt: skip
    yield store, policy
    store.close()


def test_a_device_joins_a_round_and_queues_a_sealed_upload(device: Any) -> None:
    store, policy = device
    assert listening(store, "u1") == {"t1": 1, "t2": 1}  # t3 disliked after it was played
    layout = Layout(CATALOG, table=20, rank=4)
    spec = round_spec(policy, "us", model_id=layout.model_id)
    collaborator = Collaborator(store, layout)
    key = collaborator.contribute("u1", spec=spec)
    assert key is not None and store.in_outbox(key)
    assert collaborator.contribute("u1", spec=spec) == key  # once per round


def test_a_device_counts_how_many_times_the_user_listened(device: Any) -> None:
    """Plays long enough to count (half the track or 30 s) and likes, once each; a skip does
    not count, and a dislike removes the track whatever came before."""
    store, _ = device
    ts = NOW.isoformat()
    for n, (kind, track, ms) in enumerate(
        [
            ("play_end", "t1", 100_000),
            ("play_end", "t1", 40_000),
            ("play_end", "t1", 5_000),
            ("like", "t2", 0),
            ("play_end", "t4", 10_000),
            ("like", "t3", 0),
        ]
    ):
        event = {"event_id": f"more{n}", "user_id": "u1", "type": kind, "ts": ts,
                 "track_id": track}  # fmt: skip
        if kind == "play_end":
            event |= {"ms_played": ms, "duration_ms": 200_000}
        store.append(event)
    assert listening(store, "u1") == {"t1": 3, "t2": 2}


def test_a_device_refuses_a_round_of_another_model(device: Any) -> None:
    store, policy = device
    layout = Layout(CATALOG, table=20, rank=4)
    spec = round_spec(policy, "us", model_id=Layout(CATALOG, rank=8).model_id)
    with pytest.raises(SpecRefused, match="model"):
        Collaborator(store, layout).contribute("u1", spec=spec)


def _signed_counts(layout: Layout) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """A policy whose US and EU aggregators have fresh signing keys, and each region's count
    release of the planted listeners (half of them in each) with the spec of its round."""
    keys = {"us": Ed25519PrivateKey.generate(), "eu": Ed25519PrivateKey.generate()}
    policy = policy_where_all_take_part()
    for region, key in keys.items():
        policy = policy_publishing(region, signing=key, base=policy)
    histories = _planted()
    halves = {"us": histories[::2], "eu": histories[1::2]}
    releases, specs = {}, {}
    for region, people in halves.items():
        mean = np.mean([collaborative_upload(None, layout, h, clipping_norm=1.0) for h in people],
                       axis=0)  # fmt: skip
        specs[region] = round_spec(policy, region, model_id=layout.model_id)
        releases[region] = sign_release(model_id=layout.model_id, version=1, weights=mean,
                                        created=NOW, signing_key=keys[region],
                                        kid=policy.region(region).key("signing").kid)  # fmt: skip
    return policy, releases, specs


def test_a_device_pools_every_regions_release_of_a_round(tmp_path: Path) -> None:
    layout = Layout(CATALOG, table=20, rank=4)
    policy, releases, specs = _signed_counts(layout)
    store = EventStore.open(tmp_path / "us.db", policy=policy, region="us", clock=lambda: NOW)
    try:
        eu = (releases["eu"], specs["eu"])
        model = Collaborator(store, layout).install(releases["us"], specs["us"], others=[eu])
        expected = pool(
            Statistic(releases[r].weights_array().astype(np.float64),
                      noise_std(specs[r], layout.dim), specs[r].expected_cohort)
            for r in ("us", "eu")
        )  # fmt: skip
        assert np.allclose(model.counts, expected.mean[: layout.items])
        again = Collaborator(store, layout)  # read back from the store
        assert again.version == 1 and again.model is not None
        assert np.array_equal(again.model.table, model.table)
        assert again.model.sketch is None and not again.model.fitted
    finally:
        store.close()


@pytest.mark.parametrize("wrong", ["signed by another region", "another round", "own region"])
def test_a_device_refuses_a_release_it_cannot_pool(tmp_path: Path, wrong: str) -> None:
    """A release must verify against its own region's key, be of the same round, and name a
    region once; a refusal installs nothing."""
    layout = Layout(CATALOG, table=20, rank=4)
    policy, releases, specs = _signed_counts(layout)
    other = (releases["eu"], specs["eu"])
    if wrong == "signed by another region":  # the US key cannot sign for the EU
        other = (releases["us"], specs["eu"])
    elif wrong == "another round":
        other = (releases["eu"], specs["eu"].model_copy(update={"model_version": 1}))
    else:
        other = (releases["us"], specs["us"])
    store = EventStore.open(tmp_path / "us.db", policy=policy, region="us", clock=lambda: NOW)
    try:
        error = BadSignature if wrong == "signed by another region" else DeviceError
        with pytest.raises(error):
            Collaborator(store, layout).install(releases["us"], specs["us"], others=[other])
        assert store.load_model(SLOT) is None
    finally:
        store.close()
