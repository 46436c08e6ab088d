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
from aggregator_helpers import COHORT, DIM, EXPECTED, T0, Clock, Keys, central_update, stored_sum
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sottovoce.aggregator import (
    RegionAggregator,
    RoundOverBudget,
    RoundStillOpen,
    Verdict,
    open_database,
)
from sottovoce.aggregator._edge import status_of
from sottovoce.policy import Decision, Policy
from sottovoce.sync import (
    RoundSpec,
    SealedDelta,
    new_device_secret,
    period_label,
    seal_delta,
    verify_release,
    verify_round_spec,
)
from sottovoce.sync._noise import sensitivity_factor
from sottovoce.sync._seal import SUITE, _info, _pack, _statement
from sottovoce.sync._wire import X25519_ENC_BYTES, b64encode

pytest.importorskip("opacus")

MODEL_ID = "ab" * 32
SIGMA, Q = 1.0, 0.01  # the policy's mechanism (Keys.policy): a round costs epsilon ~1.2 of 4
FACTOR = sensitivity_factor(DIM)  # the grid's sensitivity, in units of C
LOCAL = {"mode": "local", "noise_multiplier": 4.0}  # a local round at z = 4 costs epsilon ~2.4


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
            **{"rng": np.random.default_rng(0), **kw},
        )


class World:
    """An aggregator on a database (a SQLite file, or a ``postgresql://`` URL: the same tests
    run on both backends), its keys and clock, and enrolled devices."""

    def __init__(self, path: Path | str, keys: Keys, policy: Policy, *, seed: int = 7,
                 accumulate: bool = True) -> None:  # fmt: skip
        self.path, self.keys, self.policy, self.seed = path, keys, policy, seed
        self.accumulate = accumulate
        self.clock = Clock()
        self.base = np.linspace(-1, 1, DIM)
        self.conn = self.connect()
        self.agg = self.build()

    def connect(self) -> Any:
        if isinstance(self.path, str) and self.path.startswith("postgresql://"):
            return open_database(self.path)
        return sqlite3.connect(self.path)

    def build(self) -> RegionAggregator:
        return self.keys.aggregator(
            self.conn,
            policy=self.policy,
            model_id=MODEL_ID,
            base_weights=self.base,
            clock=self.clock,
            rng=np.random.default_rng(self.seed),
            accumulate=self.accumulate,
        )

    def restart(self) -> None:
        self.conn.close()
        self.conn = self.connect()
        self.agg = self.build()

    def open(self, **kw: Any) -> RoundSpec:
        """Open a round of the policy's mechanism (or ``kw``'s), six hours long by default."""
        options: dict[str, Any] = {"deadline": self.clock.now + timedelta(hours=6)} | kw
        return verify_round_spec(self.agg.open_round(**options), self.keys.signing.public_key())

    def device(self, spec: RoundSpec) -> Device:
        device = Device()
        self.agg.enroll(device.public, period_label(spec))
        return device

    def upload(self, sealed: SealedDelta) -> Verdict:
        return self.agg.accept(sealed.to_wire(), sealed.idempotency_key)

    def reasons(self, action: str = "accept_delta") -> list[str]:
        return [d.reason for _, d in self.agg.log.query(action=action)]

    def decisions(self, action: str) -> list[Decision]:
        return [d for _, d in self.agg.log.query(action=action)]

    def end(self, spec: RoundSpec) -> list[str]:
        """Move the clock a second past the round's deadline and sweep, as the scheduler does."""
        self.clock.now = spec.deadline + timedelta(seconds=1)
        return self.agg.sweep()

    def weights(self) -> npt.NDArray[np.float32]:
        release = self.agg.latest_release()
        assert release is not None
        return verify_release(release, self.keys.signing.public_key())

    def check_log(self) -> None:
        report = self.agg.log.verify(verifier_key=self.agg.log.verifier_key)
        assert report.ok, report.problems
        assert report.checkpoints >= 1


@pytest.fixture
def keys() -> Keys:
    return Keys()


@pytest.fixture
def world(backend: str, keys: Keys) -> Iterator[World]:
    w = World(backend, keys, keys.policy())
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


def test_a_full_round_publishes_at_its_deadline_base_plus_the_noised_sum_over_the_expected_cohort(
    world: World,
) -> None:
    spec = world.open()
    assert (spec.model_version, spec.min_cohort, spec.mode.value) == (0, COHORT, "central")
    assert (spec.noise_multiplier, spec.sampling_rate, spec.expected_cohort) == (SIGMA, Q, EXPECTED)
    rng = np.random.default_rng(1)
    # More devices than the minimum cohort: every on-time delta counts, none is dropped.
    deltas = [small(rng) for _ in range(COHORT + 1)]
    for i, delta in enumerate(deltas):
        verdict = world.upload(world.device(spec).seal(delta, spec, world.keys.hpke))
        assert verdict == Verdict("within_policy", added=True)
        info = world.agg.round(spec.round_id)
        assert info is not None and (info.state, info.count) == ("open", i + 1)
    # Reaching the minimum cohort closes nothing: the round waits for its deadline.
    assert world.agg.latest_release() is None
    assert world.agg.sweep() == []  # not yet
    assert world.end(spec) == [spec.round_id]
    release = world.agg.latest_release()
    assert release is not None and release.version == 1 and release.model_id == MODEL_ID
    weights = world.weights()
    total = np.sum(np.array(deltas, dtype=np.float64), axis=0)
    draws = np.random.default_rng(world.seed)  # the aggregator's noise, draw for draw
    update = central_update(total, draws)
    np.testing.assert_allclose(weights, world.base + update, rtol=0, atol=1e-6)
    assert not np.allclose(weights, world.base + total / EXPECTED, atol=1e-3)  # noise is there
    info = world.agg.round(spec.round_id)
    assert info is not None and info.state == "published" and info.count == COHORT + 1
    assert info.closed_at == spec.deadline + timedelta(seconds=1)
    assert stored_sum(world.conn) is None  # the un-noised sum is gone once published
    # The ledger charged the Poisson-sampled Gaussian at the policy's q, on the grid's
    # sensitivity, whatever the count.
    entries = world.agg.ledger.entries(spec.period_start)
    assert [(e.round_id, e.noise_multiplier, e.sampling_rate, e.sensitivity) for e in entries] == [
        (spec.round_id, SIGMA, Q, FACTOR)]  # fmt: skip
    assert entries[0].epsilon_after == pytest.approx(spec.epsilon_after)
    assert world.reasons("open_round") == ["within_budget"]
    (published,) = world.decisions("publish_release")
    assert (published.outcome.value, published.reason) == ("allow", "deadline_reached")
    # No count in the log: a central round's count is not what its noise protects.
    assert published.metrics == {"expected_cohort": EXPECTED,
                                 "epsilon_spent": entries[0].epsilon_after,
                                 "epsilon_budget": 4.0}  # fmt: skip
    assert world.reasons() == ["within_policy"] * (COHORT + 1)

    # The next round trains version 1 and builds on its weights; the noise is the next draw.
    nxt = world.open()
    assert nxt.model_version == 1
    more = [small(rng) for _ in range(COHORT)]
    for delta in more:
        world.upload(world.device(nxt).seal(delta, nxt, world.keys.hpke))
    assert world.end(nxt) == [nxt.round_id]
    second = world.agg.latest_release()
    assert second is not None and second.version == 2
    step = world.weights().astype(np.float64) - weights
    expected = central_update(np.sum(np.array(more, dtype=np.float64), axis=0), draws)
    np.testing.assert_allclose(step, expected, atol=1e-5)
    assert world.reasons("publish_release") == ["deadline_reached"] * 2


def test_a_statistic_release_is_the_rounds_noised_mean_alone(tmp_path: Path, keys: Keys) -> None:
    """``accumulate=False`` (the collaborative model's counts and factor sums): each release is
    its own round's noised sum over the expected cohort, not the previous release plus it."""
    world = World(tmp_path / "statistics.db", keys, keys.policy(), accumulate=False)
    rng, draws = np.random.default_rng(3), np.random.default_rng(world.seed)
    for version in (1, 2):
        spec = world.open()
        assert spec.model_version == version - 1
        deltas = [small(rng) for _ in range(COHORT)]
        for delta in deltas:
            world.upload(world.device(spec).seal(delta, spec, world.keys.hpke))
        world.end(spec)
        expected = central_update(np.sum(np.array(deltas, dtype=np.float64), axis=0), draws)
        np.testing.assert_allclose(world.weights(), expected, atol=1e-6)  # no base, no previous
    world.check_log()
    world.conn.close()


@pytest.mark.parametrize("count", [0, 1, COHORT - 1])
def test_a_central_round_publishes_at_its_deadline_whatever_the_count(
    world: World, count: int
) -> None:
    # Below the minimum cohort, even with nobody: the same noise over the same fixed divisor.
    spec = world.open()
    rng = np.random.default_rng(20 + count)
    deltas = [small(rng) for _ in range(count)]
    for delta in deltas:
        assert world.upload(world.device(spec).seal(delta, spec, world.keys.hpke)).accepted
    assert world.end(spec) == [spec.round_id]
    total = np.sum(np.array(deltas, dtype=np.float64).reshape(count, DIM), axis=0)
    update = central_update(total, np.random.default_rng(world.seed))
    np.testing.assert_allclose(world.weights(), world.base + update, rtol=0, atol=1e-6)
    info = world.agg.round(spec.round_id)
    assert info is not None and (info.state, info.count) == ("published", count)
    assert world.reasons("publish_release") == ["deadline_reached"]
    assert len(world.agg.ledger.entries(spec.period_start)) == 1


def test_a_round_runs_the_policys_mechanism(world: World) -> None:
    # Default: the policy's least noise; more noise is allowed, less is not, and the sampling
    # rate is the policy's (devices refuse any other).
    with pytest.raises(ValueError, match="below the policy's minimum"):
        world.agg.open_round(deadline=world.clock.now + timedelta(hours=1), noise_multiplier=0.9)
    with pytest.raises(ValueError, match="sampling rate"):
        world.agg.open_round(deadline=world.clock.now + timedelta(hours=1), sampling_rate=0.02)
    assert world.reasons("open_round") == []  # refused before anything was decided
    assert world.agg.current_round() is None
    spec = verify_round_spec(
        world.agg.open_round(deadline=world.clock.now + timedelta(hours=1)),
        world.keys.signing.public_key(),
    )
    assert (spec.noise_multiplier, spec.sampling_rate, spec.expected_cohort) == (SIGMA, Q, EXPECTED)
    start = world.agg.ledger.period_start_for(world.clock.now)
    assert spec.epsilon_after == world.agg.ledger.epsilon_if(SIGMA, Q, period_start=start,
                                                             sensitivity=FACTOR)  # fmt: skip
    world.end(spec)
    noisier = world.open(noise_multiplier=2.5)
    assert (noisier.noise_multiplier, noisier.sampling_rate) == (2.5, Q)
    world.end(noisier)
    entries = world.agg.ledger.entries(start)
    assert [(e.noise_multiplier, e.sampling_rate, e.sensitivity) for e in entries] == [
        (SIGMA, Q, FACTOR), (2.5, Q, FACTOR)]  # fmt: skip


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
    assert world.upload(first).code == "within_policy"

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

    def http(verdict: Verdict) -> tuple[int, str]:  # as the service answers it
        return status_of(verdict), verdict.code

    for body, idem, expected in cases:
        assert http(world.agg.accept(body, idem)) == expected, expected
    expected_codes = ["within_policy", *(code for _, _, (_, code) in cases)]
    assert world.reasons() == expected_codes
    denied = [d for _, d in world.agg.log.query(action="accept_delta", outcome="deny")]
    assert len(denied) == len(cases)
    assert world.agg.round(spec.round_id).count == 1  # type: ignore[union-attr]
    # A refusal repeated with the same key gets the same answer and is not logged again.
    body, idem, expected = cases[-1]
    assert http(world.agg.accept(body, idem)) == expected
    assert len(world.reasons()) == len(expected_codes)


def test_a_replayed_upload_is_counted_once(world: World) -> None:
    spec = world.open()
    sealed = world.device(spec).seal(small(np.random.default_rng(3)), spec, world.keys.hpke)
    for _ in range(3):
        assert world.upload(sealed).code == "within_policy"
    assert world.agg.round(spec.round_id).count == 1  # type: ignore[union-attr]
    assert world.reasons() == ["within_policy"]
    rows = world.conn.execute("SELECT count(*) FROM contributions").fetchone()[0]
    assert rows == 1


def test_one_enrolled_key_contributes_once_whatever_secret_it_uses(world: World) -> None:
    spec = world.open()
    device = world.device(spec)
    rng = np.random.default_rng(4)
    assert world.upload(device.seal(small(rng), spec, world.keys.hpke)).code == "within_policy"
    device.secret = new_device_secret()  # another pseudonym, the same enrolled key
    again = device.seal(small(rng), spec, world.keys.hpke)
    assert world.upload(again).code == "duplicate_contribution"
    assert world.agg.round(spec.round_id).count == 1  # type: ignore[union-attr]


def test_a_key_enrolled_for_another_period_is_not_enrolled_for_this_round(world: World) -> None:
    spec = world.open()
    device = Device()
    before, _, _ = world.agg.enrollable_periods()  # the budget period before the round's
    world.agg.enroll(device.public, before)
    sealed = device.seal(small(np.random.default_rng(5)), spec, world.keys.hpke,
                         period=before)  # fmt: skip
    assert world.upload(sealed).code == "not_enrolled"
    assert world.reasons() == ["not_enrolled"]


def test_an_enrolled_key_cannot_be_moved_to_another_period(world: World) -> None:
    spec = world.open()
    device = world.device(spec)
    world.agg.enroll(device.public, period_label(spec))  # again, same period: harmless
    _, _, after = world.agg.enrollable_periods()
    with pytest.raises(ValueError, match="already enrolled for another period"):
        world.agg.enroll(device.public, after)
    sealed = device.seal(small(np.random.default_rng(6)), spec, world.keys.hpke)
    assert world.upload(sealed).code == "within_policy"  # its device is not locked out


# -- restart, budget, deadline, retention ----------------------------------------------------


def test_a_restart_mid_round_neither_loses_nor_double_counts(world: World) -> None:
    spec = world.open()
    rng = np.random.default_rng(4)
    deltas = [small(rng) for _ in range(COHORT)]
    sealed = [world.device(spec).seal(d, spec, world.keys.hpke) for d in deltas]
    assert world.upload(sealed[0]).code == "within_policy"
    assert world.upload(sealed[1]).code == "within_policy"
    world.restart()
    assert world.agg.current_round() is not None
    assert world.agg.round(spec.round_id).count == 2  # type: ignore[union-attr]
    # The device did not see its answer and retries after the restart: counted once.
    assert world.upload(sealed[1]).code == "within_policy"
    assert world.agg.round(spec.round_id).count == 2  # type: ignore[union-attr]
    assert world.upload(sealed[2]).code == "within_policy"
    assert world.agg.latest_release() is None  # open until the deadline
    world.restart()  # the deadline passes while the aggregator is down
    assert world.end(spec) == [spec.round_id]
    total = np.sum(np.array(deltas, dtype=np.float64), axis=0)
    update = central_update(total, np.random.default_rng(world.seed))
    np.testing.assert_allclose(world.weights(), world.base + update, atol=1e-6)
    assert world.reasons() == ["within_policy"] * COHORT
    assert world.agg.round(spec.round_id).count == COHORT  # type: ignore[union-attr]


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
    assert world.upload(sealed).code == "within_policy"
    assert world.agg.round(spec.round_id).count == 1  # type: ignore[union-attr]


def test_a_round_beyond_the_budget_is_refused(tmp_path: Path, keys: Keys) -> None:
    # Every device in every round (q = 1, no amplification): z = 1 costs epsilon ~5.2 > 4.
    policy = keys.policy(sampling_rate=1.0, population=5)
    world = World(tmp_path / "budget.db", keys, policy)
    with pytest.raises(RoundOverBudget) as refused:
        world.open()
    assert refused.value.epsilon_after > refused.value.budget == 4.0
    assert world.agg.current_round() is None
    assert world.reasons("open_round") == ["budget_exhausted"]
    spec = world.open(noise_multiplier=5.0)  # more noise still fits
    assert spec.epsilon_after < 4.0
    world.check_log()
    world.conn.close()


def test_a_round_whose_budget_shrank_while_it_was_open_is_abandoned(
    world: World, keys: Keys
) -> None:
    spec = world.open()
    rng = np.random.default_rng(9)
    for _ in range(COHORT):
        assert world.upload(world.device(spec).seal(small(rng), spec, keys.hpke)).accepted
    # The operator deploys a policy whose budget no longer pays for this round.
    budget = round(spec.epsilon_after / 2, 3)
    world.policy = keys.policy(epsilon=budget)
    world.restart()
    assert world.end(spec) == [spec.round_id]
    info = world.agg.round(spec.round_id)
    assert info is not None and info.state == "abandoned"
    assert stored_sum(world.conn) is None
    assert world.agg.latest_release() is None
    assert world.agg.ledger.entries(spec.period_start) == []
    (abandoned,) = world.decisions("publish_release")
    assert (abandoned.outcome.value, abandoned.reason) == ("deny", "budget_exhausted")
    assert abandoned.metrics == {"epsilon_spent": 0.0, "epsilon_budget": budget}  # no count


def test_a_central_round_past_its_deadline_takes_nothing_more(world: World) -> None:
    spec = world.open()
    rng = np.random.default_rng(6)
    on_time = small(rng)
    assert world.upload(world.device(spec).seal(on_time, spec, world.keys.hpke)).accepted
    late = world.device(spec).seal(small(rng), spec, world.keys.hpke)
    world.clock.now = spec.deadline  # the deadline itself is too late
    assert world.upload(late).code == "round_closed"
    assert world.agg.round(spec.round_id).count == 1  # type: ignore[union-attr]
    assert world.agg.sweep() == [spec.round_id]
    update = central_update(on_time.astype(np.float64), np.random.default_rng(world.seed))
    np.testing.assert_allclose(world.weights(), world.base + update, rtol=0, atol=1e-6)
    assert world.upload(late).code == "round_closed"  # its first answer
    assert world.reasons() == ["within_policy", "round_closed"]
    assert world.agg.sweep() == []  # nothing twice


# -- local mode: every upload carries its own noise ----------------------------------------------


@pytest.fixture
def local(backend: str, keys: Keys) -> Iterator[World]:
    w = World(backend, keys, keys.policy(**LOCAL))
    yield w
    w.check_log()
    w.conn.close()


def test_a_local_round_closes_at_its_minimum_cohort_with_the_mean(local: World) -> None:
    spec = local.open()
    assert (spec.mode.value, spec.noise_multiplier, spec.min_cohort) == ("local", 4.0, COHORT)
    rng = np.random.default_rng(10)
    deltas = [small(rng) for _ in range(COHORT)]
    for i, delta in enumerate(deltas):
        verdict = local.upload(local.device(spec).seal(delta, spec, local.keys.hpke))
        assert verdict.accepted and verdict.added
        info = local.agg.round(spec.round_id)
        expected_state = "published" if i + 1 == COHORT else "open"
        assert info is not None and (info.state, info.count) == (expected_state, i + 1)
        # The upload that completed the cohort published the release, and says which.
        assert verdict.release == (local.agg.latest_release() if i + 1 == COHORT else None)
    # Each device put its delta on the grid and added z * C noise (its own seeded draw here).
    gamma = 1.0 / 2**20
    noisy = [((np.rint(d.astype(np.float64) / gamma)
               + np.rint(np.random.default_rng(0).normal(0.0, 4.0 * 2**20, DIM))) * gamma
              ).astype(np.float32) for d in deltas]  # fmt: skip
    mean = np.mean(np.array(noisy, dtype=np.float64), axis=0)
    np.testing.assert_allclose(local.weights(), local.base + mean, rtol=0, atol=1e-6)
    # Charged per upload at 2C on the grid, without amplification by sampling.
    entries = local.agg.ledger.entries(spec.period_start)
    assert [(e.noise_multiplier, e.sampling_rate, e.sensitivity) for e in entries] == [
        (4.0, 1.0, 2 * FACTOR)]  # fmt: skip
    (published,) = local.decisions("publish_release")
    assert (published.reason, published.metrics["cohort"]) == ("cohort_met", COHORT)
    assert "expected_cohort" not in published.metrics
    late = local.device(spec).seal(small(rng), spec, local.keys.hpke)
    assert local.upload(late).code == "round_closed"


def test_a_local_round_short_of_its_cohort_is_abandoned_at_its_deadline(local: World) -> None:
    spec = local.open()
    rng = np.random.default_rng(6)
    # Sealed as a deployed device seals: its noise from the OS CSPRNG.
    sealed = local.device(spec).seal(small(rng), spec, local.keys.hpke, rng=None)
    assert local.upload(sealed).code == "within_policy"
    late = local.device(spec).seal(small(rng), spec, local.keys.hpke)
    local.clock.now = spec.deadline + timedelta(seconds=1)
    assert local.upload(late).code == "round_closed"
    assert local.agg.sweep() == [spec.round_id]
    info = local.agg.round(spec.round_id)
    assert info is not None and info.state == "abandoned" and info.count == 1
    assert stored_sum(local.conn) is None
    assert local.agg.latest_release() is None
    assert local.agg.ledger.entries(spec.period_start) == []
    (abandoned,) = local.decisions("publish_release")
    assert (abandoned.outcome.value, abandoned.reason) == ("deny", "cohort_not_met")
    assert abandoned.metrics == {"epsilon_spent": 0.0, "epsilon_budget": 4.0}  # no count
    assert local.agg.sweep() == []  # nothing twice


def test_sweep_purges_contributions_after_their_retention(world: World) -> None:
    # The EU keeps contribution rows for a day, except an open round's (its once-per-device
    # check needs them), however old.
    spec = world.open(deadline=T0 + timedelta(hours=1))
    rng = np.random.default_rng(8)
    for _ in range(COHORT):
        world.upload(world.device(spec).seal(small(rng), spec, world.keys.hpke))
    assert world.end(spec) == [spec.round_id]  # published at T0 + 1h
    still_open = world.open(deadline=T0 + timedelta(days=3))
    world.upload(world.device(still_open).seal(small(rng), still_open, world.keys.hpke))
    world.clock.now = T0 + timedelta(hours=5)
    assert world.agg.sweep() == []
    assert world.reasons("purge_retention") == []  # nothing is old enough yet
    world.clock.now = T0 + timedelta(days=2)
    assert world.agg.sweep() == []
    rounds = [r[0] for r in world.conn.execute("SELECT round_id FROM contributions")]
    assert rounds == [still_open.round_id]  # older than a day, but its round is open
    world.clock.now = T0 + timedelta(days=3)
    assert world.agg.sweep() == [still_open.round_id]  # published, then purged with its rows
    assert world.conn.execute("SELECT count(*) FROM contributions").fetchone()[0] == 0
    purges = [d for _, d in world.agg.log.query(action="purge_retention")]
    assert [d.metrics["deleted_contributions"] for d in purges] == [COHORT, 1]
    assert world.reasons("publish_release") == ["deadline_reached"] * 2


def test_the_keys_must_be_the_regions(tmp_path: Path, keys: Keys) -> None:
    conn = sqlite3.connect(tmp_path / "a.db")
    stranger = Keys(signing=Ed25519PrivateKey.generate(), hpke=keys.hpke)
    with pytest.raises(ValueError, match="signing key"):
        stranger.aggregator(conn, policy=keys.policy(), model_id=MODEL_ID, clock=Clock())
    conn.close()


def test_an_expired_round_does_not_block_the_next(world: World) -> None:
    # Opening the next round ends the expired one first: central, so it is published (with no
    # contribution at all) and the next round trains its release.
    first = world.open()
    world.clock.now = first.deadline
    second = world.open()
    assert second.round_id != first.round_id
    assert world.agg.round(first.round_id).state == "published"  # type: ignore[union-attr]
    assert world.reasons("publish_release") == ["deadline_reached"]
    assert second.model_version == 1
    update = central_update(np.zeros(DIM), np.random.default_rng(world.seed))
    np.testing.assert_allclose(world.weights(), world.base + update, rtol=0, atol=1e-6)


def test_an_expired_local_round_is_abandoned_when_the_next_opens(local: World) -> None:
    first = local.open()
    local.clock.now = first.deadline
    second = local.open()
    assert local.agg.round(first.round_id).state == "abandoned"  # type: ignore[union-attr]
    assert local.reasons("publish_release") == ["cohort_not_met"]
    assert second.model_version == 0 and local.agg.latest_release() is None
