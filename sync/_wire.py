"""Wire types of the sync protocol: the only shapes in which anything crosses the network.

Three messages travel between a device and its region's aggregator (data flow steps 5-7):

- :class:`SignedRoundSpec`, aggregator -> device: what a round trains and what it will cost in
  privacy, signed with the aggregator's Ed25519 key;
- :class:`SealedDelta`, device -> aggregator: one clipped (and, in local mode, noised) model
  delta, HPKE-encrypted to the region's key, with the few fields the aggregator needs to route,
  deduplicate and verify it, and nothing else;
- :class:`ModelRelease`, aggregator -> device: new global weights, signed.

Models are frozen pydantic models that refuse unknown fields. ``to_wire`` gives RFC 8785
canonical JSON bytes and ``from_wire`` parses bytes back, raising :class:`Malformed` or
:class:`UnsupportedProtocol`, never a pydantic error. ``docs/protocol.md`` is the reference.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Final, Self

import numpy as np
import numpy.typing as npt
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from sottovoce.policy import PrivacyMode
from sottovoce.policy._canonical import canonical_json
from sottovoce.sync._errors import Malformed, UnsupportedProtocol

PROTOCOL_VERSION: Final = 1

# Raw sizes of the keys and values that travel base64-encoded.
ED25519_KEY_BYTES: Final = 32
ED25519_SIGNATURE_BYTES: Final = 64
X25519_ENC_BYTES: Final = 32


def b64encode(raw: bytes) -> str:
    """Standard base64 with padding: the encoding of every binary field on the wire."""
    return base64.b64encode(raw).decode("ascii")


def b64decode(text: str) -> bytes:
    """Decode a wire base64 field (standard alphabet, padded); raises ``ValueError``."""
    try:
        # Strict mode checks the alphabet and padding in C: base64.b64decode(validate=True)
        # runs a regular expression over the text first, twice as slow on a 110 KB delta.
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        raise ValueError("not standard base64") from None


def _base64(*, size: int | None = None, multiple: int = 1) -> AfterValidator:
    def check(value: str) -> str:
        try:
            raw = b64decode(value)
        except ValueError:
            raise PydanticCustomError("base64", "must be standard, padded base64") from None
        if size is not None and len(raw) != size:
            raise PydanticCustomError(
                "byte_length", "must decode to {size} bytes, got {n}", {"size": size, "n": len(raw)}
            )
        if len(raw) == 0 or len(raw) % multiple:
            raise PydanticCustomError(
                "byte_length", "must decode to a non-empty multiple of {m} bytes", {"m": multiple}
            )
        return value

    return AfterValidator(check)


def _utc(value: datetime) -> datetime:
    # One spelling per instant, so that a parsed spec re-encodes to the bytes that were signed.
    return value.astimezone(UTC)


Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
RegionId = Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,31}$")]
RoundId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")]
Period = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,31}$")]
IdempotencyKey = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{16,64}$")]
Kid = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\s]+$")]
# Integers are strict: JSON true or 1.5 is not a version.
Version = Annotated[int, Field(ge=0, lt=2**53, strict=True)]
Protocol = Annotated[int, Field(ge=1, lt=2**31, strict=True)]
UtcDatetime = Annotated[AwareDatetime, AfterValidator(_utc)]
Ed25519Key = Annotated[str, _base64(size=ED25519_KEY_BYTES)]
Signature = Annotated[str, _base64(size=ED25519_SIGNATURE_BYTES)]


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    # Where the protocol version sits in the message (nested for a signed spec).
    _protocol_path: ClassVar[tuple[str, ...]] = ("protocol",)

    def to_wire(self) -> bytes:
        """The message as sent: RFC 8785 canonical JSON (UTF-8)."""
        return canonical_json(self.model_dump(mode="json"))

    @classmethod
    def from_wire(cls, data: bytes | str | Mapping[str, Any]) -> Self:
        """Parse a received message; the protocol version is checked before anything else."""
        value: Any = data
        if isinstance(data, bytes | str):
            try:
                value = json.loads(data)
            except (ValueError, RecursionError):  # nesting deep enough to exhaust the stack
                raise Malformed(f"a {cls.__name__} must be a JSON object") from None
        if not isinstance(value, Mapping):
            raise Malformed(f"a {cls.__name__} must be a JSON object")
        protocol: Any = value
        for key in cls._protocol_path:
            protocol = protocol.get(key) if isinstance(protocol, Mapping) else None
        if type(protocol) is int and protocol != PROTOCOL_VERSION:
            raise UnsupportedProtocol(
                f"{cls.__name__} of protocol version {protocol}; this code speaks version "
                f"{PROTOCOL_VERSION}"
            )
        try:
            return cls.model_validate(value)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or '(message)'}: {e['msg']}"
                for e in error.errors(include_input=False, include_url=False)
            )
            raise Malformed(f"malformed {cls.__name__}: {problems}") from None


class RoundSpec(_Wire):
    """One federated round as the aggregator announces it (signed: :class:`SignedRoundSpec`).

    ``epsilon_spent`` is what the region's period has spent before this round; ``epsilon_after``
    is the aggregator's accountant's epsilon (at ``delta``) if this round completes. The device
    does not trust either: it checks the spec against its own copy of the policy
    (``check_spec``) and recomputes epsilon from the mechanism with its own ledger
    (``check_budget``).
    """

    protocol: Protocol = PROTOCOL_VERSION
    round_id: RoundId
    region: RegionId
    model_id: Hex64  # SHA-256 of the .tflite file: the architecture the weights belong to
    model_version: Version
    mode: PrivacyMode
    clipping_norm: Annotated[float, Field(gt=0)]
    noise_multiplier: Annotated[float, Field(ge=0)]
    sampling_rate: Annotated[float, Field(gt=0, le=1)]
    min_cohort: Annotated[int, Field(ge=1, lt=2**53, strict=True)]
    # Central mode divides the round's noised sum by this fixed number (sampling rate x the
    # region's population), whatever the count: the estimator the accountant analyses.
    expected_cohort: Annotated[float, Field(gt=0, lt=2**53)]
    deadline: UtcDatetime
    epsilon_spent: Annotated[float, Field(ge=0)]
    epsilon_after: Annotated[float, Field(gt=0)]
    delta: Annotated[float, Field(gt=0, lt=1)]
    period_start: UtcDatetime

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.epsilon_after < self.epsilon_spent:
            raise PydanticCustomError(
                "epsilon_order", "epsilon_after cannot be below epsilon_spent"
            )
        if self.deadline <= self.period_start:
            raise PydanticCustomError("deadline_order", "the deadline must follow period_start")
        return self


class SignedRoundSpec(_Wire):
    """A round spec with the aggregator's Ed25519 signature over its canonical JSON."""

    _protocol_path: ClassVar[tuple[str, ...]] = ("spec", "protocol")

    spec: RoundSpec
    kid: Kid  # which of the region's signing keys (policy: aggregator.public_keys)
    signature: Signature


class SealedDelta(_Wire):
    """One device's contribution to one round, as it is uploaded. Nothing else is sent.

    ``pseudonym`` rotates every ``period`` and is used only for once-per-round dedupe and
    erasure; ``device_key`` is the device's per-period Ed25519 public key, which the aggregator
    matches against enrolled keys. ``enc`` and ``ciphertext`` are the HPKE encapsulated key and
    ciphertext; the delta and the device's signature are inside.
    """

    protocol: Protocol = PROTOCOL_VERSION
    region: RegionId
    round_id: RoundId
    model_version: Version
    pseudonym: Hex64
    period: Period
    device_key: Ed25519Key
    idempotency_key: IdempotencyKey
    enc: Annotated[str, _base64(size=X25519_ENC_BYTES)]
    ciphertext: str  # standard, padded base64 of a non-empty ciphertext: checked below
    # The ciphertext decoded by the check, kept so the aggregator decodes 110 KB once, with
    # the text it was decoded from (a copy made with another ciphertext decodes its own).
    _ciphertext_bytes: bytes = PrivateAttr(default=b"")
    _ciphertext_text: str = PrivateAttr(default="")

    @model_validator(mode="after")
    def _decode_ciphertext(self) -> Self:
        try:
            raw = b64decode(self.ciphertext)
        except ValueError:
            raise PydanticCustomError(
                "base64", "ciphertext: must be standard, padded base64"
            ) from None
        if not raw:
            raise PydanticCustomError(
                "byte_length", "ciphertext: must decode to a non-empty multiple of 1 bytes"
            )
        self._ciphertext_bytes, self._ciphertext_text = raw, self.ciphertext
        return self

    def ciphertext_bytes(self) -> bytes:
        """The HPKE ciphertext (decoded once, when the message was read)."""
        if self._ciphertext_text is not self.ciphertext:
            return b64decode(self.ciphertext)
        return self._ciphertext_bytes


class ModelRelease(_Wire):
    """Global weights of one model version, signed by the region's aggregator.

    Releases carry weights only: the architecture is the .tflite file named by ``model_id``.
    ``signature`` covers the canonical JSON of every other field (``kid`` included).
    """

    protocol: Protocol = PROTOCOL_VERSION
    model_id: Hex64
    version: Version
    weights: Annotated[str, _base64(multiple=4)]  # float32, little-endian
    created: UtcDatetime
    kid: Kid
    signature: Signature

    def weights_array(self) -> npt.NDArray[np.float32]:
        """The weights as a new float32 vector (not yet checked: see ``verify_release``)."""
        return np.frombuffer(b64decode(self.weights), dtype="<f4").astype(np.float32)
