"""Many devices on real data: federated rounds through the real aggregator, and every row of
the comparison table measured in the same run.

Data flow (``sottovoce simulate``): a dataset adapter (:mod:`._datasets`) gives users and
items; :func:`~sottovoce.sim.split_holdout` hides 20 % of each user's items; item vectors come
from public catalog data that the holdout does not touch. Every user becomes a device
(:mod:`._devices`, the real ``sottovoce.device`` code and its own SQLite store) in a region of
the policy; each region gets its own aggregator — the real FastAPI service, called in process
through its ASGI app by default, or ``sottovoce aggregator serve`` processes on 127.0.0.1 with
``server=True``. Each round the aggregator opens a signed spec, devices flip the spec's coin,
train locally, seal and queue their deltas, the uploader sends them over HTTP with
``sottovoce.sync.transport``, the round closes at its minimum cohort into a signed release,
and devices install it before their next round.

Two federated pipelines run on separate device stores: ``central`` privacy mode (the
aggregator adds the noise) and ``local`` (every device adds it). The noise multiplier of each
region is the smallest that keeps all rounds within the region's ε budget (and the run's ε
cap). The other rows are trained in the same run on the same examples: ``central`` (pooled
examples, same architecture), ``central_dp`` (DP-SGD with opacus at the same ε, example
level), ``federated`` (FedAvg of the same local training without clipping or noise, averaged
here: the aggregator refuses to run without DP), plus ``random`` and ``popularity``.

Reproducible: the same seed gives the same data, split, devices (secrets, sampling, local
noise), central noise and baselines; the in-process aggregators run on a simulated clock.
Region keys are fresh each run (signatures differ; nothing measured does). With
``server=True`` the services keep real time and draw their own noise: rows can differ.

The orchestration is here; :mod:`._config` holds the configuration and what the parts share,
:mod:`._federated` the federated pipelines, :mod:`._devices` what each device does.

Device work runs in worker processes started with ``spawn``: a script that calls
:func:`simulate` must do so under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from datetime import timedelta
from typing import Any

import numpy as np
import numpy.typing as npt

from sottovoce.device import Ranker
from sottovoce.policy import PrivacyMode
from sottovoce.sim._central import train_central, train_central_dp
from sottovoce.sim._config import (
    END,
    ROWS,
    Evaluation,
    Plans,
    Progress,
    Quiet,
    RegionPlan,
    SimulationConfig,
    SimulationError,
    default_lastfm_path,
    device_task,
    pipeline_policy,
)
from sottovoce.sim._datasets import (
    Dataset,
    build_item_vectors,
    load_interactions_csv,
    load_lastfm,
    sample_users,
)
from sottovoce.sim._devices import (
    DeviceSetup,
    init_worker,
    setup_device,
)
from sottovoce.sim._evaluate import (
    Pool,
    PopularityRanker,
    RandomRanker,
    candidate_pools,
    catalog_items,
    device_events,
    evaluate,
    split_holdout,
)
from sottovoce.sim._federated import fedavg, federated_dp
from sottovoce.sync._budget import epsilon as budget_epsilon
from sottovoce.sync._budget import mechanism

__all__ = ["SimulationConfig", "SimulationError", "default_lastfm_path", "simulate"]

NOISE_NOTE = (
    "seeded: the simulated aggregators and devices draw their noise from seeded generators "
    "(a rounded Gaussian on the fixed-point grid) so that a run repeats; deployments draw the "
    "exact discrete Gaussian from the OS CSPRNG. The accounting is the same."
)


# -- the run -------------------------------------------------------------------------------


def simulate(config: SimulationConfig, *, progress: Progress | None = None) -> dict[str, Any]:
    """Run the simulation; returns the results (also written to ``workdir/results.json``)."""
    bar = progress or Quiet()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    clock = _Stopwatch(timings)
    if config.workdir.exists():
        shutil.rmtree(config.workdir)
    config.workdir.mkdir(parents=True)

    with clock("data"):
        data = _load(config)
        split = split_holdout(data, fraction=config.holdout, seed=config.seed)
        vectors = build_item_vectors(data, train=split.train, seed=config.seed)
        catalog = catalog_items(data, vectors)
        pools = candidate_pools(split, universe=data.items, negatives=config.negatives,
                                seed=config.seed)  # fmt: skip
    bar.note(f"{data.name}: {len(data.users)} users, {len(data.items)} items, "
             f"{data.size} interactions; {len(pools)} users evaluated")  # fmt: skip
    region_of = _assign_regions(data.users, config)
    ranker = Ranker.load()
    regions = _region_plans(config, region_of)

    context = multiprocessing.get_context("spawn")  # no fork after torch or threads start
    with ProcessPoolExecutor(config.workers, mp_context=context, initializer=init_worker,
                             initargs=(catalog,)) as pool:  # fmt: skip
        with clock("devices"):
            setups = _setup_devices(config, data, train=split.train, pools=pools,
                                    region_of=region_of, regions=regions, pool=pool,
                                    bar=bar)  # fmt: skip
        evaluation = Evaluation(pools, setups, region_of)
        metrics: dict[str, dict[str, float]] = {
            "random": evaluate(RandomRanker(config.seed), pools),
            "popularity": evaluate(PopularityRanker(split.train), pools),
        }
        with clock("central"):
            central_rows, central_dp_info = _central_rows(config, setups, evaluation=evaluation,
                                                          regions=regions, bar=bar)  # fmt: skip
            metrics.update(central_rows)
        with clock("federated"):
            plain = fedavg(config, setups, ranker=ranker, evaluation=evaluation,
                             region_of=region_of, bar=bar)  # fmt: skip
        metrics["federated"] = plain.final
        metrics["federated_global_only"] = plain.final_global
        history = {"federated": plain.per_round}
        audits = {}
        privacy: list[dict[str, Any]] = []
        for mode in (PrivacyMode.CENTRAL, PrivacyMode.LOCAL):
            name = "federated_dp" if mode is PrivacyMode.CENTRAL else "federated_dp_local"
            with clock(name):
                run = federated_dp(config, mode, data=data, region_of=region_of,
                                    plans=regions, ranker=ranker, evaluation=evaluation,
                                    pool=pool, bar=bar)  # fmt: skip
            metrics[name] = run.final
            metrics[f"{name}_global_only"] = run.final_global
            history[name] = run.per_round
            audits[name] = run.audit
            privacy.extend(dict(entry, pipeline=name) for entry in run.privacy)
    epsilon = max(entry["epsilon"] for entry in privacy)
    results: dict[str, Any] = {
        "dataset": data.name,
        "users": len(data.users),
        "epsilon": epsilon,
        "delta": max(entry["delta"] for entry in privacy),
        "privacy": privacy,
        "noise": NOISE_NOTE,
        "metrics": {row: metrics[row] for row in ROWS},
        "evaluated_users": len(pools),
        "items": len(data.items),
        "rounds": history,
        "regions": {
            p: {r: asdict(plan) for r, plan in plans.items()} for p, plans in regions.items()
        },
        "central_dp": central_dp_info,
        "audit": audits,
        "config": _config_summary(config),
        "timings_s": {**timings, "total": round(time.perf_counter() - started, 1)},
    }
    (config.workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


class _Stopwatch:
    def __init__(self, into: dict[str, float]) -> None:
        self._into = into

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self._into[name] = round(time.perf_counter() - start, 1)


def _load(config: SimulationConfig) -> Dataset:
    if config.csv is not None:
        data = load_interactions_csv(config.csv, item_features=config.item_features)
        if len(data.users) > config.users:
            data = sample_users(data, config.users, seed=config.seed, min_interactions=5)
        return data
    path = config.lastfm or default_lastfm_path()
    return load_lastfm(path, users=config.users, seed=config.seed)


def _assign_regions(users: Sequence[str], config: SimulationConfig) -> dict[str, str]:
    order = list(users)
    random.Random(f"{config.seed}:regions").shuffle(order)
    return {user: config.regions[n % len(config.regions)] for n, user in enumerate(order)}


def _region_plans(config: SimulationConfig, region_of: dict[str, str]) -> Plans:
    """Per pipeline and region, the policy's mechanism for the simulated population, with the
    least noise multiplier (not below the policy's) whose ``config.rounds`` rounds fit the
    budget by both ledgers: the aggregator's (opacus) and the device's (dp-accounting)."""
    from sottovoce.aggregator import epsilon_of

    plans: Plans = {"central": {}, "local": {}}
    dim = Ranker.load().parameter_count
    for region_id in config.regions:
        privacy = config.policy.region(region_id).privacy
        users = sum(1 for r in region_of.values() if r == region_id)
        budget = min(privacy.epsilon, config.epsilon)
        q = config.sampling_rate
        if q * users < privacy.min_cohort:
            need = privacy.min_cohort / max(users, 1)
            fix = (f"use --sampling-rate {need:.3g} or more, more users" if need <= 1
                   else "use more users")  # fmt: skip
            raise SimulationError(
                f"region {region_id} has {users} simulated devices: at sampling rate {q:g} a round "
                f"expects {q * users:.3g} of them, below the policy's minimum cohort of "
                f"{privacy.min_cohort} (the simulator runs the policy as declared); {fix}, or "
                "pass a policy with a smaller minimum cohort (--policy)"
            )
        for pipeline in ("central", "local"):
            mode = PrivacyMode(pipeline)

            def server(z: float, mode: PrivacyMode = mode, q: float = q,
                       privacy: Any = privacy) -> float:  # fmt: skip
                used = mechanism(mode, noise_multiplier=z, sampling_rate=q, dim=dim)
                return epsilon_of(
                    [(used.noise_multiplier, used.sampling_rate, config.rounds, used.sensitivity)],
                    delta=privacy.delta, accountant=privacy.accountant,
                )  # fmt: skip

            def spent(z: float, mode: PrivacyMode = mode, q: float = q,
                      privacy: Any = privacy) -> float:  # fmt: skip
                used = mechanism(mode, noise_multiplier=z, sampling_rate=q, dim=dim)
                device = budget_epsilon([used] * config.rounds, delta=privacy.delta)
                return max(server(z), device)

            low, high = privacy.noise_multiplier, 256.0
            if server(high) > budget:
                raise SimulationError(f"{config.rounds} rounds in {pipeline} mode cannot fit "
                                      f"region {region_id}'s ε {budget}: use fewer rounds or a "
                                      "lower sampling rate")  # fmt: skip
            if server(low) > budget * 0.999:
                # Bisect on the aggregator's (fast) ledger, then make sure the devices' own
                # ledger agrees (they are within 0.1 % of each other; its RDP is slower).
                for _ in range(30):
                    middle = (low + high) / 2
                    fits = server(middle) <= budget * 0.999
                    low, high = (low, middle) if fits else (middle, high)
            else:
                high = low  # the policy's minimum already fits
            while spent(high) > budget:
                high *= 1.001
            used = mechanism(mode, noise_multiplier=high, sampling_rate=q, dim=dim)
            plans[pipeline][region_id] = RegionPlan(
                mode=pipeline, users=users, min_cohort=privacy.min_cohort,
                noise_multiplier=high, sampling_rate=q, sensitivity=used.sensitivity,
                epsilon_budget=budget, epsilon=spent(high), delta=privacy.delta,
                accountant=str(privacy.accountant),
            )  # fmt: skip
    return plans


def _config_summary(config: SimulationConfig) -> dict[str, Any]:
    keep = ("users", "rounds", "sampling_rate", "local_steps", "epsilon", "central_epochs",
            "regions", "workers", "server", "seed", "holdout", "negatives")  # fmt: skip
    return {k: getattr(config, k) for k in keep} | {"policy": config.policy.hash}


# -- devices ---------------------------------------------------------------------------------


def _setup_devices(
    config: SimulationConfig,
    data: Dataset,
    *,
    train: dict[str, Any] | Any,
    pools: Sequence[Pool],
    region_of: dict[str, str],
    regions: Plans,
    pool: Executor,
    bar: Progress,
) -> dict[str, DeviceSetup]:
    """Create every device of both pipelines; returns the first pipeline's setups by user."""
    candidates = {p.user: p.candidates for p in pools}
    setups: dict[str, DeviceSetup] = {}
    for pipeline in ("central", "local"):
        policy = pipeline_policy(config, regions, PrivacyMode(pipeline))
        (config.workdir / f"policy-{pipeline}.json").write_text(policy.model_dump_json(indent=2))
        jobs = []
        for user in data.users:
            rng = random.Random(f"{config.seed}:catalog:{user}")
            cached = {i.item for i in train[user]} | set(candidates.get(user, ()))
            cached |= set(rng.sample(data.items, min(config.catalog_sample, len(data.items))))
            events = device_events(user, train[user], artists=data.artists,
                                   end=END - timedelta(hours=1), seed=config.seed)  # fmt: skip
            task = device_task(config, pipeline, user, region_of[user], policy)
            task.path.parent.mkdir(parents=True, exist_ok=True)
            jobs.append((task, events, candidates.get(user, ()), tuple(sorted(cached))))
        bar.start(f"devices ({pipeline} mode)", len(jobs))
        futures = [pool.submit(setup_device, t, e, c, END, examples=config.examples, catalog=k)
                   for t, e, c, k in jobs]  # fmt: skip
        for future in futures:
            setup = future.result()
            if pipeline == "central":
                setups[setup.user] = setup
            bar.advance()
    return setups


def _pooled(setups: dict[str, DeviceSetup]) -> tuple[npt.NDArray[Any], ...]:
    parts = [s for s in setups.values() if len(s.y)]
    return tuple(np.concatenate([getattr(s, a) for s in parts]) for a in ("x", "y", "w"))


def _central_rows(config: SimulationConfig, setups: dict[str, DeviceSetup], *,
                  evaluation: Evaluation, regions: Plans,
                  bar: Progress) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:  # fmt: skip
    x, y, w = _pooled(setups)
    bar.note(f"centralized baselines on {len(y)} pooled examples")
    central = train_central(x, y, w, epochs=config.central_epochs, seed=config.seed)
    epsilon = max(plan.epsilon for plan in regions["central"].values())
    delta = min(plan.delta for plan in regions["central"].values())
    private = train_central_dp(x, y, w, epsilon=epsilon, delta=delta,
                               epochs=config.central_epochs, seed=config.seed)  # fmt: skip
    info = {"epsilon": private.epsilon, "delta": private.delta,
            "noise_multiplier": private.noise_multiplier, "unit": "example"}  # fmt: skip
    rows = {
        "central": evaluation.metrics(central),
        "central_dp": evaluation.metrics(private.weights),
    }
    return rows, info
