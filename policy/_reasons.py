"""Every reason code of sottovoce, written once: what it decides, what it says, how it is answered.

Each :class:`Reason` row is one code with everything any part needs to know about it: the
outcome of a decision with that reason, the sentence the decision log shows (``None`` for a code
that is never a logged decision, such as a connection-level answer), the HTTP status and message
the aggregator answers with (``None`` for a code that never travels over HTTP), whether the
device's uploader drops a delta refused with it at once (``final``), and what a client should do
about it (``retry``).

The other tables are derived from :data:`REASON_CODES`: the decision engine's ``REASONS``
(:mod:`._decision`), the aggregator's statuses and messages (``sottovoce.aggregator._edge``),
the outbox's final refusals (``sottovoce.sync._outbox``), the codes of sync's errors (each
checked against its row when its class is defined, ``sottovoce.sync._errors``), and the tables in
``docs/protocol.md`` ("Answers and retries") and ``docs/compliance.md`` ("Reason codes"), which
tests compare with this one. Codes are an interface: add, never rename.

Sentences may use ``{placeholders}`` filled from non-personal values only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal

__all__ = ["REASON_CODES", "Reason", "reason"]

_NEVER: Final = "never: sent again, it is refused again (the uploader drops the delta)"
_LATER: Final = "later: the uploader backs off and tries again until the round's deadline"


@dataclass(frozen=True)
class Reason:
    """One reason code and every fact about it (see the module docstring)."""

    code: str
    outcome: Literal["allow", "deny"]
    sentence: str | None  # the decision log's; None: never a logged decision
    status: int | None = None  # the aggregator's HTTP answer; None: never sent over HTTP
    message: str | None = None  # what that answer says to the person reading it
    final: bool = False  # an upload refused with it is dropped at once, never retried
    retry: str = ""  # what a client should do about it

    def __post_init__(self) -> None:
        if self.status is not None and self.status >= 400 and not (self.message and self.retry):
            raise ValueError(f"{self.code}: a refusal over HTTP needs a message and retry advice")
        if self.final and not self.retry:
            raise ValueError(f"{self.code}: a final refusal needs retry advice")


def _allow(code: str, sentence: str, *, status: int | None = None, retry: str = "") -> Reason:
    return Reason(code, "allow", sentence, status=status, retry=retry)


def _refuse(
    code: str,
    sentence: str | None,
    *,
    status: int | None = None,
    message: str | None = None,
    final: bool = False,
    retry: str = "",
) -> Reason:
    return Reason(code, "deny", sentence, status, message, final, retry)


REASON_CODES: Final[tuple[Reason, ...]] = (
    # -- allow --------------------------------------------------------------------------------
    _allow("consent_given", "the user opted in to {purpose}"),
    _allow("opt_out_default",
           "{purpose} is opt-out in region {region} and the user has not opted out"),
    _allow("within_policy", "the request is within the region's policy", status=200,
           retry="no need: the delta is counted (a replay gets the same answer)"),
    _allow("within_budget",
           "the round fits the privacy budget: ε {spent:.4g} of {budget:.4g} after it"),
    _allow("cohort_met", "the round closed with {cohort} contributions (minimum {min_cohort})"),
    _allow("deadline_reached", "the round reached its deadline; its sum was released with central "
           "noise over the fixed expected cohort of {expected:.4g} devices"),
    _allow("retention_ttl", "rows older than the region's retention were deleted"),
    _allow("user_request", "the user asked for it", status=200,
           retry="no need: the delta is out of the running sum"),
    _allow("consent_recorded", "the user's choice about {purpose} was recorded"),
    _allow("policy_applied", "policy {policy} now applies (before: {previous})"),
    _allow("age_recorded", "the user's declared age was recorded"),
    _allow("delta_acknowledged",
           "the region's aggregator acknowledged the update for round {round}"),
    # -- deny: consent and age ----------------------------------------------------------------
    _refuse("consent_missing", "{purpose} needs consent the user has not given or has withdrawn"),
    _refuse("age_restricted",
            "the user is below the region's minimum age or has not declared an age"),
    # -- deny: protocol and aggregation -------------------------------------------------------
    _refuse("wrong_region", "the request is for another region than {region}", status=403,
            message="The delta is for another region; it is refused here by policy.",
            final=True, retry=_NEVER),
    _refuse("not_enrolled", "the device is not enrolled, or its enrollment is invalid",
            status=403,
            message="The device key is not enrolled for this period, or the token is refused.",
            final=True, retry=_NEVER),
    _refuse("bad_signature", "the signature does not verify", status=400,
            message="The delta's signature does not match the enrolled device key.",
            final=True, retry=_NEVER),
    _refuse("undecryptable", "the delta cannot be decrypted with the region's key", status=400,
            message="The delta could not be decrypted with this region's key.",
            final=True, retry=_NEVER),
    _refuse("round_closed", "the round is closed or unknown", status=410,
            message="The round is closed, unknown or past its deadline.",
            final=True, retry=_NEVER),
    _refuse("wrong_model_version", "the delta is for another model version", status=422,
            message="The delta was trained on another model version than the round's.",
            final=True, retry=_NEVER),
    _refuse("non_finite", "the delta has non-finite values", status=422,
            message="The delta holds values that are not finite numbers.",
            final=True, retry=_NEVER),
    _refuse("norm_exceeded", "the delta's norm is above the clipping bound", status=422,
            message="The delta's norm is above the round's clipping bound.",
            final=True, retry=_NEVER),
    _refuse("duplicate_contribution", "this pseudonym already contributed to the round",
            status=409, message="This device already contributed to the round.",
            final=True, retry=_NEVER),
    _refuse("budget_exhausted", "the round would exceed the privacy budget of ε {budget:.4g}",
            final=True, retry="never: the device does not take part in the round"),
    _refuse("spec_outside_policy",
            "the round spec does not match the region's policy ({detail})"),
    _refuse("cohort_not_met", "the round ended below its minimum cohort of {min_cohort}"),
    _refuse("unsupported_protocol",
            "the message uses a protocol version this service does not speak", status=400,
            message="The request speaks a protocol version this aggregator does not.",
            final=True, retry=_NEVER),
    _refuse("malformed", "the message is malformed", status=400,
            message="The request is not a well-formed message for this endpoint.",
            final=True, retry=_NEVER),
    _refuse("too_large", "the message is larger than the service accepts", status=413,
            message="The request body is larger than this service accepts.",
            final=True, retry=_NEVER),
    _refuse("nothing_pending",
            "there is no pending delta to erase: none was accepted, or its round closed",
            status=404,
            message="No pending delta matches: it was never accepted, or its round closed.",
            final=True, retry="never: nothing of it is left to take back"),
    _refuse("delta_dropped",
            "the update for round {round} was dropped and is in no release ({cause})"),
    # -- answers that are no logged decision ---------------------------------------------------
    _refuse("erased", None, status=410,
            message="The device took this delta back (erasure); it is not counted.",
            final=True, retry=_NEVER),
    _refuse("unsupported_media_type", None, status=415,
            message="The request body must be JSON (Content-Type: application/json).",
            final=True, retry=_NEVER),
    _refuse("too_slow", None, status=408,
            message="The request did not arrive in time; the connection is closed.",
            retry=_LATER),
    _refuse("busy", None, status=503,
            message="The service has too many open connections; try again later.",
            retry=_LATER),
    _refuse("unavailable", None, status=503,
            message="The region's database cannot take writes at the moment (restarting, or "
                    "its disk is full); nothing of this request was kept: try again later.",
            retry=_LATER),
    _refuse("no_open_round", None, status=404, message="No round is open at the moment.",
            final=True, retry="poll `GET /v1/round` again later"),
    _refuse("no_release", None, status=404,
            message="No model release has been published yet.",
            final=True, retry="poll `GET /v1/model/release` again later"),
    _refuse("not_found", None, status=404, message="There is no such endpoint.",
            final=True, retry=_NEVER),
    _refuse("method_not_allowed", None, status=405,
            message="The endpoint does not take this method.", final=True, retry=_NEVER),
    _refuse("internal", None, status=500,
            message="The aggregator failed to process the request.", retry=_LATER),
    # -- met on the device only ----------------------------------------------------------------
    # The outbox's own cause of a dropped delta.
    _refuse("deadline_passed", None, final=True, retry="never: the round's deadline has passed"),
    _refuse("wrong_model", None),
    _refuse("aggregator_unavailable", None),
    _refuse("bad_endpoint", None),
)  # fmt: skip

_BY_CODE: Final[Mapping[str, Reason]] = MappingProxyType({r.code: r for r in REASON_CODES})


def reason(code: str) -> Reason:
    """The row of ``code``; ``KeyError`` names a code no registry row has."""
    try:
        return _BY_CODE[code]
    except KeyError:
        raise KeyError(f"unknown reason code {code!r}") from None
