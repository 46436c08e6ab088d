"""The region's private keys, used and never handed out: signing round specs, releases and the
decision log's checkpoints, keying the decision digests, and opening sealed deltas.

:class:`RegionSigner` is the one place of the aggregator that holds the keys. Every other part
asks it to sign or to open; none of its methods or attributes returns a private key (the
checkpoint signer it makes holds its own copy, inside the decision log).
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime
from typing import Final

import numpy.typing as npt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sottovoce.policy import CheckpointSigner, Region
from sottovoce.sync import (
    ModelRelease,
    OpenedDelta,
    RoundSpec,
    SealedDelta,
    SignedRoundSpec,
    open_delta,
    sign_release,
    sign_round_spec,
)
from sottovoce.sync._seal import device_noise_std
from sottovoce.sync._wire import b64encode

__all__ = ["RegionSigner"]

_DIGEST_TAG: Final = b"sottovoce/aggregator/decision-digest/v1"


class RegionSigner:
    """The region's signing (Ed25519) and HPKE (X25519) keys, which must be the ones the
    region's policy publishes (devices check and seal against those): else ``ValueError``."""

    __slots__ = ("__hpke", "__signing", "kid", "region_id")

    def __init__(
        self, region: Region, *, signing_key: Ed25519PrivateKey, hpke_key: X25519PrivateKey
    ) -> None:
        self.__signing = signing_key
        self.__hpke = hpke_key
        self.region_id = region.id
        self.kid = _matching_kid(region, signing_key, hpke_key)

    def digest_key(self) -> bytes:
        """The key of the decision engine's input digests (derived, not the signing key)."""
        raw = self.__signing.private_bytes_raw()
        return hmac.new(raw, _DIGEST_TAG, hashlib.sha256).digest()

    def checkpoint_signer(self, origin: str) -> CheckpointSigner:
        """The decision log's checkpoint signer, under the region's signing key."""
        return CheckpointSigner.from_private_bytes(origin, self.__signing.private_bytes_raw())

    def sign_round_spec(self, spec: RoundSpec) -> SignedRoundSpec:
        return sign_round_spec(spec, signing_key=self.__signing, kid=self.kid)

    def sign_release(
        self, *, model_id: str, version: int, weights: npt.ArrayLike, created: datetime
    ) -> ModelRelease:
        return sign_release(model_id=model_id, version=version, weights=weights,
                            created=created, signing_key=self.__signing,
                            kid=self.kid)  # fmt: skip

    def open_delta(self, sealed: SealedDelta, spec: RoundSpec, *, dim: int) -> OpenedDelta:
        """Decrypt and verify ``sealed`` for its round (raises the ``SyncError`` it fails)."""
        return open_delta(
            sealed,
            region=self.region_id,
            round_id=spec.round_id,
            model_version=spec.model_version,
            hpke_private_key=self.__hpke,
            clipping_norm=spec.clipping_norm,
            noise_std=device_noise_std(spec),
            dim=dim,
        )

    def __repr__(self) -> str:
        return f"RegionSigner(region={self.region_id!r}, kid={self.kid!r})"


def _matching_kid(region: Region, signing: Ed25519PrivateKey, hpke: X25519PrivateKey) -> str:
    """The policy's kid for the signing key; both keys must be the region's published ones."""
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    signing_public = b64encode(signing.public_key().public_bytes(*raw))
    hpke_public = b64encode(hpke.public_key().public_bytes(*raw))
    keys = region.aggregator.public_keys
    if not any(k.use == "hpke" and k.key == hpke_public for k in keys):
        raise ValueError(f"the HPKE key is not one of region {region.id}'s keys")
    for key in keys:
        if key.use == "signing" and key.key == signing_public:
            return key.kid
    raise ValueError(f"the signing key is not one of region {region.id}'s keys")
