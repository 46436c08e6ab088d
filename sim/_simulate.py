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

Device work runs in worker processes started with ``spawn``: a script that calls
:func:`simulate` must do so under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import shutil
import sqlite3
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx
import numpy as np
import numpy.typing as npt

from sottovoce._errors import SottovoceError
from sottovoce.device import Ranker
from sottovoce.policy import DecisionLog, Policy, PrivacyMode, example_policy, policy_from_data
from sottovoce.sim._central import scores, train_central, train_central_dp
from sottovoce.sim._datasets import (
    Dataset,
    build_item_vectors,
    load_interactions_csv,
    load_lastfm,
    sample_users,
)
from sottovoce.sim._devices import (
    Contribution,
    DeviceSetup,
    DeviceTask,
    contribute,
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
from sottovoce.sync import SignedRoundSpec, period_label, sample_into_round, verify_round_spec
from sottovoce.sync.transport import RetryPolicy, Uploader, enroll, fetch_release

__all__ = ["SimulationConfig", "SimulationError", "default_lastfm_path", "simulate"]

T = TypeVar("T")
ROWS = ("random", "popularity", "central", "central_dp", "federated", "federated_global_only",
        "federated_dp", "federated_dp_global_only", "federated_dp_local",
        "federated_dp_local_global_only")  # fmt: skip
END = datetime(2026, 10, 1, 12, 0, tzinfo=UTC)  # the devices' clock: their history ends here
TOKEN = "simulation-enrollment-token"
RETRY = RetryPolicy(attempts=3, initial=0.01, maximum=0.1)


class SimulationError(SottovoceError):
    """The simulation cannot run as configured (the message says why)."""

    code = "simulation_invalid"


def default_lastfm_path() -> Path:
    """``$SOTTOVOCE_LASTFM``, else the shared HetRec folder next to the repository."""
    env = os.environ.get("SOTTOVOCE_LASTFM")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "lastfm-hetrec2011-2k"


@dataclass(frozen=True)
class SimulationConfig:
    """A run; the defaults are the README demo's (a few minutes on two cores)."""

    workdir: Path = Path("out/sim")
    lastfm: Path | None = None  # default: default_lastfm_path()
    csv: Path | None = None  # a generic interactions CSV instead of Last.fm
    item_features: Path | None = None
    users: int = 200
    rounds: int = 5
    sampling_rate: float = 0.5
    local_steps: int = 50
    epsilon: float = 8.0  # the run's cap on each region's ε (the policy's budget may be lower)
    central_epochs: int = 3
    examples: int = 500  # training examples per device (its most recent history)
    catalog_sample: int = 300  # catalog items a device caches beyond its own and its pool
    regions: tuple[str, ...] = ("eu", "us")
    workers: int = 2
    server: bool = False
    seed: int = 0
    holdout: float = 0.2
    negatives: int = 100
    policy: Policy = field(default_factory=example_policy)
    # What leaves the devices can be observed (tests, audits): ``on_request`` sees every HTTP
    # request the simulated devices and operator send, at the transport seam; ``relay`` maps
    # an aggregator's URL to the one devices should use instead (e.g. a recording proxy).
    on_request: Callable[[httpx.Request], None] | None = field(default=None, compare=False)
    relay: Callable[[str], str] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        checks = {
            "users must be at least 10": self.users >= 10,
            "rounds must be at least 1": self.rounds >= 1,
            "sampling_rate must be in (0, 1]": 0 < self.sampling_rate <= 1,
            "local_steps must be at least 1": self.local_steps >= 1,
            "epsilon must be positive": self.epsilon > 0,
            "workers must be at least 1": self.workers >= 1,
            "regions must not be empty": bool(self.regions),
        }
        for message, ok in checks.items():
            if not ok:
                raise SimulationError(message)


class Progress(Protocol):
    def start(self, name: str, total: int) -> None: ...
    def advance(self, steps: int = 1) -> None: ...
    def note(self, text: str) -> None: ...


class Quiet:
    def start(self, name: str, total: int) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass

    def note(self, text: str) -> None:
        pass


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
        evaluation = _Evaluation(pools, setups, region_of)
        metrics: dict[str, dict[str, float]] = {
            "random": evaluate(RandomRanker(config.seed), pools),
            "popularity": evaluate(PopularityRanker(split.train), pools),
        }
        with clock("central"):
            central_rows, central_dp_info = _central_rows(config, setups, evaluation=evaluation,
                                                          regions=regions, bar=bar)  # fmt: skip
            metrics.update(central_rows)
        with clock("federated"):
            fedavg = _fedavg(config, setups, ranker=ranker, evaluation=evaluation,
                             region_of=region_of, bar=bar)  # fmt: skip
        metrics["federated"] = fedavg.final
        metrics["federated_global_only"] = fedavg.final_global
        history = {"federated": fedavg.per_round}
        audits = {}
        for mode in (PrivacyMode.CENTRAL, PrivacyMode.LOCAL):
            name = "federated_dp" if mode is PrivacyMode.CENTRAL else "federated_dp_local"
            with clock(name):
                run = _federated_dp(config, mode, data=data, region_of=region_of,
                                    regions=regions, ranker=ranker, evaluation=evaluation,
                                    pool=pool, bar=bar)  # fmt: skip
            metrics[name] = run.final
            metrics[f"{name}_global_only"] = run.final_global
            history[name] = run.per_round
            audits[name] = run.audit
    epsilon = max(plan.epsilon for plan in regions.values())
    results: dict[str, Any] = {
        "dataset": data.name,
        "users": len(data.users),
        "epsilon": epsilon,
        "delta": max(plan.delta for plan in regions.values()),
        "metrics": {row: metrics[row] for row in ROWS},
        "evaluated_users": len(pools),
        "items": len(data.items),
        "rounds": history,
        "regions": {r: asdict(plan) for r, plan in regions.items()},
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


@dataclass
class RegionPlan:
    """One region's privacy settings for the run."""

    users: int
    min_cohort: int
    noise_multiplier: float
    sampling_rate: float
    epsilon_budget: float
    epsilon: float  # what all the run's rounds spend (the accountant's figure)
    delta: float
    accountant: str


def _region_plans(config: SimulationConfig, region_of: dict[str, str]) -> dict[str, RegionPlan]:
    from sottovoce.aggregator import epsilon_of

    plans = {}
    for region_id in config.regions:
        privacy = config.policy.region(region_id).privacy
        users = sum(1 for r in region_of.values() if r == region_id)
        budget = min(privacy.epsilon, config.epsilon)
        q = config.sampling_rate
        # Most of the region's sampled devices (about q·n take part): central noise shrinks
        # with the cohort. A slice smaller than the policy's minimum lowers it (reported).
        cohort = max(2, int(0.8 * q * users))

        def spent(z: float, q: float = q, privacy: Any = privacy) -> float:
            return epsilon_of([(z, q, config.rounds)], delta=privacy.delta,
                              accountant=privacy.accountant)  # fmt: skip

        low, high = 0.3, 64.0
        if spent(high) > budget:
            raise SimulationError(f"{config.rounds} rounds at sampling rate {q} cannot fit "
                                  f"region {region_id}'s ε {budget}: use fewer rounds or a "
                                  "lower sampling rate")  # fmt: skip
        for _ in range(24):  # bisect the smallest noise that fits the budget (to ~4e-6)
            middle = (low + high) / 2
            low, high = (low, middle) if spent(middle) <= budget * 0.999 else (middle, high)
        plans[region_id] = RegionPlan(users=users, min_cohort=cohort, noise_multiplier=high,
                                      sampling_rate=q, epsilon_budget=budget,
                                      epsilon=spent(high), delta=privacy.delta,
                                      accountant=str(privacy.accountant))  # fmt: skip
    return plans


def _config_summary(config: SimulationConfig) -> dict[str, Any]:
    keep = ("users", "rounds", "sampling_rate", "local_steps", "epsilon", "central_epochs",
            "regions", "workers", "server", "seed", "holdout", "negatives")  # fmt: skip
    return {k: getattr(config, k) for k in keep} | {"policy": config.policy.hash}


# -- devices ---------------------------------------------------------------------------------


def _device_task(config: SimulationConfig, pipeline: str, user: str, region: str,
                 policy: Policy) -> DeviceTask:  # fmt: skip
    path = config.workdir / "devices" / pipeline / region / f"{_safe(user)}.db"
    return DeviceTask(path, user, region, policy.model_dump_json(), config.seed)


def _safe(user: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in user)


def _setup_devices(
    config: SimulationConfig,
    data: Dataset,
    *,
    train: dict[str, Any] | Any,
    pools: Sequence[Pool],
    region_of: dict[str, str],
    regions: dict[str, RegionPlan],
    pool: Executor,
    bar: Progress,
) -> dict[str, DeviceSetup]:
    """Create every device of both pipelines; returns the first pipeline's setups by user."""
    candidates = {p.user: p.candidates for p in pools}
    setups: dict[str, DeviceSetup] = {}
    for pipeline in ("central", "local"):
        policy = _pipeline_policy(config, regions, PrivacyMode(pipeline))
        (config.workdir / f"policy-{pipeline}.json").write_text(policy.model_dump_json(indent=2))
        jobs = []
        for user in data.users:
            rng = random.Random(f"{config.seed}:catalog:{user}")
            cached = {i.item for i in train[user]} | set(candidates.get(user, ()))
            cached |= set(rng.sample(data.items, min(config.catalog_sample, len(data.items))))
            events = device_events(user, train[user], artists=data.artists,
                                   end=END - timedelta(hours=1), seed=config.seed)  # fmt: skip
            task = _device_task(config, pipeline, user, region_of[user], policy)
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


# -- policies and keys -----------------------------------------------------------------------


@dataclass
class _Keys:
    signing: Any
    hpke: Any


def _pipeline_policy(
    config: SimulationConfig, regions: dict[str, RegionPlan], mode: PrivacyMode
) -> Policy:
    """The run's policy: every region in ``mode`` with the run's minimum cohort and the
    simulation's aggregator keys (made once per run and pipeline, see ``_keys``)."""
    data = config.policy.model_dump(mode="json")
    for region in data["regions"]:
        if region["id"] not in regions:
            continue
        keys = _keys(config, mode, region["id"])
        from sottovoce.aggregator import RegionKeys

        public = RegionKeys(keys.signing, keys.hpke).public()
        for key in region["aggregator"]["public_keys"]:
            key["key"] = public[key["use"]]
        region["privacy"]["mode"] = mode.value
        region["privacy"]["min_cohort"] = regions[region["id"]].min_cohort
    return policy_from_data(data, source=f"simulation ({mode.value} mode)")


_KEYS: dict[tuple[str, str, str], _Keys] = {}


def _keys(config: SimulationConfig, mode: PrivacyMode, region: str) -> _Keys:
    slot = (str(config.workdir), mode.value, region)
    if slot not in _KEYS:
        from sottovoce.aggregator import generate_keys, load_keys

        directory = config.workdir / "keys" / mode.value / region
        keys = load_keys(directory) if directory.exists() else generate_keys(directory)
        _KEYS[slot] = _Keys(keys.signing, keys.hpke)
    return _KEYS[slot]


# -- evaluation ------------------------------------------------------------------------------


class _Evaluation:
    """Ranks every evaluated user's pool with given weights (per region), from the feature
    rows each device computed from its own store."""

    def __init__(self, pools: Sequence[Pool], setups: dict[str, DeviceSetup],
                 region_of: dict[str, str]) -> None:  # fmt: skip
        self.pools, self.setups, self.region_of = pools, setups, region_of

    def metrics(self, weights: dict[str, npt.NDArray[Any]] | npt.NDArray[Any], *,
                personal: bool = True) -> dict[str, float]:  # fmt: skip
        def rank(user: str, candidates: Sequence[str]) -> list[str]:
            setup = self.setups[user]
            rows = setup.pool_x if personal else setup.pool_x_global
            w = weights[self.region_of[user]] if isinstance(weights, dict) else weights
            order = np.argsort(-scores(w, rows), kind="stable")
            return [candidates[i] for i in order]

        return {k: round(v, 5) for k, v in evaluate(rank, self.pools).items()}


def _pooled(setups: dict[str, DeviceSetup]) -> tuple[npt.NDArray[Any], ...]:
    parts = [s for s in setups.values() if len(s.y)]
    return tuple(np.concatenate([getattr(s, a) for s in parts]) for a in ("x", "y", "w"))


def _central_rows(config: SimulationConfig, setups: dict[str, DeviceSetup], *,
                  evaluation: _Evaluation, regions: dict[str, RegionPlan],
                  bar: Progress) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:  # fmt: skip
    x, y, w = _pooled(setups)
    bar.note(f"centralized baselines on {len(y)} pooled examples")
    central = train_central(x, y, w, epochs=config.central_epochs, seed=config.seed)
    epsilon = max(plan.epsilon for plan in regions.values())
    delta = min(plan.delta for plan in regions.values())
    private = train_central_dp(x, y, w, epsilon=epsilon, delta=delta,
                               epochs=config.central_epochs, seed=config.seed)  # fmt: skip
    info = {"epsilon": private.epsilon, "delta": private.delta,
            "noise_multiplier": private.noise_multiplier, "unit": "example"}  # fmt: skip
    rows = {
        "central": evaluation.metrics(central),
        "central_dp": evaluation.metrics(private.weights),
    }
    return rows, info


# -- federated, non-private (plain FedAvg, here) ----------------------------------------------


@dataclass
class _Run:
    final: dict[str, float]
    final_global: dict[str, float]
    per_round: list[dict[str, Any]]
    audit: dict[str, Any] = field(default_factory=dict)


def _fedavg(config: SimulationConfig, setups: dict[str, DeviceSetup], *, ranker: Ranker,
            evaluation: _Evaluation, region_of: dict[str, str], bar: Progress) -> _Run:  # fmt: skip
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
    return _Run(evaluation.metrics(weights), evaluation.metrics(weights, personal=False),
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


class _Region:
    """One region's aggregator, as a device reaches it (an HTTP client) and as its operator
    does (the same SQLite file, for opening rounds)."""

    def __init__(self, config: SimulationConfig, mode: PrivacyMode, region: str, *,
                 policy: Policy, ranker: Ranker, stack: ExitStack) -> None:  # fmt: skip
        from sottovoce.aggregator import RegionAggregator

        self.region, self.policy = region, policy
        self.db = config.workdir / "aggregators" / mode.value / f"{region}.db"
        self.db.parent.mkdir(parents=True, exist_ok=True)
        keys = _keys(config, mode, region)
        self.verify_key = keys.signing.public_key()
        seed = int.from_bytes(
            hashlib.sha256(f"{config.seed}:{mode.value}:{region}".encode()).digest()[:8], "little"
        )
        # Round ids, periods and so the devices' sampling coins follow the aggregator's clock:
        # in process it is simulated (a run repeats); a served aggregator keeps real time.
        self.clock = _SimClock() if not config.server else _RealClock()

        def aggregator(rng: np.random.Generator | None = None) -> RegionAggregator:
            return RegionAggregator(
                sqlite3.connect(self.db, timeout=30.0),
                policy=policy,
                region=region,
                signing_key=keys.signing,
                hpke_key=keys.hpke,
                model_id=ranker.model_id,
                dim=ranker.parameter_count,
                base_weights=ranker.get_weights(),
                rng=rng,
                clock=self.clock,
            )

        self.operator = aggregator()
        stack.callback(self.operator.close)
        if config.server:
            self.client, self.url = _serve(config, mode, region, policy, stack)
        else:
            with warnings.catch_warnings():  # starlette's note on its httpx client: not ours
                warnings.simplefilter("ignore")
                from fastapi.testclient import TestClient

            from sottovoce.aggregator import create_app

            app = create_app(lambda: aggregator(np.random.default_rng(seed)),
                             enrollment_tokens={TOKEN})  # fmt: skip
            self.url = f"http://{region}.aggregator.invalid"
            self.client = stack.enter_context(TestClient(app, base_url=self.url))
        if config.relay is not None:
            self.url = config.relay(self.url)
            self.client.base_url = httpx.URL(self.url)
        if config.on_request is not None:
            self.client.event_hooks["request"].append(config.on_request)
        self.enrolled: set[tuple[str, str]] = set()


def _serve(config: SimulationConfig, mode: PrivacyMode, region: str, policy: Policy,
           stack: ExitStack) -> tuple[httpx.Client, str]:  # fmt: skip
    """``sottovoce aggregator serve`` for the region, on a free loopback port."""
    import socket
    import subprocess
    import sys

    folder = config.workdir / "aggregators" / mode.value
    policy_file = folder / f"{region}-policy.json"
    policy_file.write_text(policy.model_dump_json())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = (folder / f"{region}-serve.log").open("wb")
    stack.callback(log.close)
    command = [sys.executable, "-m", "sottovoce", "aggregator", "serve", "--region", region,
               "--policy", str(policy_file), "--keys",
               str(config.workdir / "keys" / mode.value / region), "--db",
               str(folder / f"{region}.db"), "--port", str(port), "--no-schedule"]  # fmt: skip
    env = {**os.environ, "SOTTOVOCE_ENROLLMENT_TOKENS": TOKEN}
    process = subprocess.Popen(command, stdout=log, stderr=log, env=env)

    def stop() -> None:
        process.terminate()
        process.wait(timeout=30)

    stack.callback(stop)
    url = f"http://127.0.0.1:{port}"
    client = stack.enter_context(httpx.Client(base_url=url, timeout=30.0))
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise SimulationError(f"the {region} aggregator did not start (see {log.name})")
        try:
            if client.get("/v1/health").status_code == 200:
                return client, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SimulationError(f"the {region} aggregator did not answer within 60 s")
        time.sleep(0.1)


def _federated_dp(config: SimulationConfig, mode: PrivacyMode, *, data: Dataset,
                  region_of: dict[str, str], regions: dict[str, RegionPlan], ranker: Ranker,
                  evaluation: _Evaluation, pool: Executor, bar: Progress) -> _Run:  # fmt: skip
    policy = _pipeline_policy(config, regions, mode)
    base = ranker.get_weights().astype(np.float64)
    weights = {r: base.copy() for r in config.regions}
    releases: dict[str, bytes | None] = dict.fromkeys(config.regions)
    per_round: list[dict[str, Any]] = []
    with ExitStack() as stack:
        services = {
            r: _Region(config, mode, r, policy=policy, ranker=ranker, stack=stack)
            for r in config.regions
        }
        members = {r: sorted(u for u, g in region_of.items() if g == r) for r in config.regions}
        label = "federated DP, central" if mode is PrivacyMode.CENTRAL else "federated DP, local"
        expected = round(config.rounds * config.sampling_rate * len(data.users))
        bar.start(f"{label} ({config.rounds} rounds)", expected)
        for number in range(1, config.rounds + 1):
            record: dict[str, Any] = {"round": number}
            for region, service in services.items():
                plan = regions[region]
                outcome = _round(config, mode, service, plan=plan, users=members[region],
                                 release=releases[region], number=number, pool=pool,
                                 bar=bar)  # fmt: skip
                record[region] = outcome
                if outcome.get("release") is not None:
                    releases[region] = outcome.pop("release")
                    weights[region] = np.frombuffer(outcome.pop("weights"), np.float32).astype(
                        np.float64
                    )
            record.update(evaluation.metrics(dict(weights)))
            per_round.append(record)
        audit = {r: _audit(s) for r, s in services.items()}
    audit["devices"] = _audit_devices(config, mode, data.users, region_of)
    return _Run(evaluation.metrics(weights), evaluation.metrics(weights, personal=False),
                per_round, audit)  # fmt: skip


def _round(config: SimulationConfig, mode: PrivacyMode, service: _Region, *, plan: RegionPlan,
           users: Sequence[str], release: bytes | None, number: int, pool: Executor,
           bar: Progress) -> dict[str, Any]:  # fmt: skip
    """One round in one region: open, train and seal on the devices, upload, close."""
    service.clock.advance(timedelta(hours=2))
    now = service.clock()
    service.operator.open_round(noise_multiplier=plan.noise_multiplier,
                                sampling_rate=plan.sampling_rate,
                                deadline=now + timedelta(hours=1))  # fmt: skip
    answer = service.client.get("/v1/round")
    if answer.status_code != 200:
        raise SimulationError(f"{service.region}: no round spec ({answer.status_code})")
    spec = verify_round_spec(SignedRoundSpec.from_wire(answer.content), service.verify_key)
    tasks = [_device_task(config, mode.value, u, service.region, service.policy) for u in users]
    # Each device flips the spec's coin itself; the simulator knows the devices' secrets, so
    # it skips waking the ones whose coin will say no (they would return at once).
    tasks = [t for t in tasks if sample_into_round(spec, t.secret())]
    futures = [pool.submit(contribute, t, spec, release, END, steps=config.local_steps,
                           examples=config.examples, round_seed=number)
               for t in tasks]  # fmt: skip
    taking_part: list[Contribution] = []
    refused: dict[str, int] = {}
    for future in futures:
        done = future.result()
        if done.key is not None:
            taking_part.append(done)
        elif done.refused is not None:
            refused[done.refused] = refused.get(done.refused, 0) + 1
        bar.advance()
    uploaded = _upload(config, mode, service, spec, [c.user for c in taking_part])
    info = service.operator.round(spec.round_id)
    assert info is not None
    outcome: dict[str, Any] = {"round_id": spec.round_id, "sampled": len(taking_part),
                               "uploaded": uploaded, "counted": info.count,
                               "min_cohort": spec.min_cohort,
                               "epsilon_after": round(spec.epsilon_after, 4),
                               "refused_on_device": refused}  # fmt: skip
    if info.state == "open":  # too few devices: the round ends unpublished at its deadline
        service.operator.sweep(spec.deadline + timedelta(seconds=1))
        outcome["state"] = "abandoned"
        return outcome
    outcome["state"] = info.state
    fetched = fetch_release(service.client, base_url=service.url,
                            verify_key=service.verify_key, model_id=spec.model_id,
                            current_version=spec.model_version, retry=RETRY)  # fmt: skip
    if fetched is not None:
        outcome["release"] = fetched.release.to_wire()
        outcome["weights"] = fetched.release.weights_array().astype(np.float32).tobytes()
        outcome["version"] = fetched.release.version
    return outcome


def _upload(config: SimulationConfig, mode: PrivacyMode, service: _Region, spec: Any,
            users: Iterable[str]) -> dict[str, int]:  # fmt: skip
    """Each taking-part device enrolls its key for the period and runs its uploader."""
    counts: dict[str, int] = {}
    period = period_label(spec)
    for user in users:
        task = _device_task(config, mode.value, user, service.region, service.policy)
        store = task.open(END)
        try:
            if (user, period) not in service.enrolled:
                enroll(service.client, base_url=service.url, token=TOKEN,
                       device_public_key=store.signing_key(period).public_key(), period=period,
                       retry=RETRY)  # fmt: skip
                service.enrolled.add((user, period))
            report = Uploader(service.client, base_url=service.url, outbox=store,
                              clock=lambda: END, retry=RETRY).run_once()  # fmt: skip
            for name, value in asdict(report).items():
                if isinstance(value, int):
                    counts[name] = counts.get(name, 0) + value
        finally:
            store.close()
    return counts


class _SimClock:
    """The in-process aggregators' clock: starts after the devices' history, moves per round."""

    def __init__(self) -> None:
        self.now = END + timedelta(hours=1)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, by: timedelta) -> None:
        self.now += by


class _RealClock(_SimClock):
    def __call__(self) -> datetime:
        return datetime.now(UTC)


def _audit(service: _Region) -> dict[str, Any]:
    report = DecisionLog(sqlite3.connect(service.db)).verify()
    return {"entries": report.size, "checkpoints": report.checkpoints, "ok": report.ok,
            "problems": report.problems[:5]}  # fmt: skip


def _audit_devices(config: SimulationConfig, mode: PrivacyMode, users: Sequence[str],
                   region_of: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    """Every device's own decision log verifies (each device keeps one)."""
    checked = failed = entries = 0
    for user in users:
        path = config.workdir / "devices" / mode.value / region_of[user] / f"{_safe(user)}.db"
        conn = sqlite3.connect(path)
        try:
            report = DecisionLog(conn).verify()
        finally:
            conn.close()
        checked += 1
        entries += report.size
        failed += 0 if report.ok else 1
    return {"devices": checked, "entries": entries, "failed": failed, "ok": failed == 0}
