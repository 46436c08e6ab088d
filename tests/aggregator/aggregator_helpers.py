"""What the aggregator tests share: a settable clock, keys with a policy that publishes them, and
what a central round adds to the weights, computed from first principles."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sottovoce.policy import Policy, example_policy, policy_from_data
from sottovoce.sync._wire import b64encode

T0 = datetime(2026, 11, 3, 9, 0, tzinfo=UTC)
DIM = 8
COHORT = 3
EXPECTED = 5.0  # the fixed denominator of central rounds: sampling rate x population
MECHANISM = {"sampling_rate": 0.01, "population": 500}  # 0.01 x 500 = EXPECTED


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Keys:
    """The EU aggregator's keys, and the example policy changed to publish them."""

    signing: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    hpke: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)

    def policy(self, **privacy: Any) -> Policy:
        data = example_policy().model_dump(mode="json")
        eu = data["regions"][0]
        assert eu["id"] == "eu"
        for key in eu["aggregator"]["public_keys"]:
            public = (self.hpke if key["use"] == "hpke" else self.signing).public_key()
            key["key"] = b64encode(public.public_bytes(Encoding.Raw, PublicFormat.Raw))
        eu["privacy"].update({"min_cohort": COHORT, **MECHANISM, **privacy})
        return policy_from_data(data)


GRID_STEPS_PER_C = 2**20  # the fixed-point grid: C / 2**20 per step (docs/privacy.md)


def central_update(
    total: npt.ArrayLike,
    rng: np.random.Generator,
    *,
    clipping_norm: float = 1.0,
    noise_multiplier: float = 1.0,
    expected_cohort: float = EXPECTED,
) -> npt.NDArray[np.float64]:
    """What a central round adds to the weights when the aggregator's noise comes from ``rng``
    (a seeded generator): the round's sum rounded to the grid of step gamma = C / 2**20, plus
    ``rint(normal(0, z * 2**20))`` grid steps per value, times gamma, over the fixed expected
    cohort. Independent of the product's code: the formula of docs/privacy.md."""
    values = np.asarray(total, dtype=np.float64)
    gamma = clipping_norm / GRID_STEPS_PER_C
    noise = np.rint(rng.normal(0.0, noise_multiplier * GRID_STEPS_PER_C, values.shape))
    update: npt.NDArray[np.float64] = (np.rint(values / gamma) + noise) * gamma / expected_cohort
    return update
