"""``bench/collaborative_dp.py`` replicates the simulator's collaborative rounds: without noise it
derives the model the exact row does, and with noise each region's release carries the noise a
run's release declares."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sim_helpers import tiny

from sottovoce.device._collaborative import Layout, Statistic, collaborative_upload
from sottovoce.sim import SimulationConfig
from sottovoce.sim._collaborative import federated_collaborative, scorer
from sottovoce.sim._config import RegionPlan
from sottovoce.sim._device_feed import listening
from sottovoce.sim._evaluate import split_holdout
from sottovoce.sim._full_ranking import Interactions
from sottovoce.sync._noise import sensitivity_factor

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import collaborative_dp


def _plan(users: int, z: float) -> RegionPlan:
    return RegionPlan(mode="central", users=users, min_cohort=1, noise_multiplier=z,
                      sampling_rate=1.0, sensitivity=1.0, epsilon_budget=8.0, epsilon=8.0,
                      delta=1e-6, accountant="prv")  # fmt: skip


@pytest.fixture(scope="module")
def setup() -> dict[str, Any]:
    data = tiny(users=40, items=30)
    split = split_holdout(data, seed=0)
    matrix = Interactions.of(data, split.train, split.heldout)
    listened = [listening(split.train[u]) for u in matrix.users]
    region_of = {u: ("eu", "us")[n % 2] for n, u in enumerate(matrix.users)}
    members = {r: [n for n, u in enumerate(matrix.users) if region_of[u] == r]
               for r in ("eu", "us")}  # fmt: skip
    layout = Layout(tuple(data.items), table=12, rank=4, seed=0)
    return {"matrix": matrix, "listened": listened, "region_of": region_of,
            "members": members, "layout": layout}  # fmt: skip


def test_without_noise_the_replica_derives_the_exact_rows_model(setup: dict[str, Any]) -> None:
    matrix, listened, region_of = setup["matrix"], setup["listened"], setup["region_of"]
    plans = {r: _plan(len(p), 2.0) for r, p in setup["members"].items()}
    model = collaborative_dp.rounds(setup["layout"], listened, setup["members"], plans, count=4,
                                    clipping_norm=1.0, rng=None)  # fmt: skip
    config = SimulationConfig(users=None, regions=("eu", "us"))
    exact = federated_collaborative(config, matrix, setup["layout"], region_of=region_of,
                                    rounds=4, listened=listened)  # fmt: skip
    users = np.arange(len(matrix.users))

    def scores(m: Any) -> Any:
        return scorer(matrix, dict.fromkeys(("eu", "us"), m), region_of, listened)(users)

    np.testing.assert_allclose(scores(model), scores(exact), rtol=1e-9, atol=1e-12)
    three = collaborative_dp.rounds(setup["layout"], listened, setup["members"], plans, count=3,
                                    clipping_norm=1.0, rng=None)  # fmt: skip
    assert not np.allclose(scores(three), scores(exact))  # the comparison can tell them apart


def test_each_release_carries_the_noise_its_round_declares(
    setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    members = setup["members"]
    layout = Layout(setup["layout"].catalog, table=12, rank=64, seed=0)  # 798 numbers
    z = {"eu": 3.0, "us": 1.5}
    plans = {r: _plan(len(p), z[r]) for r, p in members.items()}
    seen: list[list[Statistic]] = []
    real_pool = collaborative_dp.pool

    def recording(statistics: list[Statistic]) -> Statistic:
        seen.append(list(statistics))
        return real_pool(statistics)

    monkeypatch.setattr(collaborative_dp, "pool", recording)
    args = (layout, setup["listened"], members, plans)
    collaborative_dp.rounds(*args, count=1, clipping_norm=2.0, rng=np.random.default_rng(1))
    noisy = seen.pop()
    collaborative_dp.rounds(*args, count=1, clipping_norm=2.0, rng=None)
    exact = seen.pop()
    s = sensitivity_factor(layout.dim)
    for region, with_noise, without in zip(members, noisy, exact, strict=True):
        declared = z[region] * 2.0 * s / len(members[region])
        assert with_noise.noise_std == pytest.approx(declared)
        assert without.noise_std == 0.0
        uploads = [collaborative_upload(None, layout, setup["listened"][n], clipping_norm=2.0)
                   for n in members[region]]  # fmt: skip
        np.testing.assert_allclose(without.mean, np.mean(uploads, axis=0))  # over the cohort
        drawn = with_noise.mean - without.mean
        # The sample deviation of 798 draws is within 2.5 % of the true one (one sd): 6 sd.
        assert np.std(drawn) == pytest.approx(declared, rel=0.15)
