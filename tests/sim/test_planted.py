"""On data whose only structure is which items are listened to together (planted co-listening
that content features cannot explain), every learned row must beat popularity."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import policy_where_all_take_part

from sottovoce.sim import SimulationConfig, simulate

pytest.importorskip("opacus")

USERS, CLUSTERS, PER_CLUSTER = 160, 4, 20


def _write(folder: Path) -> tuple[Path, Path]:
    """Every user listens to 8 of its cluster's 20 items (play counts), and 2 items at random;
    the items' features are random: content says nothing about the clusters."""
    rng = np.random.default_rng(0)
    items = CLUSTERS * PER_CLUSTER
    interactions = folder / "plays.csv"
    with interactions.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["user_id", "item_id", "timestamp", "value"])
        for u in range(USERS):
            own = rng.choice(PER_CLUSTER, size=8, replace=False) + PER_CLUSTER * (u % CLUSTERS)
            for item in {*own.tolist(), *rng.integers(items, size=2).tolist()}:
                writer.writerow([f"u{u}", f"i{item}", "", int(rng.integers(1, 20))])
    features = folder / "features.csv"
    with features.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["item_id", *(f"f{n}" for n in range(8))])
        for item in range(items):
            writer.writerow([f"i{item}", *np.round(rng.standard_normal(8), 4).tolist()])
    return interactions, features


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("planted")
    interactions, features = _write(folder)
    # One region, every device in every round, and a budget that a population this small
    # needs for its noise not to drown the signal.
    policy = policy_where_all_take_part(epsilon=40.0, population=USERS, delta=1e-4)
    config = SimulationConfig(workdir=folder / "sim", csv=interactions, item_features=features,
                              users=USERS, regions=("us",), sampling_rate=1.0, epsilon=40.0,
                              policy=policy, reranker=False, workers=2)  # fmt: skip
    return simulate(config) | {"_config": config}


@pytest.mark.parametrize("row", ["federated", "federated_dp"])
def test_every_learned_row_beats_popularity(planted: dict[str, Any], row: str) -> None:
    metrics = planted["metrics"]
    assert metrics[row]["ndcg@10"] > 2 * metrics["popularity"]["ndcg@10"], metrics
    # and its bootstrap interval lies above popularity's mean
    assert metrics[row]["ci"]["ndcg@10"][0] > metrics["popularity"]["ndcg@10"]


def test_content_alone_cannot_explain_the_structure(planted: dict[str, Any]) -> None:
    metrics = planted["metrics"]
    assert metrics["local_only"]["ndcg@10"] < metrics["federated"]["ndcg@10"] / 2, metrics


def test_the_private_row_spent_what_it_reports(planted: dict[str, Any]) -> None:
    (entry,) = planted["privacy"]
    assert entry["pipeline"] == "collaborative"
    assert entry["rounds"] == SimulationConfig().collaborative_rounds
    assert 0 < entry["epsilon"] <= 40.0


def test_every_release_is_the_devices_exact_mean_plus_the_noise_it_declares(
    planted: dict[str, Any],
) -> None:
    """The whole pipeline, from outside: each round's published release, minus the mean of the
    uploads every device's data gives (recomputed here from the dataset, not from the run),
    leaves noise of the scale the round's spec declares and the privacy entry accounts for
    (within 14 %; a release with a fifth less noise fails). That the devices count what the
    simulator counts is ``test_evaluate``'s."""
    from sottovoce.device._collaborative import collaborative_upload
    from sottovoce.device._collaborator import advance, noise_std
    from sottovoce.sim._collaborative import layout_for
    from sottovoce.sim._device_feed import listening
    from sottovoce.sim._evaluate import split_holdout
    from sottovoce.sim._full_ranking import Interactions
    from sottovoce.sim._simulate import _load
    from sottovoce.sync import ModelRelease, RoundSpec

    config: SimulationConfig = planted["_config"]
    data = _load(config)
    split = split_holdout(data, fraction=config.holdout, seed=config.seed, by=config.split)
    matrix = Interactions.of(data, split.train, split.heldout)
    listened = [listening(split.train[user]) for user in matrix.users]
    layout = layout_for(data.items, config.seed, private=True)
    (entry,) = planted["privacy"]
    folder = config.workdir / "releases" / "collaborative"
    model = None
    for number in range(1, config.collaborative_rounds + 1):
        spec = RoundSpec.from_wire((folder / f"us-{number}.spec").read_bytes())
        release = ModelRelease.from_wire((folder / f"us-{number}.json").read_bytes())
        published = release.weights_array().astype(np.float64)
        assert spec.noise_multiplier == pytest.approx(entry["noise_multiplier"])
        uploads = [collaborative_upload(model, layout, items, clipping_norm=spec.clipping_norm)
                   for items in listened]  # fmt: skip
        noise = published - np.sum(uploads, axis=0) / spec.expected_cohort
        declared = noise_std(spec, layout.dim)
        # 1,360 numbers: the sample deviation is within 2 % of the true one (one sd); 7 sd.
        assert np.std(noise) == pytest.approx(declared, rel=0.14), number
        assert abs(np.mean(noise)) < 5 * declared / np.sqrt(layout.dim), number
        model = advance(model, layout, published, noise_std=declared)
