"""Consent and age rules as pure functions of a region's policy and a user's recorded choices.

The device store records choices; these functions decide. Keeping the decision here means the
device, sync and aggregator can never disagree about what a policy allows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from sottovoce.policy._errors import AgeRestricted, ConsentMissing, PolicyViolation
from sottovoce.policy._model import ConsentMode, Purpose, Region


@dataclass(frozen=True)
class ConsentState:
    """A user's latest choice per purpose (absent: never asked) and declared age, if any."""

    choices: Mapping[Purpose, bool] = field(default_factory=dict)
    age: int | None = None


def consent_refusal(
    region: Region, purpose: Purpose, state: ConsentState
) -> PolicyViolation | None:
    """Why ``purpose`` is not allowed for this user in ``region``, or ``None`` if it is."""
    gate = region.age
    if state.age is None and gate.unknown_age == "deny":
        return AgeRestricted(
            f"region {region.id!r} needs the user's age before {purpose.value} "
            f"(minimum {gate.minimum_age})"
        )
    if state.age is not None and state.age < gate.minimum_age:
        return AgeRestricted(
            f"region {region.id!r} allows {purpose.value} from age {gate.minimum_age}"
        )
    choice = state.choices.get(purpose)
    if choice is False:
        return ConsentMissing(f"the user withdrew consent for {purpose.value}")
    if choice is None and region.consent_mode(purpose) is ConsentMode.OPT_IN:
        return ConsentMissing(
            f"{purpose.value} is opt-in in region {region.id!r} and the user has not opted in"
        )
    return None


def consent_allows(region: Region, purpose: Purpose, state: ConsentState) -> bool:
    return consent_refusal(region, purpose, state) is None
