"""A permanent refusal stops the uploader at once: the device's upload is sent once, never again.

The real service on uvicorn (127.0.0.1) answers; the real :class:`Uploader` and the outbox's
pure ``decide`` act on the answer. Which refusals are permanent is the ``final`` column of the
registry of reason codes (``sottovoce.policy._reasons``); ``too_large`` was once missing from
the outbox's own list, and a device resent an upload that could never succeed until the
round's deadline.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from aggregator_helpers import Clock
from service_helpers import FAST_RETRY, Device, MemoryOutbox, Region, serve, small

from sottovoce.policy import DecisionLog
from sottovoce.policy._reasons import reason
from sottovoce.sync import DeltaState
from sottovoce.sync.transport import Uploader


@pytest.mark.parametrize("code", ["too_large", "not_enrolled"])
def test_a_final_refusal_drops_the_upload_after_one_attempt(tmp_path: Path, code: str) -> None:
    assert reason(code).final
    region = Region(tmp_path / "eu.db")
    # A body limit below a sealed delta's size makes the service answer 413 too_large.
    limit = {"too_large": {"max_body_bytes": 512}, "not_enrolled": {}}[code]
    device = Device.seeded(f"final/{code}")
    with serve(region.app(**limit)) as url, httpx.Client(timeout=10.0) as client:
        if code == "too_large":
            device.enroll(client, url, region.spec)
        sealed = device.seal(region.spec, small(1), region.keys.hpke.public_key())
        assert len(sealed.to_wire()) > 512
        outbox, clock = MemoryOutbox(), Clock()
        outbox.add(sealed, region.spec.deadline)
        uploader = Uploader(client, base_url=url, outbox=outbox, clock=clock, retry=FAST_RETRY)
        first = uploader.run_once()
        # Hours later, well before the round's deadline: nothing is left to send.
        clock.now = region.spec.deadline - timedelta(minutes=1)
        later = uploader.run_once()
    assert (first.dropped, first.retried, first.acknowledged) == (1, 0, 0)
    assert (later.dropped, later.retried, later.acknowledged, later.offline) == (0, 0, 0, 0)
    assert outbox.states[sealed.idempotency_key] == (DeltaState.DROPPED, code)
    assert outbox.attempts == {}  # never put off for another try
    # The service logs every refusal it answers: exactly one attempt reached it.
    with closing(sqlite3.connect(region.path)) as conn:
        refused = [d.reason for _, d in DecisionLog(conn).query(action="accept_delta")]
    assert refused == [code]
