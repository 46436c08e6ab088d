"""Policy documents, decisions and the tamper-evident decision log.

Load a policy with :func:`load_policy` (YAML or JSON); identify it by ``policy.hash``. Consent
rules (:func:`consent_allows`) are pure functions of a region's policy and a user's recorded
choices, so the device, sync and aggregator all decide the same way. A :class:`DecisionEngine`
turns each enforcement point into a :class:`Decision`; a :class:`DecisionLog` keeps them in an
RFC 9162 Merkle log with signed C2SP checkpoints; :func:`verify_inclusion` and
:func:`verify_consistency` check its proofs.

Every reason code (why a decision was taken, why a request was refused) is one row of
:data:`REASON_CODES`, a :class:`Reason` with its outcome, logged sentence, HTTP status, whether a
refusal is final for the uploader and retry advice; :func:`reason` looks one up. ``REASONS`` (the
logged codes and their sentences) and every other table of codes are derived from it.

Errors (``code`` in the middle column)::

    PolicyError                    policy_error
    ├── InvalidPolicy              invalid_policy         a document that breaks the schema or a
    │                                                     rule (``problems`` names each)
    ├── UnknownRegion              unknown_region         a region or jurisdiction it lacks
    ├── PolicyViolation            policy_violation       an action the policy forbids
    │   ├── ConsentMissing         consent_missing        the purpose needs consent not given
    │   ├── AgeRestricted          age_restricted         below the minimum age (or age unknown)
    │   ├── ResidencyViolation     wrong_region           one region's data offered to another
    │   └── BudgetExhausted        budget_exhausted       the period's privacy budget would be
    │                                                     exceeded
    ├── ProofError                 bad_proof              a Merkle proof that does not verify
    │   ├── InclusionProofError    bad_inclusion_proof
    │   └── ConsistencyProofError  bad_consistency_proof
    ├── CheckpointError            bad_checkpoint         a checkpoint malformed or wrongly signed
    └── LogError                   log_error              the decision log cannot do what was asked

``PolicyError`` derives from :class:`sottovoce.SottovoceError`. Two violations are raised by
other packages as their own types too: ``sottovoce.sync.WrongRegion`` is also a
``ResidencyViolation``, and ``sottovoce.aggregator.RoundOverBudget`` also a ``BudgetExhausted``,
so ``except PolicyViolation`` catches every refusal by policy wherever it is raised.
"""

from sottovoce.policy._checkpoint import (
    Checkpoint,
    CheckpointSigner,
    open_checkpoint,
    parse_verifier_key,
)
from sottovoce.policy._consent import ConsentState, consent_allows, consent_refusal
from sottovoce.policy._decision import REASONS, Action, Decision, DecisionEngine, Outcome
from sottovoce.policy._diff import Change, diff_policies, format_diff
from sottovoce.policy._errors import (
    AgeRestricted,
    BudgetExhausted,
    CheckpointError,
    ConsentMissing,
    ConsistencyProofError,
    InclusionProofError,
    InvalidPolicy,
    PolicyError,
    PolicyViolation,
    Problem,
    ProofError,
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
from sottovoce.policy._log import DecisionLog, InclusionProof, LogError, VerifyReport
from sottovoce.policy._merkle import leaf_hash, verify_consistency, verify_inclusion
from sottovoce.policy._model import (
    PURPOSE_DATA,
    Accountant,
    AgeGate,
    Aggregator,
    AggregatorKey,
    ConsentMode,
    DataClass,
    DeviceCap,
    Policy,
    PrivacyBudget,
    PrivacyMode,
    Purpose,
    Region,
    format_duration,
)
from sottovoce.policy._reasons import REASON_CODES, Reason, reason
from sottovoce.policy._report import render_report

__all__ = [
    "PURPOSE_DATA",
    "REASONS",
    "REASON_CODES",
    "Accountant",
    "Action",
    "AgeGate",
    "AgeRestricted",
    "Aggregator",
    "AggregatorKey",
    "BudgetExhausted",
    "Change",
    "Checkpoint",
    "CheckpointError",
    "CheckpointSigner",
    "ConsentMissing",
    "ConsentMode",
    "ConsentState",
    "ConsistencyProofError",
    "DataClass",
    "Decision",
    "DecisionEngine",
    "DecisionLog",
    "DeviceCap",
    "InclusionProof",
    "InclusionProofError",
    "InvalidPolicy",
    "LogError",
    "Outcome",
    "Policy",
    "PolicyError",
    "PolicyViolation",
    "PrivacyBudget",
    "PrivacyMode",
    "Problem",
    "ProofError",
    "Purpose",
    "Reason",
    "Region",
    "ResidencyViolation",
    "UnknownRegion",
    "VerifyReport",
    "consent_allows",
    "consent_refusal",
    "diff_policies",
    "example_policy",
    "example_policy_path",
    "format_diff",
    "format_duration",
    "leaf_hash",
    "load_policy",
    "open_checkpoint",
    "parse_policy",
    "parse_verifier_key",
    "policy_from_data",
    "reason",
    "render_report",
    "verify_consistency",
    "verify_inclusion",
]
