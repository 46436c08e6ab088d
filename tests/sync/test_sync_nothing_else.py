"""Nothing but the sealed delta and its documented metadata leaves the device.

A real device store is filled with canary user, device, track, artist and context ids, the
device trains on them, and the delta is sealed. No canary, and no text value anywhere in the
store file, may appear in the bytes sent, nor in the plaintext the aggregator decrypts.
"""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Events, StoreFactory, consenting
from sync_helpers import Parties, documented_fields, make_spec

from sottovoce.device import ITEM_DIM, Eligibility, Personalizer
from sottovoce.policy import Policy, Purpose
from sottovoce.sync import SealedDelta, check_spec, idempotency_key, period_label, pseudonym
from sottovoce.sync._seal import SUITE, _info
from sottovoce.sync._wire import b64decode, b64encode

USER = "canary-user-7f3a9c"
DEVICE = "canary-device-51e2d0"


def test_a_sealed_delta_has_exactly_the_documented_fields() -> None:
    documented = documented_fields("SealedDelta")
    assert documented == list(SealedDelta.model_fields)
    sent = json.loads(Parties().seal(np.ones(4), make_spec()).to_wire())
    assert sorted(sent) == sorted(documented)
    assert all(isinstance(value, str | int) for value in sent.values())


def _canary_history(store_events: Events, tracks: list[str]) -> list[dict[str, object]]:
    rng = random.Random(7)
    history: list[dict[str, object]] = [
        store_events("context", device_id=DEVICE, device_type="phone", network="wifi",
                     local_time="21:30"),
        store_events("search", device_id=DEVICE, query="canary-query-e4b1"),
    ]  # fmt: skip
    for _ in range(150):
        track = rng.choice(tracks)
        loved = int(track[-2:]) < 10
        ids: dict[str, Any] = {
            "track_id": track,
            "artist_id": f"canary-artist-{track[-2:]}",
            "device_id": DEVICE,
        }
        history.append(store_events("play_start", duration_ms=200_000, context_type="playlist",
                                    context_id="canary-playlist-9d0c", **ids))  # fmt: skip
        played = 200_000 if loved or rng.random() < 0.2 else rng.randint(1_000, 9_000)
        history.append(store_events("play_end", ms_played=played, duration_ms=200_000, **ids))
        if loved and rng.random() < 0.3:
            history.append(store_events("like", **ids))
    return history


def _store_strings(path: Path) -> set[str]:
    """Every text value in every table of the device's store file."""
    found: set[str] = set()
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for row in db.execute(f'SELECT * FROM "{table}"'):
                found.update(v for v in row if isinstance(v, str))
    return found


def test_no_device_data_reaches_the_wire(
    tmp_path: Path, policy: Policy, open_store: StoreFactory
) -> None:
    tracks = [f"canary-track-{i:02d}" for i in range(40)]
    rng = np.random.default_rng(3)
    store = open_store("us", name="canary.db")
    store.upsert_catalog(
        {"track_id": t, "artist_id": f"canary-artist-{t[-2:]}", "title": f"canary-title-{t[-2:]}",
         "vector": rng.normal(size=ITEM_DIM).tolist()} for t in tracks
    )  # fmt: skip
    consenting(store, USER, Purpose.PERSONALIZATION, Purpose.FEDERATED_TRAINING)
    history = _canary_history(Events(USER), tracks)
    store.append_many(history)
    local = Personalizer(store).local_round(
        USER, eligibility=Eligibility(charging=True, unmetered=True, idle=True), steps=20
    )
    assert np.any(local.delta != 0)

    spec = make_spec(region="us", round_id="us-r1", min_cohort=20)
    check_spec(spec, policy.region("us"))
    parties = Parties()
    sealed = parties.seal(local.delta, spec)
    wire = sealed.to_wire()
    envelope = sealed.model_dump(exclude={"enc", "ciphertext"})
    plaintext = SUITE.decrypt(
        b64decode(sealed.enc) + b64decode(sealed.ciphertext), parties.aggregator,
        info=_info(envelope),
    )  # fmt: skip

    canaries = {USER, DEVICE, "canary-query-e4b1", "canary-playlist-9d0c", *tracks}
    canaries |= {str(value) for event in history for value in event.values()
                 if isinstance(value, str) and len(value) >= 6}  # fmt: skip
    store_path = tmp_path / "canary.db"
    store.close()
    stored = {s for s in _store_strings(store_path) if len(s) >= 8}
    assert USER not in stored  # the store keeps a salted hash of the user id ...
    assert len(stored) > 50  # ... and plenty else, none of which may leave
    for secret in sorted(canaries | stored):
        for form in _encodings(secret):
            assert form not in wire, f"{secret!r} reached the wire"
            assert form not in plaintext, f"{secret!r} reached the sealed plaintext"
    # What does leave is what the protocol lists: the round's context, the pseudonym, the key.
    period = period_label(spec)
    assert envelope == {
        "protocol": 1, "region": "us", "round_id": "us-r1", "model_version": 3,
        "period": period, "pseudonym": pseudonym(parties.device_secret, period),
        "device_key": b64encode(parties.device_key.public_key().public_bytes_raw()),
        "idempotency_key": idempotency_key(parties.device_secret, spec=spec, period=period),
    }  # fmt: skip


def _encodings(value: str) -> list[bytes]:
    raw = value.encode("utf-8")
    forms = [raw, raw.hex().encode(), value.encode("utf-16-le")]
    forms += [s.encode() for s in (value.upper(), value.lower()) if len(s) >= 6]
    return forms


@pytest.mark.parametrize("heading", ["RoundSpec", "SignedRoundSpec", "ModelRelease"])
def test_every_message_is_documented_field_by_field(heading: str) -> None:
    from sottovoce import sync

    model = getattr(sync, heading)
    assert documented_fields(heading) == list(model.model_fields)
