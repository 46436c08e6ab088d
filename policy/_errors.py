"""Errors of ``sottovoce.policy`` (all but ``LogError``, which lives in ``_log.py``).

The package docstring draws their tree, with each one's ``code`` and meaning.
"""

from __future__ import annotations

from dataclasses import dataclass

from sottovoce._errors import SottovoceError


class PolicyError(SottovoceError):
    """Base class of policy errors."""

    code = "policy_error"


@dataclass(frozen=True)
class Problem:
    """One broken rule in a policy document: where, which rule, and what is wrong."""

    field: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message} [{self.rule}]"


class InvalidPolicy(PolicyError):
    """A policy document that cannot be accepted; ``problems`` names each field and rule."""

    code = "invalid_policy"

    def __init__(self, problems: list[Problem], *, source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        noun = "problem" if len(self.problems) == 1 else "problems"
        super().__init__(f"invalid policy{where} ({len(self.problems)} {noun}):\n{lines}")


class UnknownRegion(PolicyError):
    code = "unknown_region"


class PolicyViolation(PolicyError):
    """An action the policy forbids."""

    code = "policy_violation"


class ConsentMissing(PolicyViolation):
    code = "consent_missing"


class AgeRestricted(PolicyViolation):
    code = "age_restricted"


class ResidencyViolation(PolicyViolation):
    code = "wrong_region"


class BudgetExhausted(PolicyViolation):
    code = "budget_exhausted"


class ProofError(PolicyError):
    """A Merkle inclusion or consistency proof that does not verify."""

    code = "bad_proof"


class InclusionProofError(ProofError):
    code = "bad_inclusion_proof"


class ConsistencyProofError(ProofError):
    code = "bad_consistency_proof"


class CheckpointError(PolicyError):
    """A signed checkpoint that is malformed or whose signature does not verify."""

    code = "bad_checkpoint"
