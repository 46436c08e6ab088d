"""Wire types: parsing, canonical bytes, and the aggregator's signatures on specs and releases."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sync_helpers import MODEL_ID, PERIOD_START, Parties, make_spec

from sottovoce.policy import PrivacyMode
from sottovoce.sync import (
    PROTOCOL_VERSION,
    BadSignature,
    Malformed,
    ModelRelease,
    NonFinite,
    RoundSpec,
    SealedDelta,
    SignedRoundSpec,
    UnsupportedProtocol,
    sign_release,
    sign_round_spec,
    verify_release,
    verify_round_spec,
)
from sottovoce.sync._wire import b64decode, b64encode

AGGREGATOR = Ed25519PrivateKey.generate()
KID = "eu-sign-2026-11"


def _public_b64(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return b64encode(raw)


# -- parsing ---------------------------------------------------------------------------------


def test_a_sealed_delta_survives_the_wire() -> None:
    sealed = Parties().seal(np.ones(8), make_spec())
    wire = sealed.to_wire()
    assert wire == json.dumps(json.loads(wire), sort_keys=True, separators=(",", ":")).encode()
    assert SealedDelta.from_wire(wire) == sealed
    assert SealedDelta.from_wire(wire.decode()) == sealed
    assert SealedDelta.from_wire(json.loads(wire)) == sealed


@pytest.mark.parametrize(
    "data",
    [b"not json", b"[1, 2]", b'"text"', b"{}", b'{"protocol": 1, "extra": true}'],
)
def test_garbage_is_malformed(data: bytes) -> None:
    with pytest.raises(Malformed) as error:
        SealedDelta.from_wire(data)
    assert error.value.code == "malformed"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("pseudonym", "user-42"),
        ("device_key", "AAAA"),
        ("enc", "not base64!"),
        ("idempotency_key", "short"),
        ("region", "EU"),
        ("model_version", -1),
        ("ciphertext", ""),
        ("protocol", True),
        ("protocol", 1.5),
        ("model_version", "3"),
        ("model_version", 3.0),
    ],
)
def test_each_field_is_validated(field: str, value: Any) -> None:
    data = json.loads(Parties().seal(np.ones(3), make_spec()).to_wire())
    data[field] = value
    with pytest.raises(Malformed, match=field):
        SealedDelta.from_wire(json.dumps(data))


def test_another_protocol_version_is_unsupported_not_malformed() -> None:
    # A future version may change every other field; the version is read first.
    for message, data in (
        (SealedDelta, {"protocol": 2, "something": "new"}),
        (SignedRoundSpec, {"spec": {"protocol": 2}}),
        (ModelRelease, {"protocol": 3}),
    ):
        with pytest.raises(UnsupportedProtocol) as error:
            message.from_wire(json.dumps(data))
        assert error.value.code == "unsupported_protocol"
    assert PROTOCOL_VERSION == 1


@pytest.mark.parametrize(
    "change",
    [
        {"epsilon_after": 1.0},
        {"sampling_rate": 0},
        {"sampling_rate": 1.5},
        {"deadline": PERIOD_START},
        {"deadline": datetime(2026, 11, 2)},
        {"clipping_norm": float("nan")},
        {"clipping_norm": float("inf")},
        {"mode": "distributed"},
        {"model_id": "ABC"},
        {"delta": 1.0},
        {"expected_cohort": 0},
        {"expected_cohort": -100.0},
        {"expected_cohort": float("nan")},
        {"expected_cohort": float("inf")},
    ],
)
def test_inconsistent_specs_do_not_validate(change: dict[str, Any]) -> None:
    with pytest.raises(Malformed):
        RoundSpec.from_wire(make_spec().model_dump(mode="json") | change)


def test_a_spec_without_its_expected_cohort_is_malformed() -> None:
    data = make_spec().model_dump(mode="json")
    assert data["expected_cohort"] == 100.0
    del data["expected_cohort"]
    with pytest.raises(Malformed, match="expected_cohort"):
        RoundSpec.from_wire(data)


def test_times_are_kept_in_utc() -> None:
    cet = timezone(timedelta(hours=1))
    spec = make_spec(deadline=datetime(2026, 11, 3, 1, 0, tzinfo=cet))
    assert spec.deadline == datetime(2026, 11, 3, 0, 0, tzinfo=UTC)
    assert spec.deadline.tzinfo is UTC
    assert b'"deadline":"2026-11-03T00:00:00Z"' in spec.to_wire()


# -- round spec signatures -------------------------------------------------------------------


def test_a_signed_spec_verifies_after_the_wire() -> None:
    spec = make_spec()
    signed = sign_round_spec(spec, signing_key=AGGREGATOR, kid=KID)
    received = SignedRoundSpec.from_wire(signed.to_wire())
    assert verify_round_spec(received, _public_b64(AGGREGATOR)) == spec
    assert verify_round_spec(received, AGGREGATOR.public_key()) == spec
    assert verify_round_spec(received, b64decode(_public_b64(AGGREGATOR))) == spec
    assert received.spec.mode is PrivacyMode.CENTRAL


spec_changes = st.sampled_from(
    [
        ("round_id", "eu-other"),
        ("region", "us"),
        ("model_id", "0" * 64),
        ("model_version", 4),
        ("mode", "local"),
        ("clipping_norm", 2.0),
        ("noise_multiplier", 0.5),
        ("sampling_rate", 0.5),
        ("min_cohort", 2),
        ("epsilon_spent", 0.0),
        ("epsilon_after", 1.91),
        ("delta", 1e-4),
        ("deadline", PERIOD_START + timedelta(days=3)),
        ("period_start", PERIOD_START - timedelta(days=1)),
    ]
)


@given(change=spec_changes)
def test_any_change_to_a_signed_spec_is_detected(change: tuple[str, Any]) -> None:
    signed = sign_round_spec(make_spec(), signing_key=AGGREGATOR, kid=KID)
    data = json.loads(signed.to_wire())
    data["spec"][change[0]] = (
        change[1] if not isinstance(change[1], datetime) else (change[1].isoformat())
    )
    tampered = SignedRoundSpec.from_wire(json.dumps(data))
    with pytest.raises(BadSignature) as error:
        verify_round_spec(tampered, AGGREGATOR.public_key())
    assert error.value.code == "bad_signature"


@given(
    st.fixed_dictionaries(
        {
            "clipping_norm": st.floats(1e-6, 1e6),
            "noise_multiplier": st.floats(0, 100),
            "sampling_rate": st.floats(1e-9, 1.0),
            "epsilon_spent": st.floats(0, 50),
            "delta": st.floats(1e-12, 0.5),
            "deadline": st.integers(1, 10**6).map(lambda m: PERIOD_START + timedelta(minutes=m)),
        }
    ),
    st.floats(1e-9, 50),
)
def test_any_spec_round_trips_and_verifies(fields: dict[str, Any], extra: float) -> None:
    spec = make_spec(**fields, epsilon_after=fields["epsilon_spent"] + extra)
    signed = sign_round_spec(spec, signing_key=AGGREGATOR, kid=KID)
    assert verify_round_spec(SignedRoundSpec.from_wire(signed.to_wire()), AGGREGATOR.public_key())


def test_a_spec_signed_by_another_key_is_refused() -> None:
    signed = sign_round_spec(make_spec(), signing_key=Ed25519PrivateKey.generate(), kid=KID)
    with pytest.raises(BadSignature):
        verify_round_spec(signed, AGGREGATOR.public_key())


def test_a_spec_of_another_protocol_is_refused_before_its_signature() -> None:
    spec = make_spec(protocol=2)
    signed = sign_round_spec(spec, signing_key=AGGREGATOR, kid=KID)
    with pytest.raises(UnsupportedProtocol):
        verify_round_spec(signed, AGGREGATOR.public_key())


# -- model releases --------------------------------------------------------------------------

CREATED = datetime(2026, 11, 3, 12, tzinfo=UTC)


def _release(weights: npt.ArrayLike, **kw: Any) -> ModelRelease:
    options: dict[str, Any] = {
        "model_id": MODEL_ID,
        "version": 4,
        "created": CREATED,
        "signing_key": AGGREGATOR,
        "kid": KID,
    }
    options.update(kw)
    return sign_release(weights=weights, **options)


@given(
    weights=arrays(
        np.float32,
        st.integers(1, 500),
        elements=st.floats(allow_nan=False, allow_infinity=False, width=32),
    )
)
def test_release_round_trip(weights: npt.NDArray[np.float32]) -> None:
    release = ModelRelease.from_wire(_release(weights).to_wire())
    assert np.array_equal(verify_release(release, AGGREGATOR.public_key()), weights)


@pytest.mark.parametrize(
    "change",
    [
        {"version": 5},
        {"model_id": "0" * 64},
        {"kid": "other"},
        {"created": "2026-11-04T12:00:00Z"},
        {"weights": b64encode(np.zeros(3, "<f4").tobytes())},
    ],
)
def test_any_change_to_a_release_is_detected(change: dict[str, Any]) -> None:
    data = json.loads(_release(np.ones(3)).to_wire()) | change
    with pytest.raises(BadSignature):
        verify_release(ModelRelease.from_wire(json.dumps(data)), AGGREGATOR.public_key())


def test_a_spec_signature_cannot_pass_as_a_release_signature() -> None:
    signed = sign_round_spec(make_spec(), signing_key=AGGREGATOR, kid=KID)
    release = _release(np.ones(3)).model_copy(update={"signature": signed.signature})
    with pytest.raises(BadSignature):
        verify_release(release, AGGREGATOR.public_key())


def test_non_finite_weights_are_never_released_nor_accepted() -> None:
    with pytest.raises(NonFinite):
        _release(np.array([1.0, np.nan]))
    # Even signed by the aggregator itself, a NaN weight is refused on the device.
    weights = b64encode(np.array([1.0, np.inf], "<f4").tobytes())
    bad = _release(np.ones(2)).model_copy(update={"weights": weights})
    from sottovoce.sync._sign import release_message

    bad = bad.model_copy(update={"signature": b64encode(AGGREGATOR.sign(release_message(bad)))})
    with pytest.raises(NonFinite):
        verify_release(bad, AGGREGATOR.public_key())


def test_release_weights_must_be_whole_float32_values() -> None:
    data = json.loads(_release(np.ones(3)).to_wire()) | {"weights": b64encode(b"\x00" * 5)}
    with pytest.raises(Malformed, match="weights"):
        ModelRelease.from_wire(json.dumps(data))
