"""Sealing and opening deltas: round-trips, the clipping bound, tampering, typed refusals."""

from __future__ import annotations

import hashlib
import hmac
import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sync_helpers import Parties, make_spec

from sottovoce.policy import ResidencyViolation
from sottovoce.sync import (
    NOISE_SLACK_SIGMAS,
    BadSignature,
    Malformed,
    NonFinite,
    NormExceeded,
    RoundClosed,
    RoundSpec,
    SealedDelta,
    SyncError,
    Undecryptable,
    UnsupportedProtocol,
    WrongModelVersion,
    WrongRegion,
    add_noise,
    clip,
    device_noise_std,
    open_delta,
    period_label,
    pseudonym,
    seal_delta,
)
from sottovoce.sync._clip import l2_norm
from sottovoce.sync._noise import GRID_BITS, grid_step
from sottovoce.sync._seal import SUITE, _info, _pack, _statement
from sottovoce.sync._wire import X25519_ENC_BYTES, b64decode, b64encode

PARTIES = Parties()
CENTRAL = make_spec()
LOCAL = make_spec(mode="local", clipping_norm=0.5, noise_multiplier=0.8)

finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
deltas = st.integers(1, 300).flatmap(lambda n: arrays(np.float32, n, elements=finite32))
norms = st.floats(1e-3, 1e3)


def _raw(sealed: SealedDelta, name: str) -> bytes:
    return b64decode(getattr(sealed, name))


def _with(sealed: SealedDelta, **fields: Any) -> SealedDelta:
    return SealedDelta.model_validate(sealed.model_dump() | fields)


def _forge(
    sealed: SealedDelta,
    values: npt.NDArray[np.float32],
    *,
    signer: Ed25519PrivateKey,
    aggregator: X25519PrivateKey,
    clipping_norm: float = 1.0,
    std: float = 0.0,
    **envelope_fields: Any,
) -> SealedDelta:
    """What anyone holding the region's public key and ``signer`` can send, checks skipped."""
    envelope = sealed.model_dump(exclude={"enc", "ciphertext"}) | envelope_fields
    body = values.astype("<f4").tobytes()
    signature = signer.sign(_statement(envelope, body, clipping_norm, std))
    plaintext = _pack(body, clipping_norm, std, signature)
    out = SUITE.encrypt(plaintext, aggregator.public_key(), info=_info(envelope))
    return SealedDelta.model_validate(
        envelope
        | {
            "enc": b64encode(out[:X25519_ENC_BYTES]),
            "ciphertext": b64encode(out[X25519_ENC_BYTES:]),
        }
    )


# -- clipping and noise ----------------------------------------------------------------------


@given(delta=deltas, norm=norms)
def test_clipping_bound_holds(delta: npt.NDArray[np.float32], norm: float) -> None:
    clipped = clip(delta, norm)
    assert clipped.dtype == np.float32 and clipped.shape == delta.shape
    assert l2_norm(clipped) <= norm + 1e-5
    assert l2_norm(clipped) <= norm  # exactly, as the receiver measures it
    original = l2_norm(delta)
    if original <= norm:
        assert np.array_equal(clipped, delta)  # never scaled up, untouched below the bound
    elif original > 0:
        cosine = float(np.dot(clipped.astype(np.float64), delta.astype(np.float64)))
        assert cosine / (l2_norm(clipped) * original) == pytest.approx(1.0, abs=1e-5)
        assert l2_norm(clipped) == pytest.approx(norm, rel=1e-5)


def test_clip_refuses_what_cannot_be_sealed() -> None:
    with pytest.raises(NonFinite) as error:
        clip(np.array([1.0, np.nan], dtype=np.float32), 1.0)
    assert error.value.code == "non_finite"
    with pytest.raises(ValueError, match="flat vector"):
        clip(np.zeros((2, 2)), 1.0)
    with pytest.raises(ValueError, match="flat vector"):
        clip(np.zeros(0), 1.0)
    with pytest.raises(ValueError, match="positive"):
        clip(np.ones(3), 0.0)
    original = np.full(4, 10.0, dtype=np.float32)
    clip(original, 1.0)
    assert np.all(original == 10.0)  # the caller's array is not touched


def _seeded_noise(seed: int, shape: tuple[int, ...], *, clipping_norm: float,
                  noise_multiplier: float) -> npt.NDArray[np.float64]:  # fmt: skip
    """The seeded path's noise, written out: rint(N(0, (z 2**20)²)) grid steps of C / 2**20."""
    steps = np.rint(np.random.default_rng(seed).normal(0.0, noise_multiplier * 2**GRID_BITS, shape))
    return steps * grid_step(clipping_norm)


def test_noise_has_the_requested_std() -> None:
    # std = noise_multiplier x clipping_norm = 0.6 x 0.5
    noised = add_noise(np.zeros(200_000, dtype=np.float32), clipping_norm=0.5,
                       noise_multiplier=0.6, rng=np.random.default_rng(1))  # fmt: skip
    assert noised.dtype == np.float32 and noised.shape == (200_000,)
    assert float(np.std(noised)) == pytest.approx(0.3, rel=0.01)
    expected = _seeded_noise(1, (200_000,), clipping_norm=0.5, noise_multiplier=0.6)
    assert np.array_equal(noised, expected.astype(np.float32))
    # Without a generator the noise comes from the OS CSPRNG (exact discrete Gaussian).
    csprng = add_noise(np.zeros(20_000, dtype=np.float32), clipping_norm=0.5, noise_multiplier=0.6)
    assert csprng.dtype == np.float32
    assert float(np.std(csprng)) == pytest.approx(0.3, rel=0.04)  # standard error 0.5 %
    # No noise is not a noise level: central mode does not call it (the aggregator adds it).
    for z in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="noise multiplier"):
            add_noise(np.ones(3, dtype=np.float32), clipping_norm=1.0, noise_multiplier=z)
    with pytest.raises(ValueError, match="clipping norm"):
        add_noise(np.ones(3, dtype=np.float32), clipping_norm=0.0, noise_multiplier=1.0)


def test_noise_is_added_on_the_grid() -> None:
    # The values are rounded to the grid of step C / 2**20 first: at a negligible noise level
    # what comes back is the rounded delta.
    gamma = grid_step(0.5)
    delta = np.array([3.4, -2.6, 0.4, 1000.0], dtype=np.float32) * np.float32(gamma)
    out = add_noise(delta, clipping_norm=0.5, noise_multiplier=1e-9, rng=np.random.default_rng(0))
    assert np.array_equal(out, np.array([3.0, -3.0, 0.0, 1000.0], dtype=np.float32) * gamma)


def test_local_mode_noise_is_multiplier_times_norm() -> None:
    assert device_noise_std(LOCAL) == pytest.approx(0.8 * 0.5)
    assert device_noise_std(CENTRAL) == 0.0


# -- round-trips ---------------------------------------------------------------------------


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(delta=deltas)
def test_central_round_trip_gives_the_clipped_delta(delta: npt.NDArray[np.float32]) -> None:
    sealed = PARTIES.seal(delta, CENTRAL)
    opened = PARTIES.open(SealedDelta.from_wire(sealed.to_wire()), CENTRAL)
    assert np.array_equal(opened.delta, clip(delta, CENTRAL.clipping_norm))
    assert opened.noise_std == 0.0 and opened.clipping_norm == CENTRAL.clipping_norm
    assert opened.pseudonym == pseudonym(PARTIES.device_secret, period_label(CENTRAL))
    assert opened.device_key == sealed.device_key
    assert opened.idempotency_key == sealed.idempotency_key
    assert opened.norm <= CENTRAL.clipping_norm


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(delta=deltas, seed=st.integers(0, 2**32 - 1))
def test_local_round_trip_differs_by_the_noise_only(
    delta: npt.NDArray[np.float32], seed: int
) -> None:
    sealed = PARTIES.seal(delta, LOCAL, seed=seed)
    opened = PARTIES.open(sealed, LOCAL)
    clipped = clip(delta, LOCAL.clipping_norm)
    std = device_noise_std(LOCAL)
    again = add_noise(clipped, clipping_norm=LOCAL.clipping_norm,
                      noise_multiplier=LOCAL.noise_multiplier,
                      rng=np.random.default_rng(seed))  # fmt: skip
    assert np.array_equal(opened.delta, again)
    noise = _seeded_noise(seed, delta.shape, clipping_norm=LOCAL.clipping_norm,
                          noise_multiplier=LOCAL.noise_multiplier)  # fmt: skip
    # What is left is the grid's rounding (half a step) and float32's.
    assert np.allclose(opened.delta - clipped, noise, atol=1e-6)
    assert opened.noise_std == pytest.approx(std)


def test_local_mode_without_a_generator_draws_from_the_csprng() -> None:
    delta = np.zeros(5_000)
    first = PARTIES.open(PARTIES.seal(delta, LOCAL, rng=None), LOCAL)
    second = PARTIES.open(PARTIES.seal(delta, LOCAL, rng=None), LOCAL)
    assert not np.array_equal(first.delta, second.delta)
    std = device_noise_std(LOCAL)
    for opened in (first, second):
        assert float(np.std(opened.delta)) == pytest.approx(std, rel=0.05)  # 5 standard errors
        assert opened.noise_std == pytest.approx(std)
    # The default is the CSPRNG: a caller that passes nothing gets the deployment noise.
    sealed = seal_delta(delta=delta, spec=LOCAL, device_secret=PARTIES.device_secret,
                        signing_key=PARTIES.device_key,
                        aggregator_hpke_key=PARTIES.aggregator.public_key())  # fmt: skip
    assert float(np.std(PARTIES.open(sealed, LOCAL).delta)) == pytest.approx(std, rel=0.05)


def test_raw_key_bytes_are_accepted() -> None:
    aggregator = X25519PrivateKey.generate()
    public = aggregator.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    private = aggregator.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    parties = Parties(aggregator=aggregator)
    sealed = parties.seal(np.ones(5), CENTRAL, aggregator_hpke_key=public)
    assert parties.open(sealed, CENTRAL, hpke_private_key=private).delta.size == 5


def test_idempotency_key_is_stable_per_round_and_can_be_given() -> None:
    first, again = PARTIES.seal(np.ones(4), CENTRAL), PARTIES.seal(np.ones(4), CENTRAL, seed=9)
    assert first.idempotency_key == again.idempotency_key  # resealed after a crash: same key
    assert first.ciphertext != again.ciphertext  # HPKE is randomized
    other_round = PARTIES.seal(np.ones(4), make_spec(round_id="eu-r8"))
    assert other_round.idempotency_key != first.idempotency_key
    given_key = PARTIES.seal(np.ones(4), CENTRAL, idempotency_key="a" * 24)
    assert PARTIES.open(given_key, CENTRAL).idempotency_key == "a" * 24


# -- tampering -------------------------------------------------------------------------------

SEALED = PARTIES.seal(np.linspace(-1, 1, 50), CENTRAL)


@given(field=st.sampled_from(["enc", "ciphertext"]), data=st.data())
def test_any_flipped_bit_is_undecryptable(field: str, data: st.DataObject) -> None:
    raw = bytearray(_raw(SEALED, field))
    index = data.draw(st.integers(0, len(raw) - 1))
    raw[index] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(Undecryptable) as error:
        PARTIES.open(_with(SEALED, **{field: b64encode(bytes(raw))}), CENTRAL)
    assert error.value.code == "undecryptable"


def test_truncated_or_extended_ciphertext_is_undecryptable() -> None:
    raw = _raw(SEALED, "ciphertext")
    for changed in (raw[:-1], raw + b"\x00", raw[:16]):
        with pytest.raises(Undecryptable):
            PARTIES.open(_with(SEALED, ciphertext=b64encode(changed)), CENTRAL)


@pytest.mark.parametrize(
    ("change", "error", "code"),
    [
        ({"region": "us"}, WrongRegion, "wrong_region"),
        ({"round_id": "eu-2026-11-01-r8"}, RoundClosed, "round_closed"),
        ({"model_version": 4}, WrongModelVersion, "wrong_model_version"),
        ({"protocol": 2}, UnsupportedProtocol, "unsupported_protocol"),
    ],
)
def test_an_envelope_for_another_context_gets_its_typed_error(
    change: dict[str, Any], error: type[SyncError], code: str
) -> None:
    with pytest.raises(error) as caught:
        PARTIES.open(_with(SEALED, **change), CENTRAL)
    assert caught.value.code == code


def test_wrong_region_is_a_residency_violation() -> None:
    with pytest.raises(ResidencyViolation):
        PARTIES.open(SEALED, make_spec(region="us"))


@pytest.mark.parametrize(
    "change",
    [
        {"region": "us"},
        {"round_id": "eu-r8"},
        {"model_version": 4},
        {"period": "2026-12-01"},
        {"pseudonym": "0" * 64},
        {"idempotency_key": "b" * 32},
        {"device_key": b64encode(bytes(32))},
    ],
)
def test_a_ciphertext_replayed_into_another_context_does_not_decrypt(
    change: dict[str, Any],
) -> None:
    # The receiver expects exactly the edited context, so only HPKE's info binding can refuse.
    moved = _with(SEALED, **change)
    spec = make_spec(**{k: v for k, v in change.items() if k in RoundSpec.model_fields})
    with pytest.raises(Undecryptable):
        PARTIES.open(moved, spec)


def test_wrong_aggregator_key_is_undecryptable() -> None:
    with pytest.raises(Undecryptable):
        PARTIES.open(SEALED, CENTRAL, hpke_private_key=X25519PrivateKey.generate())


def test_a_forger_without_the_device_key_fails_the_signature() -> None:
    # Anyone can encrypt to the region's public key; only the enrolled device can sign.
    forged = _forge(
        SEALED,
        np.zeros(50, np.float32),
        signer=Ed25519PrivateKey.generate(),
        aggregator=PARTIES.aggregator,
    )
    with pytest.raises(BadSignature) as error:
        PARTIES.open(forged, CENTRAL)
    assert error.value.code == "bad_signature"


def test_a_signature_over_other_values_fails() -> None:
    honest = _forge(
        SEALED, np.zeros(50, np.float32), signer=PARTIES.device_key, aggregator=PARTIES.aggregator
    )
    assert PARTIES.open(honest, CENTRAL).norm == 0.0
    # Same signed statement, other numbers in the plaintext: the delta's hash no longer matches.
    envelope = SEALED.model_dump(exclude={"enc", "ciphertext"})
    signed = PARTIES.device_key.sign(_statement(envelope, bytes(200), 1.0, 0.0))
    body = np.full(50, 0.01, np.float32).tobytes()
    out = SUITE.encrypt(
        _pack(body, 1.0, 0.0, signed), PARTIES.aggregator.public_key(), info=_info(envelope)
    )
    swapped = _with(SEALED, enc=b64encode(out[:32]), ciphertext=b64encode(out[32:]))
    with pytest.raises(BadSignature):
        PARTIES.open(swapped, CENTRAL)


# -- values an enrolled (but misbehaving) device may send -----------------------------------


def _from_device(values: npt.NDArray[np.float32], **kw: Any) -> SealedDelta:
    return _forge(SEALED, values, signer=PARTIES.device_key, aggregator=PARTIES.aggregator, **kw)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(bad: float) -> None:
    values = np.zeros(50, np.float32)
    values[7] = bad
    with pytest.raises(NonFinite) as error:
        PARTIES.open(_from_device(values), CENTRAL)
    assert error.value.code == "non_finite"


def test_an_unclipped_delta_is_refused() -> None:
    with pytest.raises(NormExceeded) as error:
        PARTIES.open(_from_device(np.full(50, 1.0, np.float32)), CENTRAL)
    assert error.value.code == "norm_exceeded"


def test_a_looser_attested_clipping_norm_is_refused() -> None:
    with pytest.raises(NormExceeded, match="clipped to 2"):
        PARTIES.open(_from_device(np.zeros(50, np.float32), clipping_norm=2.0), CENTRAL)


def test_local_mode_allows_the_noise_and_no_more() -> None:
    std = device_noise_std(LOCAL)
    sealed = PARTIES.seal(np.zeros(50), LOCAL)
    dim = 50
    bound = LOCAL.clipping_norm * (1 + 1e-6) + std * (math.sqrt(dim) + NOISE_SLACK_SIGMAS)
    assert PARTIES.open(sealed, LOCAL).norm < bound
    just_over = np.full(dim, bound * 1.001 / math.sqrt(dim), np.float32)
    with pytest.raises(NormExceeded):
        PARTIES.open(
            _forge(
                sealed,
                just_over,
                signer=PARTIES.device_key,
                aggregator=PARTIES.aggregator,
                clipping_norm=0.5,
                std=std,
            ),
            LOCAL,
        )
    # Claiming less (or more) noise than the round requires is refused, not trusted.
    with pytest.raises(Malformed, match="noise"):
        PARTIES.open(
            _forge(
                sealed,
                np.zeros(dim, np.float32),
                signer=PARTIES.device_key,
                aggregator=PARTIES.aggregator,
                clipping_norm=0.5,
                std=0.0,
            ),
            LOCAL,
        )


def test_dimension_must_match_the_model_when_given() -> None:
    assert PARTIES.open(SEALED, CENTRAL, dim=50).delta.size == 50
    with pytest.raises(Malformed, match="50 values"):
        PARTIES.open(SEALED, CENTRAL, dim=51)


def test_a_malformed_plaintext_is_refused() -> None:
    envelope = SEALED.model_dump(exclude={"enc", "ciphertext"})
    for plaintext in (
        b"",
        b"SVD\x01" + bytes(10),
        b"XXXX" + bytes(100),
        _pack(bytes(8), 1.0, 0.0, bytes(64))[:-1],
    ):
        out = SUITE.encrypt(plaintext, PARTIES.aggregator.public_key(), info=_info(envelope))
        sealed = _with(SEALED, enc=b64encode(out[:32]), ciphertext=b64encode(out[32:]))
        with pytest.raises(Malformed) as error:
            PARTIES.open(sealed, CENTRAL)
        assert error.value.code == "malformed"


def test_checks_run_envelope_first() -> None:
    # Wrong region and a broken ciphertext: the envelope check speaks first (cheap, no crypto).
    broken = _with(SEALED, region="us", ciphertext=b64encode(b"\x00" * 40))
    with pytest.raises(WrongRegion):
        open_delta(
            broken,
            region="eu",
            round_id=CENTRAL.round_id,
            model_version=3,
            hpke_private_key=PARTIES.aggregator,
            clipping_norm=1.0,
        )


# -- pseudonyms ------------------------------------------------------------------------------

secrets_ = st.binary(min_size=16, max_size=64)
periods = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,31}", fullmatch=True)


@given(secret=secrets_, first=periods, second=periods)
def test_pseudonyms_rotate_every_period(secret: bytes, first: str, second: str) -> None:
    assume(first != second)
    assert pseudonym(secret, first) == pseudonym(secret, first)
    assert pseudonym(secret, first) != pseudonym(secret, second)


@given(secret=secrets_, other=secrets_, period=periods)
def test_pseudonyms_are_keyed_by_the_device_secret(
    secret: bytes, other: bytes, period: str
) -> None:
    assume(secret != other)
    value = pseudonym(secret, period)
    assert len(value) == 64 and value != pseudonym(other, period)
    # Without the secret, the period alone (or an unkeyed hash of it) does not give it.
    assert value != hashlib.sha256(period.encode()).hexdigest()
    assert value != hmac.new(b"", period.encode(), hashlib.sha256).hexdigest()
    assert secret.hex() not in value


def test_pseudonym_follows_the_spec_period() -> None:
    november = PARTIES.seal(np.ones(3), CENTRAL)
    december = PARTIES.seal(
        np.ones(3),
        make_spec(
            period_start=CENTRAL.period_start.replace(month=12),
            deadline=CENTRAL.deadline.replace(month=12),
        ),
    )
    assert november.period == "2026-11-01" and december.period == "2026-12-01"
    assert november.pseudonym != december.pseudonym


def test_short_device_secrets_are_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        pseudonym(b"short", "2026-11")
