"""Errors of ``sottovoce.sync``: why a sealed delta, a round spec or a release was refused.

The aggregator opens each upload with :func:`~sottovoce.sync.open_delta` and logs the error's
``code`` as the decision's reason; the device checks round specs and releases the same way.
Every class has one stable ``code``::

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
    └── AggregatorUnavailable  aggregator_unavailable  no usable answer (offline, errors)

The last three are met by the device's transport (:mod:`sottovoce.sync.transport`), not by the
aggregator's checks.

``open_delta`` checks in the order of the tree, from ``UnsupportedProtocol`` to
``NormExceeded`` (cheap envelope checks first, then decryption, the plaintext's layout, the
signature, and the values), so a delta that breaks several rules reports the first. Parsing
received bytes (``from_wire``) raises ``UnsupportedProtocol`` or ``Malformed`` before that.
"""

from __future__ import annotations

from sottovoce._errors import SottovoceError
from sottovoce.policy import ResidencyViolation


class SyncError(SottovoceError):
    """Base class of sync errors."""

    code = "sync_error"


class UnsupportedProtocol(SyncError):
    """A message of a protocol version this code does not speak."""

    code = "unsupported_protocol"


class WrongRegion(SyncError, ResidencyViolation):
    """A message for another region than the receiver's (residency: refused and logged)."""

    code = "wrong_region"


class RoundClosed(SyncError):
    """A delta for a round the receiver is not collecting (closed, unknown or another one)."""

    code = "round_closed"


class WrongModelVersion(SyncError):
    """A delta trained from another model version than the round's."""

    code = "wrong_model_version"


class Undecryptable(SyncError):
    """A ciphertext that does not open with this key for this region, round and version."""

    code = "undecryptable"


class Malformed(SyncError):
    """Bytes or fields that are not a well-formed message of this protocol."""

    code = "malformed"


class BadSignature(SyncError):
    """A signature (device, round spec or release) that does not verify."""

    code = "bad_signature"


class NonFinite(SyncError):
    """A delta with NaN or infinite values."""

    code = "non_finite"


class NormExceeded(SyncError):
    """A delta (or the clipping norm it claims) above the round's clipping bound."""

    code = "norm_exceeded"


class SpecRefused(SyncError):
    """The device will not take part: the round spec goes beyond its own copy of the policy.

    ``code`` is ``budget_exhausted`` when the round would spend more privacy than the period's
    budget, ``spec_outside_policy`` otherwise; ``rule`` names the policy rule (``region``,
    ``mode``, ``clipping_norm``, ``min_cohort``, ``noise_multiplier``, ``epsilon``, ``delta``).
    """

    code = "spec_outside_policy"

    def __init__(self, message: str, *, rule: str, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.rule = rule


class WrongModel(SyncError):
    """A release for another model file than the one on the device."""

    code = "wrong_model"


class EnrollmentRefused(SyncError):
    """The aggregator refused to enroll the device's key; ``reason`` is its code, if any."""

    code = "not_enrolled"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


class AggregatorUnavailable(SyncError):
    """No usable answer from the aggregator: offline, server errors, or an unexpected status."""

    code = "aggregator_unavailable"
