"""The federated rows: plain FedAvg (no privacy) here, and DP rounds through the real regional
aggregators (:mod:`._regions`: in process through the ASGI app, or ``sottovoce aggregator
serve`` processes), with every device the real device code in a worker process
(:mod:`._devices`)."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from contextlib import ExitStack
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt

from sottovoce.device import Ranker
from sottovoce.policy import DecisionLog, PrivacyMode
from sottovoce.sim._config import (
    END,
    Evaluation,
    Plans,
    Progress,
    Run,
    SimulationConfig,
    pipeline_policy,
    safe_name,
)
from sottovoce.sim._datasets import Dataset
from sottovoce.sim._devices import Contribution, DeviceSetup, DeviceTask, contribute
from sottovoce.sim._regions import (
    Model,
    Region,
    RegionRound,
    audit_log,
    privacy_entry,
    run_rounds,
)
from sottovoce.sync import RoundSpec

__all__ = ["audit_devices", "fedavg", "federated_dp"]

# -- federated, non-private (plain FedAvg, here) ----------------------------------------------


def fedavg(config: SimulationConfig, setups: dict[str, DeviceSetup], *, ranker: Ranker,
            evaluation: Evaluation, region_of: dict[str, str], bar: Progress) -> Run:  # fmt: skip
    """The same local training as a device's (TFLite, Adam, batch 32) and plain FedAvg of the
    deltas, per region, without clipping or noise: what federated learning reaches without DP."""
    base = ranker.get_weights().astype(np.float64)
    weights = {r: base.copy() for r in config.regions}
    per_round = []
    bar.start("federated (no DP)", config.rounds)
    for number in range(1, config.rounds + 1):
        for region in config.regions:
            members = sorted(u for u, r in region_of.items() if r == region and len(setups[u].y))
            rng = random.Random(f"{config.seed}:fedavg:{region}:{number}")
            cohort = [u for u in members if rng.random() < config.sampling_rate]
            deltas = [_local_delta(ranker, weights[region], setups[u], config, number)
                      for u in cohort]  # fmt: skip
            if deltas:
                weights[region] = weights[region] + np.mean(deltas, axis=0)
        per_round.append({"round": number, **evaluation.metrics(dict(weights))})
        bar.advance()
    return Run(evaluation.metrics(weights), evaluation.metrics(weights, personal=False),
                per_round)  # fmt: skip


def _local_delta(ranker: Ranker, start: npt.NDArray[Any], setup: DeviceSetup,
                 config: SimulationConfig, number: int) -> npt.NDArray[np.float64]:  # fmt: skip
    ranker.set_weights(start.astype(np.float32))
    ranker.reset_optimizer()
    rng = np.random.default_rng([config.seed, number, len(setup.y)])
    for _ in range(config.local_steps):
        pick = rng.choice(len(setup.y), size=min(32, len(setup.y)), replace=False)
        ranker.train_step(setup.x[pick], setup.y[pick], setup.w[pick], lr=3e-3)
    delta: npt.NDArray[np.float64] = ranker.get_weights().astype(np.float64) - start
    return delta


# -- federated with DP, through the real aggregator ------------------------------------------


def federated_dp(config: SimulationConfig, mode: PrivacyMode, *, data: Dataset,
                  region_of: dict[str, str], plans: Plans, ranker: Ranker,
                  evaluation: Evaluation, pool: Executor, bar: Progress) -> Run:  # fmt: skip
    policy = pipeline_policy(config, plans, mode)
    regions = plans[mode.value]
    base = ranker.get_weights().astype(np.float64)
    weights = {r: base.copy() for r in config.regions}
    releases: dict[str, bytes | None] = dict.fromkeys(config.regions)
    per_round: list[dict[str, Any]] = []
    with ExitStack() as stack:
        services = {
            r: Region(config, mode, r, policy=policy, model=Model.of(ranker), stack=stack)
            for r in config.regions
        }
        members = {r: sorted(u for u, g in region_of.items() if g == r) for r in config.regions}
        label = "federated DP, central" if mode is PrivacyMode.CENTRAL else "federated DP, local"
        expected = round(config.rounds * config.sampling_rate * len(data.users))
        bar.start(f"{label} ({config.rounds} rounds)", expected)
        for number in range(1, config.rounds + 1):
            record: dict[str, Any] = {"round": number}
            parts = [
                RegionRound(service, regions[region], members[region],
                            partial(_train_and_seal, pool=pool, config=config,
                                    release=releases[region], number=number))
                for region, service in services.items()
            ]  # fmt: skip
            outcomes = run_rounds(parts, bar=bar)
            for region, outcome in zip(services, outcomes, strict=True):
                outcome.pop("spec")
                record[region] = outcome
                if outcome.get("release") is not None:
                    releases[region] = outcome.pop("release")
                    weights[region] = np.frombuffer(outcome.pop("weights"), np.float32).astype(
                        np.float64
                    )
            record.update(evaluation.metrics(dict(weights)))
            per_round.append(record)
        audit = {r: audit_log(s) for r, s in services.items()}
        privacy = [privacy_entry(services[r], regions[r], config.rounds) for r in config.regions]
    audit["devices"] = audit_devices(config, mode.value, data.users, region_of)
    return Run(evaluation.metrics(weights), evaluation.metrics(weights, personal=False),
                per_round, audit, privacy)  # fmt: skip


def _train_and_seal(task: DeviceTask, spec: RoundSpec, *, pool: Executor,
                    config: SimulationConfig, release: bytes | None,
                    number: int) -> Future[Contribution]:  # fmt: skip
    return pool.submit(contribute, task, spec, release, END, steps=config.local_steps,
                       examples=config.examples, round_seed=number)  # fmt: skip


def audit_devices(config: SimulationConfig, pipeline: str, users: Sequence[str],
                  region_of: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    """Every device's own decision log verifies (each device keeps one)."""
    checked = failed = entries = 0
    for user in users:
        path = config.workdir / "devices" / pipeline / region_of[user] / f"{safe_name(user)}.db"
        conn = sqlite3.connect(path)
        try:
            report = DecisionLog(conn).verify()
        finally:
            conn.close()
        checked += 1
        entries += report.size
        failed += 0 if report.ok else 1
    return {"devices": checked, "entries": entries, "failed": failed, "ok": failed == 0}
