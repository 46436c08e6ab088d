"""The HTTP transport against a real server on 127.0.0.1 that drops, delays and garbles answers.

Backoff waits go through a fake ``sleep`` that moves a fake clock, so retries cost no wall time;
only the timeouts of delayed answers do.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fault_server import LONG_RETRY_AFTER, SHORT_RETRY_AFTER, Fault, FaultServer, random_plan
from sync_helpers import MODEL_ID, PERIOD_START, Parties, make_spec

from sottovoce.sync import (
    AggregatorUnavailable,
    BadSignature,
    DeltaState,
    EnrollmentRefused,
    Outbox,
    OutboxItem,
    WrongModel,
    WrongModelVersion,
    sign_release,
)
from sottovoce.sync.transport import (
    Fetched,
    RetryPolicy,
    Uploader,
    UploadReport,
    enroll,
    fetch_release,
)

TIMEOUT = 0.25
RETRY = RetryPolicy(attempts=3, initial=0.5, maximum=4.0, max_retry_after=5.0)
SPEC = make_spec()


class FakeTime:
    """The device's clock; ``sleep`` records the wait and moves the clock instead of blocking."""

    def __init__(self) -> None:
        self.now = PERIOD_START + timedelta(hours=1)
        self.sleeps: list[float] = []

    def __call__(self) -> datetime:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += timedelta(seconds=seconds)


class Crash(Exception):
    """The device process dies in the middle of a run."""


@dataclasses.dataclass
class Row:
    item: OutboxItem
    state: DeltaState = DeltaState.PENDING
    next_at: datetime | None = None
    reason: str | None = None


class MemoryOutbox:
    """The :class:`Outbox` protocol on a dict; states only move forward, or the test fails.

    ``crash_after`` makes the n-th recording raise :class:`Crash` before it takes effect (the
    answer was received, the process died before the outbox committed).
    """

    def __init__(self, rows: dict[str, Row] | None = None) -> None:
        self.rows: dict[str, Row] = rows or {}
        self.acks: Counter[str] = Counter()
        self.crash_after: int | None = None

    def add(self, item: OutboxItem) -> None:
        self.rows[item.idempotency_key] = Row(item)

    def restarted(self) -> MemoryOutbox:
        """What a new process finds in the store: the committed rows, nothing in memory."""
        new = MemoryOutbox({k: dataclasses.replace(r) for k, r in self.rows.items()})
        new.acks = self.acks  # the test's ledger of acknowledgements outlives the process
        return new

    def due(self, *, now: datetime, limit: int = 100) -> list[OutboxItem]:
        return [
            r.item
            for r in self.rows.values()
            if r.state is DeltaState.PENDING and (r.next_at is None or r.next_at <= now)
        ][:limit]

    def attempted(self, key: str, *, now: datetime, retry_at: datetime) -> None:
        row = self._pending(key)
        assert retry_at > now or retry_at == row.item.deadline
        row.item = dataclasses.replace(row.item, attempts=row.item.attempts + 1)
        row.next_at = retry_at

    def acknowledge(self, key: str, *, now: datetime) -> None:
        self._pending(key).state = DeltaState.ACKNOWLEDGED
        self.acks[key] += 1

    def drop(self, key: str, *, reason: str, now: datetime) -> None:
        row = self._pending(key)
        row.state, row.reason = DeltaState.DROPPED, reason

    def _pending(self, key: str) -> Row:
        if self.crash_after is not None:
            self.crash_after -= 1
            if self.crash_after < 0:
                raise Crash
        row = self.rows[key]
        assert row.state is DeltaState.PENDING, (key, row.state)
        return row

    def states(self) -> Counter[DeltaState]:
        return Counter(r.state for r in self.rows.values())

    def next_due(self) -> datetime:
        pending = [r.next_at for r in self.rows.values() if r.state is DeltaState.PENDING]
        return min((t for t in pending if t is not None), default=PERIOD_START)


def _typed(outbox: MemoryOutbox) -> Outbox:
    return outbox  # mypy: the test double follows the protocol


def sealed_items(n: int, *, round_id: str | None = None) -> list[OutboxItem]:
    """``n`` real sealed deltas from ``n`` devices (one key per device and round)."""
    spec = make_spec(round_id=round_id) if round_id else SPEC
    aggregator = Parties().aggregator
    items = []
    for i in range(n):
        device = Parties(device_secret=bytes([i + 1]) * 32, aggregator=aggregator)
        sealed = device.seal(np.full(8, 0.1 * (i + 1)), spec, seed=i)
        items.append(OutboxItem(sealed.idempotency_key, sealed.region, sealed.round_id,
                                spec.deadline, sealed.to_wire()))  # fmt: skip
    assert len({i.idempotency_key for i in items}) == n
    return items


@pytest.fixture
def server() -> Iterator[FaultServer]:
    server = FaultServer(tokens={"app-token"}).start()
    yield server
    server.stop()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=TIMEOUT) as client:
        yield client


def uploader(
    client: httpx.Client, server: FaultServer, outbox: MemoryOutbox, t: FakeTime
) -> Uploader:
    return Uploader(client, base_url=server.url, outbox=_typed(outbox), clock=t, retry=RETRY,
                    sleep=t.sleep)  # fmt: skip


def outbox_with(items: list[OutboxItem]) -> MemoryOutbox:
    outbox = MemoryOutbox()
    for item in items:
        outbox.add(item)
    return outbox


# -- uploads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_every_delta_is_acknowledged_and_aggregated_exactly_once(seed: int) -> None:
    rng = random.Random(seed)
    items = sealed_items(6)
    server = FaultServer(plan=random_plan(seed, 40), delay=TIMEOUT * 2).start()
    t = FakeTime()
    outbox = outbox_with(items)
    crash_after = rng.randrange(len(items))  # in the first run, which records every item
    crashes = 0
    try:
        for run in range(40):
            if not outbox.due(now=t()):
                t.now = max(t.now, outbox.next_due())
            if run == 0:
                outbox.crash_after = crash_after
            with httpx.Client(timeout=TIMEOUT) as client:
                try:
                    uploader(client, server, outbox, t).run_once(
                        limit=rng.randint(1, 6) if run else len(items)
                    )
                except Crash:
                    crashes += 1
                    outbox = outbox.restarted()  # and a new client and uploader next turn
            if outbox.states()[DeltaState.ACKNOWLEDGED] == len(items):
                break
    finally:
        server.stop()
    assert crashes == 1 and sum(server.requests.values()) > len(items)
    assert outbox.states() == {DeltaState.ACKNOWLEDGED: len(items)}
    assert set(outbox.acks) == {i.idempotency_key for i in items}
    assert server.aggregated == dict.fromkeys(outbox.acks, 1)
    assert {k: a[0] for k, a in server.answers.items()} == {
        i.idempotency_key: i.body for i in items
    }


def test_a_lost_answer_is_resent_and_counted_once(
    client: httpx.Client, server: FaultServer
) -> None:
    items = sealed_items(2)
    server.plan.extend([Fault.LOST_RESPONSE, Fault.TRUNCATED, Fault.NONE, Fault.GARBAGE])
    outbox, t = outbox_with(items), FakeTime()
    report = uploader(client, server, outbox, t).run_once()
    assert report == UploadReport(acknowledged=2)
    assert server.aggregated == dict.fromkeys(outbox.acks, 1)
    assert sum(server.requests.values()) == 5


def test_short_retry_after_is_waited_for(client: httpx.Client, server: FaultServer) -> None:
    server.plan.extend([Fault.RATE_LIMITED, Fault.UNAVAILABLE_503])
    outbox, t = outbox_with(sealed_items(1)), FakeTime()
    assert uploader(client, server, outbox, t).run_once() == UploadReport(acknowledged=1)
    assert t.sleeps == [SHORT_RETRY_AFTER, SHORT_RETRY_AFTER]


def test_long_retry_after_ends_the_run_and_sets_the_next_attempt(
    client: httpx.Client, server: FaultServer
) -> None:
    server.plan.append(Fault.RATE_LIMITED_LONG)
    outbox, t = outbox_with(sealed_items(3)), FakeTime()
    start = t.now
    assert uploader(client, server, outbox, t).run_once() == UploadReport(retried=3)
    assert sum(server.requests.values()) == 1 and t.sleeps == []
    assert {r.next_at for r in outbox.rows.values()} == {
        start + timedelta(seconds=LONG_RETRY_AFTER)
    }
    t.now += timedelta(seconds=LONG_RETRY_AFTER)
    assert uploader(client, server, outbox, t).run_once() == UploadReport(acknowledged=3)


def test_backoff_grows_with_jitter_between_tries(client: httpx.Client, server: FaultServer) -> None:
    server.plan.extend([Fault.ERROR_500, Fault.DROP])
    outbox, t = outbox_with(sealed_items(1)), FakeTime()
    assert uploader(client, server, outbox, t).run_once() == UploadReport(acknowledged=1)
    first, second = t.sleeps
    assert 0 <= first <= RETRY.initial and 0 <= second <= 2 * RETRY.initial


def test_offline_keeps_deltas_pending_and_a_later_run_delivers_them(
    client: httpx.Client, server: FaultServer
) -> None:
    server.stop()  # the port is closed: connection refused
    outbox, t = outbox_with(sealed_items(4)), FakeTime()
    sent: list[httpx.Request] = []
    offline_client = httpx.Client(timeout=TIMEOUT, event_hooks={"request": [sent.append]})
    with offline_client:
        report = uploader(offline_client, server, outbox, t).run_once()
    assert report == UploadReport(offline=4)
    assert len(sent) == RETRY.attempts  # one delta tried, the run stopped there
    assert outbox.states() == {DeltaState.PENDING: 4}
    assert outbox.due(now=t()) == []
    assert all(
        r.item.attempts == 1 and r.next_at and r.next_at > t.now for r in outbox.rows.values()
    )

    server.start()  # same port, same state: back online later
    t.now = outbox.next_due()
    assert uploader(client, server, outbox, t).run_once() == UploadReport(acknowledged=4)
    assert server.aggregated == dict.fromkeys(outbox.acks, 1)


def test_a_closed_round_drops_the_delta(client: httpx.Client, server: FaultServer) -> None:
    server.closed_rounds.add(SPEC.round_id)
    outbox, t = outbox_with(sealed_items(2)), FakeTime()
    assert uploader(client, server, outbox, t).run_once() == UploadReport(dropped=2)
    assert {r.reason for r in outbox.rows.values()} == {"round_closed"}
    assert not server.aggregated


def test_same_key_with_another_body_is_dropped_as_malformed(
    client: httpx.Client, server: FaultServer
) -> None:
    first, other = sealed_items(1), sealed_items(1)  # same key, fresh HPKE: other bytes
    t = FakeTime()
    assert uploader(client, server, outbox_with(first), t).run_once().acknowledged == 1
    outbox = outbox_with(other)
    assert uploader(client, server, outbox, t).run_once() == UploadReport(dropped=1)
    assert next(iter(outbox.rows.values())).reason == "malformed"


def test_past_the_deadline_a_failing_delta_is_dropped(
    client: httpx.Client, server: FaultServer
) -> None:
    server.plan.extend([Fault.ERROR_500] * RETRY.attempts)
    outbox, t = outbox_with(sealed_items(1)), FakeTime()
    t.now = SPEC.deadline
    assert uploader(client, server, outbox, t).run_once() == UploadReport(dropped=1)
    assert next(iter(outbox.rows.values())).reason == "deadline_passed"


# -- releases --------------------------------------------------------------------------------

AGGREGATOR_KEY = Ed25519PrivateKey.generate()


def release_bytes(*, version: int = 4, model_id: str = MODEL_ID,
                  key: Ed25519PrivateKey = AGGREGATOR_KEY) -> bytes:  # fmt: skip
    release = sign_release(model_id=model_id, version=version, weights=np.ones(16),
                           created=PERIOD_START, signing_key=key, kid="eu-1")  # fmt: skip
    return release.to_wire()


def fetch(client: httpx.Client, server: FaultServer, etag: str | None = None) -> Fetched | None:
    return fetch_release(client, base_url=server.url, etag=etag,
                         verify_key=AGGREGATOR_KEY.public_key(), model_id=MODEL_ID,
                         current_version=3, retry=RETRY, sleep=FakeTime().sleep)  # fmt: skip


def test_release_is_fetched_then_not_modified(client: httpx.Client, server: FaultServer) -> None:
    server.release = release_bytes()
    server.plan.extend([Fault.TRUNCATED, Fault.UNAVAILABLE_503])
    fetched = fetch(client, server)
    assert fetched is not None and fetched.release.version == 4 and fetched.etag
    assert fetch(client, server, etag=fetched.etag) is None
    assert fetch(client, server, etag='"stale"') == fetched


@pytest.mark.parametrize(
    ("release", "error"),
    [
        (lambda: release_bytes(key=Ed25519PrivateKey.generate()), BadSignature),
        (lambda: release_bytes(model_id="ab" * 32), WrongModel),
        (lambda: release_bytes(version=3), WrongModelVersion),
        (lambda: release_bytes(version=2), WrongModelVersion),
    ],
    ids=["bad-signature", "wrong-model", "same-version", "older-version"],
)
def test_release_is_refused(
    client: httpx.Client, server: FaultServer, release: object, error: type[Exception]
) -> None:
    assert callable(release)
    server.release = release()
    with pytest.raises(error):
        fetch(client, server)


def test_release_without_an_aggregator_is_unavailable(
    client: httpx.Client, server: FaultServer
) -> None:
    server.stop()
    with pytest.raises(AggregatorUnavailable, match="cannot be reached"):
        fetch(client, server)


# -- enrollment ------------------------------------------------------------------------------


def test_enrollment_registers_the_period_key(client: httpx.Client, server: FaultServer) -> None:
    key = Ed25519PrivateKey.generate().public_key()
    server.plan.append(Fault.LOST_RESPONSE)  # enrolled, answer lost: enrolling again is fine
    enroll(client, base_url=server.url, token="app-token", device_public_key=key,
           period="2026-11-01", retry=RETRY, sleep=FakeTime().sleep)  # fmt: skip
    assert list(server.enrolled.values()) == ["2026-11-01"]


def test_enrollment_with_a_bad_token_is_refused(client: httpx.Client, server: FaultServer) -> None:
    key = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(EnrollmentRefused) as refused:
        enroll(client, base_url=server.url, token="stolen", device_public_key=key,
               period="2026-11-01", retry=RETRY, sleep=FakeTime().sleep)  # fmt: skip
    assert refused.value.code == "not_enrolled" and refused.value.reason == "not_enrolled"
    assert not server.enrolled


def test_only_the_transport_imports_httpx() -> None:
    root = Path(__file__).resolve().parents[2]
    # sim/ is a harness: it runs aggregators and talks to them like an operator would.
    folders = ("core", "device", "sync", "aggregator", "policy")
    users = [
        path.relative_to(root).as_posix()
        for folder in folders
        for path in sorted((root / folder).rglob("*.py"))
        if re.search(r"^\s*(import|from) httpx\b", path.read_text(encoding="utf-8"), re.M)
    ]
    assert users == ["sync/transport.py"]
