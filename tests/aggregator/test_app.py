"""The aggregator service on a real uvicorn on 127.0.0.1, driven by sync's real transport.

The round is opened in process on the same SQLite file before the server starts (as an
operator would); everything a device does goes over HTTP with ``sottovoce.sync.transport``.
The service's schedule sweeps every few milliseconds, so a central round ends (and publishes)
as soon as the test moves the aggregator's clock to its deadline.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from aggregator_helpers import COHORT, DIM, T0, Clock, Keys, central_update
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sottovoce.policy import DecisionLog
from sottovoce.sync import (
    DeltaState,
    EnrollmentRefused,
    OutboxItem,
    SealedDelta,
    SignedRoundSpec,
    period_label,
    seal_delta,
    verify_round_spec,
)
from sottovoce.sync.transport import RetryPolicy, Uploader, enroll, fetch_release

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("opacus")

from sottovoce.aggregator._aggregator import RegionAggregator  # noqa: E402
from sottovoce.aggregator._app import create_app  # noqa: E402

MODEL_ID = "cd" * 32
TOKEN = "app-enrollment-token"
RETRY = RetryPolicy(attempts=2, initial=0.01, maximum=0.05)
SWEEP_SECONDS = 0.05
NOISE_SEED = 3


@dataclass
class MemoryOutbox:
    """The uploader's :class:`~sottovoce.sync.Outbox` on a dict (state, drop reason)."""

    items: dict[str, OutboxItem] = field(default_factory=dict)
    states: dict[str, tuple[DeltaState, str | None]] = field(default_factory=dict)

    def add(self, item: OutboxItem) -> None:
        self.items[item.idempotency_key] = item
        self.states[item.idempotency_key] = (DeltaState.PENDING, None)

    def due(self, *, now: datetime, limit: int = 100) -> list[OutboxItem]:
        pending = [k for k, (s, _) in self.states.items() if s is DeltaState.PENDING]
        return [self.items[k] for k in pending][:limit]

    def attempted(self, key: str, *, now: datetime, retry_at: datetime) -> None:
        pass  # stays pending

    def acknowledge(self, key: str, *, now: datetime) -> None:
        self.states[key] = (DeltaState.ACKNOWLEDGED, None)

    def drop(self, key: str, *, reason: str, now: datetime) -> None:
        self.states[key] = (DeltaState.DROPPED, reason)


class Service:
    """An aggregator file with an open round, served by uvicorn on a free loopback port."""

    def __init__(self, path: Path) -> None:
        self.path, self.keys, self.clock = path, Keys(), Clock()
        self.policy = self.keys.policy()
        conn = sqlite3.connect(path)
        agg = self.aggregator(conn)
        signed = agg.open_round(
            noise_multiplier=1.0, sampling_rate=0.01, deadline=T0 + timedelta(hours=6)
        )
        conn.close()
        self.spec = verify_round_spec(signed, self.keys.signing.public_key())
        self.client = httpx.Client(timeout=5.0)
        self.url = ""

    def aggregator(self, conn: sqlite3.Connection) -> RegionAggregator:
        return self.keys.aggregator(
            conn,
            policy=self.policy,
            model_id=MODEL_ID,
            clock=self.clock,
            rng=np.random.default_rng(NOISE_SEED),
        )

    @property
    def verify_key(self) -> Any:
        return self.keys.signing.public_key()

    def device(self, *, token: str = TOKEN) -> Ed25519PrivateKey:
        key = Ed25519PrivateKey.generate()
        enroll(
            self.client,
            base_url=self.url,
            token=token,
            device_public_key=key.public_key(),
            period=period_label(self.spec),
            retry=RETRY,
        )
        return key

    def seal(self, key: Ed25519PrivateKey, delta: Any, **kw: Any) -> SealedDelta:
        return seal_delta(
            delta=delta,
            spec=self.spec,
            device_secret=_secret(key),
            signing_key=key,
            aggregator_hpke_key=self.keys.hpke.public_key(),
            rng=np.random.default_rng(0),
            **kw,
        )

    def upload(self, *sealed: SealedDelta) -> MemoryOutbox:
        """One upload run of a device whose own clock says the round is still on."""
        outbox = MemoryOutbox()
        for s in sealed:
            outbox.add(
                OutboxItem(s.idempotency_key, s.region, s.round_id, self.spec.deadline, s.to_wire())
            )
        Uploader(
            self.client, base_url=self.url, outbox=outbox, clock=lambda: T0, retry=RETRY
        ).run_once()
        return outbox

    def end_round(self) -> None:
        """Move the aggregator's clock to the deadline; wait for the schedule to publish."""
        self.clock.now = self.spec.deadline
        deadline = time.monotonic() + 10
        while self.client.get(f"{self.url}/v1/model/release").status_code == 404:
            assert time.monotonic() < deadline, "the schedule did not end the round"
            time.sleep(0.02)

    def metrics(self) -> dict[str, float]:
        text = self.client.get(f"{self.url}/v1/metrics").text
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    svc = Service(tmp_path / "aggregator.db")
    app = create_app(lambda: svc.aggregator(sqlite3.connect(svc.path)), enrollment_tokens={TOKEN},
                     scheduler=lambda agg: agg.sweep(), tick_seconds=SWEEP_SECONDS)  # fmt: skip
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    svc.url = f"http://127.0.0.1:{port}"
    yield svc
    svc.client.close()
    server.should_exit = True
    thread.join(timeout=10)
    assert not thread.is_alive()


def _secret(key: Ed25519PrivateKey) -> bytes:
    """One device, one secret: the pseudonym of a round is the same for all its deltas."""
    return hashlib.sha256(key.private_bytes_raw()).digest()


def small(i: int) -> Any:
    values = np.random.default_rng(i).normal(size=DIM)
    return (values / np.linalg.norm(values) * 0.5).astype(np.float32)


def test_a_full_round_over_http_publishes_a_release_the_device_verifies(
    service: Service,
) -> None:
    answer = service.client.get(f"{service.url}/v1/round")
    assert answer.status_code == 200
    spec = verify_round_spec(SignedRoundSpec.from_wire(answer.content), service.verify_key)
    assert spec == service.spec
    no_release = service.client.get(f"{service.url}/v1/model/release")
    assert (no_release.status_code, no_release.json()["code"]) == (404, "no_release")

    deltas = [small(i) for i in range(COHORT)]
    sealed = [service.seal(service.device(), delta) for delta in deltas]
    outbox = service.upload(*sealed)
    assert set(outbox.states.values()) == {(DeltaState.ACKNOWLEDGED, None)}
    # The minimum cohort is there, and the round is still open: it ends at its deadline.
    time.sleep(3 * SWEEP_SECONDS)  # a few sweeps pass
    assert service.client.get(f"{service.url}/v1/round").status_code == 200
    assert service.client.get(f"{service.url}/v1/model/release").status_code == 404

    service.end_round()
    fetched = fetch_release(
        service.client,
        base_url=service.url,
        verify_key=service.verify_key,
        model_id=MODEL_ID,
        current_version=0,
        retry=RETRY,
    )
    assert fetched is not None and fetched.etag is not None
    assert fetched.release.version == 1
    # The base is zero: the weights are the round's update, exactly as the spec describes it.
    total = np.sum(np.array(deltas, dtype=np.float64), axis=0)
    update = central_update(total, np.random.default_rng(NOISE_SEED),
                            clipping_norm=spec.clipping_norm,
                            noise_multiplier=spec.noise_multiplier,
                            expected_cohort=spec.expected_cohort)  # fmt: skip
    np.testing.assert_allclose(fetched.release.weights_array(), update, rtol=0, atol=1e-6)
    again = fetch_release(
        service.client,
        base_url=service.url,
        etag=fetched.etag,
        verify_key=service.verify_key,
        model_id=MODEL_ID,
        current_version=1,
        retry=RETRY,
    )
    assert again is None  # 304
    raw = service.client.get(
        f"{service.url}/v1/model/release", headers={"If-None-Match": fetched.etag}
    )
    assert (raw.status_code, raw.headers["ETag"], raw.content) == (304, fetched.etag, b"")

    # Acknowledgements lost: the device resends everything; each delta still counts once.
    replayed = service.upload(*sealed)
    assert set(replayed.states.values()) == {(DeltaState.ACKNOWLEDGED, None)}
    metrics = service.metrics()
    assert metrics["sottovoce_deltas_accepted_total"] == COHORT
    assert metrics["sottovoce_enrollments_total"] == COHORT
    assert service.client.get(f"{service.url}/v1/round").json()["code"] == "no_open_round"
    # A delta sent after the deadline is refused, and the release stays as it was.
    late = service.upload(service.seal(service.device(), small(COHORT)))
    assert set(late.states.values()) == {(DeltaState.DROPPED, "round_closed")}
    latest = service.client.get(f"{service.url}/v1/model/release")
    assert latest.headers["ETag"] == fetched.etag


def test_a_round_the_schedule_publishes_counts_in_the_published_metric(service: Service) -> None:
    outbox = service.upload(service.seal(service.device(), small(0)))
    assert set(outbox.states.values()) == {(DeltaState.ACKNOWLEDGED, None)}
    service.end_round()
    assert service.client.get(f"{service.url}/v1/model/release").status_code == 200
    assert service.metrics()["sottovoce_rounds_published_total"] == 1


def test_refusals_come_back_with_their_code(service: Service) -> None:
    key = service.device()
    stranger = Ed25519PrivateKey.generate()  # never enrolled
    outbox = service.upload(service.seal(stranger, small(1)))
    assert set(outbox.states.values()) == {(DeltaState.DROPPED, "not_enrolled")}

    big = service.seal(key, small(2))
    url = f"{service.url}/v1/rounds/{big.round_id}/deltas"
    answer = service.client.post(
        url, content=big.to_wire(), headers={"Content-Type": "application/json"}
    )  # no key
    assert answer.status_code == 400
    assert answer.json() == {
        "code": "malformed",
        "message": "The Idempotency-Key header is required.",
    }
    headers = {"Idempotency-Key": big.idempotency_key, "Content-Type": "application/json"}
    other = service.client.post(
        f"{service.url}/v1/rounds/elsewhere/deltas", content=big.to_wire(), headers=headers
    )
    assert (other.status_code, other.json()["code"]) == (400, "malformed")
    assert service.client.post(url, content=big.to_wire(), headers=headers).status_code == 200
    # The same device in the same round under a new key: one contribution only.
    twice = service.seal(key, small(3), idempotency_key="second-upload-of-device")
    second = service.client.post(
        url, content=twice.to_wire(), headers=headers | {"Idempotency-Key": twice.idempotency_key}
    )
    assert (second.status_code, second.json()["code"]) == (409, "duplicate_contribution")
    assert second.json()["message"]
    reused = service.client.post(url, content=twice.to_wire(), headers=headers)
    assert (reused.status_code, reused.json()["code"]) == (409, "malformed")
    garbage = service.client.post(
        url, content=b"{}", headers=headers | {"Idempotency-Key": "k" * 20}
    )
    assert garbage.status_code == 400 and garbage.json()["code"] in {
        "malformed",
        "unsupported_protocol",
    }

    metrics = service.metrics()
    assert metrics['sottovoce_deltas_refused_total{code="not_enrolled"}'] == 1
    assert metrics['sottovoce_deltas_refused_total{code="duplicate_contribution"}'] == 1
    assert metrics["sottovoce_deltas_accepted_total"] == 1


def test_enrollment_needs_a_valid_token(service: Service) -> None:
    with pytest.raises(EnrollmentRefused) as refused:
        service.device(token="not-the-token")
    assert refused.value.reason == "not_enrolled" and "403" in str(refused.value)
    url = f"{service.url}/v1/enroll"
    missing = service.client.post(url, json={"protocol": 1, "device_key": "x", "period": "p"})
    assert (missing.status_code, missing.json()["code"]) == (401, "not_enrolled")
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    bad_key = service.client.post(
        url, json={"protocol": 1, "device_key": "AAAA", "period": "2026-11-01"}, headers=auth
    )
    assert (bad_key.status_code, bad_key.json()["code"]) == (400, "malformed")
    old = service.client.post(
        url, json={"protocol": 99, "device_key": "AAAA", "period": "2026-11-01"}, headers=auth
    )
    assert (old.status_code, old.json()["code"]) == (400, "unsupported_protocol")
    shapeless = service.client.post(
        url, content=b"[1]", headers=auth | {"Content-Type": "application/json"}
    )
    assert (shapeless.status_code, shapeless.json()["code"]) == (400, "malformed")
    service.device()
    # Every enrollment decision, accepted or refused, is in the policy log: the two token
    # refusals, the bad key, the old protocol, then the good one.
    with closing(sqlite3.connect(service.path)) as conn:
        logged = DecisionLog(conn).query(action="enroll_device")
        decided = [(d.outcome.value, d.reason) for _, d in logged]
    assert decided == [("deny", "not_enrolled"), ("deny", "not_enrolled"), ("deny", "malformed"),
                       ("deny", "unsupported_protocol"), ("allow", "within_policy")]  # fmt: skip


def test_health_metrics_and_openapi(service: Service) -> None:
    health = service.client.get(f"{service.url}/v1/health")
    assert health.json() == {"status": "ok", "open_round": service.spec.round_id}
    metrics = service.client.get(f"{service.url}/v1/metrics")
    assert metrics.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE sottovoce_deltas_accepted_total counter" in metrics.text
    assert "sottovoce_rounds_published_total 0" in metrics.text.splitlines()
    paths = service.client.get(f"{service.url}/openapi.json").json()["paths"]
    assert set(paths) == {
        "/v1/round",
        "/v1/enroll",
        "/v1/rounds/{round_id}/deltas",
        "/v1/pseudonyms/{pseudonym}/erasure",
        "/v1/model/release",
        "/v1/health",
        "/v1/metrics",
    }
    assert "requestBody" in paths["/v1/rounds/{round_id}/deltas"]["post"]
    unknown = service.client.get(f"{service.url}/v2/nothing")
    assert (unknown.status_code, unknown.json()["code"]) == (404, "not_found")
