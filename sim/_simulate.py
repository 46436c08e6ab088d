"""Many devices on real data: the collaborative model and the session reranker through the real
aggregators, and every row of the comparison table measured in the same run, by full ranking.

Data flow (``sottovoce simulate``): a dataset adapter (:mod:`._datasets`) gives users and
items; :func:`~sottovoce.sim.split_holdout` hides 20 % of each user's items (random, or each
user's latest); item vectors come from public catalog data that the holdout does not touch.
:mod:`._full_ranking` ranks every item a user did not train on; :mod:`._references` gives
popularity, ItemKNN, EASE and the device alone (content) on the same split.

Every user becomes a device (:mod:`._devices`, the real ``sottovoce.device`` code and its own
SQLite store) in a region of the policy; each region gets its own aggregator per pipeline — the
real FastAPI service, called in process through its ASGI app by default, or ``sottovoce
aggregator serve`` processes on 127.0.0.1 with ``server=True``. Pipelines, each on its own
device stores (its own deployment, with its own budget):

- the collaborative model (:mod:`._collaborative`): a DP count round, then factor rounds, in
  central mode; ``federated`` is the same model summed exactly, ``federated_dp`` the real thing;
  both are scored as a device scores, blended with the catalog's item vectors when those are
  public content (:mod:`sottovoce.device._blend`), and then followed by the model alone
  (``federated_model_only``, ``federated_dp_model_only``);
- the session reranker (``reranker=True``, :mod:`._federated`): the TFLite ranker trained by DP
  rounds in ``central`` and ``local`` mode, plus ``central``, ``central_dp`` and plain FedAvg
  baselines; scored on the sampled protocol (``metrics_sampled``).

Each region's noise multiplier is the smallest that keeps the pipeline's rounds within the
region's ε budget (and the run's ε cap).

Reproducible: the same seed gives the same data, split, devices (secrets, sampling, local
noise), central noise and baselines; the in-process aggregators run on a simulated clock.
Region keys are fresh each run (signatures differ; nothing measured does). With
``server=True`` the services keep real time and draw their own noise: rows can differ.

Device work runs in worker processes started with ``spawn``: a script that calls
:func:`simulate` must do so under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from datetime import timedelta
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt

from sottovoce.device import Ranker
from sottovoce.device._collaborative import CollaborativeModel
from sottovoce.policy import PrivacyMode
from sottovoce.sim import _references as references
from sottovoce.sim._central import train_central, train_central_dp
from sottovoce.sim._collaborative import (
    PIPELINE,
    Listened,
    federated_collaborative,
    layout_for,
    private_collaborative,
    scorer,
)
from sottovoce.sim._config import (
    END,
    MODEL_ONLY,
    RERANKER_ROWS,
    ROWS,
    Evaluation,
    Plans,
    Progress,
    Quiet,
    SimulationConfig,
    default_lastfm_path,
    device_task,
    pipeline_policy,
)
from sottovoce.sim._datasets import (
    CATALOG_NOTE,
    COOCCURRENCE_NOTE,
    Dataset,
    build_item_vectors,
    device_content,
    item_vector_source,
    load_interactions_csv,
    load_lastfm,
    sample_users,
)
from sottovoce.sim._device_feed import listening
from sottovoce.sim._devices import (
    DeviceSetup,
    init_worker,
    setup_device,
)
from sottovoce.sim._errors import SimulationError
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
from sottovoce.sim._full_ranking import Interactions, Scorer, evaluate_full
from sottovoce.sim._plans import Pipeline, region_plans

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
        try:
            split = split_holdout(data, fraction=config.holdout, seed=config.seed,
                                  by=config.split)  # fmt: skip
        except ValueError as error:
            raise SimulationError(f"--split {config.split}: {error}") from None
        vectors = build_item_vectors(data, train=split.train, seed=config.seed)
        catalog = catalog_items(data, vectors)
        pools = candidate_pools(split, universe=data.items, negatives=config.negatives,
                                seed=config.seed)  # fmt: skip
        matrix = Interactions.of(data, split.train, split.heldout)
        listened = [listening(split.train[user]) for user in matrix.users]
    bar.note(f"{data.name}: {len(data.users)} users, {len(data.items)} items, "
             f"{data.size} interactions; {len(pools)} users evaluated")  # fmt: skip
    region_of = _assign_regions(data.users, config)
    ranker = Ranker.load()
    layout = layout_for(data.items, config.seed, private=True)
    regions = region_plans(config, region_of, {
        "central": Pipeline(PrivacyMode.CENTRAL, ranker.parameter_count, config.rounds,
                            config.sampling_rate),
        "local": Pipeline(PrivacyMode.LOCAL, ranker.parameter_count, config.rounds,
                          config.sampling_rate),
        PIPELINE: Pipeline(PrivacyMode.CENTRAL, layout.dim, config.collaborative_rounds,
                           config.collaborative_sampling_rate),
    })  # fmt: skip
    content = np.stack([vectors[i] for i in data.items])
    with clock("references"):
        full = _reference_rows(config, data, matrix, content, bar)
    collaborative = partial(
        _collaborative_rows,
        config,
        matrix,
        region_of=region_of,
        listened=listened,
        content=device_content(data, vectors),
        source=item_vector_source(data),
    )
    with clock("collaborative"):
        exact = federated_collaborative(config, matrix,
                                        layout_for(data.items, config.seed, private=False),
                                        region_of=region_of,
                                        rounds=config.collaborative_rounds,
                                        listened=listened)  # fmt: skip
        full |= collaborative("federated", exact)

    context = multiprocessing.get_context("spawn")  # no fork after torch or threads start
    with ProcessPoolExecutor(config.workers, mp_context=context, initializer=init_worker,
                             initargs=(catalog,)) as pool:  # fmt: skip
        with clock("devices"):
            setups = _setup_devices(config, data, train=split.train, pools=pools,
                                    region_of=region_of, regions=regions, pool=pool,
                                    bar=bar)  # fmt: skip
        with clock("federated_dp"):
            private, run = private_collaborative(
                config, matrix, layout, region_of=region_of, plans=regions,
                rounds=config.collaborative_rounds, pool=pool, bar=bar)  # fmt: skip
            full |= collaborative("federated_dp", private)
        privacy: list[dict[str, Any]] = list(run["privacy"])
        history: dict[str, Any] = {PIPELINE: run["rounds"]}
        audits: dict[str, Any] = {PIPELINE: run["audit"]}
        reranker: dict[str, Any] = {}
        if config.reranker:
            reranker = _reranker_rows(config, data=data, train=split.train, pools=pools,
                                      setups=setups, region_of=region_of, regions=regions,
                                      ranker=ranker, pool=pool, bar=bar, clock=clock)  # fmt: skip
            privacy += reranker.pop("privacy")
            history |= reranker.pop("history")
            audits |= reranker.pop("audit")
    epsilon = max(entry["epsilon"] for entry in privacy)
    results: dict[str, Any] = {
        "dataset": data.name,
        "users": len(data.users),
        "epsilon": epsilon,
        "delta": max(entry["delta"] for entry in privacy),
        "privacy": privacy,
        "noise": NOISE_NOTE,
        "protocol": "full",
        "split": config.split,
        "item_vectors": item_vector_source(data),
        "item_vectors_note": CATALOG_NOTE if item_vector_source(data) == "cooccurrence" else None,
        "metrics": _in_order(full),
        "protocol_sampled": f"each held-out item among {config.negatives} sampled items the user "
        "never touched (the session reranker's table; sampled metrics can "
        "reorder models: read the full-ranking table first)",
        "metrics_sampled": reranker.get("metrics"),
        "collaborative": {
            "table": layout.table_size,
            "rank": layout.rank,
            "rounds": config.collaborative_rounds,
            "model_id": layout.model_id,
            "dim": layout.dim,
        },
        "skipped_rows": {
            "count": data.skipped.count,
            "first": [row._asdict() for row in data.skipped.first],
        },
        "evaluated_users": len(pools),
        "items": len(data.items),
        "rounds": history,
        "regions": {
            p: {r: asdict(plan) for r, plan in plans.items()} for p, plans in regions.items()
        },
        "central_dp": reranker.get("central_dp"),
        "audit": audits,
        "config": _config_summary(config),
        "timings_s": {**timings, "total": round(time.perf_counter() - started, 1)},
    }
    (config.workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _collaborative_rows(config: SimulationConfig, matrix: Interactions, name: str,
                        model: CollaborativeModel, *, region_of: Mapping[str, str],
                        listened: Listened, content: npt.NDArray[np.float64] | None,
                        source: str) -> dict[str, dict[str, Any]]:  # fmt: skip
    """The row ``name`` of the collaborative ``model``: the device's scores, the model blended
    with ``content`` (public item vectors from ``source``, :func:`device_content`;
    :mod:`sottovoce.device._blend`), and then beside it the model alone (``<name>_model_only``).
    Without content (vectors from co-occurrence are central data, not a device's) the row is
    the model alone."""
    models = dict.fromkeys(config.regions, model)
    row = evaluate_full(scorer(matrix, models, region_of, listened, content=content), matrix,
                        seed=config.seed)  # fmt: skip
    if content is None:
        return {name: row}
    alone = evaluate_full(scorer(matrix, models, region_of, listened), matrix, seed=config.seed)
    return {name: row | {"content": source}, f"{name}{MODEL_ONLY}": alone}


def _in_order(full: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The full-ranking rows in the table's order, each model-alone row after its row."""
    names = (name for row in ROWS for name in (row, f"{row}{MODEL_ONLY}"))
    return {name: full[name] for name in names if name in full}


def _reference_rows(
    config: SimulationConfig, data: Dataset, matrix: Interactions,
    content: npt.NDArray[np.float64], bar: Progress,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Random, popularity, ItemKNN, EASE and the device alone (content), full ranking."""
    bar.note("references: popularity, ItemKNN, EASE (lambda chosen on a validation slice)")
    seed = config.seed
    rows = {
        "random": evaluate_full(_random_scores(matrix, seed), matrix, seed=seed),
        "popularity": evaluate_full(references.popularity(matrix), matrix, seed=seed),
        "itemknn": evaluate_full(references.item_knn(matrix), matrix, seed=seed),
    }
    ease, lam = references.ease(matrix, seed=seed)
    rows["ease"] = evaluate_full(ease, matrix, seed=seed) | {"lambda": lam}
    rows["local_only"] = evaluate_full(references.content_profile(matrix, content), matrix,
                                       seed=seed)  # fmt: skip
    if item_vector_source(data) == "cooccurrence":
        rows["local_only"]["note"] = COOCCURRENCE_NOTE
    return rows


def _reranker_rows(config: SimulationConfig, *, data: Dataset, train: Any, pools: Sequence[Pool],
                   setups: dict[str, DeviceSetup], region_of: dict[str, str], regions: Plans,
                   ranker: Ranker, pool: Executor, bar: Progress,
                   clock: _Stopwatch) -> dict[str, Any]:  # fmt: skip
    """The session reranker's rows (sampled protocol): pooled, FedAvg, and DP rounds through
    the aggregators in central and local mode."""
    evaluation = Evaluation(pools, setups, region_of)
    metrics: dict[str, dict[str, float]] = {
        "random": evaluate(RandomRanker(config.seed), pools),
        "popularity": evaluate(PopularityRanker(train), pools),
    }
    with clock("reranker_central"):
        central_rows, central_dp = _central_rows(config, setups, evaluation=evaluation,
                                                 regions=regions, pool=pool, bar=bar)  # fmt: skip
        metrics.update(central_rows)
    with clock("reranker_federated"):
        plain = fedavg(config, setups, ranker=ranker, evaluation=evaluation,
                       region_of=region_of, bar=bar)  # fmt: skip
    metrics["federated"] = plain.final
    metrics["federated_global_only"] = plain.final_global
    history: dict[str, Any] = {"reranker_federated": plain.per_round}
    audits: dict[str, Any] = {}
    privacy: list[dict[str, Any]] = []
    for mode in (PrivacyMode.CENTRAL, PrivacyMode.LOCAL):
        name = "federated_dp" if mode is PrivacyMode.CENTRAL else "federated_dp_local"
        with clock(f"reranker_{name}"):
            run = federated_dp(config, mode, data=data, region_of=region_of, plans=regions,
                               ranker=ranker, evaluation=evaluation, pool=pool,
                               bar=bar)  # fmt: skip
        metrics[name] = run.final
        metrics[f"{name}_global_only"] = run.final_global
        history[f"reranker_{name}"] = run.per_round
        audits[f"reranker_{name}"] = run.audit
        privacy.extend(dict(entry, pipeline=f"reranker_{name}") for entry in run.privacy)
    return {"metrics": {row: metrics[row] for row in RERANKER_ROWS}, "central_dp": central_dp,
            "history": history, "audit": audits, "privacy": privacy}  # fmt: skip


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
        data = load_interactions_csv(config.csv, item_features=config.item_features,
                                     skip_bad_rows=config.skip_bad_rows)  # fmt: skip
        if config.users is not None and len(data.users) > config.users:
            data = sample_users(data, config.users, seed=config.seed, min_interactions=5)
        return data
    path = config.lastfm or default_lastfm_path()
    return load_lastfm(path, users=config.users, seed=config.seed)


def _assign_regions(users: Sequence[str], config: SimulationConfig) -> dict[str, str]:
    order = list(users)
    random.Random(f"{config.seed}:regions").shuffle(order)
    return {user: config.regions[n % len(config.regions)] for n, user in enumerate(order)}


def _random_scores(data: Interactions, seed: int) -> Scorer:
    def score(users: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        rng = np.random.default_rng([seed, 3, int(users[0]) if len(users) else 0])
        return rng.random((len(users), len(data.items)))

    return score


def _config_summary(config: SimulationConfig) -> dict[str, Any]:
    keep = ("users", "rounds", "collaborative_rounds", "reranker", "split", "sampling_rate",
            "collaborative_sampling_rate", "local_steps", "epsilon", "central_epochs", "regions",
            "workers", "server", "seed", "holdout", "negatives")  # fmt: skip
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
    """Create every device once, in the first pipeline's world (the reranker's central one, or
    the collaborative model's alone), and give every other pipeline a copy of those fresh stores
    (its own world: it opens them with its own policy, a logged change of policy); returns the
    devices' setups by user."""
    candidates = {p.user: p.candidates for p in pools}
    setups: dict[str, DeviceSetup] = {}
    first = "central" if config.reranker else PIPELINE
    mode = PrivacyMode.CENTRAL if first == PIPELINE else PrivacyMode(first)
    policy = pipeline_policy(config, regions, mode, pipeline=first)
    jobs = []
    for user in data.users:
        rng = random.Random(f"{config.seed}:catalog:{user}")
        cached = {i.item for i in train[user]} | set(candidates.get(user, ()))
        cached |= set(rng.sample(data.items, min(config.catalog_sample, len(data.items))))
        events = device_events(user, train[user], artists=data.artists,
                               end=END - timedelta(hours=1), seed=config.seed)  # fmt: skip
        task = device_task(config, first, user, region_of[user], policy)
        task.path.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((task, events, candidates.get(user, ()), tuple(sorted(cached))))
    bar.start(f"devices ({len(jobs)})", len(jobs))
    examples = config.examples if config.reranker else 0  # the reranker's only
    futures = [pool.submit(setup_device, t, e, c if config.reranker else (), END,
                           examples=examples, catalog=k)
               for t, e, c, k in jobs]  # fmt: skip
    for future in futures:
        setup = future.result()
        setups[setup.user] = setup
        bar.advance()
    devices = config.workdir / "devices"
    others = ("local", PIPELINE) if config.reranker else ()
    for pipeline in (first, *others):
        if pipeline != first:  # the same devices, before any round, in their own world
            shutil.copytree(devices / first, devices / pipeline)
        mode = PrivacyMode.LOCAL if pipeline == "local" else PrivacyMode.CENTRAL
        policy = pipeline_policy(config, regions, mode, pipeline=pipeline)
        (config.workdir / f"policy-{pipeline}.json").write_text(policy.model_dump_json(indent=2))
    return setups


def _pooled(setups: dict[str, DeviceSetup]) -> tuple[npt.NDArray[Any], ...]:
    parts = [s for s in setups.values() if len(s.y)]
    return tuple(np.concatenate([getattr(s, a) for s in parts]) for a in ("x", "y", "w"))


def _central_rows(config: SimulationConfig, setups: dict[str, DeviceSetup], *,
                  evaluation: Evaluation, regions: Plans, pool: Executor,
                  bar: Progress) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:  # fmt: skip
    """The pooled baselines, the plain and the DP one trained at once in two workers (each is
    one thread of torch: seeded, so the weights do not depend on where they are trained)."""
    x, y, w = _pooled(setups)
    bar.note(f"centralized baselines on {len(y)} pooled examples")
    epsilon = max(plan.epsilon for plan in regions["central"].values())
    delta = min(plan.delta for plan in regions["central"].values())
    plain = pool.submit(train_central, x, y, w, epochs=config.central_epochs, seed=config.seed)
    dp = pool.submit(train_central_dp, x, y, w, epsilon=epsilon, delta=delta,
                     epochs=config.central_epochs, seed=config.seed)  # fmt: skip
    central, private = plain.result(), dp.result()
    info = {"epsilon": private.epsilon, "delta": private.delta,
            "noise_multiplier": private.noise_multiplier, "unit": "example"}  # fmt: skip
    rows = {
        "central": evaluation.metrics(central),
        "central_dp": evaluation.metrics(private.weights),
    }
    return rows, info
