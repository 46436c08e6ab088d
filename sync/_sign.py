"""Aggregator signatures on round specs and model releases, and their checks on the device.

Data flow steps 6-7: the aggregator signs each :class:`RoundSpec` it announces and each
:class:`ModelRelease` it publishes with its region's Ed25519 signing key (the ``signing`` key of
the region in the policy); the device verifies both against the key pinned in its own copy of
the policy before it takes part in a round or swaps in new weights.

What is signed is a domain tag and the RFC 8785 canonical JSON of the message (for a release,
every field but ``signature``). The tags keep one key's signatures from being replayed across
message types.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sottovoce.policy._canonical import canonical_json
from sottovoce.sync._errors import BadSignature, Malformed, NonFinite, UnsupportedProtocol
from sottovoce.sync._wire import (
    PROTOCOL_VERSION,
    ModelRelease,
    RoundSpec,
    SignedRoundSpec,
    b64decode,
    b64encode,
)

_SPEC_TAG: Final = b"sottovoce/round-spec/v1\x00"
_RELEASE_TAG: Final = b"sottovoce/model-release/v1\x00"

SigningPublicKey = Ed25519PublicKey | bytes | str  # a key object, 32 raw bytes, or base64


def signing_public_key(key: SigningPublicKey) -> Ed25519PublicKey:
    """An Ed25519 public key from an object, raw bytes, or base64 (as policy documents hold it)."""
    if isinstance(key, Ed25519PublicKey):
        return key
    raw = b64decode(key) if isinstance(key, str) else key
    if len(raw) != 32:
        raise ValueError("an Ed25519 public key is 32 raw bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def round_spec_message(spec: RoundSpec) -> bytes:
    """The bytes a round spec's signature covers."""
    return _SPEC_TAG + canonical_json(spec.model_dump(mode="json"))


def sign_round_spec(
    spec: RoundSpec, *, signing_key: Ed25519PrivateKey, kid: str
) -> SignedRoundSpec:
    """The aggregator's signed announcement of ``spec``."""
    signature = signing_key.sign(round_spec_message(spec))
    return SignedRoundSpec(spec=spec, kid=kid, signature=b64encode(signature))


def verify_round_spec(
    signed: SignedRoundSpec, aggregator_signing_public_key: SigningPublicKey
) -> RoundSpec:
    """The spec, if its protocol is spoken here and the region's aggregator signed it."""
    if signed.spec.protocol != PROTOCOL_VERSION:
        raise UnsupportedProtocol(f"a round spec of protocol version {signed.spec.protocol}")
    key = signing_public_key(aggregator_signing_public_key)
    try:
        key.verify(b64decode(signed.signature), round_spec_message(signed.spec))
    except InvalidSignature:
        raise BadSignature(
            f"round spec {signed.spec.round_id!r} is not signed by the region's aggregator key"
        ) from None
    return signed.spec


def release_message(release: ModelRelease) -> bytes:
    """The bytes a release's signature covers: every field but ``signature``."""
    return _RELEASE_TAG + canonical_json(release.model_dump(mode="json", exclude={"signature"}))


def sign_release(
    *,
    model_id: str,
    version: int,
    weights: npt.ArrayLike,
    created: datetime,
    signing_key: Ed25519PrivateKey,
    kid: str,
) -> ModelRelease:
    """A signed release of ``weights`` (a flat float32 vector) as ``version`` of ``model_id``."""
    values = np.asarray(weights, dtype=np.float32)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"weights are a non-empty flat vector, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise NonFinite("the weights have NaN or infinite values; they cannot be released")
    unsigned = ModelRelease(
        model_id=model_id,
        version=version,
        weights=b64encode(values.astype("<f4").tobytes()),
        created=created,
        kid=kid,
        signature=b64encode(bytes(64)),
    )
    signature = signing_key.sign(release_message(unsigned))
    return unsigned.model_copy(update={"signature": b64encode(signature)})


def verify_release(
    release: ModelRelease, aggregator_signing_public_key: SigningPublicKey
) -> npt.NDArray[np.float32]:
    """The release's weights, if its protocol is spoken here and the aggregator signed it.

    Whether the release fits the local model (``model_id``) and is newer than the one in use
    is the caller's decision; this checks the message itself.
    """
    if release.protocol != PROTOCOL_VERSION:
        raise UnsupportedProtocol(f"a model release of protocol version {release.protocol}")
    key = signing_public_key(aggregator_signing_public_key)
    try:
        key.verify(b64decode(release.signature), release_message(release))
    except InvalidSignature:
        raise BadSignature(
            f"release {release.version} of model {release.model_id[:12]} is not signed by the "
            "region's aggregator key"
        ) from None
    weights = release.weights_array()
    if weights.size == 0:
        raise Malformed("a release without weights")
    if not np.all(np.isfinite(weights)):
        raise NonFinite(f"release {release.version} has NaN or infinite weights")
    return weights
