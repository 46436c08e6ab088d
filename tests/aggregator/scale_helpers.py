"""A region served by ``sottovoce aggregator serve`` (several workers on PostgreSQL), its devices,
and what the fault tests read back from its database.

:class:`ServedRegion` is one region's database (a ``postgresql://`` URL, or an SQLite path) with
keys and a policy written to files, as an operator would have them, and an operator in process
(on the same database, with a clock of its own and a seeded central noise) who opens rounds and
closes them: the release of a round is then exactly predictable (:meth:`expected_release`).
:meth:`ServedRegion.serve` runs the real command, on the clock ``SOTTOVOCE_NOW`` sets, and
:class:`Served` knows its worker processes. Devices enroll and upload with sync's real
transport; :class:`Counting` is the devices' HTTP transport, which counts the failures they met
(how a test shows a fault hit uploads in flight).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
from aggregator_helpers import MECHANISM, T0, Clock, central_update, stored_sum
from fastapi import FastAPI
from service_helpers import Device, MemoryOutbox

from sottovoce._database import Connection
from sottovoce._pgserver import free_port
from sottovoce.aggregator import PartialSum, RegionAggregator, create_app, open_database
from sottovoce.aggregator._service import generate_keys, policy_with_keys
from sottovoce.device import Ranker
from sottovoce.policy import DecisionLog, example_policy
from sottovoce.sync import DeltaState, RoundSpec, SealedDelta, verify_round_spec
from sottovoce.sync.transport import RetryPolicy, Uploader

CLI = [str(Path(sys.executable).with_name("sottovoce")), "aggregator"]
TOKEN = "scale-enrollment-token"
# The policy's mechanism (aggregator_helpers.MECHANISM: an expected cohort of 5) with a budget
# that pays for every round of a module's tests in one period.
PRIVACY = {"min_cohort": 3, **MECHANISM, "epsilon": 12.0}
ROUND = timedelta(hours=6)
START_TIMEOUT = 120.0  # seconds: the service imports torch for its accountant before it listens


def without_faketime(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without libfaketime (when the suite runs under ``faketime``): the service's
    calendar is ``SOTTOVOCE_NOW`` anyway, and under libfaketime a thread's timed wait never
    ends (the absolute deadline it computes is shifted), which stalls psycopg_pool's reconnection
    after a PostgreSQL restart."""
    env = {k: v for k, v in environ.items() if not k.startswith("FAKETIME")}
    preload = [p for p in env.get("LD_PRELOAD", "").split() if "faketime" not in p]
    env["LD_PRELOAD"] = " ".join(preload)
    return env


def delta(seed: int, dim: int) -> npt.NDArray[np.float32]:
    """A delta of norm 0.5 (inside the clipping norm: sealing leaves it as it is)."""
    values = np.random.default_rng(seed).normal(size=dim)
    return (values / np.linalg.norm(values) * 0.5).astype(np.float32)


class ServedRegion:
    """The EU region on ``database``: keys and policy in ``root``, the shipped ranker's model,
    an operator clock (at :data:`aggregator_helpers.T0`) and a seeded central noise."""

    def __init__(self, root: Path, database: str, *, seed: int = 5) -> None:
        self.root, self.database, self.seed = root, database, seed
        self.keys = generate_keys(root / "keys")
        self.policy = policy_with_keys(example_policy(), "eu", self.keys, None, privacy=PRIVACY)
        self.policy_file = root / "policy.json"
        self.policy_file.write_text(json.dumps(self.policy.model_dump(mode="json")))
        ranker = Ranker.load(None)  # what serve runs by default
        self.model_id, self.base = ranker.model_id, ranker.get_weights().astype(np.float64)
        self.dim = int(self.base.shape[0])
        self.clock = Clock()

    def connect(self) -> Connection:
        return open_database(self.database)

    @contextmanager
    def operator(self) -> Iterator[RegionAggregator]:
        """The region's aggregator in this process, on a connection of its own."""
        agg = RegionAggregator(
            self.connect(), policy=self.policy, region="eu", signing_key=self.keys.signing,
            hpke_key=self.keys.hpke, model_id=self.model_id, dim=self.dim,
            base_weights=self.base, clock=self.clock, rng=np.random.default_rng(self.seed),
        )  # fmt: skip
        try:
            yield agg
        finally:
            agg.close()

    def open_round(self, length: timedelta = ROUND) -> RoundSpec:
        with self.operator() as agg:
            signed = agg.open_round(deadline=self.clock.now + length)
        return verify_round_spec(signed, self.keys.signing.public_key())

    def close_round(self, spec: RoundSpec, *, closers: int = 2) -> list[list[str]]:
        """Past the deadline, ``closers`` operators sweep at once (each on its own connection):
        what each one ended."""
        self.clock.now = spec.deadline + timedelta(seconds=1)
        ended: list[list[str]] = [[] for _ in range(closers)]
        barrier = threading.Barrier(closers)

        def sweep(index: int) -> None:
            with self.operator() as agg:
                barrier.wait()
                ended[index] = agg.sweep()

        threads = [threading.Thread(target=sweep, args=(i,)) for i in range(closers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        return ended

    def expected_release(self, spec: RoundSpec, accepted: list[Any]) -> npt.NDArray[np.float64]:
        """The previous weights + (the sum of exactly ``accepted`` on the grid + the operator's
        first seeded noise draw) / the expected cohort."""
        total = np.sum(np.array(accepted, dtype=np.float64).reshape(-1, self.dim), axis=0)
        update = central_update(total, np.random.default_rng(self.seed),
                                clipping_norm=spec.clipping_norm,
                                noise_multiplier=spec.noise_multiplier,
                                expected_cohort=spec.expected_cohort)  # fmt: skip
        previous = self.base
        if spec.model_version > 0:
            with self.reading() as conn:
                (body,) = conn.execute(
                    "SELECT body FROM releases WHERE version = ?", (spec.model_version,)
                ).fetchone()
            from sottovoce.sync import ModelRelease

            previous = ModelRelease.from_wire(body).weights_array().astype(np.float64)
        expected: npt.NDArray[np.float64] = previous + update
        return expected

    # -- the service ---------------------------------------------------------------------------

    def app(self) -> FastAPI:
        """The service in this process (for :func:`service_helpers.serve`): one worker."""
        return create_app(
            lambda: RegionAggregator(
                self.connect(), policy=self.policy, region="eu", signing_key=self.keys.signing,
                hpke_key=self.keys.hpke, model_id=self.model_id, dim=self.dim,
                base_weights=self.base, clock=self.clock,
            ),
            enrollment_tokens={TOKEN},
        )  # fmt: skip

    @contextmanager
    def serve(self, *, workers: int, log: Path, options: Sequence[str] = ()) -> Iterator[Served]:
        """``sottovoce aggregator serve`` on this database with ``workers`` processes, and
        ``options``."""
        port = free_port()
        command = [*CLI, "serve", "--region", "eu", "--policy", str(self.policy_file),
                   "--keys", str(self.root / "keys"), "--db", self.database,
                   "--workers", str(workers), "--port", str(port), "--no-schedule",
                   "--log-level", "warning", *options]  # fmt: skip
        env = {**without_faketime(os.environ), "SOTTOVOCE_NOW": T0.isoformat(),
               "SOTTOVOCE_ENROLLMENT_TOKENS": TOKEN}  # fmt: skip
        with log.open("wb") as out:
            process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        served = Served(process, f"http://127.0.0.1:{port}", log)
        try:
            served.wait_until_up(workers)
            yield served
        finally:
            served.stop()

    # -- reading the database back ---------------------------------------------------------------

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        conn = self.connect()
        try:
            yield conn
        finally:
            conn.close()

    def state(self, round_id: str) -> RoundState:
        with self.reading() as conn:
            state, count = conn.execute(
                "SELECT state, count FROM rounds WHERE round_id = ?", (round_id,)
            ).fetchone()
            keys = sorted(k for (k,) in conn.execute(
                "SELECT idempotency_key FROM contributions WHERE round_id = ? AND status = 200",
                (round_id,)))  # fmt: skip
            workers = conn.execute(
                "SELECT count(*) FROM round_partials WHERE round_id = ?", (round_id,)
            ).fetchone()[0]
            releases = [v for (v,) in conn.execute("SELECT version FROM releases")]
            ledger = [r for (r,) in conn.execute(
                "SELECT round_id FROM privacy_ledger WHERE round_id = ?", (round_id,))]  # fmt: skip
            return RoundState(state, int(count), keys, stored_sum(conn, round_id), int(workers),
                              releases, ledger)  # fmt: skip

    def release_weights(self, version: int) -> npt.NDArray[np.float32]:
        from sottovoce.sync import ModelRelease, verify_release

        with self.reading() as conn:
            (body,) = conn.execute(
                "SELECT body FROM releases WHERE version = ?", (version,)
            ).fetchone()
        return verify_release(ModelRelease.from_wire(body), self.keys.signing.public_key())

    def decisions(self) -> Counter[tuple[str, str]]:
        """Every logged decision, counted by (action, reason)."""
        with self.reading() as conn:
            return Counter((d.action.value, d.reason) for _, d in DecisionLog(conn).query())

    def verify_log(self) -> tuple[Any, int, list[int]]:
        """The log's verification report, its size and its stored entry indexes."""
        with self.reading() as conn:
            log = DecisionLog(conn)
            report = log.verify(verifier_key=log.verifier_key)
            indexes = [i for (i,) in conn.execute("SELECT idx FROM decision_log ORDER BY idx")]
            return report, log.size, indexes


@dataclass(frozen=True)
class RoundState:
    """A round as the database holds it."""

    state: str
    count: int
    accepted_keys: list[str]  # contributions with status 200
    partial: PartialSum | None  # every worker's running sum, merged (None once closed)
    partials: int  # running-sum rows (one per worker process that accepted a delta)
    releases: list[int]  # every release's version
    ledger: list[str]  # this round's privacy ledger entries


@dataclass
class Served:
    """The ``serve`` process, its base URL and its log."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def wait_until_up(self, workers: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self.process.poll() is None, self.tail()
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=5).status_code == 200 and (
                    workers == 1 or len(self.workers()) == workers
                ):
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"serve did not come up:\n{self.tail()}"
            time.sleep(0.1)

    def workers(self) -> list[int]:
        """The worker processes' pids (children of the parent), oldest first."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
            except (OSError, IndexError):
                continue
            if int(ppid) == self.process.pid and state != "Z":
                found.append(int(stat.parent.name))
        return sorted(found)

    def connections(self) -> dict[int, int]:
        """Each worker's open client connections (established TCP sockets on the port)."""
        port = int(self.url.rsplit(":", 1)[1])
        established = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError):
                for line in Path(table).read_text().splitlines()[1:]:
                    fields = line.split()
                    if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                        established.add(f"socket:[{fields[9]}]")
        counts = {}
        for pid in self.workers():
            with contextlib.suppress(OSError):
                fds = Path(f"/proc/{pid}/fd").iterdir()
                counts[pid] = sum(1 for fd in fds if _link(fd) in established)
        return counts

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def _link(path: Path) -> str:
    try:
        return str(path.readlink())
    except OSError:  # closed meanwhile
        return ""


class Tally:
    """Every request the devices' transports sent (see :class:`Counting`): when it started and
    ended (monotonic seconds), and its answer's status or, without one, the error's name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: list[tuple[float, float, int | str]] = []

    def add(self, started: float, outcome: int | str) -> None:
        with self._lock:
            self.requests.append((started, time.monotonic(), outcome))

    @property
    def outcomes(self) -> Counter[int | str]:
        return Counter(outcome for _, _, outcome in self.requests)

    def during(self, start: float, end: float) -> list[int | str]:
        """The outcomes of the requests in flight at some moment between ``start`` and ``end``."""
        return [outcome for began, ended, outcome in self.requests
                if began < end and ended > start]  # fmt: skip


class Counting(httpx.HTTPTransport):
    """A device's real HTTP transport, recording each request into a :class:`Tally`."""

    def __init__(self, tally: Tally) -> None:
        super().__init__()
        self.tally = tally

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        started = time.monotonic()
        try:
            response = super().handle_request(request)
        except httpx.TransportError as error:
            self.tally.add(started, type(error).__name__)
            raise
        self.tally.add(started, response.status_code)
        return response


@dataclass
class Uploaded:
    """One device's delta and how its upload ended."""

    sealed: SealedDelta
    values: npt.NDArray[np.float32]
    outbox: MemoryOutbox

    @property
    def acknowledged(self) -> bool:
        key = self.sealed.idempotency_key
        return self.outbox.states[key] == (DeltaState.ACKNOWLEDGED, None)


def upload_until_acknowledged(
    region: ServedRegion, url: str, device: Device, spec: RoundSpec, values: Any, *,
    tally: Tally, retry: RetryPolicy, seconds: float = 60.0,
) -> Uploaded:  # fmt: skip
    """A device's outbox sent with sync's :class:`Uploader` until the delta is acknowledged (or
    ``seconds`` pass). Between runs the device's clock jumps to the outbox's next attempt and
    the device waits a little for real; a ``Retry-After`` is waited for at most 0.3 s."""
    sealed = device.seal(spec, values, region.keys.hpke.public_key())
    outbox, clock = MemoryOutbox(), Clock()
    outbox.add(sealed, spec.deadline)
    key = sealed.idempotency_key
    deadline = time.monotonic() + seconds
    with httpx.Client(transport=Counting(tally), timeout=20) as client:
        uploader = Uploader(client, base_url=url, outbox=outbox, clock=clock, retry=retry,
                            sleep=lambda s: time.sleep(min(s, 0.3)))  # fmt: skip
        while outbox.pending() and time.monotonic() < deadline:
            uploader.run_once()
            if outbox.pending():
                clock.now = outbox.retry_at[key]
                time.sleep(0.2)
    return Uploaded(sealed, values, outbox)
