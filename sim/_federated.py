"""The federated rows: plain FedAvg (no privacy) here, and DP rounds through the real regional
aggregators (in process through the ASGI app, or ``sottovoce aggregator serve`` processes), with
every device the real device code in a worker process (:mod:`._devices`)."""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, Future
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt

from sottovoce._clock import NOW_ENV
from sottovoce.device import Ranker
from sottovoce.policy import DecisionLog, Policy, PrivacyMode
from sottovoce.sim._config import (
    END,
    RETRY,
    TOKEN,
    Evaluation,
    Plans,
    Progress,
    RegionPlan,
    Run,
    SimulationConfig,
    SimulationError,
    device_task,
    pipeline_policy,
    region_keys,
    safe_name,
)
from sottovoce.sim._datasets import (
    Dataset,
)
from sottovoce.sim._devices import (
    Contribution,
    DeviceSetup,
    DeviceTask,
    contribute,
)
from sottovoce.sync import (
    RoundSpec,
    SignedRoundSpec,
    period_label,
    sample_into_round,
    verify_round_spec,
)
from sottovoce.sync.transport import Uploader, enroll, fetch_release

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


@dataclass(frozen=True)
class Model:
    """What a region's aggregator trains: the model's id and size, its weights before any
    release, and whether a release adds to the previous one (see ``RegionAggregator``)."""

    model_id: str
    dim: int
    base_weights: npt.NDArray[Any]
    accumulate: bool = True
    catalog: tuple[str, ...] = ()  # the collaborative model's layout, for a served aggregator
    rank: int = 0

    @classmethod
    def of(cls, ranker: Ranker) -> Model:
        return cls(ranker.model_id, ranker.parameter_count, ranker.get_weights())


class Region:
    """One region's aggregator, as a device reaches it (an HTTP client) and as its operator
    does (the same SQLite file, for opening rounds)."""

    def __init__(self, config: SimulationConfig, mode: PrivacyMode, region: str, *,
                 policy: Policy, model: Model, stack: ExitStack,
                 pipeline: str | None = None) -> None:  # fmt: skip
        from sottovoce.aggregator import RegionAggregator

        name = pipeline or mode.value
        self.region, self.policy = region, policy
        self.db = config.workdir / "aggregators" / name / f"{region}.db"
        self.db.parent.mkdir(parents=True, exist_ok=True)
        keys = region_keys(config, name, region)
        self.verify_key = keys.signing.public_key()
        seed = int.from_bytes(
            hashlib.sha256(f"{config.seed}:{name}:{region}".encode()).digest()[:8], "little"
        )
        # Round ids, periods and so the devices' sampling coins follow the aggregator's clock:
        # simulated, so a run repeats on any date. A served aggregator starts on the same
        # calendar (SOTTOVOCE_NOW) and advances in real time, staying behind the round deadlines
        # that this clock sets two simulated hours apart.
        self.clock = _SimClock()

        def aggregator(rng: np.random.Generator | None = None) -> RegionAggregator:
            return RegionAggregator(
                sqlite3.connect(self.db, timeout=30.0),
                policy=policy,
                region=region,
                signing_key=keys.signing,
                hpke_key=keys.hpke,
                model_id=model.model_id,
                dim=model.dim,
                base_weights=model.base_weights,
                rng=rng,
                clock=self.clock,
                accumulate=model.accumulate,
            )

        # The operator closes central rounds at their deadline: its noise is seeded like the
        # service's, so a run repeats (deployments draw from the OS CSPRNG).
        self.operator = aggregator(np.random.default_rng(seed + 1))
        stack.callback(self.operator.close)
        if config.server:
            self.client, self.url = _serve(config, name, region, policy, stack, model=model)
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


def _serve(config: SimulationConfig, pipeline: str, region: str, policy: Policy,
           stack: ExitStack, *, model: Model) -> tuple[httpx.Client, str]:  # fmt: skip
    """``sottovoce aggregator serve`` for the region, on a free loopback port (the ranker, or
    the collaborative model of ``model.catalog``)."""
    import socket
    import subprocess
    import sys

    folder = config.workdir / "aggregators" / pipeline
    policy_file = folder / f"{region}-policy.json"
    policy_file.write_text(policy.model_dump_json())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = (folder / f"{region}-serve.log").open("wb")
    stack.callback(log.close)
    command = [sys.executable, "-m", "sottovoce", "aggregator", "serve", "--region", region,
               "--policy", str(policy_file), "--keys",
               str(config.workdir / "keys" / pipeline / region), "--db",
               str(folder / f"{region}.db"), "--port", str(port), "--no-schedule"]  # fmt: skip
    if model.catalog:
        catalog = folder / "catalog.txt"
        catalog.write_text("\n".join(model.catalog) + "\n")
        command += ["--collaborative", str(catalog), "--rank", str(model.rank)]
    env = {**os.environ, "SOTTOVOCE_ENROLLMENT_TOKENS": TOKEN,
           NOW_ENV: _SimClock()().isoformat()}  # fmt: skip
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
            for region, service in services.items():
                plan = regions[region]
                join = partial(_train_and_seal, pool=pool, config=config,
                               release=releases[region], number=number)  # fmt: skip
                outcome = run_round(config, mode, service, plan=plan, users=members[region],
                                    join=join, bar=bar)  # fmt: skip
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


def privacy_entry(service: Region, plan: RegionPlan, rounds: int) -> dict[str, Any]:
    """The region's privacy as its aggregator's ledger reports it, with the mechanism's
    parameters, so that anyone can recompute it (the results' ``privacy`` list)."""
    ledger = service.operator.ledger
    start = ledger.period_start_for(service.clock())
    starts = sorted({ledger.period_start_for(service.clock.first + timedelta(hours=2 * k))
                     for k in range(rounds + 1)} | {start})  # fmt: skip
    charged = [entry for s in starts for entry in ledger.entries(s)]
    epsilon = max([ledger.spent(s) for s in starts], default=0.0)
    return {"region": service.region, "mode": plan.mode,
            "noise_multiplier": plan.noise_multiplier, "sampling_rate": plan.sampling_rate,
            "rounds": len(charged), "periods": len({e.period_start for e in charged}),
            "sensitivity_factor": plan.sensitivity, "epsilon": epsilon, "delta": plan.delta,
            "budget": plan.epsilon_budget, "accountant": plan.accountant,
            "expected_cohort": plan.expected_cohort}  # fmt: skip


def _train_and_seal(task: DeviceTask, spec: RoundSpec, *, pool: Executor,
                    config: SimulationConfig, release: bytes | None,
                    number: int) -> Future[Contribution]:  # fmt: skip
    return pool.submit(contribute, task, spec, release, END, steps=config.local_steps,
                       examples=config.examples, round_seed=number)  # fmt: skip


Join = Callable[[DeviceTask, RoundSpec], "Future[Contribution]"]
"""Starts one device's part in a round (in a worker process)."""


def run_round(config: SimulationConfig, mode: PrivacyMode, service: Region, *,
              plan: RegionPlan, users: Sequence[str], join: Join, bar: Progress,
              pipeline: str | None = None) -> dict[str, Any]:  # fmt: skip
    """One round in one region: open, train and seal on the devices, upload, close. The
    outcome has the verified ``spec`` and, when published, the ``release`` (wire JSON)."""
    name = pipeline or mode.value
    service.clock.advance(timedelta(hours=2))
    now = service.clock()
    service.operator.open_round(noise_multiplier=plan.noise_multiplier,
                                deadline=now + timedelta(hours=1))  # fmt: skip
    answer = service.client.get("/v1/round")
    if answer.status_code != 200:
        raise SimulationError(f"{service.region}: no round spec ({answer.status_code})")
    spec = verify_round_spec(SignedRoundSpec.from_wire(answer.content), service.verify_key)
    tasks = [device_task(config, name, u, service.region, service.policy) for u in users]
    # Each device flips the spec's coin itself; the simulator knows the devices' secrets, so
    # it skips waking the ones whose coin will say no (they would return at once).
    tasks = [t for t in tasks if sample_into_round(spec, t.secret())]
    futures = [join(t, spec) for t in tasks]
    taking_part: list[Contribution] = []
    refused: dict[str, int] = {}
    for future in futures:
        done = future.result()
        if done.key is not None:
            taking_part.append(done)
        elif done.refused is not None:
            refused[done.refused] = refused.get(done.refused, 0) + 1
        bar.advance()
    uploaded = upload(config, name, service, spec, [c.user for c in taking_part])
    info = service.operator.round(spec.round_id)
    assert info is not None
    outcome: dict[str, Any] = {"round_id": spec.round_id, "sampled": len(taking_part),
                               "uploaded": uploaded, "counted": info.count,
                               "min_cohort": spec.min_cohort,
                               "expected_cohort": spec.expected_cohort,
                               "epsilon_after": round(spec.epsilon_after, 4),
                               "refused_on_device": refused, "spec": spec}  # fmt: skip
    if info.state == "open":
        # The deadline passes: central mode publishes every on-time contribution's noised sum
        # over the expected cohort; local mode, still short of its cohort, is abandoned.
        service.operator.sweep(spec.deadline + timedelta(seconds=1))
        info = service.operator.round(spec.round_id)
        assert info is not None
    outcome["state"] = info.state
    if info.state != "published":
        return outcome
    fetched = fetch_release(service.client, base_url=service.url,
                            verify_key=service.verify_key, model_id=spec.model_id,
                            current_version=spec.model_version, retry=RETRY)  # fmt: skip
    if fetched is not None:
        outcome["release"] = fetched.release.to_wire()
        outcome["weights"] = fetched.release.weights_array().astype(np.float32).tobytes()
        outcome["version"] = fetched.release.version
    return outcome


def upload(config: SimulationConfig, pipeline: str, service: Region, spec: Any,
           users: Iterable[str]) -> dict[str, int]:  # fmt: skip
    """Each taking-part device enrolls its key for the period and runs its uploader."""
    counts: dict[str, int] = {}
    period = period_label(spec)
    for user in users:
        task = device_task(config, pipeline, user, service.region, service.policy)
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
        self.now = self.first = END + timedelta(hours=1)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, by: timedelta) -> None:
        self.now += by


def audit_log(service: Region) -> dict[str, Any]:
    report = DecisionLog(sqlite3.connect(service.db)).verify()
    return {"entries": report.size, "checkpoints": report.checkpoints, "ok": report.ok,
            "problems": report.problems[:5]}  # fmt: skip


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
