"""Taking part in a round: spec checks, sealing, and the transactional outbox in the store."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import NOW, fill_listening, policy_publishing, policy_where_all_take_part, round_spec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sottovoce.device import Eligibility, EventStore, Personalizer
from sottovoce.policy import ConsentMissing, Policy, Purpose
from sottovoce.sync import RoundSpec, SealedDelta, SpecRefused, open_delta, sample_into_round

READY = Eligibility(charging=True, unmetered=True, idle=True)


@pytest.fixture(scope="module")
def aggregator() -> tuple[X25519PrivateKey, Policy]:
    """The US aggregator's HPKE key, and a policy that publishes it."""
    key = X25519PrivateKey.generate()
    return key, policy_publishing("us", hpke=key)


def _open_device(path: Path, policy: Policy, *, secret: bytes | None = None) -> Personalizer:
    store = EventStore.open(path, policy=policy, region="us", clock=lambda: NOW,
                            device_secret=secret)  # fmt: skip
    fill_listening(store, "ann", events=600, consent=())  # each test grants what it needs
    return Personalizer(store)


@pytest.fixture
def device(tmp_path: Path, aggregator: tuple[X25519PrivateKey, Policy]) -> Personalizer:
    """A US device whose policy samples every device into every round (q = 1)."""
    return _open_device(tmp_path / "d.db", policy_where_all_take_part(aggregator[1]))


@pytest.fixture
def example_device(tmp_path: Path, aggregator: tuple[X25519PrivateKey, Policy]) -> Personalizer:
    """A US device under the example policy's own mechanism (q = 0.001, z >= 0.8, epsilon 8)."""
    return _open_device(tmp_path / "e.db", aggregator[1])


def _spec(device: Personalizer, **overrides: object) -> RoundSpec:
    """Round ``us-r1`` as the device's region's aggregator would open it at ``NOW`` (its 30-day
    budget period started 2026-10-04 and ends 2026-11-03T00:00Z: the deadline is before)."""
    fields: dict[str, Any] = {"round_id": "us-r1", "deadline": NOW + timedelta(hours=12),
                              "epsilon_spent": 1.0, "epsilon_after": 1.5,
                              "model_id": device.ranker.model_id,
                              "model_version": device.version, **overrides}  # fmt: skip
    region = fields.pop("region", "us")  # another region: the US round, relabelled
    spec: RoundSpec = round_spec(device.store.policy, "us", **fields)
    return RoundSpec.model_validate(spec.model_dump() | {"region": region})


def _charged(device: Personalizer) -> list[str]:
    return sorted(c.round_id for c in device.store.privacy_history("us"))


def test_a_round_is_sealed_and_queued_with_the_model_in_one_step(
    device: Personalizer, aggregator: tuple[X25519PrivateKey, Policy]
) -> None:
    store = device.store
    store.grant("ann", Purpose.FEDERATED_TRAINING)
    spec = _spec(device)
    key = device.contribute("ann", spec=spec, eligibility=READY, steps=20)
    assert key is not None
    (item,) = store.due(now=NOW)
    assert item.idempotency_key == key and item.round_id == "us-r1"
    opened = open_delta(SealedDelta.from_wire(item.body), region="us", round_id="us-r1",
                        model_version=spec.model_version, hpke_private_key=aggregator[0],
                        clipping_norm=1.0)  # fmt: skip
    assert float(np.linalg.norm(opened.delta)) <= 1.0 + 1e-5
    assert store.load_model(f"local:{store.user_hash('ann')}") is not None
    logged = [d.reason for _, d in store.decisions.query(action="contribute_delta")]
    assert logged == ["consent_given"]
    (charge,) = store.privacy_history("us")  # the device's own ledger has the round
    assert (charge.round_id, charge.period_start, charge.at) == ("us-r1", spec.period_start, NOW)
    assert (charge.mechanism.noise_multiplier, charge.mechanism.sampling_rate) == (0.8, 1.0)
    # asking again for the same round queues nothing new, and charges nothing more
    assert device.contribute("ann", spec=spec, eligibility=READY, steps=20) == key
    assert store.outbox_states() == {"pending": 1}
    assert _charged(device) == ["us-r1"]


def test_the_outbox_moves_forward_only(device: Personalizer) -> None:
    store = device.store
    store.grant("ann", Purpose.FEDERATED_TRAINING)
    key = device.contribute("ann", spec=_spec(device), eligibility=READY, steps=5)
    assert key is not None
    store.attempted(key, now=NOW, retry_at=NOW + timedelta(minutes=5))
    assert store.due(now=NOW) == [] and len(store.due(now=NOW + timedelta(minutes=5))) == 1
    store.acknowledge(key, now=NOW)
    store.drop(key, reason="round_closed", now=NOW)  # too late: acknowledged stays
    assert store.outbox_states() == {"acknowledged": 1}
    assert store.due(now=NOW + timedelta(days=1)) == []


def test_withdrawing_training_consent_purges_queued_deltas(device: Personalizer) -> None:
    store = device.store
    store.grant("ann", Purpose.FEDERATED_TRAINING)
    device.contribute("ann", spec=_spec(device), eligibility=READY, steps=5)
    report = store.withdraw("ann", Purpose.FEDERATED_TRAINING)
    assert report.deleted["outbox"] == 1 and store.outbox_states() == {}
    with pytest.raises(ConsentMissing):
        device.contribute("ann", spec=_spec(device, round_id="us-r2"), eligibility=READY)
    assert store.outbox_states() == {}
    # Without consent the device could not have taken part: the round is not charged. The
    # earlier round stays charged (the budget is the device's; a purge does not refund it).
    assert _charged(device) == ["us-r1"]


def test_a_spec_beyond_the_policy_is_refused_before_training(
    example_device: Personalizer,
) -> None:
    device, store = example_device, example_device.store
    store.grant("ann", Purpose.FEDERATED_TRAINING)
    changes: list[tuple[dict[str, object], str]] = [
        ({"epsilon_after": 9.0}, "epsilon"),  # the US budget is 8
        ({"clipping_norm": 5.0}, "clipping_norm"),
        ({"min_cohort": 2}, "min_cohort"),
        ({"mode": "local"}, "mode"),
        ({"region": "eu"}, "region"),
        ({"model_version": device.version + 1}, "model"),
        ({"model_id": "ab" * 32}, "model"),
        # the device's own ledger: the mechanism must be the policy's, in its current period
        ({"noise_multiplier": 0.79}, "noise_multiplier"),
        ({"sampling_rate": 1.0}, "sampling_rate"),
        ({"expected_cohort": 50.0}, "expected_cohort"),
        ({"period_start": NOW - timedelta(days=1)}, "period"),
    ]
    for change, rule in changes:
        with pytest.raises(SpecRefused) as refused:
            device.contribute("ann", spec=_spec(device, **change), eligibility=READY)
        assert refused.value.rule == rule, change
    assert store.outbox_states() == {}
    assert store.load_model(f"local:{store.user_hash('ann')}") is None  # nothing was trained
    assert _charged(device) == []  # nor charged
    logged = [d.reason for _, d in store.decisions.query(action="contribute_delta")]
    assert logged == ["budget_exhausted"] + ["spec_outside_policy"] * (len(changes) - 1)
    # The round as the aggregator opens it is taken (or left out by the coin) and charged.
    device.contribute("ann", spec=_spec(device), eligibility=READY, steps=1)
    assert _charged(device) == ["us-r1"]


def test_the_sampling_rate_keeps_most_devices_out(
    tmp_path: Path, aggregator: tuple[X25519PrivateKey, Policy]
) -> None:
    policy = policy_where_all_take_part(aggregator[1], sampling_rate=0.02, population=2000)
    secret = bytes(range(32))  # the test knows it; the store never hands it out
    device = _open_device(tmp_path / "q.db", policy, secret=secret)
    device.store.grant("ann", Purpose.FEDERATED_TRAINING)
    specs = [_spec(device, round_id=f"r{i}") for i in range(40)]
    assert {s.sampling_rate for s in specs} == {0.02} and specs[0].expected_cohort == 40.0
    taken = [device.contribute("ann", spec=spec, eligibility=READY, steps=1) for spec in specs]
    assert sum(k is not None for k in taken) <= 5
    # The device's secret coin decided, and only it: every other round queued nothing ...
    assert [k is not None for k in taken] == [sample_into_round(s, secret) for s in specs]
    assert device.store.outbox_states() == ({"pending": sum(k is not None for k in taken)}
                                            if any(taken) else {})  # fmt: skip
    # ... but every round it could have joined is charged (central mode, before the coin).
    assert _charged(device) == sorted(s.round_id for s in specs)


def test_a_release_is_installed_only_when_signed_by_the_pinned_key(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from sottovoce.device import DeviceError
    from sottovoce.sync import BadSignature, sign_release

    signer = Ed25519PrivateKey.generate()
    store = EventStore.open(tmp_path / "r.db", policy=policy_publishing("us", signing=signer),
                            region="us", clock=lambda: NOW)  # fmt: skip
    device = Personalizer(store)
    weights = device.global_weights * 0.5

    def release(version: int, key: Ed25519PrivateKey = signer, model: str | None = None) -> object:
        return sign_release(model_id=model or device.ranker.model_id, version=version,
                            weights=weights, created=datetime(2026, 11, 2, tzinfo=UTC),
                            signing_key=key, kid="us-sign-2026-11")  # fmt: skip

    device.install_release(release(2))  # type: ignore[arg-type]
    assert device.version == 2 and Personalizer(store).version == 2
    with pytest.raises(BadSignature):
        device.install_release(release(3, key=Ed25519PrivateKey.generate()))  # type: ignore[arg-type]
    with pytest.raises(DeviceError, match="not newer"):
        device.install_release(release(2))  # type: ignore[arg-type]
    with pytest.raises(DeviceError, match="release is for model"):
        device.install_release(release(4, model="ab" * 32))  # type: ignore[arg-type]
    assert Personalizer(store).version == 2
    store.close()
