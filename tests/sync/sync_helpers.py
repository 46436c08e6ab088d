"""Shared builders for the sync tests: a round spec, keys for a device and an aggregator."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sottovoce.sync import (
    OpenedDelta,
    RoundSpec,
    SealedDelta,
    device_noise_std,
    open_delta,
    seal_delta,
)

PERIOD_START = datetime(2026, 11, 1, tzinfo=UTC)
PROTOCOL_DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
MODEL_ID = "5e" * 32


def make_spec(**overrides: Any) -> RoundSpec:
    """A valid EU round under the example policy (central mode, C = 1; its mechanism)."""
    fields: dict[str, Any] = {
        "round_id": "eu-2026-11-01-r7",
        "region": "eu",
        "model_id": MODEL_ID,
        "model_version": 3,
        "mode": "central",
        "clipping_norm": 1.0,
        "noise_multiplier": 1.1,
        "sampling_rate": 0.002,
        "min_cohort": 25,
        "expected_cohort": 100.0,
        "deadline": PERIOD_START + timedelta(days=2),
        "epsilon_spent": 1.5,
        "epsilon_after": 1.9,
        "delta": 1e-6,
        "period_start": PERIOD_START,
    }
    fields.update(overrides)
    return RoundSpec.model_validate(fields)


@dataclass
class Parties:
    """A device (secret, per-period signing key) and its region's aggregator (HPKE key)."""

    device_secret: bytes = b"\x07" * 32
    device_key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    aggregator: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)

    def seal(
        self, delta: npt.ArrayLike, spec: RoundSpec, *, seed: int = 0, **kw: Any
    ) -> SealedDelta:
        options: dict[str, Any] = {
            "device_secret": self.device_secret,
            "signing_key": self.device_key,
            "aggregator_hpke_key": self.aggregator.public_key(),
            "rng": np.random.default_rng(seed),
        }
        options.update(kw)
        return seal_delta(delta=delta, spec=spec, **options)

    def open(self, sealed: SealedDelta, spec: RoundSpec, **kw: Any) -> OpenedDelta:
        options: dict[str, Any] = {
            "region": spec.region,
            "round_id": spec.round_id,
            "model_version": spec.model_version,
            "hpke_private_key": self.aggregator,
            "clipping_norm": spec.clipping_norm,
            "noise_std": device_noise_std(spec),
        }
        options.update(kw)
        return open_delta(sealed, **options)


def documented_fields(heading: str) -> list[str]:
    """The field names in the table under ``### heading`` in docs/protocol.md, in order."""
    text = PROTOCOL_DOC.read_text(encoding="utf-8")
    section = text.split(f"### {heading}\n", 1)[1].split("\n#", 1)[0]
    return re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE)
