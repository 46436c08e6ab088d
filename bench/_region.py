"""The region ``bench/aggregator.py`` runs in process: its keys, policy, clock and database, its
aggregator with one open round, and the devices that seal deltas for it.

The keys are the aggregator's own (``sottovoce.aggregator.generate_keys`` into a directory of
the run, read back by each child process with ``load_keys``), published in the example policy by
``policy_with_keys``. The database is the backend's: a SQLite file (``SQLITE_SETTINGS``: the
service's by default) or a fresh database on a throwaway PostgreSQL server that
:class:`Databases` starts on loopback and stops (``sottovoce._pgserver``: fsync and
synchronous_commit on).
"""

from __future__ import annotations

import hashlib
import math
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from sottovoce._database import Connection
    from sottovoce._pgserver import ThrowawayPostgres
    from sottovoce.aggregator import RegionAggregator, RegionKeys
    from sottovoce.policy import Policy
    from sottovoce.sync import RoundSpec

REGION = "eu"
BACKENDS = ("sqlite", "postgres")
NOISE_MULTIPLIER, SAMPLING_RATE = 1.0, 0.01
ROUND_HOURS = 6  # a round's deadline after it opens, on the aggregator's clock
DELTA_NORM = 0.5  # below the example policy's clipping norm of 1, so sealing does not clip
SQLITE_SETTINGS = {
    "service": "journal_mode=WAL, synchronous=FULL, autocommit connection (as 'sottovoce "
    "aggregator serve' opens its database)",
    "default": "rollback journal, synchronous=FULL (sqlite3.connect defaults)",
    "wal": "journal_mode=WAL, synchronous=NORMAL",
}
POSTGRES_SETTINGS = (
    "PostgreSQL on 127.0.0.1 (sottovoce._pgserver: fsync=on, synchronous_commit=on), "
    "a psycopg pool per process, as 'sottovoce aggregator serve --db postgresql://...'"
)


def is_url(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://"))


def settings_of(target: str, journal: str) -> str:
    return POSTGRES_SETTINGS if is_url(target) else SQLITE_SETTINGS[journal]


class Databases:
    """Each run's fresh region database: a SQLite file in ``work``, or a database on a
    PostgreSQL server of this bench's own (started on entry, stopped and removed on exit)."""

    def __init__(self, backend: str, work: Path) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r}: one of {', '.join(BACKENDS)}")
        self.backend, self._work = backend, work
        self._server: ThrowawayPostgres | None = None
        self._made = 0

    def __enter__(self) -> Databases:
        if self.backend == "postgres":
            from sottovoce._pgserver import ThrowawayPostgres

            self._server = ThrowawayPostgres()
            self._server.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        if self._server is not None:
            self._server.close()

    def new(self, name: str) -> str:
        """A fresh database for the run ``name`` (a path or a ``postgresql://`` URL)."""
        self._made += 1
        if self._server is None:
            return str(self._work / f"{name}-{self._made}.db")
        return self._server.new_database(f"{name}_{self._made}")

    def drop(self, target: str) -> None:
        """Remove a run's database once its figures are taken (disk space of the next runs)."""
        if self._server is None:
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(target + suffix).unlink(missing_ok=True)
        else:
            self._server.server.drop_database(target.rsplit("/", 1)[1])


def open_db(target: str, journal: str = "service") -> Connection:
    """A connection to ``target`` with one of the ``SQLITE_SETTINGS`` (a URL: PostgreSQL)."""
    from sottovoce.aggregator import open_database

    if is_url(target) or journal == "service":
        return open_database(target if is_url(target) else Path(target), application="bench")
    conn = sqlite3.connect(target, check_same_thread=False)
    if journal == "wal":
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def database_mb(conn: Connection, target: str) -> float:
    if is_url(target):
        size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        return round(int(size) / 2**20, 1)
    return round(sum(Path(target + s).stat().st_size for s in ("", "-wal")
                     if Path(target + s).exists()) / 2**20, 1)  # fmt: skip


def make_keys(directory: Path) -> Path:
    """New region keys in ``directory`` (the aggregator's PEM files); returns it."""
    from sottovoce.aggregator import generate_keys

    generate_keys(directory)
    return directory


def region_policy(keys: RegionKeys, *, cohort: int) -> Policy:
    """The example policy, with the EU region publishing ``keys``, central mode, and an
    expected cohort of ``cohort`` devices per round (population ``cohort / SAMPLING_RATE``)."""
    from sottovoce.aggregator._service import policy_with_keys
    from sottovoce.policy import example_policy

    policy = example_policy()
    population = math.ceil(cohort / SAMPLING_RATE)
    privacy = {
        "mode": "central",
        "population": population,
        "sampling_rate": SAMPLING_RATE,
        "min_cohort": 2,
        "noise_multiplier": NOISE_MULTIPLIER,
        "delta": min(policy.region(REGION).privacy.delta, 0.1 / population),
    }
    return policy_with_keys(policy, REGION, keys, None, privacy=privacy)


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


def build_aggregator(
    conn: Connection,
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
        signing_key=keys.signing,
        hpke_key=keys.hpke,
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
    return verify_round_spec(signed, keys.signing.public_key())


def close_round(agg: RegionAggregator, spec: RoundSpec, clock: BenchClock) -> float:
    """Move the clock past the round's deadline and sweep: seconds of the sweep (the close)."""
    clock.move_past(spec.deadline)
    start = time.perf_counter()
    ended = agg.sweep(clock())
    elapsed = time.perf_counter() - start
    if ended != [spec.round_id]:
        raise SystemExit(f"the sweep past the deadline ended {ended}, not {spec.round_id}")
    return elapsed


def check_published(agg: RegionAggregator, spec: RoundSpec, n: int) -> None:
    info = agg.round(spec.round_id)
    release = agg.latest_release()
    if info is None or info.state != "published" or info.count != n or release is None:
        raise SystemExit(f"the round did not publish with {n} deltas: {info}")


def raw_public_b64(key: Any) -> str:
    from sottovoce.sync._wire import b64encode

    return b64encode(key.public_key().public_bytes_raw())


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
    conn: Connection, keys_dir: Path, *, n: int, model_id: str, base: npt.NDArray[np.float32]
) -> Prepared:
    """A round open on ``conn`` for the keys in ``keys_dir``, with ``n`` devices enrolled and
    their deltas sealed (none uploaded)."""
    from sottovoce.aggregator import load_keys
    from sottovoce.sync import period_label

    keys = load_keys(keys_dir)
    clock = BenchClock()
    agg = build_aggregator(conn, keys, cohort=n, model_id=model_id, base=base, clock=clock)
    spec = open_round(agg, keys, clock)
    devices = Devices(seed=n, dim=base.size)
    hpke_public = keys.hpke.public_key()
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
