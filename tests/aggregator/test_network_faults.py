"""Exactly-once aggregation through a faulty network: devices, a fault proxy, the real service.

Devices enroll and upload with sync's real transport (:class:`Uploader` over their own outboxes
and clocks) through :class:`fault_proxy.FaultProxy` to the aggregator on uvicorn on 127.0.0.1.
The proxy drops, delays, stalls, resets, answers 5xx, truncates requests and answers, and
duplicates requests. Whatever it does, every delta must be aggregated exactly once: when the
round ends at its deadline (the service's schedule publishes it) it holds one contribution per
device, each idempotency key has exactly one ``within_policy`` decision and no refusal, every
outbox item ends acknowledged, the decision log verifies, and the release is the base plus the
noised sum of exactly these deltas over the round's fixed expected cohort.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from aggregator_helpers import Clock
from fault_proxy import FAULTS, Fault, FaultProxy, running
from service_helpers import (
    MODEL_ID,
    SWEEP_SECONDS,
    Device,
    MemoryOutbox,
    Region,
    RoundRow,
    serve,
    small,
)

from sottovoce.sync import AggregatorUnavailable, DeltaState, SealedDelta
from sottovoce.sync.transport import RetryPolicy, Uploader, fetch_release

pytest.importorskip("opacus")

DEVICES = 30
CLIENT_TIMEOUT = 1.0  # the proxy's stall outlasts it: the device gives up, the delta arrives
STALL = 1.3
RETRY = RetryPolicy(attempts=4, initial=0.01, maximum=0.05)
WORKERS = 8  # devices uploading at the same time
MAX_RUNS = 12  # upload runs per device before the test calls it stuck


@dataclass
class Outcome:
    """What one device did: its sealed delta and its outbox at the end."""

    sealed: SealedDelta
    delta: npt.NDArray[np.float32]
    outbox: MemoryOutbox


def contribute(region: Region, url: str, index: int, seed: int) -> Outcome:
    """One device's part: enroll (again when unanswered), seal, upload until the outbox is done.

    Between runs the device's clock jumps to the outbox's next attempt time, so the outbox's
    backoff decides when to resend, without the test sleeping through it.
    """
    device, delta = Device.seeded(f"{seed}/{index}"), small(index)
    with httpx.Client(timeout=CLIENT_TIMEOUT) as client:
        tries = 0
        while True:
            tries += 1
            try:
                device.enroll(client, url, region.spec, retry=RETRY)
                break
            except AggregatorUnavailable:
                if tries >= MAX_RUNS:
                    raise
        sealed = device.seal(region.spec, delta, region.keys.hpke.public_key())
        outbox, clock = MemoryOutbox(), Clock()
        outbox.add(sealed, region.spec.deadline)
        uploader = Uploader(client, base_url=url, outbox=outbox, clock=clock, retry=RETRY)
        runs = 0
        while outbox.pending() and runs < MAX_RUNS:
            runs += 1
            uploader.run_once()
            if outbox.pending():
                clock.now = outbox.retry_at[sealed.idempotency_key]
    return Outcome(sealed, delta, outbox)


def run_cohort(
    region: Region, devices: int, proxy_factory: Callable[[str], FaultProxy]
) -> tuple[list[Outcome], FaultProxy]:
    """All devices through the proxy, then the deadline; returns their outcomes and the proxy."""
    app = region.app(sweep_seconds=SWEEP_SECONDS)
    with serve(app) as url, running(proxy_factory(url)) as proxy:
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            outcomes = list(
                pool.map(lambda i: contribute(region, proxy.url, i, proxy.seed), range(devices))
            )
        # Every device is in, and the round waits for its deadline; then the schedule ends it.
        row = region.round_row()
        assert row is not None and (row.state, row.count) == ("open", devices)
        assert region.end_round() == RoundRow("published", devices, None)
        # Devices fetch the release through the same network; a lost answer is fetched again.
        with httpx.Client(timeout=CLIENT_TIMEOUT) as client:
            for _ in range(3):
                fetched = None
                for _ in range(MAX_RUNS):
                    try:
                        fetched = fetch_release(
                            client,
                            base_url=proxy.url,
                            verify_key=region.keys.signing.public_key(),
                            model_id=MODEL_ID,
                            current_version=0,
                            retry=RETRY,
                        )
                        break
                    except AggregatorUnavailable:
                        continue
                assert fetched is not None
                assert fetched.release == region.latest_release()
            metrics = httpx.get(f"{url}/v1/metrics").text.splitlines()
        assert f"sottovoce_deltas_accepted_total {devices}" in metrics
    return outcomes, proxy


def check_exactly_once(region: Region, outcomes: list[Outcome], cohort: int) -> None:
    assert len(outcomes) == cohort
    for outcome in outcomes:
        key = outcome.sealed.idempotency_key
        assert outcome.outbox.states == {key: (DeltaState.ACKNOWLEDGED, None)}, outcome
    row = region.round_row()
    assert row is not None and (row.state, row.count) == ("published", cohort)
    keys = sorted(o.sealed.idempotency_key for o in outcomes)
    assert region.accepted_keys() == keys
    accepted = [d for d in region.decisions() if d.reason == "within_policy"]
    refused = [d for d in region.decisions() if d.outcome.value == "deny"]
    assert refused == []  # a lost answer or a duplicate is never refused, nor counted again
    assert len(accepted) == cohort
    digests = sorted(d.inputs_digest for d in accepted)
    expected = sorted(region.upload_digest(o.sealed.idempotency_key, o.sealed.to_wire())
                      for o in outcomes)  # fmt: skip
    assert digests == expected  # each key's upload decided once, as accepted
    assert [d.reason for d in region.decisions("publish_release")] == ["deadline_reached"]
    report = region.verify_log()
    assert report.ok, report.problems
    release = region.latest_release()
    assert release is not None and release.version == 1
    np.testing.assert_allclose(
        release.weights_array(),
        region.expected_release([o.delta for o in outcomes]),
        rtol=0,
        atol=1e-6,
    )


def _cohort_through_a_seeded_fault_mix(tmp_path: Path, seed: int, *, every_fault: bool) -> None:
    region = Region(tmp_path / "aggregator.db")
    started = time.monotonic()
    outcomes, proxy = run_cohort(
        region, DEVICES, lambda url: FaultProxy(url, seed=seed, rate=0.3, stall=STALL)
    )
    elapsed = time.monotonic() - started
    check_exactly_once(region, outcomes, DEVICES)
    counts = proxy.counts
    total = sum(counts.values())
    faulted = total - counts[Fault.NONE]
    assert 0.15 < faulted / total < 0.45, counts
    if every_fault:
        assert set(FAULTS) <= set(counts), f"a fault never fired: {counts}"
    # Retries really happened: more requests than devices' enrollments, uploads and fetches.
    assert total > 2 * DEVICES + 3
    assert elapsed < 30, f"the faulty cohort took {elapsed:.1f} s"


def test_a_cohort_through_a_faulty_network_is_aggregated_exactly_once(tmp_path: Path) -> None:
    _cohort_through_a_seeded_fault_mix(tmp_path, seed=8, every_fault=True)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_more_seeded_fault_mixes(tmp_path: Path, seed: int) -> None:
    _cohort_through_a_seeded_fault_mix(tmp_path, seed=seed, every_fault=False)


@pytest.mark.parametrize("fault", FAULTS, ids=str)
def test_each_fault_on_every_first_attempt(tmp_path: Path, fault: Fault) -> None:
    """Every device's first upload (and the first enrollment) meets ``fault``; one at a time,
    so a failure names the fault that broke exactly-once."""
    region = Region(tmp_path / "aggregator.db")
    outcomes, proxy = run_cohort(
        region,
        3,
        lambda url: FaultProxy(url, seed=0, rate=1.0, faults=[fault], first_only=True, stall=STALL),
    )
    check_exactly_once(region, outcomes, 3)
    counts = proxy.counts
    # Three first uploads, three first enrollments and the first release fetch met the fault.
    assert counts[fault] == 3 + 3 + 1, counts
    for outcome in outcomes:
        key = outcome.sealed.idempotency_key
        sent, received = proxy.requests(key), proxy.forwarded(key)
        if fault is Fault.DELAY:
            assert (sent, received) == (1, 1)  # late, but answered
        elif fault is Fault.DUPLICATE:
            assert (sent, received) == (1, 2)  # received twice, counted once
        elif fault in (Fault.TRUNCATED_RESPONSE, Fault.STALL):
            assert (sent, received) == (2, 2)  # acted on, answer lost, resent, counted once
        else:
            assert (sent, received) == (2, 1)  # lost on the way in, resent
