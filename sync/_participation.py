"""Whether a device takes part in a round: its own policy check and its own coin (pure).

Between data flow steps 4 and 5: after verifying a signed round spec, the device compares it
with its own copy of the region's policy (``check_spec``) and refuses a round that is weaker
than the policy promises, whatever the aggregator says. It then samples itself into the round
with the spec's rate (``sample_into_round``), the Poisson sampling the privacy accountant
assumes; the coin is keyed with the device secret, so the aggregator cannot predict it and a
restarted device decides the same way.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

from sottovoce.policy import Region
from sottovoce.policy._canonical import canonical_json
from sottovoce.sync._errors import SpecRefused, UnsupportedProtocol
from sottovoce.sync._wire import PROTOCOL_VERSION, RoundSpec

_SAMPLE_TAG: Final = b"sottovoce-sample\x00"


def check_spec(spec: RoundSpec, policy_region: Region) -> None:
    """Raise :class:`SpecRefused` unless ``spec`` stays within the region's policy.

    The spec must be for this region and its privacy mode, clip no looser than the policy's
    norm, wait for at least the policy's minimum cohort, add noise, stay within the period's
    epsilon and delta budget, and not stretch a budget period beyond the policy's length (a
    period that never ends would never rotate the pseudonym or renew the budget).
    """
    if spec.protocol != PROTOCOL_VERSION:
        raise UnsupportedProtocol(f"a round spec of protocol version {spec.protocol}")
    privacy = policy_region.privacy
    rules: list[tuple[bool, str, str]] = [
        (spec.region != policy_region.id, "region",
         f"the round is for region {spec.region!r}, this device is in {policy_region.id!r}"),
        (spec.mode is not privacy.mode, "mode",
         f"the round's privacy mode is {spec.mode.value}; the policy says {privacy.mode.value}"),
        (spec.clipping_norm > privacy.clipping_norm, "clipping_norm",
         f"the round clips at {spec.clipping_norm:g}, above the policy's "
         f"{privacy.clipping_norm:g}"),
        (spec.min_cohort < privacy.min_cohort, "min_cohort",
         f"the round closes with {spec.min_cohort} devices, below the policy's minimum of "
         f"{privacy.min_cohort}"),
        (spec.noise_multiplier <= 0, "noise_multiplier",
         "the round adds no noise, so no epsilon can hold"),
        (spec.delta > privacy.delta, "delta",
         f"the round's delta {spec.delta:g} is above the policy's {privacy.delta:g}"),
        (spec.deadline - spec.period_start > privacy.period, "period",
         f"the round ends more than the policy's period ({privacy.period}) after its budget "
         "period started"),
    ]  # fmt: skip
    for broken, rule, detail in rules:
        if broken:
            raise SpecRefused(f"refusing round {spec.round_id!r}: {detail}", rule=rule)
    if max(spec.epsilon_spent, spec.epsilon_after) > privacy.epsilon:
        raise SpecRefused(
            f"refusing round {spec.round_id!r}: it would bring the period's epsilon to "
            f"{spec.epsilon_after:.4g}, above the policy's budget of {privacy.epsilon:.4g}",
            rule="epsilon",
            code="budget_exhausted",
        )


def sample_into_round(spec: RoundSpec, device_secret: bytes) -> bool:
    """True with probability ``spec.sampling_rate``, the same answer every time for a round.

    The coin is the first 64 bits of HMAC-SHA256(device secret, region and round id), read as
    a uniform number in [0, 1): pseudorandom to anyone without the secret, independent across
    rounds, and stable across restarts (no state to keep).
    """
    if len(device_secret) < 16:
        raise ValueError("a device secret must be at least 16 bytes")
    context = {"region": spec.region, "round_id": spec.round_id}
    digest = hmac.new(device_secret, _SAMPLE_TAG + canonical_json(context), hashlib.sha256)
    coin = int.from_bytes(digest.digest()[:8], "big") / 2**64
    return coin < spec.sampling_rate
