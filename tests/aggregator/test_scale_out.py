"""One region, several worker processes, one PostgreSQL database: exactly once, whatever fails.

``sottovoce aggregator serve --db postgresql://... --workers 2`` runs on a PostgreSQL server of
this module's own (real, on loopback); devices enroll and upload over HTTP with sync's real
code, many at once, so the kernel spreads their connections over both workers. Each test opens
a round in process (the operator), uploads, and the operator closes the round with two sweeps
racing on two connections, with a seeded central noise, so the release is predictable:

- concurrency: replays of one upload (same idempotency key, same body) and a device trying twice
  under two keys land on both workers at once; every accepted delta counts once (contribution
  rows, the round's count, the workers' running sums merged = the exact sum of the accepted
  deltas), the round closes once (one release, one ledger entry), and the decision log is one
  Merkle log holding one entry per decision;
- SIGKILL of a worker while uploads are in flight: the parent starts another, the devices'
  retries (sync.transport's) all succeed, nothing is lost or counted twice;
- a PostgreSQL restart while uploads are in flight: uploads meet 503 ``unavailable`` or no
  answer, or wait for the server, and succeed when retried; exact count and sum after;
- the workers' own sweeps (twice a second each) race to end a round past its deadline: it is
  published once.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import numpy as np
import pytest
from scale_helpers import (
    TOKEN,
    Served,
    ServedRegion,
    Tally,
    Uploaded,
    delta,
    upload_until_acknowledged,
)
from service_helpers import Device

from sottovoce._pgserver import ThrowawayPostgres
from sottovoce.policy import DecisionLog
from sottovoce.sync import RoundSpec, SealedDelta, period_label
from sottovoce.sync.transport import RetryPolicy, enroll

pytest.importorskip("opacus")
pytest.importorskip("psycopg_pool")

WORKERS = 2
RETRY = RetryPolicy(attempts=4, initial=0.05, maximum=0.5)
CLIENTS = 12  # devices talking to the service at the same time
SWEEP_SECONDS = 0.5
RACE_ROUND = timedelta(seconds=8)  # a round the workers' own sweeps end, while the test waits


@dataclass
class Cluster:
    pg: ThrowawayPostgres
    region: ServedRegion
    service: Served


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A PostgreSQL server of this module's own (one test restarts it), one region database on
    it, and ``serve --workers 2`` on that database."""
    if os.environ.get("SOTTOVOCE_TEST_PG") == "off":
        pytest.skip("SOTTOVOCE_TEST_PG=off: no PostgreSQL for this run")
    root = tmp_path_factory.mktemp("scale_out")
    with ThrowawayPostgres() as pg:
        region = ServedRegion(root, pg.new_database("region"))
        # Each worker sweeps twice a second: both try to end a round past its deadline.
        options = ["--sweep-seconds", str(SWEEP_SECONDS)]
        with region.serve(workers=WORKERS, log=root / "serve.log", options=options) as service:
            yield Cluster(pg, region, service)


def enroll_all(cluster: Cluster, spec: RoundSpec, devices: list[Device]) -> None:
    def one(device: Device) -> None:
        with httpx.Client(timeout=20) as client:
            device.enroll(client, cluster.service.url, spec, token=TOKEN, retry=RETRY)

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(one, devices))


def post(url: str, sealed: SealedDelta) -> tuple[int, str]:
    """One upload on a connection of its own (so that the kernel may hand it to any worker)."""
    response = httpx.post(
        f"{url}/v1/rounds/{sealed.round_id}/deltas",
        content=sealed.to_wire(),
        headers={"Content-Type": "application/json", "Idempotency-Key": sealed.idempotency_key},
        timeout=30,
    )
    return response.status_code, response.json()["code"]


def check_closed_exactly_once(
    cluster: Cluster, spec: RoundSpec, accepted: dict[str, Any], decisions_before: Counter[Any]
) -> None:
    """Before the close: the round holds exactly ``accepted`` (key -> delta) in its rows, count
    and merged running sums; the close publishes it once, as predicted; the log verifies."""
    region = cluster.region
    before = region.state(spec.round_id)
    assert (before.state, before.count) == ("open", len(accepted))
    assert before.accepted_keys == sorted(accepted)
    assert before.partial is not None and before.partial.count == len(accepted)
    total = np.sum(np.array(list(accepted.values()), dtype=np.float64), axis=0)
    np.testing.assert_allclose(before.partial.total, total, rtol=0, atol=1e-9)

    ended = region.close_round(spec)
    assert sorted(ended) == [[], [spec.round_id]]  # two operators raced; one closed it
    after = region.state(spec.round_id)
    version = spec.model_version + 1
    assert (after.state, after.count, after.partial) == ("published", len(accepted), None)
    assert after.releases[-1] == version and after.releases.count(version) == 1
    assert after.ledger == [spec.round_id]
    np.testing.assert_allclose(region.release_weights(version),
                               region.expected_release(spec, list(accepted.values())),
                               rtol=0, atol=1e-6)  # fmt: skip

    new = region.decisions() - decisions_before
    assert new[("accept_delta", "within_policy")] == len(accepted)
    assert new[("publish_release", "deadline_reached")] == 1
    report, size, indexes = region.verify_log()
    assert report.ok, report.problems
    assert indexes == list(range(size))  # one sequence, whichever worker appended
    assert sum(region.decisions().values()) == size  # one entry per decision


def test_workers_count_every_delta_once_under_replays_and_duplicates(cluster: Cluster) -> None:
    region, url = cluster.region, cluster.service.url
    spec = region.open_round()
    decisions_before = region.decisions()
    plain, replayed, twice = 24, 8, 6
    devices = [Device.seeded(f"spread/{i}") for i in range(plain + replayed + twice)]
    enroll_all(cluster, spec, devices)
    hpke = region.keys.hpke.public_key()
    values = {i: delta(i, region.dim) for i in range(len(devices))}
    sealed = {i: d.seal(spec, values[i], hpke) for i, d in enumerate(devices)}
    # A device trying twice: a second delta under another idempotency key (same pseudonym).
    again = {i: delta(1000 + i, region.dim) for i in range(plain + replayed, len(devices))}
    seconds = {i: devices[i].seal(spec, again[i], hpke, idempotency_key=f"second-try-{i:06d}")
               for i in again}  # fmt: skip
    sends: list[tuple[str, SealedDelta]] = [("plain", sealed[i]) for i in range(plain)]
    sends += [("replay", sealed[i]) for i in range(plain, plain + replayed) for _ in range(3)]
    sends += [("first", sealed[i]) for i in seconds] + [("second", s) for s in seconds.values()]
    random.Random(7).shuffle(sends)
    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(lambda send: post(url, send[1]), sends))

    by_key: dict[str, list[tuple[int, str]]] = {}
    for (_, s), answer in zip(sends, answers, strict=True):
        by_key.setdefault(s.idempotency_key, []).append(answer)
    for i in range(plain + replayed):  # every copy of a replayed upload gets the first answer
        assert set(by_key[sealed[i].idempotency_key]) == {(200, "within_policy")}
    accepted = {sealed[i].idempotency_key: values[i] for i in range(plain + replayed)}
    for i, second in seconds.items():  # of a device's two keys, exactly one counts
        pair = sorted(by_key[sealed[i].idempotency_key] + by_key[second.idempotency_key])
        assert pair == [(200, "within_policy"), (409, "duplicate_contribution")], pair
        if by_key[second.idempotency_key] == [(200, "within_policy")]:
            accepted[second.idempotency_key] = again[i]
        else:
            accepted[sealed[i].idempotency_key] = values[i]
    state = region.state(spec.round_id)
    assert state.partials == WORKERS, "both workers accepted deltas (one running sum each)"
    new = region.decisions() - decisions_before
    assert new[("accept_delta", "duplicate_contribution")] == twice
    check_closed_exactly_once(cluster, spec, accepted, decisions_before)


def contribute_all(
    cluster: Cluster, spec: RoundSpec, name: str, count: int, *, fault: Callable[[], None],
    when: Callable[[int], bool],
) -> tuple[list[Uploaded], Tally, tuple[float, float]]:  # fmt: skip
    """``count`` devices enroll, then upload (:data:`CLIENTS` at a time, so that both workers
    always have uploads in flight) with sync's Uploader and its retries; ``fault`` runs once
    ``when(deltas accepted so far)`` holds, while uploads go on. Returns the devices'
    outcomes, their requests and when the fault began and ended."""
    devices = [Device.seeded(f"{name}/{i}") for i in range(count)]
    enroll_all(cluster, spec, devices)
    tally = Tally()

    def one(i: int) -> Uploaded:
        return upload_until_acknowledged(cluster.region, cluster.service.url, devices[i], spec,
                                         delta(i, cluster.region.dim), tally=tally,
                                         retry=RETRY)  # fmt: skip

    window: list[float] = []

    def watch() -> None:
        deadline = time.monotonic() + 60
        with cluster.region.reading() as conn:
            while time.monotonic() < deadline:
                (accepted,) = conn.execute(
                    "SELECT count FROM rounds WHERE round_id = ?", (spec.round_id,)
                ).fetchone()
                if when(int(accepted)):
                    window.append(time.monotonic())
                    fault()
                    window.append(time.monotonic())
                    return
                time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(CLIENTS) as pool:
        outcomes = list(pool.map(one, range(count)))
    watcher.join()
    assert len(window) == 2, "the fault never happened"
    assert all(o.acknowledged for o in outcomes), [o.outbox.states for o in outcomes]
    return outcomes, tally, (window[0], window[1])


def test_a_killed_worker_is_replaced_and_no_delta_is_lost_or_doubled(cluster: Cluster) -> None:
    region, service = cluster.region, cluster.service
    spec = region.open_round()
    decisions_before = region.decisions()
    before = service.workers()
    assert len(before) == WORKERS
    killed: list[int] = []
    held: list[int] = []  # the device connections the killed worker held

    def kill_a_busy_worker() -> None:
        # The worker holding the most device connections at the moment: uploads are cut. One
        # device is on a slow network, its upload's body still arriving, so that some worker
        # holds a device's connection however fast the others' uploads are decided.
        host, port = service.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as slow:
            slow.sendall(f"POST /v1/rounds/{spec.round_id}/deltas HTTP/1.1\r\nHost: {host}\r\n"
                         "Content-Type: application/json\r\nContent-Length: 100000\r\n"
                         "Idempotency-Key: slow-device-upload-0001\r\n\r\n{".encode())  # fmt: skip
            deadline = time.monotonic() + 10
            while not any((busy := service.connections()).values()):
                assert time.monotonic() < deadline, "no worker holds a device's connection"
                time.sleep(0.001)
            killed.append(max(busy, key=lambda pid: busy[pid]))
            held.append(busy[killed[0]])
            os.kill(killed[0], signal.SIGKILL)

    # Early in a long enough run that uploads are in flight when the kill comes, however fast
    # the machine decides them.
    devices = 80
    outcomes, tally, _ = contribute_all(cluster, spec, "kill", devices, fault=kill_a_busy_worker,
                                        when=lambda n: n >= devices // 4)  # fmt: skip
    answered = {o for o in tally.outcomes if isinstance(o, int)}
    cut = sum(n for o, n in tally.outcomes.items() if isinstance(o, str))
    assert answered == {200}, tally.outcomes  # nothing refused, nothing answered 5xx
    # It was killed holding device connections; whether one of them had a request in flight
    # at that instant is up to the timing (the tally says how many were cut).
    assert held and held[0] >= 1
    # The parent started a new worker in the killed one's place.
    deadline = time.monotonic() + 30
    while (now := service.workers()) == before or len(now) != WORKERS:
        assert time.monotonic() < deadline, service.tail()
        time.sleep(0.05)
    assert killed[0] not in now and set(before) - set(killed) <= set(now)
    accepted = {o.sealed.idempotency_key: o.values for o in outcomes}
    check_closed_exactly_once(cluster, spec, accepted, decisions_before)
    print(f"a worker killed: {cut} requests cut, all retried")


def test_postgres_restarting_mid_round_costs_retries_not_deltas(cluster: Cluster) -> None:
    region = cluster.region
    spec = region.open_round()
    decisions_before = region.decisions()
    devices = 40
    outcomes, tally, (stop, start) = contribute_all(cluster, spec, "restart", devices,
                                                    fault=cluster.pg.restart,
                                                    when=lambda n: n >= devices // 4)  # fmt: skip
    during = Counter(tally.during(stop, start))
    assert during, "no upload was in flight while PostgreSQL restarted"
    # Uploads met the restart as 503 unavailable, no answer, or a wait: never another answer.
    assert {o for o in tally.outcomes if isinstance(o, int)} <= {200, 503}, tally.outcomes
    accepted = {o.sealed.idempotency_key: o.values for o in outcomes}
    check_closed_exactly_once(cluster, spec, accepted, decisions_before)
    print(
        f"PostgreSQL restarted in {start - stop:.2f} s; requests in flight then: "
        f"{dict(during)}; all requests: {dict(tally.outcomes)}"
    )


def test_the_workers_own_sweeps_end_a_round_once(cluster: Cluster) -> None:
    """Both workers sweep twice a second; when the round's deadline passes, both try to end
    it, and it is published once (its central noise is the service's own, from the OS)."""
    region, url = cluster.region, cluster.service.url
    with region.operator() as agg:
        period = agg.enrollable_periods()[1]
    devices = [Device.seeded(f"race/{i}") for i in range(10)]
    # The service's clock, from the time it stamps on a decision (SOTTOVOCE_NOW, then real time).
    asked = time.monotonic()
    with httpx.Client(timeout=20) as client:
        enroll(client, base_url=url, token=TOKEN, device_public_key=devices[0].key.public_key(),
               period=period, retry=RETRY)  # fmt: skip
    with region.reading() as conn:
        stamped = list(DecisionLog(conn).query(action="enroll_device"))[-1][1].at
    region.clock.now = stamped + timedelta(seconds=time.monotonic() - asked)  # never behind it
    spec = region.open_round(RACE_ROUND)
    assert period == period_label(spec)
    decisions_before = region.decisions()
    enroll_all(cluster, spec, devices[1:])
    hpke = region.keys.hpke.public_key()
    values = [delta(5000 + i, region.dim) for i in range(len(devices))]
    sealed = [d.seal(spec, v, hpke) for d, v in zip(devices, values, strict=True)]
    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(lambda s: post(url, s), sealed))
    assert answers == [(200, "within_policy")] * len(devices)
    before = region.state(spec.round_id)
    assert (before.state, before.count) == ("open", len(devices)), "uploads outlasted the round"
    total = np.sum(np.array(values, dtype=np.float64), axis=0)
    assert before.partial is not None
    np.testing.assert_allclose(before.partial.total, total, rtol=0, atol=1e-9)

    deadline = time.monotonic() + RACE_ROUND.total_seconds() + 30
    while (after := region.state(spec.round_id)).state == "open":
        assert time.monotonic() < deadline, "no worker ended the round"
        time.sleep(0.1)
    time.sleep(3 * SWEEP_SECONDS)  # every worker swept again after the round ended
    after = region.state(spec.round_id)
    version = spec.model_version + 1
    assert (after.state, after.count, after.partial) == ("published", len(devices), None)
    assert after.releases.count(version) == 1 and after.ledger == [spec.round_id]
    new = region.decisions() - decisions_before
    assert new[("publish_release", "deadline_reached")] == 1
    report, size, indexes = region.verify_log()
    assert report.ok, report.problems
    assert indexes == list(range(size))
    # The release is the previous weights + (the exact sum + noise of scale z C) / 5: what is
    # left once the sum is taken out is noise of the policy's scale, centred on zero.
    previous = region.base
    if spec.model_version > 0:
        previous = region.release_weights(spec.model_version).astype(np.float64)
    noise = (region.release_weights(version) - previous) * spec.expected_cohort - total
    scale = spec.noise_multiplier * spec.clipping_norm
    assert 0.95 * scale < float(np.std(noise)) < 1.05 * scale
    assert abs(float(np.mean(noise))) < 0.05 * scale
