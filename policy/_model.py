"""The policy document: what every other part of sottovoce enforces.

A policy names the regions sottovoce serves (each with its jurisdictions, its aggregator and that
aggregator's public keys), how each consent purpose works there (opt-in or opt-out), how long
each class of data may be kept, the privacy mode and budget for federated learning, and age
gating. Models are frozen; a policy's identity is the SHA-256 of its canonical (RFC 8785) JSON.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping
from datetime import timedelta
from enum import StrEnum
from functools import cached_property
from types import MappingProxyType
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializerFunctionWrapHandler,
    WrapSerializer,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from sottovoce.policy._canonical import canonical_json
from sottovoce.policy._errors import UnknownRegion


class Purpose(StrEnum):
    """What a user can consent to."""

    PERSONALIZATION = "personalization"
    FEDERATED_TRAINING = "federated_training"
    ANALYTICS = "analytics"


class ConsentMode(StrEnum):
    OPT_IN = "opt_in"  # off until the user says yes
    OPT_OUT = "opt_out"  # on until the user says no


class DataClass(StrEnum):
    """The classes of stored data that retention rules bound."""

    RAW_EVENTS = "raw_events"
    DERIVED_STATE = "derived_state"
    OUTBOX = "outbox"
    AGGREGATOR_DELTAS = "aggregator_deltas"
    AUDIT_LOG = "audit_log"


class PrivacyMode(StrEnum):
    CENTRAL = "central"  # devices clip, the aggregator adds the noise
    LOCAL = "local"  # devices clip and add all the noise


class Accountant(StrEnum):
    RDP = "rdp"
    PRV = "prv"


# What withdrawing consent for a purpose must purge on the device.
PURPOSE_DATA: dict[Purpose, frozenset[DataClass]] = {
    Purpose.PERSONALIZATION: frozenset({DataClass.RAW_EVENTS, DataClass.DERIVED_STATE}),
    Purpose.FEDERATED_TRAINING: frozenset({DataClass.OUTBOX}),
    Purpose.ANALYTICS: frozenset(),
}

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")


def _parse_duration(value: object) -> object:
    """Accept ``"30d"``, ``"12h"``, ``"90m"``, ``"45s"``, ``"2w"``, ISO 8601 or seconds."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])
    if isinstance(value, bool):  # bool is an int; a duration of True is a typo
        raise PydanticCustomError("duration", "a duration like '30d', '12h' or 'P30D'")
    return value


def _positive_duration(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise PydanticCustomError("positive_duration", "a duration must be longer than zero")
    return value


MAX_CLOCK_SKEW = timedelta(days=1)


def _bounded_skew(value: timedelta) -> timedelta:
    if value > MAX_CLOCK_SKEW:
        raise PydanticCustomError(
            "clock_skew_bound",
            "a clock skew allowance is at most {limit}: events further ahead of the device's "
            "clock would steer its state for that long",
            {"limit": format_duration(MAX_CLOCK_SKEW)},
        )
    return value


def format_duration(value: timedelta) -> str:
    """The canonical text of a duration: the largest whole unit (``"30d"``, ``"36h"``)."""
    seconds = int(value.total_seconds())
    for unit in ("d", "h", "m"):
        if seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"


Duration = Annotated[
    timedelta,
    BeforeValidator(_parse_duration),
    AfterValidator(_positive_duration),
    PlainSerializer(format_duration, return_type=str),
]


def _check_key(value: str) -> str:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise PydanticCustomError("base64", "a public key must be standard base64") from None
    if len(raw) != 32:
        raise PydanticCustomError(
            "key_length", "a public key must be 32 bytes, got {n}", {"n": len(raw)}
        )
    return value


def _check_country(value: str) -> str:
    if not re.fullmatch(r"[A-Z]{2}", value):
        raise PydanticCustomError(
            "iso3166_alpha2", "a jurisdiction is an ISO 3166-1 alpha-2 code such as 'DE'"
        )
    return value


Slug = Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,31}$")]
PublicKey = Annotated[str, AfterValidator(_check_key)]
Country = Annotated[str, AfterValidator(_check_country)]


def _as_dict(value: Mapping[Any, Any], handler: SerializerFunctionWrapHandler) -> Any:
    return handler(dict(value))


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)


class AggregatorKey(_Frozen):
    """A public key of a region's aggregator; several allow rotation."""

    kid: Annotated[str, Field(min_length=1, max_length=64)]
    use: Literal["hpke", "signing"]  # X25519 for sealing deltas, Ed25519 for releases and specs
    key: PublicKey


class Aggregator(_Frozen):
    endpoint: Annotated[str, Field(pattern=r"^https?://[^\s/]+(/\S*)?$")]
    public_keys: Annotated[tuple[AggregatorKey, ...], Field(min_length=2)]

    @field_validator("endpoint")
    @classmethod
    def _the_services_root(cls, endpoint: str) -> str:
        # The device adds /v1/... itself (sync.transport.api_url): an endpoint ending in /v1
        # would have it call /v1/v1/...
        if endpoint.rstrip("/").endswith("/v1"):
            raise PydanticCustomError(
                "endpoint_root",
                "an endpoint is the service's root, without /v1 (the device adds /v1/... itself)",
            )
        return endpoint

    @model_validator(mode="after")
    def _one_key_of_each_use(self) -> Self:
        uses = {k.use for k in self.public_keys}
        if uses != {"hpke", "signing"}:
            raise PydanticCustomError(
                "key_uses", "an aggregator needs at least one 'hpke' and one 'signing' key"
            )
        kids = [k.kid for k in self.public_keys]
        if len(set(kids)) != len(kids):
            raise PydanticCustomError("unique_kid", "key ids must be unique within a region")
        return self


DELTA_POPULATION_FACTOR = 0.1
"""delta may be at most this fraction of 1/population: a guarantee that fails with probability
delta for each of N devices must fail for (in expectation) well under one of them."""


class DeviceCap(_Frozen):
    """What one device may spend across budget periods, enforced by the device itself."""

    epsilon: Annotated[float, Field(gt=0, le=1000)]
    window: Duration  # e.g. "365d": every round joined in the last window counts


class PrivacyBudget(_Frozen):
    """How federated learning may spend privacy in a region, per period.

    The mechanism is fixed here, not by the aggregator: each round every device samples itself
    in with ``sampling_rate`` (Poisson sampling); in central mode the aggregator sums every
    on-time contribution and divides by the fixed expected cohort ``sampling_rate *
    population``; the noise multiplier may not go below ``noise_multiplier``. ``population`` is
    the region's expected number of eligible devices. See docs/privacy.md.
    """

    mode: PrivacyMode
    epsilon: Annotated[float, Field(gt=0, le=100)]
    delta: Annotated[float, Field(gt=0, lt=1)]
    period: Duration
    clipping_norm: Annotated[float, Field(gt=0)]
    min_cohort: Annotated[int, Field(ge=2)]
    population: Annotated[int, Field(ge=2, le=10**10)]
    sampling_rate: Annotated[float, Field(gt=0, le=1)]
    noise_multiplier: Annotated[float, Field(gt=0, le=1000)]
    accountant: Accountant = Accountant.RDP
    device_cap: DeviceCap | None = None

    @property
    def expected_cohort(self) -> float:
        """The fixed denominator of central mode: devices expected in a round."""
        return self.sampling_rate * self.population

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        # delta is the chance that the guarantee fails for a device; over N devices it must stay
        # well below one expected failure.
        bound = DELTA_POPULATION_FACTOR / self.population
        if self.delta > bound:
            raise PydanticCustomError(
                "delta_below_population",
                "delta must be at most {factor} / population = {bound} (population "
                "{population}); a larger delta lets the guarantee fail for some devices",
                {"factor": DELTA_POPULATION_FACTOR, "bound": f"{bound:.3g}",
                 "population": self.population},
            )  # fmt: skip
        if self.expected_cohort < self.min_cohort:
            raise PydanticCustomError(
                "expected_cohort",
                "sampling_rate x population = {cohort} devices per round, below min_cohort "
                "{min_cohort}; raise the sampling rate to at least {rate}",
                {"cohort": f"{self.expected_cohort:.4g}", "min_cohort": self.min_cohort,
                 "rate": f"{self.min_cohort / self.population:.4g}"},
            )  # fmt: skip
        return self


class AgeGate(_Frozen):
    minimum_age: Annotated[int, Field(ge=0, le=21)]
    unknown_age: Literal["allow", "deny"] = "deny"


class Region(_Frozen):
    id: Slug
    name: Annotated[str, Field(min_length=1, max_length=120)]
    jurisdictions: Annotated[tuple[Country, ...], Field(min_length=1)]
    aggregator: Aggregator
    # Read-only mappings: a frozen model whose dicts could be edited would keep a stale hash.
    consent: Annotated[
        Mapping[Purpose, ConsentMode], AfterValidator(MappingProxyType), WrapSerializer(_as_dict)
    ]
    retention: Annotated[
        Mapping[DataClass, Duration], AfterValidator(MappingProxyType), WrapSerializer(_as_dict)
    ]
    privacy: PrivacyBudget
    age: AgeGate
    # How far ahead of the device's clock an event's time may be (clocks drift); an event
    # further ahead is refused, or it would count as the latest listening until that time.
    clock_skew: Annotated[Duration, AfterValidator(_bounded_skew)] = timedelta(minutes=5)

    @model_validator(mode="after")
    def _complete(self) -> Self:
        if len(set(self.jurisdictions)) != len(self.jurisdictions):
            raise PydanticCustomError("unique_jurisdictions", "a jurisdiction is listed twice")
        missing_purposes = sorted(set(Purpose) - set(self.consent))
        if missing_purposes:
            raise PydanticCustomError(
                "all_purposes",
                "consent must set every purpose; missing: {missing}",
                {"missing": ", ".join(missing_purposes)},
            )
        missing_classes = sorted(set(DataClass) - set(self.retention))
        if missing_classes:
            raise PydanticCustomError(
                "all_data_classes",
                "retention must bound every data class; missing: {missing}",
                {"missing": ", ".join(missing_classes)},
            )
        return self

    def consent_mode(self, purpose: Purpose) -> ConsentMode:
        return self.consent[purpose]

    def ttl(self, data_class: DataClass) -> timedelta:
        return self.retention[data_class]

    def key(self, use: Literal["hpke", "signing"]) -> AggregatorKey:
        """The region's current key for ``use`` (the first one listed)."""
        return next(k for k in self.aggregator.public_keys if k.use == use)


class Policy(_Frozen):
    """A whole policy document. Identify it by ``policy.hash``, never by its name."""

    schema_version: Literal[1] = 1
    name: Annotated[str, Field(min_length=1, max_length=120)]
    version: Annotated[str, Field(min_length=1, max_length=40)]
    regions: Annotated[tuple[Region, ...], Field(min_length=1)]

    @model_validator(mode="after")
    def _regions_disjoint(self) -> Self:
        ids = [r.id for r in self.regions]
        if len(set(ids)) != len(ids):
            raise PydanticCustomError("unique_region_ids", "two regions share an id")
        owner: dict[str, str] = {}
        for region in self.regions:
            for country in region.jurisdictions:
                if country in owner:
                    raise PydanticCustomError(
                        "disjoint_jurisdictions",
                        "jurisdiction {c} belongs to both {a} and {b}",
                        {"c": country, "a": owner[country], "b": region.id},
                    )
                owner[country] = region.id
        return self

    def canonical_json(self) -> bytes:
        """RFC 8785 canonical JSON of the document: the bytes its hash is taken over."""
        return canonical_json(self.model_dump(mode="json"))

    @cached_property
    def hash(self) -> str:
        """The policy's identity: hex SHA-256 of its canonical JSON."""
        return hashlib.sha256(self.canonical_json()).hexdigest()

    def region(self, region_id: str) -> Region:
        for region in self.regions:
            if region.id == region_id:
                return region
        known = ", ".join(r.id for r in self.regions)
        raise UnknownRegion(f"policy {self.name!r} has no region {region_id!r} (known: {known})")

    def region_for(self, jurisdiction: str) -> Region:
        """The region a country (ISO 3166-1 alpha-2) belongs to."""
        code = jurisdiction.upper()
        for region in self.regions:
            if code in region.jurisdictions:
                return region
        raise UnknownRegion(f"policy {self.name!r} serves no region for jurisdiction {code!r}")
