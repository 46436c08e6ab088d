"""Policy decisions: what was decided, under which policy, for which region, and why.

The device, sync and the aggregator ask a :class:`DecisionEngine` at every enforcement point
(store events, personalize, contribute a delta, accept a delta, open a round, publish a release,
purge for retention, erase, export, record consent). The engine only decides; callers do the I/O
and append the returned :class:`Decision` to their :class:`~sottovoce.policy.DecisionLog`.

A decision never carries personal data: no user, device or track ids, no event contents. What
it was about is bound only by ``inputs_digest``, an HMAC-SHA256 of the canonical inputs under a
key the log's owner holds, so whoever holds the inputs can show which decision was about them
while the log alone reveals nothing (a plain hash of a user id could be reversed by guessing).
``metrics`` holds only non-personal numbers (counts, epsilon, norms).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from sottovoce.policy._canonical import canonical_json
from sottovoce.policy._consent import ConsentState, consent_refusal
from sottovoce.policy._model import Policy, Purpose, Region
from sottovoce.policy._reasons import REASON_CODES


class Action(StrEnum):
    STORE_EVENTS = "store_events"
    PERSONALIZE = "personalize"
    CONTRIBUTE_DELTA = "contribute_delta"
    ACCEPT_DELTA = "accept_delta"
    ENROLL_DEVICE = "enroll_device"
    OPEN_ROUND = "open_round"
    PUBLISH_RELEASE = "publish_release"
    PURGE_RETENTION = "purge_retention"
    ERASE = "erase"
    EXPORT = "export"
    RECORD_CONSENT = "record_consent"
    APPLY_POLICY = "apply_policy"


class Outcome(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


# The decision log's reason codes and their sentences, derived from the one registry of codes
# (:mod:`._reasons`): every code that is a logged decision, and which of them deny.
REASONS: dict[str, str] = {r.code: r.sentence for r in REASON_CODES if r.sentence is not None}
DENY_REASONS = frozenset(
    r.code for r in REASON_CODES if r.sentence is not None and r.outcome == "deny"
)

Metric = int | float | str | bool


class Decision(BaseModel):
    """One decision, as it is logged (RFC 8785 canonical JSON of this model is the log entry)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = 1
    action: Action
    outcome: Outcome
    reason: Annotated[str, Field(pattern=r"^[a-z_]+$")]
    sentence: str
    policy_hash: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    region: str
    inputs_digest: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    at: AwareDatetime
    metrics: dict[str, Metric] = Field(default_factory=dict)

    @property
    def allowed(self) -> bool:
        return self.outcome is Outcome.ALLOW

    def canonical(self) -> bytes:
        """The entry's bytes in the log: RFC 8785 canonical JSON."""
        return canonical_json(self.model_dump(mode="json"))


def _now() -> datetime:
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


class DecisionEngine:
    """Decides by one region's policy. Pure: no I/O, the clock and digest key are given."""

    def __init__(
        self,
        policy: Policy,
        region: str,
        *,
        digest_key: bytes,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        if len(digest_key) < 16:
            raise ValueError("the digest key must be at least 16 bytes")
        self.policy = policy
        self.region: Region = policy.region(region)
        self._key = digest_key
        self._clock = clock

    def digest(self, inputs: Mapping[str, Any]) -> str:
        """Keyed digest of the canonical inputs (what binds a decision to what it was about)."""
        canonical = canonical_json(dict(inputs))
        return hmac.new(self._key, canonical, hashlib.sha256).hexdigest()

    def decide(
        self,
        action: Action,
        reason: str,
        *,
        inputs: Mapping[str, Any],
        metrics: Mapping[str, Metric] | None = None,
        **fill: Any,
    ) -> Decision:
        """A decision with a known reason code; ``fill`` completes its sentence."""
        if reason not in REASONS:
            raise ValueError(f"unknown reason code {reason!r}")
        sentence = REASONS[reason].format(region=self.region.id, **fill)
        return Decision(
            action=action,
            outcome=Outcome.DENY if reason in DENY_REASONS else Outcome.ALLOW,
            reason=reason,
            sentence=sentence[0].upper() + sentence[1:] + ".",
            policy_hash=self.policy.hash,
            region=self.region.id,
            inputs_digest=self.digest(inputs),
            at=self._clock(),
            metrics=dict(metrics or {}),
        )

    # -- consent-gated actions on the device --------------------------------------------------
    def consent(
        self,
        action: Action,
        purpose: Purpose,
        state: ConsentState,
        *,
        inputs: Mapping[str, Any],
        metrics: Mapping[str, Metric] | None = None,
    ) -> Decision:
        """May ``action`` go ahead for a user with this consent state? (store, personalize...)"""
        reason = self.consent_reason(purpose, state)
        return self.decide(action, reason, inputs=inputs, metrics=metrics, purpose=purpose.value)

    def consent_reason(self, purpose: Purpose, state: ConsentState) -> str:
        """The reason code :meth:`consent` would give, without building a decision (callers
        that log only changes check it first)."""
        refusal = consent_refusal(self.region, purpose, state)
        if refusal is not None:
            return refusal.code
        return "consent_given" if state.choices.get(purpose) is True else "opt_out_default"

    def store_events(self, state: ConsentState, *, inputs: Mapping[str, Any]) -> Decision:
        return self.consent(Action.STORE_EVENTS, Purpose.PERSONALIZATION, state, inputs=inputs)

    def personalize(self, state: ConsentState, *, inputs: Mapping[str, Any]) -> Decision:
        return self.consent(Action.PERSONALIZE, Purpose.PERSONALIZATION, state, inputs=inputs)

    def contribute_delta(self, state: ConsentState, *, inputs: Mapping[str, Any]) -> Decision:
        """May the user's training go into a round? (The spec itself is checked by
        ``sottovoce.sync.check_spec``; its refusals are logged with :meth:`spec_refused`.)"""
        return self.consent(Action.CONTRIBUTE_DELTA, Purpose.FEDERATED_TRAINING, state,
                            inputs=inputs)  # fmt: skip

    def spec_refused(self, code: str, *, inputs: Mapping[str, Any], detail: str) -> Decision:
        """The device refused a round spec beyond its copy of the policy (``code`` is
        ``spec_outside_policy`` or ``budget_exhausted``)."""
        return self.decide(Action.CONTRIBUTE_DELTA, code, inputs=inputs, detail=detail,
                           budget=self.region.privacy.epsilon)  # fmt: skip

    # -- the aggregator ----------------------------------------------------------------------
    def accept_delta(
        self, *, inputs: Mapping[str, Any], refusal: str | None = None, region: str | None = None
    ) -> Decision:
        """Record the verdict on an uploaded delta; ``refusal`` is the verifier's reason code."""
        if region is not None and region != self.region.id:
            refusal = "wrong_region"
        if refusal is not None and refusal not in DENY_REASONS:
            raise ValueError(f"{refusal!r} is not a refusal reason")
        return self.decide(Action.ACCEPT_DELTA, refusal or "within_policy", inputs=inputs)

    def enroll_device(self, *, inputs: Mapping[str, Any], refusal: str | None = None) -> Decision:
        """A device's per-period key enrolled, or refused (``not_enrolled`` for a missing or
        wrong token, ``malformed``, ``unsupported_protocol``)."""
        if refusal is not None and refusal not in DENY_REASONS:
            raise ValueError(f"{refusal!r} is not a refusal reason")
        return self.decide(Action.ENROLL_DEVICE, refusal or "within_policy", inputs=inputs)

    def open_round(
        self, *, inputs: Mapping[str, Any], epsilon_spent: float, epsilon_after: float
    ) -> Decision:
        budget = self.region.privacy.epsilon
        metrics = {"epsilon_spent": epsilon_spent, "epsilon_after": epsilon_after,
                   "epsilon_budget": budget}  # fmt: skip
        reason = "budget_exhausted" if epsilon_after > budget else "within_budget"
        return self.decide(Action.OPEN_ROUND, reason, inputs=inputs, metrics=metrics,
                           budget=budget, spent=epsilon_after)  # fmt: skip

    def publish_release(
        self,
        *,
        inputs: Mapping[str, Any],
        epsilon_spent: float,
        cohort: int | None = None,
        expected_cohort: float | None = None,
    ) -> Decision:
        """A round released. Central mode passes ``expected_cohort`` (the fixed denominator) and
        no count: the count of a central round is not part of what its noise protects. Local
        mode passes the ``cohort`` it closed with (each upload carries its own noise)."""
        privacy = self.region.privacy
        metrics: dict[str, Metric] = {"epsilon_spent": epsilon_spent,
                                      "epsilon_budget": privacy.epsilon}  # fmt: skip
        if expected_cohort is not None:
            metrics["expected_cohort"] = expected_cohort
            return self.decide(Action.PUBLISH_RELEASE, "deadline_reached", inputs=inputs,
                               metrics=metrics, expected=expected_cohort)  # fmt: skip
        if cohort is None:
            raise ValueError("a release needs the cohort (local mode) or the expected cohort")
        metrics["cohort"] = cohort
        return self.decide(Action.PUBLISH_RELEASE, "cohort_met", inputs=inputs, metrics=metrics,
                           cohort=cohort, min_cohort=privacy.min_cohort)  # fmt: skip

    def round_abandoned(
        self, *, inputs: Mapping[str, Any], reason: str, epsilon_spent: float
    ) -> Decision:
        """A round ended without a release: ``cohort_not_met`` (local mode, too few uploads by
        the deadline) or ``budget_exhausted`` (the policy changed under an open round). No count
        is logged: nothing derived from an abandoned round's contributions leaves it."""
        privacy = self.region.privacy
        metrics: dict[str, Metric] = {"epsilon_spent": epsilon_spent,
                                      "epsilon_budget": privacy.epsilon}  # fmt: skip
        return self.decide(Action.PUBLISH_RELEASE, reason, inputs=inputs, metrics=metrics,
                           min_cohort=privacy.min_cohort, budget=privacy.epsilon)  # fmt: skip

    # -- rights and retention ----------------------------------------------------------------
    def purge(
        self, *, deleted: Mapping[str, int], inputs: Mapping[str, Any], log_pruned_total: int = 0
    ) -> Decision:
        """A retention purge. ``log_pruned_total`` is how many of the oldest log entries have
        had their text removed by retention so far: verification accepts no more than that."""
        metrics: dict[str, Metric] = {f"deleted_{k}": v for k, v in deleted.items()}
        metrics["log_pruned_total"] = log_pruned_total
        return self.decide(Action.PURGE_RETENTION, "retention_ttl", inputs=inputs,
                           metrics=metrics)  # fmt: skip

    def erase(
        self, *, deleted: Mapping[str, int], inputs: Mapping[str, Any], refusal: str | None = None
    ) -> Decision:
        """An erasure (on the device: a user's data; at the aggregator: a pending delta)."""
        if refusal is not None:
            if refusal not in DENY_REASONS:
                raise ValueError(f"{refusal!r} is not a refusal reason")
            return self.decide(Action.ERASE, refusal, inputs=inputs)
        return self.decide(Action.ERASE, "user_request", inputs=inputs,
                           metrics={f"deleted_{k}": v for k, v in deleted.items()})  # fmt: skip

    def export(self, *, inputs: Mapping[str, Any], count: int) -> Decision:
        return self.decide(Action.EXPORT, "user_request", inputs=inputs,
                           metrics={"events": count})  # fmt: skip

    def record_age(
        self, state: ConsentState, *, inputs: Mapping[str, Any], deleted: Mapping[str, int]
    ) -> Decision:
        """A declared age; below the region's minimum it purged what personalization held."""
        refusal = consent_refusal(self.region, Purpose.PERSONALIZATION, state)
        reason = "age_restricted" if refusal is not None and refusal.code == "age_restricted" \
            else "age_recorded"  # fmt: skip
        return self.decide(Action.RECORD_CONSENT, reason, inputs=inputs,
                           metrics={f"deleted_{k}": v for k, v in deleted.items()})  # fmt: skip

    def apply_policy(self, *, previous: str | None, inputs: Mapping[str, Any]) -> Decision:
        """The store or service now enforces this engine's policy (first time, or a change).

        The decision's ``policy_hash`` is the new policy's; its metrics name it (``policy_name``,
        ``policy_version``) and give the whole hash of the one it replaced, so an audit can tell
        which policies governed a period from the log alone."""
        before = (previous or "none")[:16]
        metrics: dict[str, Metric] = {"policy_name": self.policy.name,
                                      "policy_version": self.policy.version,
                                      "previous_policy_hash": previous or "none"}  # fmt: skip
        return self.decide(Action.APPLY_POLICY, "policy_applied", inputs=inputs, metrics=metrics,
                           policy=self.policy.hash[:16], previous=before)  # fmt: skip

    def record_consent(
        self, purpose: Purpose, *, granted: bool, inputs: Mapping[str, Any],
        deleted: Mapping[str, int] | None = None,
    ) -> Decision:  # fmt: skip
        metrics: dict[str, Metric] = {"granted": granted}
        metrics.update({f"deleted_{k}": v for k, v in (deleted or {}).items()})
        return self.decide(Action.RECORD_CONSENT, "consent_recorded", inputs=inputs,
                           metrics=metrics, purpose=purpose.value)  # fmt: skip
