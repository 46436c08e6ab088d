"""Errors of ``sottovoce.sync``: why a sealed delta, a round spec or a release was refused.

The package docstring draws their tree, with each one's ``code`` and meaning (``BadEndpoint``
is exported by :mod:`sottovoce.sync.transport`, whose calls raise it).

The aggregator opens each upload with :func:`~sottovoce.sync.open_delta` and logs the error's
``code`` as the decision's reason. ``open_delta`` checks in the order of the tree, from
``UnsupportedProtocol`` to ``NormExceeded`` (cheap envelope checks first, then decryption, the
plaintext's layout, the signature, and the values), so a delta that breaks several rules
reports the first. Parsing received bytes (``from_wire``) raises ``UnsupportedProtocol`` or
``Malformed`` before that.

Each error's ``code`` is a row of the one registry of reason codes
(:data:`sottovoce.policy.REASON_CODES`): defining a subclass whose code has no row fails at
import, and so does raising one with a code (``code=``) that has none.
"""

from __future__ import annotations

from typing import Any

from sottovoce._errors import SottovoceError
from sottovoce.policy import ResidencyViolation, reason


class SyncError(SottovoceError):
    """Base class of sync errors; every subclass's ``code`` is a registry row."""

    code = "sync_error"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        reason(cls.code)  # KeyError: a code the registry does not have

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, code=None if code is None else reason(code).code)


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


class BadEndpoint(SyncError, ValueError):
    """A base URL that is not the root of a service: not http(s), no host, a query or
    fragment, or a path that already ends in the API's ``/v1``."""

    code = "bad_endpoint"
