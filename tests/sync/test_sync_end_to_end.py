"""A device store, its real SQLite outbox and the uploader against a faulty server on loopback.

Every delta is acknowledged once and aggregated once, and no byte the device sends (bodies,
headers, URLs) carries a user id, device id, track id, artist id or event content.
"""

from __future__ import annotations

import random
import sqlite3
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from conftest import policy_publishing, policy_where_all_take_part, round_spec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from fault_server import FaultServer, random_plan

from sottovoce._demo import listen, make_catalog
from sottovoce.device import Eligibility, EventStore, Personalizer
from sottovoce.policy import Purpose
from sottovoce.sync import SealedDelta, open_delta
from sottovoce.sync.transport import RetryPolicy, Uploader

CANARIES = ["canary-user-5c1e", "canary-device-77aa", "canary-track-0b9d", "canary-artist-e3f2",
            "canary search words"]  # fmt: skip
START = datetime(2026, 11, 1, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = START + timedelta(days=2)

    def __call__(self) -> datetime:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deltas_from_a_real_outbox_arrive_once_and_carry_no_identifiers(
    seed: int, tmp_path: Path
) -> None:
    user, device_id, track, artist, query = CANARIES
    aggregator = X25519PrivateKey.generate()
    clock = Clock()
    # Every device in every round (q = 1), so that each of the three rounds queues a delta.
    policy = policy_where_all_take_part(policy_publishing("us", hpke=aggregator))
    store = EventStore.open(tmp_path / "d.db", policy=policy, region="us", clock=clock)
    tracks, rows = make_catalog(random.Random(seed))
    store.upsert_catalog([*rows, {"track_id": track, "artist_id": artist, "vector": [1.0] * 16}])
    events = listen(random.Random(seed), user, tracks, {1, 3}, 400)
    for event in events:
        event["device_id"] = device_id
    events.append(
        {
            "type": "play_end",
            "event_id": "canary-event",
            "user_id": user,
            "device_id": device_id,
            "track_id": track,
            "artist_id": artist,
            "ms_played": 200_000,
            "duration_ms": 200_000,
            "ts": events[-1]["ts"],
        }
    )
    events.append({"type": "search", "event_id": "canary-search", "user_id": user,
                   "query": query, "ts": events[-1]["ts"]})  # fmt: skip
    store.append_many(events)
    store.grant(user, Purpose.FEDERATED_TRAINING)
    device = Personalizer(store)
    keys = []
    for r in range(3):
        spec = round_spec(policy, "us", model_id=device.ranker.model_id, now=clock.now,
                          round_id=f"us-{seed}-{r}", noise_multiplier=1.1,
                          deadline=clock.now + timedelta(days=3), epsilon_spent=0.5 * r,
                          epsilon_after=0.5 * r + 0.5)  # fmt: skip
        keys.append(device.contribute(user, spec=spec, eligibility=Eligibility(True, True, True),
                                      steps=10))  # fmt: skip

    sent: list[bytes] = []

    def record(request: httpx.Request) -> None:  # the transport seam: all the device sends
        sent.append(str(request.url).encode() + b"\n" + b"".join(
            k + b": " + v + b"\n" for k, v in request.headers.raw) + request.read())  # fmt: skip

    server = FaultServer(plan=random_plan(seed, 30), delay=0.5).start()
    try:
        for _ in range(40):
            with httpx.Client(timeout=0.25, event_hooks={"request": [record]}) as client:
                Uploader(client, base_url=server.url, outbox=store, clock=clock,
                         retry=RetryPolicy(attempts=3, initial=0.5, maximum=4.0,
                                           max_retry_after=5.0),
                         sleep=clock.sleep).run_once()  # fmt: skip
            if store.outbox_states().get("acknowledged") == 3:
                break
            with closing(sqlite3.connect(store.path)) as conn:  # the store hands out none
                pending = conn.execute(
                    "SELECT min(next_attempt_ts) FROM outbox WHERE state = 'pending'"
                ).fetchone()[0]
            if pending is not None:  # wait, as the app's scheduler would, until it is due
                clock.now = max(clock.now, datetime.fromtimestamp(pending / 1000, tz=UTC))
    finally:
        server.stop()
    assert store.outbox_states() == {"acknowledged": 3}
    # each round was charged once to the device's own ledger (central mode: as it evaluated it)
    charged = sorted(c.round_id for c in store.privacy_history("us"))
    assert charged == [f"us-{seed}-{r}" for r in range(3)]
    assert set(server.aggregated) == set(keys) and set(server.aggregated.values()) == {1}
    for key in keys:  # what arrived is the sealed delta, openable by the region only
        body = server.answers[key][0]
        sealed = SealedDelta.from_wire(body)
        open_delta(sealed, region="us", round_id=sealed.round_id, model_version=0,
                   hpke_private_key=aggregator, clipping_norm=1.0)  # fmt: skip
    wire = b"\n".join(sent)
    assert wire, "nothing was sent"
    for canary in [*CANARIES, store.user_hash(user), "canary-event", "canary-search"]:
        assert canary.encode() not in wire, canary
    store.close()
