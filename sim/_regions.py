"""Each region's aggregator as the simulated devices reach it, and a round through them.

Data flow: the coordinator opens a round on each region's real aggregator (in process through
its ASGI app over :class:`._in_process.InProcessTransport`, or a ``sottovoce aggregator
serve`` process on loopback), every sampled device (the real device code, in a worker
process) checks the spec, trains, seals and queues its delta, and the coordinator runs each
device's uploader against the region's service; the round then closes at its deadline into a
signed release that the devices install next round.

:func:`run_rounds` runs one round in every region at once: the devices of all regions share
the workers, and each delta is uploaded as soon as its device has sealed it, while later
devices still train. The uploads of a region reach its aggregator in the order its devices
started, one at a time, so a round's sum is the same float sum on every run; opening, enrolling
and closing the devices' stores (which wait on the disk) overlap on a few threads.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
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
    Progress,
    RegionPlan,
    SimulationConfig,
    device_task,
    region_keys,
)
from sottovoce.sim._devices import Contribution, DeviceTask
from sottovoce.sim._errors import SimulationError
from sottovoce.sim._in_process import InProcessTransport
from sottovoce.sync import (
    RoundSpec,
    SignedRoundSpec,
    period_label,
    sample_into_round,
    verify_round_spec,
)
from sottovoce.sync.transport import Uploader, enroll, fetch_release

__all__ = ["Join", "Model", "Region", "RegionRound", "audit_log", "privacy_entry", "run_rounds"]

UPLOAD_THREADS = 4  # the coordinator's uploads in flight (stores opening, enrolling, closing)

# -- a region's aggregator -----------------------------------------------------------------


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
                _connect(self.db),
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
            from sottovoce.aggregator import create_app

            app = create_app(lambda: aggregator(np.random.default_rng(seed)),
                             enrollment_tokens={TOKEN})  # fmt: skip
            self.url = f"http://{region}.aggregator.invalid"
            transport = InProcessTransport(app, name=f"aggregator-{name}-{region}")
            self.client = stack.enter_context(httpx.Client(transport=transport,
                                                           base_url=self.url))  # fmt: skip
        if config.relay is not None:
            self.url = config.relay(self.url)
            self.client.base_url = httpx.URL(self.url)
        if config.on_request is not None:
            self.client.event_hooks["request"].append(config.on_request)
        self.enrolled: set[tuple[str, str]] = set()
        self.pipeline = name  # the deployment: "central", "local", "collaborative"
        self._config = config
        self._tasks: dict[str, DeviceTask] = {}

    def task(self, user: str) -> DeviceTask:
        """Where the user's device in this region lives, made once (it carries the policy's
        JSON, which every round would otherwise render again for every device)."""
        task = self._tasks.get(user)
        if task is None:
            task = device_task(self._config, self.pipeline, user, self.region, self.policy)
            self._tasks[user] = task
        return task


def _connect(path: Path) -> sqlite3.Connection:
    """The aggregator's database as the service opens it (write-ahead log, a durable commit
    per accepted delta; ``open_aggregator``): a rollback journal would cost several syncs per
    upload."""
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


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


# -- a round in every region ----------------------------------------------------------------


Join = Callable[[DeviceTask, RoundSpec], "Future[Contribution]"]
"""Starts one device's part in a round (in a worker process)."""


@dataclass(frozen=True)
class RegionRound:
    """One region's part in a round: its aggregator, its mechanism, its devices, and how a
    device joins."""

    service: Region
    plan: RegionPlan
    users: Sequence[str]
    join: Join


def run_rounds(rounds: Sequence[RegionRound], *, bar: Progress) -> list[dict[str, Any]]:
    """One round in each region, at the same time (see the module docstring). The outcomes,
    in the order of ``rounds``, have the verified ``spec`` and, when published, the
    ``release`` (wire JSON) and its ``weights`` (float32 bytes)."""
    started = [_start(part) for part in rounds]
    with ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="sim-upload") as threads:
        sent = [_upload_as_sealed(part, spec, futures, threads=threads, bar=bar)
                for part, (spec, futures) in zip(rounds, started, strict=True)]  # fmt: skip
        return [_close(part, spec, *done)
                for part, (spec, _), done in zip(rounds, started, sent, strict=True)]  # fmt: skip


def _start(part: RegionRound) -> tuple[RoundSpec, list[Future[Contribution]]]:
    """Open the region's round, fetch and verify its spec, and start its sampled devices."""
    service, plan = part.service, part.plan
    service.clock.advance(timedelta(hours=2))
    now = service.clock()
    service.operator.open_round(noise_multiplier=plan.noise_multiplier,
                                deadline=now + timedelta(hours=1))  # fmt: skip
    answer = service.client.get("/v1/round")
    if answer.status_code != 200:
        raise SimulationError(f"{service.region}: no round spec ({answer.status_code})")
    spec = verify_round_spec(SignedRoundSpec.from_wire(answer.content), service.verify_key)
    tasks = [service.task(u) for u in part.users]
    # Each device flips the spec's coin itself; the simulator knows the devices' secrets, so
    # it skips waking the ones whose coin will say no (they would return at once).
    tasks = [t for t in tasks if sample_into_round(spec, t.secret())]
    return spec, [part.join(t, spec) for t in tasks]


_Sent = tuple[int, dict[str, int], list["Future[dict[str, int]]"]]  # taking part, refused, uploads


def _upload_as_sealed(part: RegionRound, spec: RoundSpec, futures: Sequence[Future[Contribution]],
                      *, threads: ThreadPoolExecutor, bar: Progress) -> _Sent:  # fmt: skip
    """Start each device's upload as soon as it has sealed its delta, in the order the devices
    started: each upload waits for the one before it to be answered before it sends."""
    taking_part = 0
    refused: dict[str, int] = {}
    uploads: list[Future[dict[str, int]]] = []
    previous: threading.Event | None = None
    for future in futures:
        done = future.result()
        if done.key is not None:
            taking_part += 1
            turn = threading.Event()
            uploads.append(threads.submit(_upload, part.service, spec, done.user,
                                          after=previous, then=turn))  # fmt: skip
            previous = turn
        elif done.refused is not None:
            refused[done.refused] = refused.get(done.refused, 0) + 1
        bar.advance()
    return taking_part, refused, uploads


def _upload(service: Region, spec: RoundSpec, user: str, *, after: threading.Event | None,
            then: threading.Event) -> dict[str, int]:  # fmt: skip
    """The device enrolls its key for the period if it has not yet, and runs its uploader once
    the upload before it (``after``) has been answered; ``then`` lets the next one go."""
    period = period_label(spec)
    try:
        store = service.task(user).open(END)
        try:
            if (user, period) not in service.enrolled:
                enroll(service.client, base_url=service.url, token=TOKEN,
                       device_public_key=store.keys.public_key(period), period=period,
                       retry=RETRY)  # fmt: skip
                service.enrolled.add((user, period))
            if after is not None:
                after.wait()
            report = Uploader(service.client, base_url=service.url, outbox=store,
                              clock=lambda: END, retry=RETRY).run_once()  # fmt: skip
            then.set()
        finally:
            store.close()
    finally:
        then.set()  # a failed upload does not hold up the others (its error is raised below)
    return {key: value for key, value in asdict(report).items() if isinstance(value, int)}


def _close(part: RegionRound, spec: RoundSpec, taking_part: int, refused: dict[str, int],
           uploads: Sequence[Future[dict[str, int]]]) -> dict[str, Any]:  # fmt: skip
    """Wait for the region's uploads, then close its round and fetch the release."""
    service = part.service
    uploaded: dict[str, int] = {}
    for sent in uploads:
        for key, value in sent.result().items():
            uploaded[key] = uploaded.get(key, 0) + value
    info = service.operator.round(spec.round_id)
    assert info is not None
    outcome: dict[str, Any] = {"round_id": spec.round_id, "sampled": taking_part,
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
