"""Aggregator benchmark: sealed deltas/s through the real accept path, and peak memory vs cohort.

Prints one JSON object (progress goes to stderr). Every delta is a real one: a float32 vector of
the shipped ranker's size (``dim``, read from ``device/ranker.json`` through
``sottovoce.device.Ranker``; the aggregator is given only that number, the model id and the
ranker's weights as its base), sealed by ``sottovoce.sync.seal_delta`` for the EU region of the
example policy with fresh aggregator keys, by a device with its own Ed25519 key (enrolled for
the period) and its own device secret (so its own pseudonym); no key is shared. Rounds are
central mode, noise multiplier 1, sampling rate 0.01, and every delta of a run is one device of
the round's cohort: the policy's population is the run's number of deltas over the sampling
rate, so its expected cohort (the fixed denominator of the release) is that number; its minimum
cohort is 2 and its delta ``min(example's, 0.1 / population)``, as a policy needs. A central
round publishes at its deadline, not at a count: once every delta is in, the bench moves the
aggregator's clock (the service's: ``SOTTOVOCE_NOW`` if set, else the system clock) past the
round's deadline and ``sweep`` closes it (noised sum over the expected cohort with the exact
discrete Gaussian from the OS CSPRNG, ledger step, signed release); ``close_ms`` is that sweep.

Every measured process is a fresh one, started through a tiny launcher process: Linux carries
``ru_maxrss`` over ``execve`` from the process that spawned it, so a child spawned straight
from this (large) process would report this process's peak as its own.

In process (``deltas_per_s``): ``RegionAggregator.accept(body, key)`` on a real SQLite file
(``backend``), one thread, the deltas sealed and their devices enrolled before the timed loop
(the close, a separate sweep, is not in it). The headline
opens the database as ``sottovoce aggregator serve`` does (WAL, synchronous=FULL, autocommit
connection) and keeps the process environment as given. ``variants`` repeats it with OpenBLAS
limited to one thread (``OPENBLAS_NUM_THREADS=1``: the L2 norms of a 20,737-value vector go to
a multithreaded BLAS dot, whose hand-off to a second thread stalls when the other core is
busy), on the connection ``sqlite3.connect(path)`` gives (``rollback``: rollback journal,
synchronous=FULL), and with one OpenBLAS thread on WAL + synchronous=NORMAL (``openblas1_wal``).
``breakdown_ms`` holds medians of the parts timed alone on the same deltas: parsing the envelope
(``SealedDelta.from_wire``), ``open_delta`` (decrypt, verify the signature, values and norm),
the running sum's round trip (``PartialSum.from_bytes`` + ``add`` + ``to_bytes``) and a bare
write transaction replacing a blob of the running sum's size in SQLite. ``profile`` is a
separate run under cProfile on a connection that times every SQL statement: per-accept
milliseconds of the main parts, calls per accept, and the costliest statements.

Over HTTP (``deltas_per_s_http``): ``create_app`` served by uvicorn on 127.0.0.1 (a free port)
in its own process, driven from this one by ``http_clients`` concurrent httpx clients (asyncio),
each POSTing to ``/v1/rounds/{round_id}/deltas`` with ``Idempotency-Key`` as
``sottovoce.sync.transport`` does; same SQLite settings and environment as the headline
(``deltas_per_s_http_openblas1_wal``: the server on WAL with one OpenBLAS thread). Devices are
enrolled in the database before the server starts (enrollment over HTTP is not measured). The
server imports opacus when it starts, as a server that has closed a round before has (or the
first close would pay for importing torch). After the uploads the bench asks the server to
close the round (it moves its clock past the deadline and sweeps, on its scheduler tick) and
checks that ``/v1/model/release`` serves version 1.

Memory (``peak_rss_mb_1k``, ``peak_rss_mb_100k``): a fresh process builds the aggregator and
opens the round (this imports opacus and torch), then enrolls and accepts N deltas that its
child seals on the fly and streams through a pipe, so it never holds more than one, and closes
the round (a sweep past its deadline). Peak is its
``ru_maxrss`` (RUSAGE_SELF; the child is not included), nothing subtracted;
``baseline_rss_mb`` is the same measure after setup, before the first delta. ``vmhwm_mb`` is
the kernel's high-water mark of the process image, as a cross-check. The ``_1k`` and ``_100k``
keys hold the ``--n-small`` and ``--n-large`` runs. These runs use one OpenBLAS thread and WAL
(``--rss-journal``), so that 100,000 deltas fit the time budget;
``large_run_accept_per_s_by_tenth`` is the accept rate in each tenth of the large run, which
shows whether an accept costs more as the round's cohort grows.
``naive_peak_rss_mb_100k`` is the usual in-memory server, in its own fresh process: it keeps
every delta as a float32 array in a list and averages at the end (``reduce(np.add) / n``, like
Flower's ``aggregate`` but without its weighted copy of every delta, which would double the
peak). It is handed the opened vectors (drawn with numpy in that process: no parsing,
decryption, verification, SQLite or torch), so it is a lower bound of what such a server holds.

Usage: ``python bench/aggregator.py [--n-throughput 2000] [--n-large 100000] [--clients 16]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import hashlib
import json
import math
import os
import pstats
import re
import resource
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from sottovoce.aggregator import RegionAggregator
    from sottovoce.policy import Policy
    from sottovoce.sync import RoundSpec

REGION = "eu"
BACKEND = "sqlite"
NOISE_MULTIPLIER, SAMPLING_RATE = 1.0, 0.01
ROUND_HOURS = 6  # a round's deadline after it opens, on the aggregator's clock
# How often the HTTP server's scheduler looks whether the bench asked it to close the round.
SERVE_TICK_S = 0.5
DELTA_NORM = 0.5  # below the example policy's clipping norm of 1, so sealing does not clip
TARGET_PER_CORE = 500
BREAKDOWN_SAMPLES = 300
# One streamed delta: lengths of the device key (base64), the idempotency key and the body.
FRAME = struct.Struct("<HHI")
# Runs its arguments as a child: a small process to spawn from, for a clean ru_maxrss.
LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
SQLITE_SETTINGS = {
    "service": "journal_mode=WAL, synchronous=FULL, autocommit connection (as 'sottovoce "
    "aggregator serve' opens its database)",
    "default": "rollback journal, synchronous=FULL (sqlite3.connect defaults)",
    "wal": "journal_mode=WAL, synchronous=NORMAL",
}
_START = time.perf_counter()
_LOAD: list[float] = []  # 1-minute load averages seen at each progress line (other work)


def log(message: str) -> None:
    _LOAD.append(os.getloadavg()[0])
    print(f"[bench/aggregator {time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr)


def peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def vmhwm_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 3)


def percentile_ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000, 3)


# -- the region, its keys and its devices ---------------------------------------------------


@dataclass(frozen=True)
class RegionKeys:
    """The region aggregator's private keys, as raw bytes (so a child process can get them)."""

    signing: bytes
    hpke: bytes

    @classmethod
    def generate(cls) -> RegionKeys:
        return cls(signing=os.urandom(32), hpke=os.urandom(32))

    def signing_key(self) -> Ed25519PrivateKey:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(self.signing)

    def hpke_key(self) -> X25519PrivateKey:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        return X25519PrivateKey.from_private_bytes(self.hpke)

    def to_json(self) -> dict[str, str]:
        return {"signing": self.signing.hex(), "hpke": self.hpke.hex()}

    @classmethod
    def from_json(cls, data: dict[str, str]) -> RegionKeys:
        return cls(signing=bytes.fromhex(data["signing"]), hpke=bytes.fromhex(data["hpke"]))


def raw_public_b64(key: Any) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


def region_policy(keys: RegionKeys, *, cohort: int) -> Policy:
    """The example policy, with the EU region publishing ``keys`` and an expected cohort of
    ``cohort`` devices per round (population ``cohort / SAMPLING_RATE``)."""
    from sottovoce.policy import example_policy, policy_from_data

    data = example_policy().model_dump(mode="json")
    region = next(r for r in data["regions"] if r["id"] == REGION)
    for key in region["aggregator"]["public_keys"]:
        private = keys.hpke_key() if key["use"] == "hpke" else keys.signing_key()
        key["key"] = raw_public_b64(private)
    privacy = region["privacy"]
    population = math.ceil(cohort / SAMPLING_RATE)
    privacy.update({
        "mode": "central",
        "population": population,
        "sampling_rate": SAMPLING_RATE,
        "min_cohort": 2,
        "noise_multiplier": NOISE_MULTIPLIER,
        "delta": min(privacy["delta"], 0.1 / population),
    })  # fmt: skip
    return policy_from_data(data)


class BenchClock:
    """The aggregator's clock: the service's (``SOTTOVOCE_NOW``, else the system clock), which
    the bench moves forward to end a round at its deadline."""

    def __init__(self) -> None:
        from sottovoce._clock import clock_from_env

        self._base: Callable[[], datetime] = clock_from_env()
        self._shift = timedelta(0)

    def __call__(self) -> datetime:
        return self._base() + self._shift

    def move_past(self, deadline: datetime) -> None:
        now = self()
        if now <= deadline:
            self._shift += deadline - now + timedelta(seconds=1)


def connect(path: Path, journal: str, factory: type[sqlite3.Connection] | None = None) -> Any:
    """A connection with one of the ``SQLITE_SETTINGS``."""
    factory = factory or sqlite3.Connection
    if journal == "service":  # as aggregator/_service.py's open_aggregator
        conn = sqlite3.connect(path, isolation_level=None, factory=factory)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn
    conn = sqlite3.connect(path, factory=factory)
    if journal == "wal":
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def build_aggregator(
    conn: sqlite3.Connection,
    keys: RegionKeys,
    *,
    cohort: int,
    model_id: str,
    base: npt.NDArray[np.float32],
    clock: BenchClock,
) -> RegionAggregator:
    """The region's aggregator; its central noise is the deployment's (no seeded ``rng``)."""
    from sottovoce.aggregator import RegionAggregator

    return RegionAggregator(
        conn,
        policy=region_policy(keys, cohort=cohort),
        region=REGION,
        signing_key=keys.signing_key(),
        hpke_key=keys.hpke_key(),
        model_id=model_id,
        dim=base.size,
        base_weights=base,
        clock=clock,
    )


def open_round(agg: RegionAggregator, keys: RegionKeys, clock: BenchClock) -> RoundSpec:
    from sottovoce.sync import verify_round_spec

    signed = agg.open_round(
        noise_multiplier=NOISE_MULTIPLIER,
        sampling_rate=SAMPLING_RATE,  # the policy's; open_round refuses any other
        deadline=clock() + timedelta(hours=ROUND_HOURS),
    )
    return verify_round_spec(signed, keys.signing_key().public_key())


def close_round(agg: RegionAggregator, spec: RoundSpec, clock: BenchClock) -> float:
    """Move the clock past the round's deadline and sweep: seconds of the sweep (the close)."""
    clock.move_past(spec.deadline)
    start = time.perf_counter()
    ended = agg.sweep(clock())
    elapsed = time.perf_counter() - start
    if ended != [spec.round_id]:
        raise SystemExit(f"the sweep past the deadline ended {ended}, not {spec.round_id}")
    return elapsed


class Devices:
    """Device ``i``'s Ed25519 key, secret and delta, derived from a seed (nothing to ship)."""

    def __init__(self, seed: int, dim: int) -> None:
        self._seed = seed.to_bytes(8, "little")
        self._dim = dim
        self._rng = np.random.default_rng(seed)

    def _derive(self, what: bytes, i: int) -> bytes:
        message = b"bench-device/" + what + self._seed + i.to_bytes(8, "little")
        return hashlib.sha256(message).digest()

    def seal(self, i: int, spec: RoundSpec, hpke_public: Any) -> tuple[str, str, bytes]:
        """(device key base64, idempotency key, wire body) of device ``i``'s delta."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from sottovoce.sync import seal_delta

        values = self._rng.standard_normal(self._dim, dtype=np.float32)
        values *= np.float32(DELTA_NORM / np.linalg.norm(values))
        key = Ed25519PrivateKey.from_private_bytes(self._derive(b"key", i))
        sealed = seal_delta(
            delta=values,
            spec=spec,
            device_secret=self._derive(b"secret", i),
            signing_key=key,
            aggregator_hpke_key=hpke_public,
            rng=self._rng,
        )
        return raw_public_b64(key), sealed.idempotency_key, sealed.to_wire()


def check_published(agg: RegionAggregator, spec: RoundSpec, n: int) -> None:
    info = agg.round(spec.round_id)
    release = agg.latest_release()
    if info is None or info.state != "published" or info.count != n or release is None:
        raise SystemExit(f"the round did not publish with {n} deltas: {info}")


@dataclass
class Prepared:
    """An aggregator with an open round, its enrolled devices and their sealed deltas."""

    agg: RegionAggregator
    conn: Any
    clock: BenchClock
    spec: RoundSpec
    keys: RegionKeys
    uploads: list[tuple[str, bytes]]  # (idempotency key, wire body)
    dim: int


def prepare(
    path: Path,
    *,
    n: int,
    model_id: str,
    base: npt.NDArray[np.float32],
    journal: str,
    factory: type[sqlite3.Connection] | None = None,
) -> Prepared:
    from sottovoce.sync import period_label

    keys = RegionKeys.generate()
    conn = connect(path, journal, factory)
    clock = BenchClock()
    agg = build_aggregator(conn, keys, cohort=n, model_id=model_id, base=base, clock=clock)
    spec = open_round(agg, keys, clock)
    devices = Devices(seed=n, dim=base.size)
    hpke_public = keys.hpke_key().public_key()
    uploads = []
    # Setup only: one outer transaction, so enrolling N devices costs one commit (enroll's
    # own write transaction, with its logged decision, nests as a savepoint).
    conn.execute("BEGIN IMMEDIATE")
    for i in range(n):
        device_key, key, body = devices.seal(i, spec, hpke_public)
        agg.enroll(device_key, period_label(spec))
        uploads.append((key, body))
    conn.execute("COMMIT")
    return Prepared(agg, conn, clock, spec, keys, uploads, base.size)


# -- in process (child) ---------------------------------------------------------------------


class TimedConnection(sqlite3.Connection):
    """A connection that adds up the wall time of each SQL statement (profile run only)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        start = time.perf_counter()
        try:
            return super().execute(sql, parameters)
        finally:
            statement = " ".join(sql.split())[:60]
            self.seconds[statement] += time.perf_counter() - start
            self.calls[statement] += 1


def accept_all(prepared: Prepared) -> list[float]:
    """Seconds of each accept, in upload order (the round stays open: it ends at its deadline)."""
    times = []
    for key, body in prepared.uploads:
        start = time.perf_counter()
        answer = prepared.agg.accept(body, key)
        times.append(time.perf_counter() - start)
        if not answer.added:
            raise SystemExit(f"an upload was refused: {answer}")
    info = prepared.agg.round(prepared.spec.round_id)
    if info is None or info.state != "open" or info.count != len(prepared.uploads):
        raise SystemExit(f"the round does not hold the {len(prepared.uploads)} deltas: {info}")
    return times


def breakdown(prepared: Prepared, journal: str) -> dict[str, float]:
    """Medians of the parts of an accept, each timed alone on the same deltas."""
    from sottovoce.aggregator import PartialSum
    from sottovoce.sync import SealedDelta, device_noise_std, open_delta

    spec, hpke = prepared.spec, prepared.keys.hpke_key()
    parse, opening, summing, deltas = [], [], [], []
    for _, body in prepared.uploads[:BREAKDOWN_SAMPLES]:
        start = time.perf_counter()
        sealed = SealedDelta.from_wire(body)
        parse.append(time.perf_counter() - start)
        start = time.perf_counter()
        opened = open_delta(
            sealed,
            region=spec.region,
            round_id=spec.round_id,
            model_version=spec.model_version,
            hpke_private_key=hpke,
            clipping_norm=spec.clipping_norm,
            noise_std=device_noise_std(spec),
            dim=prepared.dim,
        )
        opening.append(time.perf_counter() - start)
        deltas.append(opened.delta)
    blob = PartialSum.empty(prepared.dim).to_bytes()
    for delta in deltas:
        start = time.perf_counter()
        blob = PartialSum.from_bytes(blob).add(delta).to_bytes()
        summing.append(time.perf_counter() - start)
    return {
        "from_wire_p50": median_ms(parse),
        "open_delta_p50": median_ms(opening),
        "partial_sum_roundtrip_p50": median_ms(summing),
        "sqlite_blob_rewrite_p50": blob_rewrite(len(blob), journal),
        "running_sum_blob_bytes": len(blob),
    }


def blob_rewrite(size: int, journal: str) -> float:
    """Median seconds (as ms) of a bare write transaction replacing one ``size``-byte blob."""
    with tempfile.TemporaryDirectory() as tmp:
        conn = connect(Path(tmp) / "blob.db", journal)
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, b BLOB)")
        conn.execute("INSERT INTO t VALUES (1, ?)", (os.urandom(size),))
        conn.commit()
        times = []
        for _ in range(BREAKDOWN_SAMPLES):
            blob = os.urandom(size)
            start = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE t SET b = ? WHERE id = 1", (blob,))
            conn.execute("COMMIT")
            times.append(time.perf_counter() - start)
        conn.close()
    return median_ms(times)


# The parts of an accept, found in the profile by (path fragment, function name): cumulative
# time; builtins ("~") by a fragment of their name, own time.
PROFILE_PARTS: tuple[tuple[str, str, str], ...] = (
    ("accept", "sottovoce/aggregator/", "accept"),
    ("from_wire (sealed delta, stored round spec)", "sottovoce/sync/_wire.py", "from_wire"),
    ("open_delta", "sottovoce/sync/_seal.py", "open_delta"),
    ("hpke_decrypt", "~", "hpke.Suite' objects"),
    ("ed25519_verify", "~", "Ed25519PublicKey' objects"),
    ("numpy_dot (L2 norms)", "~", "'dot' of 'numpy.ndarray'"),
    ("base64_decode", "~", "a2b_base64"),
    ("sha256", "~", "openssl_sha256"),
    ("pydantic_validate", "~", "SchemaValidator' objects"),
    ("partial_sum_from_bytes", "sottovoce/aggregator/_partial_sum.py", "from_bytes"),
    ("partial_sum_add", "sottovoce/aggregator/_partial_sum.py", "add"),
    ("partial_sum_to_bytes", "sottovoce/aggregator/_partial_sum.py", "to_bytes"),
    ("decision_log_append", "sottovoce/policy/_log.py", "append"),
)


def profile(
    path: Path, *, n: int, model_id: str, base: npt.NDArray[np.float32], journal: str
) -> Any:
    prepared = prepare(
        path, n=n, model_id=model_id, base=base, journal=journal, factory=TimedConnection
    )
    conn: TimedConnection = prepared.conn
    conn.seconds.clear()
    conn.calls.clear()
    profiler = cProfile.Profile()
    profiler.enable()
    accept_all(prepared)
    profiler.disable()
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, Any]]
    raw = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    per_accept, calls = {}, {}
    for label, where, name in PROFILE_PARTS:
        builtin = where == "~"
        rows = [
            row for (file, _, func), row in raw.items()
            if (name in func if builtin else func == name and where in file.replace("\\", "/"))
        ]  # fmt: skip
        if rows:
            per_accept[label] = round(sum(r[2 if builtin else 3] for r in rows) / n * 1000, 3)
            calls[label] = round(sum(r[1] for r in rows) / n, 2)
    top = sorted(raw.items(), key=lambda item: item[1][2], reverse=True)[:8]
    statements = sorted(conn.seconds.items(), key=lambda item: item[1], reverse=True)[:6]
    return {
        "n": n,
        "note": "ms per accept under cProfile (cumulative; builtins: own time)",
        "per_accept_ms": per_accept,
        "calls_per_accept": calls,
        "top_own_time_ms_per_accept": {
            re.sub(r" at 0x[0-9a-f]+", "", f"{Path(file).name}:{line}({func})"): round(
                row[2] / n * 1000, 3
            )
            for (file, line, func), row in top
        },
        "sql_total_ms_per_accept": round(sum(conn.seconds.values()) / n * 1000, 3),
        "sql_ms_per_accept": {sql: round(s / n * 1000, 3) for sql, s in statements},
        "sql_statements_per_accept": round(sum(conn.calls.values()) / n, 2),
    }


def throughput_child(args: list[str]) -> None:
    """Child: accept N pre-sealed deltas in process; optionally profile another round."""
    n, model_id, base_path, journal, workdir, n_profile = args
    base, work = np.load(base_path), Path(workdir)
    prepared = prepare(
        work / f"throughput-{os.getpid()}.db",
        n=int(n),
        model_id=model_id,
        base=base,
        journal=journal,
    )
    times = accept_all(prepared)
    close_s = close_round(prepared.agg, prepared.spec, prepared.clock)
    check_published(prepared.agg, prepared.spec, int(n))
    result: dict[str, Any] = {
        "deltas_per_s": round(int(n) / sum(times), 1),
        "accept_p50_ms": median_ms(times),
        "accept_p99_ms": percentile_ms(times, 0.99),
        "close_ms": round(close_s * 1000, 2),
        "breakdown_ms": {"accept_p50": median_ms(times), **breakdown(prepared, journal)},
    }
    prepared.conn.close()
    del prepared
    if int(n_profile):
        result["profile"] = profile(
            work / f"profile-{os.getpid()}.db",
            n=int(n_profile),
            model_id=model_id,
            base=base,
            journal=journal,
        )
    print(json.dumps(result))


# -- over HTTP ------------------------------------------------------------------------------


def serve_child(args: list[str]) -> None:
    """Child: the aggregator service on a free loopback port until stdin closes; a ``close``
    line on stdin ends the open round (clock past its deadline, then a sweep)."""
    import importlib
    import importlib.util

    import uvicorn

    from sottovoce.aggregator import create_app

    importlib.import_module("opacus")  # as a server that has closed a round before has it
    config = json.loads(Path(args[0]).read_text())
    keys = RegionKeys.from_json(config["keys"])
    base = np.load(config["base"])
    clock = BenchClock()
    close_asked = threading.Event()

    def factory() -> RegionAggregator:
        conn = connect(Path(config["db"]), config["journal"])
        return build_aggregator(conn, keys, cohort=config["cohort"], model_id=config["model_id"],
                                base=base, clock=clock)  # fmt: skip

    def scheduler(agg: RegionAggregator) -> None:
        # On the aggregator's thread, as the service's own schedule: nothing until asked.
        signed = agg.current_round() if close_asked.is_set() else None
        if signed is not None:
            start = time.perf_counter()
            close_round(agg, signed.spec, clock)
            log(f"http server: round closed by a sweep in {time.perf_counter() - start:.2f} s")

    app = create_app(factory, enrollment_tokens={"bench-token"}, scheduler=scheduler,
                     tick_seconds=SERVE_TICK_S)  # fmt: skip
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise SystemExit("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    print(json.dumps({"port": port, "impl": f"{http}+{loop}"}), flush=True)
    for line in sys.stdin:  # the parent closes stdin when it is done
        if line.strip() == "close":
            close_asked.set()
    server.should_exit = True
    thread.join(timeout=30)
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}), flush=True)


async def post_all(
    url: str, uploads: list[tuple[str, bytes]], clients: int
) -> tuple[float, list[float], Counter[tuple[int, str]]]:
    import httpx

    latencies: list[float] = []
    answers: Counter[tuple[int, str]] = Counter()
    pending = iter(uploads)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=300.0) as client:

        async def device_client() -> None:
            for key, body in pending:
                headers = {"Content-Type": "application/json", "Idempotency-Key": key}
                start = time.perf_counter()
                response = await client.post(url, content=body, headers=headers)
                latencies.append(time.perf_counter() - start)
                answers[response.status_code, response.json().get("code", "")] += 1

        start = time.perf_counter()
        await asyncio.gather(*(device_client() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return elapsed, latencies, answers


def wait_for_release(root: str, timeout: float = 120.0) -> None:
    """Wait until the server publishes release 1 (its sweep closes the round)."""
    import httpx

    give_up = time.monotonic() + timeout
    with httpx.Client() as client:
        while True:
            release = client.get(f"{root}/v1/model/release")
            if release.status_code == 200 and release.json()["version"] == 1:
                return
            if time.monotonic() > give_up:
                raise SystemExit(f"no release after the round: {release.status_code}")
            time.sleep(0.1)


def over_http(
    work: Path,
    *,
    name: str,
    n: int,
    clients: int,
    model_id: str,
    base_path: Path,
    journal: str,
    blas1: bool,
) -> dict[str, Any]:

    log(f"http [{name}]: sealing {n} deltas and enrolling their devices")
    db = work / f"http-{name}.db"
    prepared = prepare(db, n=n, model_id=model_id, base=np.load(base_path), journal=journal)
    prepared.conn.close()
    config = {"db": str(db), "journal": journal, "keys": prepared.keys.to_json(),
              "cohort": n, "model_id": model_id, "base": str(base_path)}  # fmt: skip
    config_path = work / f"http-{name}.json"
    config_path.write_text(json.dumps(config))
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
    server = spawn(["_serve", str(config_path)], blas1=blas1, **pipes)
    assert server.stdout is not None and server.stdin is not None
    try:
        started = json.loads(server.stdout.readline())
        root = f"http://127.0.0.1:{started['port']}"
        url = f"{root}/v1/rounds/{prepared.spec.round_id}/deltas"
        log(f"http [{name}]: {n} uploads from {clients} concurrent clients to {root}")
        elapsed, latencies, answers = asyncio.run(post_all(url, prepared.uploads, clients))
        if answers != Counter({(200, "within_policy"): n}):
            raise SystemExit(f"uploads over HTTP were refused: {dict(answers)}")
        log(f"http [{name}]: closing the round (the server's clock past its deadline, a sweep)")
        server.stdin.write(b"close\n")
        server.stdin.flush()
        wait_for_release(root)
        server.stdin.close()
        stopped = json.loads(server.stdout.readline())
    finally:
        if not server.stdin.closed:
            server.stdin.close()  # the server stops when its stdin ends
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    db.unlink()
    result = {
        "deltas_per_s": round(n / elapsed, 1),
        "latency_p50_ms": median_ms(latencies),
        "latency_p99_ms": percentile_ms(latencies, 0.99),
        "server": f"uvicorn ({started['impl']}), one process; the app decides uploads one at a "
        "time on its aggregator thread",
        "server_peak_rss_mb": stopped["peak_rss_mb"],
    }
    log(f"http [{name}]: {result['deltas_per_s']} deltas/s")
    return result


# -- memory (children) ----------------------------------------------------------------------


def generate_child(args: list[str]) -> None:
    """Child of the streaming worker: seals deltas one at a time and writes them as frames."""
    from sottovoce.sync import SignedRoundSpec

    spec_path, hpke_public_b64, n, dim = args
    spec = SignedRoundSpec.from_wire(Path(spec_path).read_bytes()).spec
    devices = Devices(seed=int(n), dim=int(dim))
    hpke_public = base64.b64decode(hpke_public_b64)
    out = sys.stdout.buffer
    for i in range(int(n)):
        device_key, key, body = devices.seal(i, spec, hpke_public)
        out.write(FRAME.pack(len(device_key), len(key), len(body)))
        out.write(device_key.encode() + key.encode() + body)
    out.flush()


def read_frames(stream: IO[bytes]) -> Iterator[tuple[str, str, bytes]]:
    while head := stream.read(FRAME.size):
        lengths = FRAME.unpack(head)
        data = stream.read(sum(lengths))
        if len(data) != sum(lengths):
            raise SystemExit("the delta stream ended inside a frame")
        a, b = lengths[0], lengths[0] + lengths[1]
        yield data[:a].decode(), data[a:b].decode(), data[b:]


def stream_child(args: list[str]) -> None:
    """Child: enroll and accept N streamed deltas into one round; print peak RSS as JSON."""
    from sottovoce.sync import period_label

    n_text, model_id, base_path, journal, workdir = args
    n, work = int(n_text), Path(workdir)
    base = np.load(base_path)
    keys = RegionKeys.generate()
    db = work / f"stream-{n}.db"
    conn = connect(db, journal)
    clock = BenchClock()
    agg = build_aggregator(conn, keys, cohort=n, model_id=model_id, base=base, clock=clock)
    spec = open_round(agg, keys, clock)
    period = period_label(spec)
    signed = agg.current_round()
    assert signed is not None
    spec_path = work / f"stream-{n}-spec.json"
    spec_path.write_bytes(signed.to_wire())
    generator = subprocess.Popen(
        [sys.executable, __file__, "_generate", str(spec_path), raw_public_b64(keys.hpke_key()),
         str(n), str(base.size)],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert generator.stdout is not None
    baseline = peak_rss_mb()
    enrolling = 0.0
    # Accept time per tenth of the run: a cost that grows with the cohort shows up here.
    tenth, by_tenth, in_tenth = max(1, n // 10), [0.0] * 10, [0] * 10
    count = 0
    start = time.perf_counter()
    for device_key, key, body in read_frames(generator.stdout):
        t0 = time.perf_counter()
        agg.enroll(device_key, period)
        t1 = time.perf_counter()
        answer = agg.accept(body, key)
        by_tenth[min(9, count // tenth)] += time.perf_counter() - t1
        in_tenth[min(9, count // tenth)] += 1
        enrolling += t1 - t0
        if not answer.added:
            raise SystemExit(f"delta {count} was refused: {answer}")
        count += 1
        if count % tenth == 0:
            rate = tenth / by_tenth[min(9, count // tenth - 1)]
            log(f"memory run of {n}: {count} deltas, {rate:.0f} accepts/s in the last "
                f"{tenth}, peak RSS {peak_rss_mb()} MB")  # fmt: skip
    elapsed = time.perf_counter() - start
    rates = [round(k / s, 1) if s else None for k, s in zip(in_tenth, by_tenth, strict=True)]
    if generator.wait() != 0 or count != n:
        raise SystemExit(f"the delta generator failed after {count} of {n} deltas")
    close_s = close_round(agg, spec, clock)
    log(f"memory run of {n}: round closed by a sweep in {close_s:.2f} s")
    check_published(agg, spec, n)
    conn.close()
    print(json.dumps({
        "n": n,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak_rss_mb(),
        "vmhwm_mb": vmhwm_mb(),
        "seconds": round(elapsed, 1),
        "accept_per_s": round(n / sum(by_tenth), 1),
        "accept_per_s_by_tenth": rates,
        "enroll_ms": round(enrolling / n * 1000, 3),
        "db_mb": round(db.stat().st_size / 2**20, 1),
    }))  # fmt: skip


def naive_child(args: list[str]) -> None:
    """Child: keep every delta in a list of float32 arrays, average at the end; print peak RSS."""
    import functools

    n, dim = int(args[0]), int(args[1])
    rng = np.random.default_rng(n)
    baseline = peak_rss_mb()
    start = time.perf_counter()
    deltas = []
    for i in range(n):
        values = rng.standard_normal(dim, dtype=np.float32)
        values *= np.float32(DELTA_NORM / np.linalg.norm(values))
        deltas.append(values)
        if (i + 1) % max(1, n // 10) == 0:
            log(f"naive run of {n}: {i + 1} deltas held, peak RSS {peak_rss_mb()} MB")
    mean = functools.reduce(np.add, deltas) / n
    print(json.dumps({
        "n": n,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak_rss_mb(),
        "vmhwm_mb": vmhwm_mb(),
        "seconds": round(time.perf_counter() - start, 1),
        "mean_norm": round(float(np.linalg.norm(mean)), 6),
    }))  # fmt: skip


# -- main -----------------------------------------------------------------------------------


def spawn(command: list[str], *, blas1: bool = False, **popen: Any) -> subprocess.Popen[bytes]:
    """This script in ``command``'s role, in a fresh process started through the launcher."""
    env = dict(os.environ)
    if blas1:
        env["OPENBLAS_NUM_THREADS"] = "1"
    argv = [sys.executable, "-c", LAUNCHER, sys.executable, __file__, *command]
    return subprocess.Popen(argv, env=env, **popen)


def child_json(command: list[str], *, blas1: bool = False) -> dict[str, Any]:
    child = spawn(command, blas1=blas1, stdout=subprocess.PIPE)
    out, _ = child.communicate()
    if child.returncode != 0:
        raise SystemExit(f"{command[0]} failed with exit code {child.returncode}")
    result: dict[str, Any] = json.loads(out)
    return result


def available_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def in_process(
    work: Path, *, n: int, n_profile: int, model_id: str, base_path: Path, journal: str
) -> dict[str, Any]:
    runs = {}
    variants = [("headline", journal, False), ("openblas1", journal, True)]
    variants += [("rollback", "default", False), ("openblas1_wal", "wal", True)]
    for name, settings, blas1 in variants:
        profiled = n_profile if name in ("headline", "openblas1") else 0
        log(f"in process [{name}]: {n} deltas ({settings} SQLite settings)" + (
            f", then {profiled} under cProfile" if profiled else ""
        ))  # fmt: skip
        command = ["_throughput", str(n), model_id, str(base_path), settings, str(work)]
        runs[name] = child_json([*command, str(profiled)], blas1=blas1)
        runs[name] |= {"sqlite": SQLITE_SETTINGS[settings]}
        if blas1:
            runs[name]["env"] = "OPENBLAS_NUM_THREADS=1"
        log(f"in process [{name}]: {runs[name]['deltas_per_s']} deltas/s")
    head = runs.pop("headline")
    profiles = {"profile": head.pop("profile")}
    profiles["profile_openblas1"] = runs["openblas1"].pop("profile")
    return {
        "n_throughput": n,
        "deltas_per_s": head["deltas_per_s"],
        "accept_p50_ms": head["accept_p50_ms"],
        "accept_p99_ms": head["accept_p99_ms"],
        "close_ms": head["close_ms"],
        "sqlite": head["sqlite"],
        "target_deltas_per_s_per_core": TARGET_PER_CORE,
        "meets_target": head["deltas_per_s"] >= TARGET_PER_CORE,
        **{f"deltas_per_s_{name}": run["deltas_per_s"] for name, run in runs.items()},
        "breakdown_ms": head["breakdown_ms"],
        "variants": runs,
        **profiles,
    }


def memory(
    work: Path, *, small: int, large: int, model_id: str, base_path: Path, dim: int,
    journal: str, skip_naive: bool,
) -> dict[str, Any]:  # fmt: skip
    runs = {}
    for n in (small, large):
        log(f"memory: {n} deltas streamed through a fresh process ({journal} SQLite settings)")
        command = ["_stream", str(n), model_id, str(base_path), journal, str(work)]
        runs[n] = child_json(command, blas1=True)
        log(f"memory: {runs[n]}")
        (work / f"stream-{n}.db").unlink()
    s, b = runs[small], runs[large]
    growth_small = s["peak_rss_mb"] - s["baseline_rss_mb"]
    growth_large = b["peak_rss_mb"] - b["baseline_rss_mb"]
    result: dict[str, Any] = {
        "n_small": small,
        "n_large": large,
        "peak_rss_mb_1k": s["peak_rss_mb"],
        "peak_rss_mb_100k": b["peak_rss_mb"],
        "baseline_rss_mb": b["baseline_rss_mb"],
        "baseline_rss_mb_1k": s["baseline_rss_mb"],
        "rss_growth_mb_1k": round(growth_small, 1),
        "rss_growth_mb_100k": round(growth_large, 1),
        "peak_rss_ratio_100k_vs_1k": round(b["peak_rss_mb"] / s["peak_rss_mb"], 3),
        # A ratio of growths below 1 MB would be noise.
        "rss_growth_ratio_100k_vs_1k": (
            round(growth_large / growth_small, 2) if growth_small >= 1 else None
        ),
        "vmhwm_mb_1k": s["vmhwm_mb"],
        "vmhwm_mb_100k": b["vmhwm_mb"],
        "rss_runs": f"{SQLITE_SETTINGS[journal]}; OPENBLAS_NUM_THREADS=1; enroll + accept per "
        "delta, sealed by a child process and streamed through a pipe",
        "large_run_s": b["seconds"],
        "large_run_accept_per_s": b["accept_per_s"],
        "large_run_accept_per_s_by_tenth": b["accept_per_s_by_tenth"],
        "large_run_enroll_ms": b["enroll_ms"],
        "large_run_db_mb": b["db_mb"],
    }
    need_mb = large * dim * 4 / 2**20
    avail = available_mb()
    if skip_naive or (avail is not None and need_mb > 0.8 * avail):
        reason = "--skip-naive" if skip_naive else f"needs ~{need_mb:.0f} MB, {avail:.0f} free"
        log(f"memory: naive run skipped ({reason})")
        return result | {"naive_peak_rss_mb_100k": None, "naive_skipped": reason}
    log(f"memory: naive in-memory baseline, {large} deltas (~{need_mb:.0f} MB of arrays)")
    naive = child_json(["_naive", str(large), str(dim)])
    log(f"memory: naive {naive}")
    return result | {
        "naive_peak_rss_mb_100k": naive["peak_rss_mb"],
        "naive_baseline_rss_mb": naive["baseline_rss_mb"],
        "naive_vmhwm_mb_100k": naive["vmhwm_mb"],
        "naive_run_s": naive["seconds"],
        "naive_vs_streaming_rss_100k": round(naive["peak_rss_mb"] / b["peak_rss_mb"], 1),
        "naive_includes": "a list of n float32 opened-delta arrays drawn with numpy, then "
        "reduce(np.add)/n; no parsing, decryption, verification, SQLite or torch",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-throughput", type=int, default=2_000, help="deltas per in-process run")
    parser.add_argument("--n-profile", type=int, default=300, help="deltas in a cProfile run")
    parser.add_argument("--n-http", type=int, default=2_000, help="deltas uploaded over HTTP")
    parser.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients")
    parser.add_argument("--n-small", type=int, default=1_000, help="deltas, small memory run")
    parser.add_argument("--n-large", type=int, default=100_000, help="deltas, large memory run")
    parser.add_argument(
        "--journal", choices=sorted(SQLITE_SETTINGS), default="service",
        help="SQLite settings of the headline and HTTP runs (default: the service's)",
    )  # fmt: skip
    parser.add_argument(
        "--rss-journal", choices=sorted(SQLITE_SETTINGS), default="wal",
        help="SQLite settings of the memory runs (wal: 100k deltas fit the time budget)",
    )  # fmt: skip
    parser.add_argument("--skip-naive", action="store_true", help="skip the in-memory baseline")
    args = parser.parse_args()
    if min(args.n_throughput, args.n_http, args.n_small, args.n_large) < 2:
        parser.error("every run needs at least 2 deltas (a policy's minimum cohort)")
    if args.n_profile < 2 or args.clients < 1:
        parser.error("--n-profile must be at least 2 and --clients at least 1")

    from sottovoce.device import Ranker

    ranker = Ranker.load()
    base = ranker.get_weights()
    model_id, dim = ranker.model_id, ranker.parameter_count
    if base.shape != (dim,):
        raise SystemExit("the ranker's weights do not match its parameter count")
    del ranker
    load_start = os.getloadavg()[0]
    log(f"model {model_id[:12]}…, {dim} parameters; load average {load_start:.2f}")
    with tempfile.TemporaryDirectory(prefix="bench-aggregator-") as tmp:
        work = Path(tmp)
        base_path = work / "base.npy"
        np.save(base_path, base)
        process = in_process(
            work, n=args.n_throughput, n_profile=args.n_profile, model_id=model_id,
            base_path=base_path, journal=args.journal,
        )  # fmt: skip
        common = {"n": args.n_http, "clients": args.clients, "model_id": model_id,
                  "base_path": base_path}  # fmt: skip
        http = over_http(work, name="headline", journal=args.journal, blas1=False, **common)
        tuned = over_http(work, name="openblas1_wal", journal="wal", blas1=True, **common)
        mem = memory(
            work, small=args.n_small, large=args.n_large, model_id=model_id,
            base_path=base_path, dim=dim, journal=args.rss_journal, skip_naive=args.skip_naive,
        )  # fmt: skip
    result = {
        "backend": BACKEND,
        "model_id": model_id,
        "dim": dim,
        **process,
        "deltas_per_s_http": http["deltas_per_s"],
        "http_clients": args.clients,
        "n_http": args.n_http,
        "http_latency_p50_ms": http["latency_p50_ms"],
        "http_latency_p99_ms": http["latency_p99_ms"],
        "http_server": http["server"],
        "http_server_peak_rss_mb": http["server_peak_rss_mb"],
        "deltas_per_s_http_openblas1_wal": tuned["deltas_per_s"],
        "http_latency_p50_ms_openblas1_wal": tuned["latency_p50_ms"],
        "http_latency_p99_ms_openblas1_wal": tuned["latency_p99_ms"],
        **mem,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "sqlite_version": sqlite3.sqlite_version,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": round(load_start, 2),
        "load_average_at_end": round(os.getloadavg()[0], 2),
        "load_average_max_seen": round(max(_LOAD), 2),
        "total_s": round(time.perf_counter() - _START, 1),
    }
    print(json.dumps(result))


ROLES = {"_throughput": throughput_child, "_serve": serve_child, "_generate": generate_child,
         "_stream": stream_child, "_naive": naive_child}  # fmt: skip

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ROLES:
        ROLES[sys.argv[1]](sys.argv[2:])
    else:
        main()
