"""The device's keys: a 32-byte secret and an Ed25519 signing key per budget period, kept in
the store's file. They are used here and never handed out, as a keyset handle in Tink signs
without giving its key away: the secret keys the device's pseudonyms, its upload keys and its
coin for each round; a period's signing key signs that period's uploads, and only its public
half leaves this class (the region enrols it).
"""

from __future__ import annotations

import secrets

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from sottovoce.device._store_file import StoreFile
from sottovoce.sync import (
    RoundSpec,
    SealedDelta,
    idempotency_key,
    period_label,
    sample_into_round,
    seal_delta,
)

__all__ = ["DeviceKeys"]


class DeviceKeys:
    """Operations with the device's keys (``meta.device_secret`` and ``device_keys``)."""

    __slots__ = ("_file",)  # the keys stay in the file: nothing holds them between calls

    def __init__(self, file: StoreFile) -> None:
        self._file = file

    def public_key(self, period: str) -> Ed25519PublicKey:
        """The device's public key for ``period`` (made on first use; one per period), the
        one it enrols with its region and the aggregator checks its uploads against."""
        return self._signing_key(period).public_key()

    def in_round(self, spec: RoundSpec) -> bool:
        """Whether the device's secret coin puts it in ``spec``'s round (the same answer every
        time; see :func:`sottovoce.sync.sample_into_round`)."""
        return sample_into_round(spec, self._secret())

    def upload_key(self, spec: RoundSpec, *, period: str | None = None) -> str:
        """The idempotency key of the device's upload to ``spec``'s round (see
        :func:`sottovoce.sync.idempotency_key`); ``period`` defaults to the spec's."""
        period = period_label(spec) if period is None else period
        return idempotency_key(self._secret(), spec=spec, period=period)

    def seal(
        self,
        delta: npt.ArrayLike,
        *,
        spec: RoundSpec,
        aggregator_hpke_key: X25519PublicKey | bytes,
        period: str | None = None,
        upload_key: str | None = None,
        rng: np.random.Generator | None = None,
    ) -> SealedDelta:
        """``delta`` sealed for ``spec``'s round (:func:`sottovoce.sync.seal_delta`) under the
        device's pseudonym for ``period`` and signed with its key for that period."""
        period = period_label(spec) if period is None else period
        return seal_delta(delta=delta, spec=spec, device_secret=self._secret(),
                          signing_key=self._signing_key(period),
                          aggregator_hpke_key=aggregator_hpke_key, rng=rng, period=period,
                          idempotency_key=upload_key)  # fmt: skip

    def _secret(self) -> bytes:
        return bytes.fromhex(self._file.meta("device_secret"))

    def _signing_key(self, period: str) -> Ed25519PrivateKey:
        with self._file.write():
            self._file.conn.execute(
                "INSERT OR IGNORE INTO device_keys (period, signing_key) VALUES (?, ?)",
                (period, secrets.token_hex(32)),
            )
            row = self._file.conn.execute(
                "SELECT signing_key FROM device_keys WHERE period = ?", (period,)
            ).fetchone()
        return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(row[0]))
