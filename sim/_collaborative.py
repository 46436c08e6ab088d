"""The collaborative rows: federated matrix factorisation over a DP-selected item table
(:mod:`sottovoce.device._collaborative`), with and without DP.

- ``federated_dp``: the real thing, through each region's real aggregator (statistic releases,
  central noise, the policy's budget): a count round, then factor rounds. Every device is the
  real device code (:class:`~sottovoce.device._collaborator.Collaborator`) on its own store,
  in a worker process: it checks the spec against its own policy and ledger, flips the coin,
  computes its upload from its own history, seals it and queues it; the coordinator runs its
  uploader over HTTP (:mod:`._regions`). The regions' rounds run together; before its next
  round a device installs each round's signed releases of every region, pooled into one model
  (:func:`~sottovoce.device._collaborative.pool`).
- ``federated``: the same uploads and the same model, summed exactly (no clipping beyond the
  uploads' own scaling, no noise) here, over every region: what the design reaches without DP.

Evaluation scores every catalog item for every evaluated user with the device's own scoring
(:meth:`CollaborativeModel.scores`) on the pooled model, from what the device's store holds of
the user's training items: how many times it listened to each
(:func:`~sottovoce.sim._device_feed.listening`).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, Future
from contextlib import ExitStack
from datetime import datetime
from functools import cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from sottovoce.device._blend import Blend
from sottovoce.device._collaborative import (
    PRIVATE_RANK,
    RANK,
    CollaborativeModel,
    Layout,
    Statistic,
    collaborative_upload,
)
from sottovoce.device._collaborative import pool as pool_releases
from sottovoce.device._collaborator import Collaborator, advance, noise_std
from sottovoce.policy import PrivacyMode
from sottovoce.sim._config import (
    END,
    Plans,
    Progress,
    SimulationConfig,
    pipeline_policy,
)
from sottovoce.sim._devices import Contribution, DeviceTask
from sottovoce.sim._federated import audit_devices
from sottovoce.sim._full_ranking import Interactions, Scorer
from sottovoce.sim._regions import (
    Model,
    Region,
    RegionRound,
    audit_log,
    privacy_entry,
    run_rounds,
)
from sottovoce.sync import ModelRelease, RoundSpec

__all__ = [
    "PIPELINE",
    "Listened",
    "federated_collaborative",
    "layout_for",
    "mean_upload",
    "private_collaborative",
    "scorer",
]

PIPELINE = "collaborative"
Listened = Sequence[Mapping[str, int]]  # per user: how many times they listened to each item


def layout_for(items: Sequence[str], seed: int, *, private: bool) -> Layout:
    """The catalog's layout: rank 32 without noise, 16 under DP (see ``_collaborative``)."""
    return Layout(tuple(items), rank=PRIVATE_RANK if private else RANK, seed=seed)


# -- without DP ------------------------------------------------------------------------------


def federated_collaborative(config: SimulationConfig, data: Interactions, layout: Layout, *,
                            region_of: Mapping[str, str], rounds: int,
                            listened: Listened) -> CollaborativeModel:  # fmt: skip
    """Each round's uploads summed exactly over the devices the coin picks in every region, and
    pooled as the devices pool the regions' releases; returns the model. ``listened``: per user
    (the rows of ``data``), what their device counts of each item."""
    members = {r: [n for n, u in enumerate(data.users) if region_of[u] == r]
               for r in config.regions}  # fmt: skip
    model: CollaborativeModel | None = None
    for number in range(1, rounds + 1):
        statistics = []
        for region, people in members.items():
            if not people:
                continue
            rng = random.Random(f"{config.seed}:collaborative:{region}:{number}")
            q = config.collaborative_sampling_rate
            cohort = [n for n in people if rng.random() < q] or people
            mean = mean_upload(model, layout, listened, cohort, over=len(cohort))
            statistics.append(Statistic(mean, 0.0, len(cohort)))
        model = advance(model, layout, pool_releases(statistics).mean, noise_std=0.0)
    assert model is not None
    return model


def mean_upload(model: CollaborativeModel | None, layout: Layout, listened: Listened,
                cohort: Sequence[int], *, over: float,
                clipping_norm: float = 1.0) -> npt.NDArray[np.float64]:  # fmt: skip
    """The sum of the ``cohort``'s uploads (rows of ``listened``) over ``over`` devices: a
    round's exact mean, before any noise."""
    total = sum(collaborative_upload(model, layout, listened[n], clipping_norm=clipping_norm)
                for n in cohort)  # fmt: skip
    return np.asarray(total, np.float64) / over


def scorer(
    data: Interactions, models: Mapping[str, CollaborativeModel], region_of: Mapping[str, str],
    listened: Listened, *, content: npt.NDArray[np.float64] | None = None,
) -> Scorer:  # fmt: skip
    """Each user's scores from their region's model and what their device counts of each of
    their training items, blended on the device with ``content`` (the catalog's public item
    vectors, in its order; :class:`~sottovoce.device._blend.Blend`) when given."""

    blends = {id(m): Blend(m, content) for m in models.values()} if content is not None else {}

    def score(users: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        rows = []
        for n in users:
            model = models[region_of[data.users[n]]]
            blend = blends.get(id(model))
            rows.append(model.scores(listened[n]) if blend is None else blend.scores(listened[n]))
        return np.stack(rows)

    return score


# -- with DP, through the aggregators ---------------------------------------------------------


def private_collaborative(
    config: SimulationConfig, data: Interactions, layout: Layout, *, region_of: Mapping[str, str],
    plans: Plans, rounds: int, pool: Executor, bar: Progress,
) -> tuple[CollaborativeModel, dict[str, Any]]:  # fmt: skip
    """Run the rounds through the regions' aggregators; returns the model the devices derive
    from the last releases, and the per-round outcomes, audit and privacy entries."""
    mode = PrivacyMode.CENTRAL
    policy = pipeline_policy(config, plans, mode, pipeline=PIPELINE)
    folder = config.workdir / "releases" / PIPELINE
    folder.mkdir(parents=True, exist_ok=True)
    shape = Model(
        layout.model_id,
        layout.dim,
        np.zeros(layout.dim, np.float32),
        accumulate=False,
        catalog=layout.catalog,
        rank=layout.rank,
    )
    model: CollaborativeModel | None = None
    history: list[dict[str, Any]] = []
    with ExitStack() as stack:
        services = {r: Region(config, mode, r, policy=policy, model=shape, stack=stack,
                              pipeline=PIPELINE) for r in config.regions}  # fmt: skip
        members = {r: sorted(u for u, g in region_of.items() if g == r) for r in config.regions}
        published: list[dict[str, tuple[Path, Path]]] = []  # per round: region -> spec, release
        q = config.collaborative_sampling_rate
        bar.start(f"collaborative, federated DP ({rounds} rounds)",
                  round(rounds * q * len(data.users)))  # fmt: skip
        for number in range(1, rounds + 1):
            record: dict[str, Any] = {"round": number}
            parts = [RegionRound(service, plans[PIPELINE][region], members[region],
                                 partial(_join, pool, tuple(published), layout))
                     for region, service in services.items()]  # fmt: skip
            outcomes = run_rounds(parts, bar=bar)
            releases: dict[str, tuple[Path, Path]] = {}
            statistics = []
            for region, outcome in zip(services, outcomes, strict=True):
                spec: RoundSpec = outcome.pop("spec")
                release = outcome.pop("release", None)
                outcome.pop("weights", None)
                record[region] = outcome
                if release is None:
                    continue
                paths = (folder / f"{region}-{number}.spec", folder / f"{region}-{number}.json")
                paths[0].write_bytes(spec.to_wire())
                paths[1].write_bytes(release)
                releases[region] = paths
                vector = ModelRelease.from_wire(release).weights_array().astype(np.float64)
                statistics.append(Statistic(vector, noise_std(spec, layout.dim),
                                            spec.expected_cohort))  # fmt: skip
            if statistics:
                pooled = pool_releases(statistics)
                model = advance(model, layout, pooled.mean, noise_std=pooled.noise_std)
                for region in releases:
                    record[region]["table"] = len(model.table)
            published.append(releases)
            history.append(record)
        audit: dict[str, Any] = {r: audit_log(s) for r, s in services.items()}
        privacy = [dict(privacy_entry(services[r], plans[PIPELINE][r], rounds), pipeline=PIPELINE)
                   for r in config.regions]  # fmt: skip
    audit["devices"] = audit_devices(config, PIPELINE, list(region_of), dict(region_of))
    if model is None:
        raise RuntimeError("no collaborative release in any region")
    return model, {"rounds": history, "audit": audit, "privacy": privacy}


def _join(pool: Executor, published: tuple[dict[str, tuple[Path, Path]], ...], layout: Layout,
          task: DeviceTask, spec: RoundSpec) -> Future[Contribution]:  # fmt: skip
    return pool.submit(collaborate, task, spec, published, END, table=layout.table,
                       rank=layout.rank, seed=layout.seed)  # fmt: skip


# -- on the device (worker processes) ---------------------------------------------------------


def collaborate(task: DeviceTask, spec: RoundSpec,
                published: tuple[dict[str, tuple[Path, Path]], ...], now: datetime, *,
                table: int, rank: int, seed: int) -> Contribution:  # fmt: skip
    """Install the rounds the device lacks (each round's releases of every region), then join
    the round."""
    from sottovoce._errors import SottovoceError
    from sottovoce.sim._devices import _CATALOG, ELIGIBLE

    layout = _layout(tuple(_CATALOG), table, rank, seed)  # the catalog's order: Dataset.items
    store = task.open(now)
    try:
        rng = np.random.default_rng([task.seed, int.from_bytes(task.secret()[:4])])
        device = Collaborator(store, layout, noise_rng=rng)
        for releases in published:
            if task.region not in releases:
                continue  # its region published nothing that round: nothing to install
            own = _published(*releases[task.region])
            others = [_published(*paths) for r, paths in releases.items() if r != task.region]
            if own[0].version > device.version:
                device.install(*own, others=others)
        try:
            key = device.contribute(task.user, spec=spec, eligible=not ELIGIBLE.missing())
        except SottovoceError as error:
            return Contribution(task.user, None, device.version, error.code)
        return Contribution(task.user, key, device.version)
    finally:
        store.close()


def _published(spec_path: Path, release_path: Path) -> tuple[ModelRelease, RoundSpec]:
    return _read_release(release_path), _read_spec(spec_path)


@cache
def _layout(catalog: tuple[str, ...], table: int, rank: int, seed: int) -> Layout:
    return Layout(catalog, table=table, rank=rank, seed=seed)


@cache
def _read_release(path: Path) -> ModelRelease:
    return ModelRelease.from_wire(path.read_bytes())


@cache
def _read_spec(path: Path) -> RoundSpec:
    return RoundSpec.from_wire(path.read_bytes())
