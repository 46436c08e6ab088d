"""What the aggregator tests share: a settable clock, and keys with a policy that publishes them."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

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
