"""Sealing a model delta on the device and opening it at the aggregator (sans-I/O).

Data flow step 5 (device): ``seal_delta`` clips the delta to L2 norm C and adds the device's
noise when the round's mode is ``local`` (:mod:`._clip`), labels it with the period's
pseudonym (:mod:`._pseudonym`), signs it with the device's per-period Ed25519 key and encrypts
it with HPKE to the region aggregator's X25519 key. Step 6 (aggregator): ``open_delta``
checks the envelope, decrypts, verifies the signature and the values, and returns the delta or
raises a typed :class:`~sottovoce.sync.SyncError` whose ``code`` is the decision's reason.

Encryption context. HPKE is RFC 9180 base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
AES-128-GCM, through ``cryptography``'s single-shot ``Suite.encrypt``/``decrypt``. Its ``info``
is a domain tag plus the canonical JSON of every envelope field (protocol, region, round id,
model version, pseudonym, period, device key, idempotency key). ``info`` enters the HPKE key
schedule, so the AEAD key and nonce depend on it: a ciphertext moved into another round, region
or version (or with any envelope field edited) does not decrypt. RFC 9180 section 8.1 names
``info`` as the place for this with single-shot APIs; ``cryptography`` exposes no public AAD
argument there, so the associated data of the AEAD is empty and ``info`` carries the binding.

Plaintext (little-endian)::

    offset  size  field
    0       4     magic b"SVD" + protocol version byte (0x01)
    4       4     uint32 n, the number of float32 values
    8       8     float64 clipping norm the device used
    16      8     float64 standard deviation of the noise the device added (0 in central mode)
    24      64    Ed25519 signature by the device's per-period key (see ``_statement``)
    88      4n    the delta, float32

Nothing derived from events, ids or local state is in either; only the delta's numbers.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from sottovoce.policy import PrivacyMode
from sottovoce.policy._canonical import canonical_json
from sottovoce.sync._clip import FloatArray, add_noise, clip, l2_norm
from sottovoce.sync._errors import (
    BadSignature,
    Malformed,
    NonFinite,
    NormExceeded,
    RoundClosed,
    Undecryptable,
    UnsupportedProtocol,
    WrongModelVersion,
    WrongRegion,
)
from sottovoce.sync._pseudonym import idempotency_key, period_label, pseudonym
from sottovoce.sync._wire import (
    ED25519_SIGNATURE_BYTES,
    PROTOCOL_VERSION,
    X25519_ENC_BYTES,
    RoundSpec,
    SealedDelta,
    b64decode,
    b64encode,
)

SUITE: Final = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_128_GCM)
MAGIC: Final = b"SVD" + bytes([PROTOCOL_VERSION])
_HEADER: Final = struct.Struct("<4sIdd")
HEADER_BYTES: Final = _HEADER.size + ED25519_SIGNATURE_BYTES  # 88
# In local mode the received norm may exceed C by the noise: ||N(0, s^2 I_d)|| exceeds
# s * (sqrt(d) + t) with probability at most exp(-t^2 / 2) (Gaussian concentration of a
# 1-Lipschitz function). t = 10 wrongly refuses an honest delta with probability < 2e-22.
NOISE_SLACK_SIGMAS: Final = 10.0

_INFO_TAG: Final = b"sottovoce/sealed-delta/v1\x00"
_STATEMENT_TAG: Final = b"sottovoce/delta-statement/v1\x00"


@dataclass(frozen=True, eq=False)
class OpenedDelta:
    """A delta that passed every check, with what the aggregator may know about its sender."""

    delta: FloatArray
    pseudonym: str
    period: str
    device_key: str  # base64 raw Ed25519 public key, as in the envelope (enrollment lookup)
    idempotency_key: str
    clipping_norm: float  # as the device attests it
    noise_std: float  # as the device attests it (0 in central mode)
    norm: float  # L2 norm of the received delta


# -- the noise a round has each device add ------------------------------------------------


def device_noise_std(spec: RoundSpec) -> float:
    """The noise each device adds for ``spec``: all of it in local mode, none in central mode.

    Local mode is the Gaussian mechanism applied to each device's clipped delta on its own, with
    std = noise_multiplier * C. The aggregator sees every upload, so there is no amplification
    by sampling, and two neighbouring histories of a device can move its clipped delta by 2C:
    the device's ledger charges each upload as the Gaussian with noise multiplier z / 2
    (:func:`sottovoce.sync._budget.mechanism`). The price is accuracy: the sum of n uploads
    carries sqrt(n) times the noise the aggregator would add to it in central mode.
    """
    if spec.mode is PrivacyMode.LOCAL:
        return spec.noise_multiplier * spec.clipping_norm
    return 0.0


# -- sealing ---------------------------------------------------------------------------------


def seal_delta(
    *,
    delta: npt.ArrayLike,
    spec: RoundSpec,
    device_secret: bytes,
    signing_key: Ed25519PrivateKey,
    aggregator_hpke_key: X25519PublicKey | bytes,
    rng: np.random.Generator | None = None,
    idempotency_key: str | None = None,
    period: str | None = None,
) -> SealedDelta:
    """Clip, noise (local mode), sign and encrypt one delta for ``spec``'s round.

    Local-mode noise is the discrete Gaussian from the OS CSPRNG unless ``rng`` (a seeded
    generator, for simulations and tests only) is given; HPKE takes its randomness from the OS.
    ``period`` defaults to ``period_label(spec)``; ``signing_key`` is the device's key for that
    period, the one it enrolled.
    """
    if spec.protocol != PROTOCOL_VERSION:
        raise UnsupportedProtocol(f"round spec of protocol {spec.protocol}")
    period = period_label(spec) if period is None else period
    values = clip(delta, spec.clipping_norm)
    std = device_noise_std(spec)
    if std > 0:
        values = add_noise(values, clipping_norm=spec.clipping_norm,
                           noise_multiplier=spec.noise_multiplier, rng=rng)  # fmt: skip
    key = _idempotency(device_secret, spec, period, idempotency_key)
    envelope = {
        "protocol": PROTOCOL_VERSION,
        "region": spec.region,
        "round_id": spec.round_id,
        "model_version": spec.model_version,
        "pseudonym": pseudonym(device_secret, period),
        "period": period,
        "device_key": b64encode(_raw_public(signing_key.public_key())),
        "idempotency_key": key,
    }
    body = values.astype("<f4").tobytes()
    signature = signing_key.sign(_statement(envelope, body, spec.clipping_norm, std))
    plaintext = _pack(body, spec.clipping_norm, std, signature)
    sealed = SUITE.encrypt(plaintext, _hpke_public(aggregator_hpke_key), info=_info(envelope))
    payload = {"enc": b64encode(sealed[:X25519_ENC_BYTES]),
               "ciphertext": b64encode(sealed[X25519_ENC_BYTES:])}  # fmt: skip
    return SealedDelta.model_validate(envelope | payload)


def _idempotency(secret: bytes, spec: RoundSpec, period: str, given: str | None) -> str:
    return given if given is not None else idempotency_key(secret, spec=spec, period=period)


def _info(envelope: dict[str, object]) -> bytes:
    """HPKE ``info``: binds the ciphertext to every envelope field (region, round, version...)."""
    return _INFO_TAG + canonical_json(envelope)


def _statement(envelope: dict[str, object], body: bytes, clipping_norm: float, std: float) -> bytes:
    """What the device signs: the round context, its pseudonym, the key and the delta's hash."""
    return _STATEMENT_TAG + canonical_json({
        "region": envelope["region"],
        "round_id": envelope["round_id"],
        "model_version": envelope["model_version"],
        "pseudonym": envelope["pseudonym"],
        "period": envelope["period"],
        "idempotency_key": envelope["idempotency_key"],
        "delta_sha256": hashlib.sha256(body).hexdigest(),
        "clipping_norm": clipping_norm,
        "noise_std": std,
    })  # fmt: skip


def _pack(body: bytes, clipping_norm: float, std: float, signature: bytes) -> bytes:
    return _HEADER.pack(MAGIC, len(body) // 4, clipping_norm, std) + signature + body


def _unpack(plaintext: bytes) -> tuple[bytes, float, float, bytes]:
    if len(plaintext) < HEADER_BYTES:
        raise Malformed("the sealed plaintext is shorter than its header")
    magic, count, clipping_norm, std = _HEADER.unpack_from(plaintext)
    if magic != MAGIC:
        raise Malformed("the sealed plaintext does not start with the protocol's magic bytes")
    body = plaintext[HEADER_BYTES:]
    if count == 0 or len(body) != 4 * count:
        raise Malformed(f"the sealed plaintext declares {count} values but holds {len(body)} bytes")
    if not (math.isfinite(clipping_norm) and clipping_norm > 0):
        raise Malformed("the attested clipping norm is not a positive number")
    if not (math.isfinite(std) and std >= 0):
        raise Malformed("the attested noise standard deviation is not a number >= 0")
    signature = plaintext[_HEADER.size : HEADER_BYTES]
    return body, float(clipping_norm), float(std), signature


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _hpke_public(key: X25519PublicKey | bytes) -> X25519PublicKey:
    if isinstance(key, X25519PublicKey):
        return key
    if len(key) != 32:
        raise ValueError("an X25519 public key is 32 raw bytes")
    return X25519PublicKey.from_public_bytes(key)


def _hpke_private(key: X25519PrivateKey | bytes) -> X25519PrivateKey:
    if isinstance(key, X25519PrivateKey):
        return key
    if len(key) != 32:
        raise ValueError("an X25519 private key is 32 raw bytes")
    return X25519PrivateKey.from_private_bytes(key)


# -- opening ---------------------------------------------------------------------------------


def open_delta(
    sealed: SealedDelta,
    *,
    region: str,
    round_id: str,
    model_version: int,
    hpke_private_key: X25519PrivateKey | bytes,
    clipping_norm: float,
    noise_std: float = 0.0,
    tolerance: float = 1e-6,
    dim: int | None = None,
) -> OpenedDelta:
    """Check, decrypt and verify one sealed delta for the receiver's round.

    ``noise_std`` is the noise the round has each device add (``device_noise_std(spec)``); the
    device must attest exactly that. The received norm must be at most
    ``clipping_norm * (1 + tolerance) + noise_std * (sqrt(dim) + NOISE_SLACK_SIGMAS)``:
    ``tolerance`` (relative) absorbs float rounding, the second term the device's own noise
    (see ``NOISE_SLACK_SIGMAS``). The check bounds a device's influence; it cannot tell
    honest noise from signal. ``dim``, when given, is the model's parameter count.
    """
    _check_envelope(sealed, region=region, round_id=round_id, model_version=model_version)
    envelope = sealed.model_dump(mode="json", exclude={"enc", "ciphertext"})
    plaintext = _decrypt(sealed, envelope, _hpke_private(hpke_private_key))
    body, attested_norm, attested_std, signature = _unpack(plaintext)
    if dim is not None and len(body) != 4 * dim:
        raise Malformed(f"the delta has {len(body) // 4} values; the model has {dim}")
    if not math.isclose(attested_std, noise_std, rel_tol=1e-9, abs_tol=1e-12):
        raise Malformed(
            f"the device added noise of std {attested_std:.6g}; the round requires {noise_std:.6g}"
        )
    statement = _statement(envelope, body, attested_norm, attested_std)
    _verify_device_signature(sealed.device_key, signature, statement)
    values = np.frombuffer(body, dtype="<f4").astype(np.float32)
    if not np.all(np.isfinite(values)):
        raise NonFinite("the delta has NaN or infinite values")
    _check_norm(values, attested_norm=attested_norm, clipping_norm=clipping_norm,
                noise_std=noise_std, tolerance=tolerance)  # fmt: skip
    return OpenedDelta(
        delta=values,
        pseudonym=sealed.pseudonym,
        period=sealed.period,
        device_key=sealed.device_key,
        idempotency_key=sealed.idempotency_key,
        clipping_norm=attested_norm,
        noise_std=attested_std,
        norm=l2_norm(values),
    )


def _decrypt(sealed: SealedDelta, envelope: dict[str, object], key: X25519PrivateKey) -> bytes:
    try:
        return SUITE.decrypt(
            b64decode(sealed.enc) + sealed.ciphertext_bytes(), key, info=_info(envelope)
        )
    except InvalidTag:
        raise Undecryptable(
            f"the delta does not decrypt with region {sealed.region}'s key for round "
            f"{sealed.round_id} version {sealed.model_version}"
        ) from None


def _verify_device_signature(device_key: str, signature: bytes, statement: bytes) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(b64decode(device_key)).verify(signature, statement)
    except (InvalidSignature, ValueError):
        raise BadSignature("the device's signature over the delta does not verify") from None


def _check_envelope(sealed: SealedDelta, *, region: str, round_id: str, model_version: int) -> None:
    if sealed.protocol != PROTOCOL_VERSION:
        raise UnsupportedProtocol(
            f"a delta of protocol version {sealed.protocol}; this aggregator speaks "
            f"{PROTOCOL_VERSION}"
        )
    if sealed.region != region:
        raise WrongRegion(f"a delta for region {sealed.region!r} sent to region {region!r}")
    if sealed.round_id != round_id:
        raise RoundClosed(f"a delta for round {sealed.round_id!r}, not the open round {round_id!r}")
    if sealed.model_version != model_version:
        raise WrongModelVersion(
            f"a delta from model version {sealed.model_version}; round {round_id!r} trains "
            f"version {model_version}"
        )


def _check_norm(
    values: FloatArray,
    *,
    attested_norm: float,
    clipping_norm: float,
    noise_std: float,
    tolerance: float,
) -> None:
    if attested_norm > clipping_norm * (1 + tolerance):
        raise NormExceeded(
            f"the device clipped to {attested_norm:.6g}, above the round's bound "
            f"{clipping_norm:.6g}"
        )
    bound = clipping_norm * (1 + tolerance) + noise_std * (
        math.sqrt(values.size) + NOISE_SLACK_SIGMAS
    )
    norm = l2_norm(values)
    if norm > bound:
        raise NormExceeded(f"the delta's norm {norm:.6g} is above the bound {bound:.6g}")
