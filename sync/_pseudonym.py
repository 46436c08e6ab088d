"""What a device is called outside itself: its secret, per-period pseudonyms, idempotency keys.

A device keeps one secret (:func:`new_device_secret`) that never leaves it. From it and the
round's budget period (:func:`period_label`) it derives the pseudonym a sealed delta carries
(rotating every period, so periods cannot be linked) and the default idempotency key of an
upload (so a delta resealed after a crash is counted once). Pure functions of their arguments.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import time
from typing import Final

from sottovoce.policy._canonical import canonical_json
from sottovoce.sync._wire import RoundSpec

__all__ = ["MIN_SECRET_BYTES", "idempotency_key", "new_device_secret", "period_label", "pseudonym"]

MIN_SECRET_BYTES: Final = 16
_PSEUDONYM_TAG: Final = b"sottovoce-pseudonym\x00"
_IDEMPOTENCY_TAG: Final = b"sottovoce-idempotency\x00"


def pseudonym(device_secret: bytes, period: str) -> str:
    """The device's pseudonym for one budget period (:func:`period_label`): HMAC-SHA256 of the
    period, hex.

    Keyed with a secret that never leaves the device, so pseudonyms of different periods
    cannot be linked to each other or to the device without it.
    """
    _check_secret(device_secret)
    message = _PSEUDONYM_TAG + period.encode("utf-8")
    return hmac.new(device_secret, message, hashlib.sha256).hexdigest()


def idempotency_key(device_secret: bytes, *, spec: RoundSpec, period: str) -> str:
    """The default idempotency key: one per device, round, model version and period.

    Deterministic, so a delta resealed after a crash (before the outbox row committed) carries
    the same key and the aggregator counts it once; keyed, so it links nothing without the
    secret.
    """
    _check_secret(device_secret)
    context = {"region": spec.region, "round_id": spec.round_id,
               "model_version": spec.model_version, "period": period}  # fmt: skip
    digest = hmac.new(device_secret, _IDEMPOTENCY_TAG + canonical_json(context), hashlib.sha256)
    return digest.hexdigest()[:32]


def period_label(spec: RoundSpec) -> str:
    """The period a round belongs to, as pseudonyms and per-period keys name it.

    The start of the spec's privacy-accounting period (``"2026-11-01"``, or the full UTC time
    when the period does not start at midnight): the pseudonym rotates with the budget.
    """
    start = spec.period_start
    if start.time() == time(0):
        return start.date().isoformat()
    return start.strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_secret(device_secret: bytes) -> None:
    if len(device_secret) < MIN_SECRET_BYTES:
        raise ValueError(f"a device secret must be at least {MIN_SECRET_BYTES} bytes")


def new_device_secret() -> bytes:
    """A fresh 32-byte device secret from the OS's CSPRNG (kept on the device, never sent)."""
    return secrets.token_bytes(32)
