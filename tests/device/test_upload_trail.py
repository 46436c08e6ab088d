"""Did a user's model update leave the device? The access export, the decision log and the audit
report say what was queued for which round, its size, and when the aggregator acknowledged or
the device dropped it; never the update, its pseudonym or its idempotency key."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from conftest import NOW, fill_listening, policy_publishing, policy_where_all_take_part, round_spec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sottovoce.device import Eligibility, EventStore, Personalizer
from sottovoce.policy import Policy
from sottovoce.sync import SealedDelta
from sottovoce.sync.transport import Uploader

READY = Eligibility(charging=True, unmetered=True, idle=True)
SENT = NOW + timedelta(minutes=1)


@pytest.fixture(scope="module")
def policy() -> Policy:
    """The example policy with a US aggregator key of our own, every device in every round."""
    return policy_where_all_take_part(policy_publishing("us", hpke=X25519PrivateKey.generate()))


def _answer(request: httpx.Request) -> httpx.Response:
    """The aggregator takes round us-r1's update and refuses us-r2's for good."""
    if request.url.path == "/v1/rounds/us-r1/deltas":
        return httpx.Response(200, json={"status": "accepted"})
    return httpx.Response(400, json={"code": "norm_exceeded", "message": "too large a norm"})


def test_uploads_and_their_outcomes_are_in_the_export_the_log_and_the_report(
    tmp_path: Path, policy: Policy
) -> None:
    path = tmp_path / "device.db"
    clock = [NOW]  # the device's clock: NOW while it trains, SENT when it uploads
    store = EventStore.open(path, policy=policy, region="us", clock=lambda: clock[0])
    fill_listening(store, "ann", events=300)
    device = Personalizer(store)
    for round_id in ("us-r1", "us-r2"):
        spec = round_spec(policy, "us", model_id=device.ranker.model_id, round_id=round_id,
                          model_version=device.version, deadline=NOW + timedelta(hours=12),
                          epsilon_spent=1.0, epsilon_after=1.5)  # fmt: skip
        assert device.contribute("ann", spec=spec, eligibility=READY, steps=3) is not None
    queued = store.due(now=NOW)
    secrets = [s for item in queued for s in (item.idempotency_key,
               SealedDelta.from_wire(item.body).pseudonym)]  # fmt: skip
    sizes = {item.round_id: len(item.body) for item in queued}

    clock[0] = SENT
    with httpx.Client(transport=httpx.MockTransport(_answer)) as client:
        sent = Uploader(client, base_url="https://us.example", outbox=store,
                        clock=store.now).run_once()  # fmt: skip
    assert (sent.acknowledged, sent.dropped) == (1, 1)
    entries = store.decisions.size
    store.acknowledge(queued[0].idempotency_key, now=SENT)  # again: nothing moves, nothing logged
    assert store.decisions.size == entries

    exported = store.export_user("ann")
    assert exported["uploads"] == [
        {"round_id": "us-r1", "region": "us", "state": "acknowledged", "reason": None,
         "retries": 0, "bytes": sizes["us-r1"], "queued_at": NOW.isoformat(),
         "deadline": (NOW + timedelta(hours=12)).isoformat(), "finished_at": SENT.isoformat()},
        {"round_id": "us-r2", "region": "us", "state": "dropped", "reason": "norm_exceeded",
         "retries": 0, "bytes": sizes["us-r2"], "queued_at": NOW.isoformat(),
         "deadline": (NOW + timedelta(hours=12)).isoformat(), "finished_at": SENT.isoformat()},
    ]  # fmt: skip
    trail = [d for d in exported["decisions"] if d["action"] == "contribute_delta"]
    assert [(d["reason"], d["metrics"]["round"]) for d in trail] == [
        ("consent_given", "us-r1"), ("consent_given", "us-r2"),
        ("delta_acknowledged", "us-r1"), ("delta_dropped", "us-r2")]  # fmt: skip
    assert trail[0]["metrics"] == {"round": "us-r1", "model_version": device.version,
                                   "period": trail[0]["metrics"]["period"],
                                   "bytes": sizes["us-r1"],
                                   "deadline": (NOW + timedelta(hours=12)).isoformat()}  # fmt: skip
    assert trail[2]["at"].startswith("2026-11-02T09:01:00")
    assert trail[3]["metrics"]["cause"] == "norm_exceeded"
    assert "acknowledged the update for round us-r1" in trail[2]["sentence"]
    # An entry and the one that queued it carry one digest: the trail is linked, not guessed.
    assert trail[0]["inputs_digest"] == trail[2]["inputs_digest"] != trail[1]["inputs_digest"]
    log = b"".join(store.decisions.entry(i) for i in range(store.decisions.size))
    assert not [s for s in secrets if s.encode() in log], "no key or pseudonym in the log"
    store.close()
    with sqlite3.connect(path) as conn:  # a finished update keeps its size, not its body
        rows = conn.execute("SELECT round_id, length(body), bytes FROM outbox ORDER BY round_id")
        assert rows.fetchall() == [("us-r1", 0, sizes["us-r1"]), ("us-r2", 0, sizes["us-r2"])]

    report = tmp_path / "report.html"
    run = subprocess.run([sys.executable, "-m", "sottovoce", "audit", "report", str(path),
                          "-o", str(report)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "SOTTOVOCE_NOW": SENT.isoformat()},
                         check=False)  # fmt: skip
    assert report.exists(), run.stdout + run.stderr
    uploads = report.read_text().split('<section id="uploads">')[1].split("</section>")[0]
    assert "Model updates sent from the device" in uploads
    assert (f"<td>us</td><td>us-r1</td><td>2026-11-02 09:00:00Z</td>"
            f'<td class="num">{sizes["us-r1"]}</td><td>acknowledged</td>'
            "<td>2026-11-02 09:01:00Z</td>") in uploads  # fmt: skip
    assert "<td>us-r2</td>" in uploads and "<td>dropped (norm_exceeded)</td>" in uploads
