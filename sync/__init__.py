"""Sync: the only path by which anything leaves a device.

What leaves is a :class:`SealedDelta`: a model delta clipped to the round's norm, noised on the
device when the region's privacy mode is ``local``, signed with the device's per-period key,
HPKE-encrypted to the region aggregator's key and labelled with a rotating pseudonym. Raw
events, features, ids and local statistics never do. What comes back is a signed
:class:`RoundSpec` (checked against the device's own policy with :func:`check_spec`) and a
signed :class:`ModelRelease`.

This is the sans-I/O core (like h11): functions that take and return values. Wire types and
error codes are shared with the aggregator, which opens deltas with :func:`open_delta`.
``docs/protocol.md`` documents the format.
"""

from sottovoce.sync._budget import Charge, Mechanism, charge_for, check_budget, epsilon, mechanism
from sottovoce.sync._errors import (
    AggregatorUnavailable,
    BadSignature,
    EnrollmentRefused,
    Malformed,
    NonFinite,
    NormExceeded,
    RoundClosed,
    SpecRefused,
    SyncError,
    Undecryptable,
    UnsupportedProtocol,
    WrongModel,
    WrongModelVersion,
    WrongRegion,
)
from sottovoce.sync._outbox import (
    Acknowledged,
    DeltaState,
    Drop,
    Outbox,
    OutboxItem,
    Outcome,
    RetryAt,
    backoff,
    decide,
)
from sottovoce.sync._participation import check_spec, sample_into_round
from sottovoce.sync._seal import (
    NOISE_SLACK_SIGMAS,
    OpenedDelta,
    add_noise,
    clip,
    device_noise_std,
    idempotency_key,
    new_device_secret,
    open_delta,
    period_label,
    pseudonym,
    seal_delta,
)
from sottovoce.sync._sign import (
    sign_release,
    sign_round_spec,
    verify_release,
    verify_round_spec,
)
from sottovoce.sync._wire import (
    PROTOCOL_VERSION,
    ModelRelease,
    RoundSpec,
    SealedDelta,
    SignedRoundSpec,
)

__all__ = [
    "NOISE_SLACK_SIGMAS",
    "PROTOCOL_VERSION",
    "Acknowledged",
    "AggregatorUnavailable",
    "BadSignature",
    "Charge",
    "DeltaState",
    "Drop",
    "EnrollmentRefused",
    "Malformed",
    "Mechanism",
    "ModelRelease",
    "NonFinite",
    "NormExceeded",
    "OpenedDelta",
    "Outbox",
    "OutboxItem",
    "Outcome",
    "RetryAt",
    "RoundClosed",
    "RoundSpec",
    "SealedDelta",
    "SignedRoundSpec",
    "SpecRefused",
    "SyncError",
    "Undecryptable",
    "UnsupportedProtocol",
    "WrongModel",
    "WrongModelVersion",
    "WrongRegion",
    "add_noise",
    "backoff",
    "charge_for",
    "check_budget",
    "check_spec",
    "clip",
    "decide",
    "device_noise_std",
    "epsilon",
    "idempotency_key",
    "mechanism",
    "new_device_secret",
    "open_delta",
    "period_label",
    "pseudonym",
    "sample_into_round",
    "seal_delta",
    "sign_release",
    "sign_round_spec",
    "verify_release",
    "verify_round_spec",
]
