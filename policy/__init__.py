"""Policy documents: what every part of sottovoce enforces.

Load a policy with :func:`load_policy` (YAML or JSON); identify it by ``policy.hash``. Consent
rules (:func:`consent_allows`) are pure functions of a region's policy and a user's recorded
choices, so the device, sync and aggregator all decide the same way.
"""

from sottovoce.policy._consent import ConsentState, consent_allows, consent_refusal
from sottovoce.policy._errors import (
    AgeRestricted,
    BudgetExhausted,
    ConsentMissing,
    InvalidPolicy,
    PolicyError,
    PolicyViolation,
    Problem,
    ResidencyViolation,
    UnknownRegion,
)
from sottovoce.policy._load import (
    example_policy,
    example_policy_path,
    load_policy,
    parse_policy,
    policy_from_data,
)
from sottovoce.policy._model import (
    PURPOSE_DATA,
    Accountant,
    AgeGate,
    Aggregator,
    AggregatorKey,
    ConsentMode,
    DataClass,
    Policy,
    PrivacyBudget,
    PrivacyMode,
    Purpose,
    Region,
    format_duration,
)

__all__ = [
    "PURPOSE_DATA",
    "Accountant",
    "AgeGate",
    "AgeRestricted",
    "Aggregator",
    "AggregatorKey",
    "BudgetExhausted",
    "ConsentMissing",
    "ConsentMode",
    "ConsentState",
    "DataClass",
    "InvalidPolicy",
    "Policy",
    "PolicyError",
    "PolicyViolation",
    "PrivacyBudget",
    "PrivacyMode",
    "Problem",
    "Purpose",
    "Region",
    "ResidencyViolation",
    "UnknownRegion",
    "consent_allows",
    "consent_refusal",
    "example_policy",
    "example_policy_path",
    "format_duration",
    "load_policy",
    "parse_policy",
    "policy_from_data",
]
