"""Rounds end to end in process: real SQLite files, real sealed deltas, the real ledger."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from aggregator_helpers import COHORT, DIM, T0, Clock, Keys
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sottovoce.aggregator import BudgetExceeded
from sottovoce.aggregator._rounds import RegionAggregator, RoundStillOpen
from sottovoce.policy import Policy
from sottovoce.sync import (
    RoundSpec,
    SealedDelta,
    new_device_secret,
    period_label,
    seal_delta,
    verify_release,
    verify_round_spec,
)
from sottovoce.sync._seal import SUITE, _info, _pack, _statement
from sottovoce.sync._wire import X25519_ENC_BYTES, b64encode

pytest.importorskip("opacus")

MODEL_ID = "ab" * 32
SIGMA, Q = 1.0, 0.01  # a round costs well under the budget of 4


@dataclass
class Device:
    secret: bytes = field(default_factory=new_device_secret)
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    @property
    def public(self) -> str:
        return b64encode(self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    def seal(
        self, delta: npt.ArrayLike, spec: RoundSpec, hpke: X25519PrivateKey, **kw: Any
    ) -> SealedDelta:
        return seal_delta(
            delta=delta,
            spec=spec,
            device_secret=self.secret,
            signing_key=self.key,
            aggregator_hpke_key=hpke.public_key(),
            rng=np.random.default_rng(0),
            **kw,
        )


class World:
    """An aggregator on a file, its keys and clock, and enrolled devices."""

    def __init__(self, path: Path, keys: Keys, policy: Policy, *, seed: int = 7) -> None:
        self.path, self.keys, self.policy, self.seed = path, keys, policy, seed
        self.clock = Clock()
        self.base = np.linspace(-1, 1, DIM)
        self.conn = sqlite3.connect(path)
        self.agg = self.build()

    def build(self) -> RegionAggregator:
        return RegionAggregator(
            self.conn,
            policy=self.policy,
            region="eu",
            signing_key=self.keys.signing,
            hpke_key=self.keys.hpke,
            model_id=MODEL_ID,
            dim=DIM,
            base_weights=self.base,
            clock=self.clock,
            rng=np.random.default_rng(self.seed),
        )

    def restart(self) -> None:
        self.conn.close()
        self.conn = sqlite3.connect(self.path)
        self.agg = self.build()

    def open(self, **kw: Any) -> RoundSpec:
        options: dict[str, Any] = {
            "noise_multiplier": SIGMA,
            "sampling_rate": Q,
            "deadline": self.clock.now + timedelta(hours=6),
        } | kw
        return verify_round_spec(self.agg.open_round(**options), self.keys.signing.public_key())

    def device(self, spec: RoundSpec) -> Device:
        device = Device()
        self.agg.enroll(device.public, period_label(spec))
        return device

    def upload(self, sealed: SealedDelta) -> tuple[int, str]:
        return self.agg.accept(sealed.to_wire(), sealed.idempotency_key)

    def reasons(self, action: str = "accept_delta") -> list[str]:
        return [d.reason for _, d in self.agg.log.query(action=action)]

    def check_log(self) -> None:
        report = self.agg.log.verify(verifier_key=self.agg.log.verifier_key)
        assert report.ok, report.problems
        assert report.checkpoints >= 1


@pytest.fixture
def keys() -> Keys:
    return Keys()


@pytest.fixture
def world(tmp_path: Path, keys: Keys) -> Iterator[World]:
    w = World(tmp_path / "aggregator.db", keys, keys.policy())
    yield w
    w.check_log()
    w.conn.close()


def small(rng: np.random.Generator) -> npt.NDArray[np.float32]:
    """A delta well inside the clipping norm (so sealing does not change it)."""
    values = rng.normal(size=DIM)
    return (values / np.linalg.norm(values) * 0.5).astype(np.float32)


def forge(
    sealed: SealedDelta,
    values: npt.NDArray[np.float32],
    *,
    signer: Ed25519PrivateKey,
    hpke: X25519PrivateKey,
) -> SealedDelta:
    """What someone with the region's public key can send, skipping the device's checks."""
    envelope = sealed.model_dump(exclude={"enc", "ciphertext"})
    body = values.astype("<f4").tobytes()
    signature = signer.sign(_statement(envelope, body, 1.0, 0.0))
    out = SUITE.encrypt(_pack(body, 1.0, 0.0, signature), hpke.public_key(), info=_info(envelope))
    sealed_fields = {
        "enc": b64encode(out[:X25519_ENC_BYTES]),
        "ciphertext": b64encode(out[X25519_ENC_BYTES:]),
    }
    return SealedDelta.model_validate(envelope | sealed_fields)


# -- a full round ----------------------------------------------------------------------------


def test_a_full_round_publishes_base_plus_mean_plus_central_noise(world: World) -> None:
    spec = world.open()
    assert (spec.model_version, spec.min_cohort, spec.mode.value) == (0, COHORT, "central")
    rng = np.random.default_rng(1)
    deltas = [small(rng) for _ in range(COHORT)]
    for i, delta in enumerate(deltas):
        assert world.upload(world.device(spec).seal(delta, spec, world.keys.hpke)) == (
            200,
            "within_policy",
        )
        assert world.agg.round(spec.round_id).count == i + 1  # type: ignore[union-attr]
    release = world.agg.latest_release()
    assert release is not None and release.version == 1 and release.model_id == MODEL_ID
    weights = verify_release(release, world.keys.signing.public_key())
    mean = np.mean(np.array(deltas, dtype=np.float64), axis=0)
    draws = np.random.default_rng(world.seed)
    noise = draws.normal(0.0, SIGMA * 1.0 / COHORT, size=DIM)
    np.testing.assert_allclose(weights, world.base + mean + noise, rtol=0, atol=1e-6)
    assert not np.allclose(weights, world.base + mean, atol=1e-3)  # the noise is there
    info = world.agg.round(spec.round_id)
    assert info is not None and info.state == "published" and info.closed_at == T0
    partial = world.conn.execute("SELECT partial FROM rounds").fetchone()[0]
    assert partial is None  # the un-noised sum is gone once published
    entries = world.agg.ledger.entries(spec.period_start)
    assert [(e.round_id, e.noise_multiplier) for e in entries] == [(spec.round_id, SIGMA)]
    assert world.reasons("open_round") == ["within_budget"]
    assert world.reasons("publish_release") == ["cohort_met"]
    assert world.reasons() == ["within_policy"] * COHORT

    # The next round trains version 1 and builds on its weights.
    nxt = world.open()
    assert nxt.model_version == 1
    more = [small(rng) for _ in range(COHORT)]
    for delta in more:
        world.upload(world.device(nxt).seal(delta, nxt, world.keys.hpke))
    second = world.agg.latest_release()
    assert second is not None and second.version == 2
    step = verify_release(second, world.keys.signing.public_key()) - weights
    expected = np.mean(np.array(more, dtype=np.float64), axis=0)
    expected += draws.normal(0.0, SIGMA / COHORT, size=DIM)
    np.testing.assert_allclose(step, expected, atol=1e-5)


def test_one_round_at_a_time(world: World) -> None:
    world.open()
    with pytest.raises(RoundStillOpen):
        world.open()


# -- refusals --------------------------------------------------------------------------------


def test_every_refusal_has_its_status_code_and_decision(world: World) -> None:
    spec = world.open()
    hpke = world.keys.hpke
    rng = np.random.default_rng(2)
    good = world.device(spec)
    first = good.seal(small(rng), spec, hpke)
    assert world.upload(first) == (200, "within_policy")

    cases: list[tuple[bytes, str, tuple[int, str]]] = []

    def case(sealed: SealedDelta, expected: tuple[int, str]) -> None:
        cases.append((sealed.to_wire(), sealed.idempotency_key, expected))

    wire = json.loads(first.to_wire())
    key = "k" * 20
    cases.append(
        (
            json.dumps(wire | {"protocol": 2, "idempotency_key": key}).encode(),
            key,
            (400, "unsupported_protocol"),
        )
    )
    cases.append((b"not json at all", "m" * 20, (400, "malformed")))
    # Same key as an accepted upload, another body.
    cases.append((b"{}", first.idempotency_key, (409, "malformed")))
    case(Device().seal(small(rng), spec, hpke), (403, "not_enrolled"))
    us = spec.model_copy(update={"region": "us"})
    case(world.device(spec).seal(small(rng), us, hpke), (403, "wrong_region"))
    gone = spec.model_copy(update={"round_id": "eu-unknown"})
    case(world.device(spec).seal(small(rng), gone, hpke), (410, "round_closed"))
    # The same device (same pseudonym) again, with another idempotency key.
    case(
        good.seal(small(rng), spec, hpke, idempotency_key="x" * 24), (409, "duplicate_contribution")
    )
    case(
        world.device(spec).seal(small(rng), spec, X25519PrivateKey.generate()),
        (400, "undecryptable"),
    )
    other = world.device(spec)
    case(
        forge(
            other.seal(small(rng), spec, hpke),
            small(rng),
            signer=Ed25519PrivateKey.generate(),
            hpke=hpke,
        ),
        (400, "bad_signature"),
    )
    old = spec.model_copy(update={"model_version": 5})
    case(world.device(spec).seal(small(rng), old, hpke), (422, "wrong_model_version"))
    nan = world.device(spec)
    bad = np.full(DIM, np.nan, dtype=np.float32)
    case(
        forge(nan.seal(small(rng), spec, hpke), bad, signer=nan.key, hpke=hpke), (422, "non_finite")
    )
    loose = spec.model_copy(update={"clipping_norm": 10.0})
    case(world.device(spec).seal(np.full(DIM, 2.0), loose, hpke), (422, "norm_exceeded"))

    for body, idem, expected in cases:
        assert world.agg.accept(body, idem) == expected, expected
    expected_codes = ["within_policy", *(code for _, _, (_, code) in cases)]
    assert world.reasons() == expected_codes
    denied = [d for _, d in world.agg.log.query(action="accept_delta", outcome="deny")]
    assert len(denied) == len(cases)
    assert world.agg.round(spec.round_id).count == 1  # type: ignore[union-attr]
    # A refusal repeated with the same key gets the same answer and is not logged again.
    body, idem, expected = cases[-1]
    assert world.agg.accept(body, idem) == expected
    assert len(world.reasons()) == len(expected_codes)


def test_a_replayed_upload_is_counted_once(world: World) -> None:
    spec = world.open()
    sealed = world.device(spec).seal(small(np.random.default_rng(3)), spec, world.keys.hpke)
    for _ in range(3):
        assert world.upload(sealed) == (200, "within_policy")
    assert world.agg.round(spec.round_id).count == 1  # type: ignore[union-attr]
    assert world.reasons() == ["within_policy"]
    rows = world.conn.execute("SELECT count(*) FROM contributions").fetchone()[0]
    assert rows == 1


def test_one_enrolled_key_contributes_once_whatever_secret_it_uses(world: World) -> None:
    spec = world.open()
    device = world.device(spec)
    rng = np.random.default_rng(4)
    assert world.upload(device.seal(small(rng), spec, world.keys.hpke)) == (200, "within_policy")
    device.secret = new_device_secret()  # another pseudonym, the same enrolled key
    again = device.seal(small(rng), spec, world.keys.hpke)
    assert world.upload(again) == (409, "duplicate_contribution")
    assert world.agg.round(spec.round_id).count == 1  # type: ignore[union-attr]


def test_a_key_enrolled_for_another_period_is_not_enrolled_for_this_round(world: World) -> None:
    spec = world.open()
    device = Device()
    world.agg.enroll(device.public, "1999-01-01")
    sealed = device.seal(small(np.random.default_rng(5)), spec, world.keys.hpke,
                         period="1999-01-01")  # fmt: skip
    assert world.upload(sealed) == (403, "not_enrolled")
    assert world.reasons() == ["not_enrolled"]


def test_an_enrolled_key_cannot_be_moved_to_another_period(world: World) -> None:
    spec = world.open()
    device = world.device(spec)
    world.agg.enroll(device.public, period_label(spec))  # again, same period: harmless
    with pytest.raises(ValueError, match="already enrolled for period"):
        world.agg.enroll(device.public, "2030-01-01")
    sealed = device.seal(small(np.random.default_rng(6)), spec, world.keys.hpke)
    assert world.upload(sealed) == (200, "within_policy")  # its device is not locked out


# -- restart, budget, deadline, retention ----------------------------------------------------


def test_a_restart_mid_round_neither_loses_nor_double_counts(world: World) -> None:
    spec = world.open()
    rng = np.random.default_rng(4)
    deltas = [small(rng) for _ in range(COHORT)]
    sealed = [world.device(spec).seal(d, spec, world.keys.hpke) for d in deltas]
    assert world.upload(sealed[0]) == (200, "within_policy")
    assert world.upload(sealed[1]) == (200, "within_policy")
    world.restart()
    assert world.agg.current_round() is not None
    assert world.agg.round(spec.round_id).count == 2  # type: ignore[union-attr]
    # The device did not see its answer and retries after the restart: counted once.
    assert world.upload(sealed[1]) == (200, "within_policy")
    assert world.agg.round(spec.round_id).count == 2  # type: ignore[union-attr]
    assert world.agg.latest_release() is None
    assert world.upload(sealed[2]) == (200, "within_policy")
    release = world.agg.latest_release()
    assert release is not None
    weights = verify_release(release, world.keys.signing.public_key())
    noise = np.random.default_rng(world.seed).normal(0.0, SIGMA / COHORT, size=DIM)
    mean = np.mean(np.array(deltas, dtype=np.float64), axis=0)
    np.testing.assert_allclose(weights, world.base + mean + noise, atol=1e-6)
    assert world.reasons() == ["within_policy"] * COHORT


def test_a_failed_transaction_counts_nothing(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = world.open()
    sealed = world.device(spec).seal(small(np.random.default_rng(5)), spec, world.keys.hpke)

    def crash(_: Any) -> int:
        raise RuntimeError("crash while logging")

    monkeypatch.setattr(world.agg.log, "append", crash)
    with pytest.raises(RuntimeError):
        world.upload(sealed)
    monkeypatch.undo()
    assert world.agg.round(spec.round_id).count == 0  # type: ignore[union-attr]
    assert world.upload(sealed) == (200, "within_policy")
    assert world.agg.round(spec.round_id).count == 1  # type: ignore[union-attr]


def test_a_round_beyond_the_budget_is_refused(world: World) -> None:
    with pytest.raises(BudgetExceeded) as refused:
        world.open(noise_multiplier=0.3, sampling_rate=1.0)
    assert refused.value.epsilon_after > refused.value.budget == 4.0
    assert world.agg.current_round() is None
    assert world.reasons("open_round") == ["budget_exhausted"]
    world.open()  # a cheaper round still fits


def test_a_round_past_its_deadline_is_abandoned_and_publishes_nothing(world: World) -> None:
    spec = world.open()
    rng = np.random.default_rng(6)
    assert world.upload(world.device(spec).seal(small(rng), spec, world.keys.hpke))[0] == 200
    late = world.device(spec).seal(small(rng), spec, world.keys.hpke)
    world.clock.now = spec.deadline + timedelta(seconds=1)
    assert world.upload(late) == (410, "round_closed")
    assert world.agg.sweep() == [spec.round_id]
    info = world.agg.round(spec.round_id)
    assert info is not None and info.state == "abandoned" and info.count == 1
    assert world.conn.execute("SELECT partial FROM rounds").fetchone()[0] is None
    assert world.agg.latest_release() is None
    assert world.agg.ledger.entries(spec.period_start) == []
    assert world.reasons("publish_release") == ["cohort_not_met"]
    assert world.agg.sweep() == []  # nothing twice


def test_sweep_purges_contributions_after_their_retention(world: World) -> None:
    spec = world.open()
    rng = np.random.default_rng(8)
    for _ in range(COHORT):
        world.upload(world.device(spec).seal(small(rng), spec, world.keys.hpke))
    still_open = world.open()
    world.upload(world.device(still_open).seal(small(rng), still_open, world.keys.hpke))
    world.clock.now = T0 + timedelta(hours=5)
    world.agg.sweep()
    assert world.reasons("purge_retention") == []  # nothing is old enough yet
    world.clock.now = T0 + timedelta(days=2)
    world.agg.sweep()
    # The published round's rows are gone; the open round kept its rows until it ended.
    rounds = [r[0] for r in world.conn.execute("SELECT round_id FROM contributions")]
    assert rounds == []  # the second round was abandoned first, then purged with the rest
    purges = [d for _, d in world.agg.log.query(action="purge_retention")]
    assert [d.metrics["deleted_contributions"] for d in purges] == [COHORT + 1]


def test_the_keys_must_be_the_regions(tmp_path: Path, keys: Keys) -> None:
    conn = sqlite3.connect(tmp_path / "a.db")
    with pytest.raises(ValueError, match="signing key"):
        RegionAggregator(
            conn,
            policy=keys.policy(),
            region="eu",
            signing_key=Ed25519PrivateKey.generate(),
            hpke_key=keys.hpke,
            model_id=MODEL_ID,
            dim=DIM,
        )
    conn.close()


def test_an_expired_round_does_not_block_the_next(world: World) -> None:
    first = world.open()
    world.clock.now = first.deadline
    second = world.open()
    assert second.round_id != first.round_id
    assert world.agg.round(first.round_id).state == "abandoned"  # type: ignore[union-attr]
    assert world.reasons("publish_release") == ["cohort_not_met"]
