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

Errors: why a sealed delta, a round spec or a release was refused. The aggregator logs the
error's ``code`` as the decision's reason; the device checks round specs and releases the same
way. Every class has one stable ``code``::

    SyncError                  sync_error
    ├── UnsupportedProtocol    unsupported_protocol  a message of another protocol version
    ├── WrongRegion            wrong_region          for another region (also a
    │                                                policy.ResidencyViolation)
    ├── RoundClosed            round_closed          for another (closed or unknown) round
    ├── WrongModelVersion      wrong_model_version   for another model version
    ├── Undecryptable          undecryptable         not sealed to this key and context
    ├── Malformed              malformed             not a well-formed message of this protocol
    ├── BadSignature           bad_signature         a signature that does not verify
    ├── NonFinite              non_finite            NaN or infinite values in a delta
    ├── NormExceeded           norm_exceeded         a delta above the clipping bound
    ├── SpecRefused            spec_outside_policy   a round spec beyond the device's policy
    │                          | budget_exhausted    (``rule`` names the broken rule)
    ├── WrongModel             wrong_model           a release for another model file
    ├── EnrollmentRefused      not_enrolled          the aggregator refused the device's key
    ├── AggregatorUnavailable  aggregator_unavailable  no usable answer (offline, errors)
    └── BadEndpoint            bad_endpoint          a base URL that is not a service's root
                                                     (in :mod:`sottovoce.sync.transport`)

The last four are met by the device's transport (:mod:`sottovoce.sync.transport`), not by the
aggregator's checks; ``BadEndpoint`` is also a ``ValueError``. ``SyncError`` derives from
:class:`sottovoce.SottovoceError`. :func:`open_delta` checks in the order of the tree, from
``UnsupportedProtocol`` to ``NormExceeded``, so a delta that breaks several rules reports the
first.
"""

from sottovoce.sync._budget import Charge, Mechanism, charge_for, check_budget, epsilon, mechanism
from sottovoce.sync._clip import add_noise, clip
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
    AttemptOutcome,
    DeltaState,
    Drop,
    Outbox,
    OutboxItem,
    RetryAt,
    backoff,
    decide,
)
from sottovoce.sync._participation import check_spec, sample_into_round
from sottovoce.sync._pseudonym import idempotency_key, new_device_secret, period_label, pseudonym
from sottovoce.sync._seal import (
    NOISE_SLACK_SIGMAS,
    OpenedDelta,
    device_noise_std,
    open_delta,
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
    "AttemptOutcome",
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
