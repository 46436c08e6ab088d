"""The aggregator service on a real uvicorn on 127.0.0.1, and what tests read back from its file.

:func:`serve` runs an app on a free loopback port in a thread (the pattern of ``test_app.py``).
:class:`Region` is one region's aggregator file with its keys, clock and an open round, opened in
process before the server starts, as an operator would. :class:`Device` seals with sync's real
code. What the service decided is read back from the same SQLite file, on a connection of the
test's own, with the policy package's :class:`~sottovoce.policy.DecisionLog`, as an auditor
would; the round's count and running sum are read from the aggregator's tables.

A central round closes at its deadline, not at a count: a test moves the region's clock past
the deadline and lets the service's own schedule (``Region.app(sweep_seconds=...)``) or the
operator in process (:meth:`Region.sweep`) end it.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import uvicorn
from aggregator_helpers import COHORT, DIM, Clock, Keys, central_update, stored_sum
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI

from sottovoce.aggregator import (
    PartialSum,
    RegionAggregator,
    RegionKeys,
    ServiceConfig,
    create_app,
)
from sottovoce.aggregator._signer import RegionSigner
from sottovoce.policy import Decision, DecisionEngine, DecisionLog, VerifyReport
from sottovoce.sync import (
    DeltaState,
    ModelRelease,
    OutboxItem,
    RoundSpec,
    SealedDelta,
    new_device_secret,
    period_label,
    seal_delta,
    verify_round_spec,
)
from sottovoce.sync._wire import b64encode
from sottovoce.sync.transport import RetryPolicy, enroll

MODEL_ID = "cd" * 32
TOKEN = "app-enrollment-token"
SIGMA, Q = 1.0, 0.01  # the policy's mechanism (Keys.policy): a round costs epsilon ~1.2 of 4
SWEEP_SECONDS = 0.05  # how often a ticking service sweeps (ends rounds past their deadline)
FAST_RETRY = RetryPolicy(attempts=2, initial=0.01, maximum=0.05)


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run ``app`` on uvicorn on a free 127.0.0.1 port; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True, name="uvicorn")
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        if thread.is_alive():
            raise RuntimeError("uvicorn did not stop")


@dataclass(frozen=True)
class RoundRow:
    """A round as the aggregator's tables hold it (``partial``: its running sum, every worker's
    merged; ``None`` once it closed)."""

    state: str
    count: int
    partial: PartialSum | None


class Region:
    """The EU aggregator's file with an open round, its keys, clock and policy.

    ``base`` are the weights before any release; the central noise of the first release is the
    first draw of ``np.random.default_rng(seed)``, so a test can predict the release exactly
    (every aggregator on the file, the service's or the operator's, starts that generator).
    """

    def __init__(self, path: Path, *, min_cohort: int = COHORT, seed: int = 3) -> None:
        self.path, self.seed = path, seed
        self.keys, self.clock = Keys(), Clock()
        self.policy = self.keys.policy(min_cohort=min_cohort)
        self.base = np.linspace(-1.0, 1.0, DIM)
        with closing(sqlite3.connect(path)) as conn:
            operator = self.aggregator(conn)
            signed = operator.open_round(
                noise_multiplier=SIGMA,
                sampling_rate=Q,
                deadline=self.clock.now + timedelta(hours=6),
            )
        # A decision engine under the region's digest key (what the operator's uses): what
        # links a logged decision to its inputs.
        signer = RegionSigner(self.policy.region("eu"), signing_key=self.keys.signing,
                              hpke_key=self.keys.hpke)  # fmt: skip
        self._engine = DecisionEngine(self.policy, "eu", digest_key=signer.digest_key(),
                                      clock=self.clock)  # fmt: skip
        self.spec: RoundSpec = verify_round_spec(signed, self.keys.signing.public_key())

    def aggregator(self, conn: sqlite3.Connection) -> RegionAggregator:
        return self.keys.aggregator(
            conn,
            policy=self.policy,
            model_id=MODEL_ID,
            base_weights=self.base,
            clock=self.clock,
            rng=np.random.default_rng(self.seed),
        )

    def app(self, *, sweep_seconds: float | None = None, **options: Any) -> FastAPI:
        """The service on this file; with ``sweep_seconds``, its schedule sweeps that often (so
        a round past its deadline ends without a request), as ``build_app``'s does."""
        if sweep_seconds is not None:
            options |= {"scheduler": lambda agg: agg.sweep(), "tick_seconds": sweep_seconds}
        return create_app(
            lambda: self.aggregator(sqlite3.connect(self.path)),
            enrollment_tokens={TOKEN},
            **options,
        )

    def service_config(self, **options: Any) -> ServiceConfig:
        """The configuration ``serve`` would run this region with (no schedule of its own),
        plus ``options``."""
        return ServiceConfig(
            policy=self.policy,
            region="eu",
            keys=RegionKeys(self.keys.signing, self.keys.hpke),
            database=self.path,
            model_id=MODEL_ID,
            base_weights=self.base.astype(np.float32),
            enrollment_tokens=frozenset({TOKEN}),
            schedule_rounds=False,
            clock=self.clock,
            **options,
        )

    # -- ending the round ------------------------------------------------------------------------

    def sweep(self) -> list[str]:
        """The operator sweeps in process, on a connection of its own (the service may be
        serving the same file): rounds past their deadline on the region's clock end."""
        with closing(sqlite3.connect(self.path, timeout=10)) as conn:
            return self.aggregator(conn).sweep()

    def end_round(self, timeout: float = 10.0) -> RoundRow:
        """Move the clock to the round's deadline and wait until a ticking service ended it."""
        self.clock.now = self.spec.deadline
        deadline = time.monotonic() + timeout
        while True:
            row = self.round_row()
            assert row is not None
            if row.state != "open":
                return row
            assert time.monotonic() < deadline, "the service did not end the round"
            time.sleep(0.02)

    # -- reading the file back -----------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=10)) as conn:
            yield conn

    def round_row(self, round_id: str | None = None) -> RoundRow | None:
        with self._read() as conn:
            round_id = round_id or self.spec.round_id
            row = conn.execute(
                "SELECT state, count FROM rounds WHERE round_id = ?", (round_id,)
            ).fetchone()
            partial = stored_sum(conn, round_id)
        return None if row is None else RoundRow(row[0], int(row[1]), partial)

    def decisions(self, action: str | None = "accept_delta") -> list[Decision]:
        with self._read() as conn:
            return [d for _, d in DecisionLog(conn).query(action=action)]

    def verify_log(self) -> VerifyReport:
        with self._read() as conn:
            log = DecisionLog(conn)
            return log.verify(verifier_key=log.verifier_key)

    def enrolled(self) -> int:
        with self._read() as conn:
            return int(conn.execute("SELECT count(*) FROM enrollments").fetchone()[0])

    def accepted_keys(self) -> list[str]:
        with self._read() as conn:
            rows = conn.execute("SELECT idempotency_key FROM contributions WHERE status = 200")
            return sorted(r[0] for r in rows)

    def latest_release(self) -> ModelRelease | None:
        with self._read() as conn:
            row = conn.execute("SELECT body FROM releases ORDER BY version DESC LIMIT 1").fetchone()
        return None if row is None else ModelRelease.from_wire(row[0])

    def digest(self, inputs: Mapping[str, Any]) -> str:
        """The ``inputs_digest`` a decision about ``inputs`` carries."""
        return self._engine.digest(inputs)

    def upload_digest(self, idempotency_key: str, body: bytes) -> str:
        """The ``inputs_digest`` of the verdict on one upload (its key and body)."""
        return self.digest(
            {"idempotency_key": idempotency_key, "body_sha256": hashlib.sha256(body).hexdigest()}
        )

    def expected_release(self, accepted: list[npt.NDArray[np.float32]]) -> npt.NDArray[np.float64]:
        """Base + (the sum of exactly ``accepted`` on the grid + the first release's central
        noise) / the expected cohort: the first release of this file, whatever the count."""
        total = np.sum(np.array(accepted, dtype=np.float64).reshape(-1, DIM), axis=0)
        update = central_update(total, np.random.default_rng(self.seed),
                                clipping_norm=self.spec.clipping_norm,
                                noise_multiplier=self.spec.noise_multiplier,
                                expected_cohort=self.spec.expected_cohort)  # fmt: skip
        expected: npt.NDArray[np.float64] = self.base + update
        return expected


@dataclass
class Device:
    """A device's per-period key and secret (one secret: one pseudonym per period)."""

    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    secret: bytes = field(default_factory=new_device_secret)

    @classmethod
    def seeded(cls, name: str) -> Device:
        """The same device every run (same keys, pseudonym and idempotency keys)."""
        seed = hashlib.sha256(name.encode()).digest()
        key = Ed25519PrivateKey.from_private_bytes(seed)
        return cls(key, hashlib.sha256(b"secret/" + seed).digest())

    @property
    def public_b64(self) -> str:
        return b64encode(self.key.public_key().public_bytes_raw())

    def enroll(
        self,
        client: httpx.Client,
        url: str,
        spec: RoundSpec,
        *,
        token: str = TOKEN,
        retry: RetryPolicy = FAST_RETRY,
    ) -> None:
        enroll(
            client,
            base_url=url,
            token=token,
            device_public_key=self.key.public_key(),
            period=period_label(spec),
            retry=retry,
        )

    def seal(
        self, spec: RoundSpec, delta: npt.ArrayLike, hpke_public: Any, **kw: Any
    ) -> SealedDelta:
        return seal_delta(
            delta=delta,
            spec=spec,
            device_secret=self.secret,
            signing_key=self.key,
            aggregator_hpke_key=hpke_public,
            rng=np.random.default_rng(0),
            **kw,
        )


def small(seed: int) -> npt.NDArray[np.float32]:
    """A delta of norm 0.5, well inside the clipping norm (sealing leaves it as it is)."""
    values = np.random.default_rng(seed).normal(size=DIM)
    return (values / np.linalg.norm(values) * 0.5).astype(np.float32)


@dataclass
class MemoryOutbox:
    """The uploader's :class:`~sottovoce.sync.Outbox` on dicts, honouring ``retry_at``."""

    items: dict[str, OutboxItem] = field(default_factory=dict)
    states: dict[str, tuple[DeltaState, str | None]] = field(default_factory=dict)
    retry_at: dict[str, datetime] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)

    def add(self, sealed: SealedDelta, deadline: datetime) -> OutboxItem:
        item = OutboxItem(
            sealed.idempotency_key, sealed.region, sealed.round_id, deadline, sealed.to_wire()
        )
        self.items[item.idempotency_key] = item
        self.states[item.idempotency_key] = (DeltaState.PENDING, None)
        return item

    def pending(self) -> list[str]:
        return [k for k, (s, _) in self.states.items() if s is DeltaState.PENDING]

    def due(self, *, now: datetime, limit: int = 100) -> list[OutboxItem]:
        keys = [k for k in self.pending() if self.retry_at.get(k, now) <= now]
        return [replace(self.items[k], attempts=self.attempts.get(k, 0)) for k in keys[:limit]]

    def attempted(self, key: str, *, now: datetime, retry_at: datetime) -> None:
        self.attempts[key] = self.attempts.get(key, 0) + 1
        self.retry_at[key] = retry_at

    def acknowledge(self, key: str, *, now: datetime) -> None:
        self.states[key] = (DeltaState.ACKNOWLEDGED, None)

    def drop(self, key: str, *, reason: str, now: datetime) -> None:
        self.states[key] = (DeltaState.DROPPED, reason)
