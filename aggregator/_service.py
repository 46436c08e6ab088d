"""Running one region's aggregator as a service: keys and config at the process edge, the
round schedule and retention sweeps, and uvicorn with structured JSON logs.

``sottovoce aggregator serve`` reads a :class:`ServiceConfig` (options and environment), loads
the region's private keys from a directory (:func:`load_keys`; :func:`generate_keys` makes
them and a policy that publishes them), and serves :func:`build_app`: the FastAPI layer of
:mod:`._app` over a :class:`RegionAggregator` on its database: an embedded SQLite file, or a
PostgreSQL database (several workers: :mod:`._workers`). Everything the service knows is in
the database, so a restart resumes the open round where it stood.

:class:`RoundScheduler` is the operator's loop, run by the app every ``sweep_seconds``: sweep
(abandon expired rounds, purge what retention bounds), then open the next round if none is
open and the period's privacy budget allows it. A round the budget refuses is logged once, and
the scheduler waits for the next budget period instead of asking again every tick.

::

    AggregatorError
    └── ServiceConfigError   config_invalid: missing or unreadable keys, keys the policy does
                             not publish, a region the policy does not have
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from fastapi import FastAPI

from sottovoce._clock import Clock, system_clock
from sottovoce._errors import SottovoceError
from sottovoce.aggregator._aggregator import RegionAggregator
from sottovoce.aggregator._app import create_app
from sottovoce.aggregator._connections import ConnectionLimits, uvicorn_config
from sottovoce.aggregator._errors import AggregatorError
from sottovoce.aggregator._ledger import RoundOverBudget, epsilon_of
from sottovoce.aggregator._postgres import open_database
from sottovoce.aggregator._refusals import RefusalLimit
from sottovoce.policy import Policy, format_duration, policy_from_data
from sottovoce.sync._wire import b64encode

__all__ = [
    "RegionKeys",
    "RoundScheduler",
    "ServiceConfig",
    "ServiceConfigError",
    "build_app",
    "generate_keys",
    "json_log_config",
    "load_keys",
]

SIGNING_FILE: Final = "signing.pem"
HPKE_FILE: Final = "hpke.pem"
log = logging.getLogger("sottovoce.aggregator")


class ServiceConfigError(AggregatorError):
    """The service cannot start with this configuration (the message says what to fix)."""

    code = "config_invalid"


# -- keys ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegionKeys:
    """A region aggregator's private keys: Ed25519 signs specs and releases, X25519 opens deltas."""

    signing: Ed25519PrivateKey
    hpke: X25519PrivateKey

    def public(self) -> dict[str, str]:
        raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
        return {
            "signing": b64encode(self.signing.public_key().public_bytes(*raw)),
            "hpke": b64encode(self.hpke.public_key().public_bytes(*raw)),
        }


def generate_keys(directory: Path) -> RegionKeys:
    """New keys, written as unencrypted PKCS#8 PEM files readable by the owner only.

    Refuses to overwrite: replacing a region's keys strands every device sealed to the old one.
    """
    directory.mkdir(parents=True, exist_ok=True)
    keys = RegionKeys(Ed25519PrivateKey.generate(), X25519PrivateKey.generate())
    for name, key in ((SIGNING_FILE, keys.signing), (HPKE_FILE, keys.hpke)):
        path = directory / name
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ServiceConfigError(f"{path} exists; refusing to replace a region key") from None
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
    return keys


def load_keys(directory: Path) -> RegionKeys:
    """The keys :func:`generate_keys` wrote (``signing.pem``, ``hpke.pem``)."""
    signing = _load_key(directory / SIGNING_FILE)
    hpke = _load_key(directory / HPKE_FILE)
    if not isinstance(signing, Ed25519PrivateKey):
        raise ServiceConfigError(f"{directory / SIGNING_FILE} must hold an Ed25519 private key")
    if not isinstance(hpke, X25519PrivateKey):
        raise ServiceConfigError(f"{directory / HPKE_FILE} must hold an X25519 private key")
    return RegionKeys(signing, hpke)


def _load_key(path: Path) -> object:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ServiceConfigError(f"cannot read the key file {path}: {error.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise ServiceConfigError(f"{path} is not an unencrypted PEM private key: {error}") from None
    return key


DEV_PRIVACY: Final[dict[str, Any]] = {
    "population": 3, "sampling_rate": 1.0, "min_cohort": 2, "noise_multiplier": 2.0,
    "delta": 0.01,
}  # fmt: skip
"""The ``dev`` profile's mechanism: a few devices on one machine, each in every round; one round
costs epsilon 1.13 at delta 0.01, and seven compose to 3.97, within the example's EU budget of 4."""


def policy_with_keys(
    policy: Policy,
    region: str,
    keys: RegionKeys,
    endpoint: str | None,
    *,
    privacy: dict[str, Any] | None = None,
) -> Policy:
    """``policy`` with ``region``'s aggregator publishing ``keys`` (and ``endpoint``, if given;
    ``privacy`` overrides fields of the region's privacy budget, e.g. :data:`DEV_PRIVACY`)."""
    data = policy.model_dump(mode="json")
    regions = [r for r in data["regions"] if r["id"] == region]
    if not regions:
        known = ", ".join(r["id"] for r in data["regions"])
        raise ServiceConfigError(f"the policy has no region {region!r} (it has: {known})")
    aggregator = regions[0]["aggregator"]
    public = keys.public()
    for key in aggregator["public_keys"]:
        key["key"] = public[key["use"]]
    if endpoint is not None:
        aggregator["endpoint"] = endpoint
    if privacy is not None:
        regions[0]["privacy"].update(privacy)
    return policy_from_data(data, source=f"policy with {region} keys")


# -- config ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceConfig:
    """Everything ``serve`` needs; the CLI fills it from options and the environment."""

    policy: Policy
    region: str
    keys: RegionKeys
    database: str | Path  # a SQLite file, or a postgresql:// URL
    model_id: str
    base_weights: npt.NDArray[np.float32]
    enrollment_tokens: frozenset[str]
    noise_multiplier: float | None = None  # None: the policy's minimum
    round_seconds: float = 3600.0
    sweep_seconds: float = 60.0
    schedule_rounds: bool = True
    max_body_bytes: int = 1 << 20
    clock: Clock = system_clock  # rounds, deadlines, retention and the schedule read this
    accumulate: bool = True  # False: a model whose releases are statistics (collaborative)
    docs: bool = False  # serve /docs and /redoc (the OpenAPI document is always served)
    # Slow clients and connections (see ._connections), and refusals logged one by one per
    # source before they are only counted (see ._refusals).
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    refusal_limit: RefusalLimit = field(default_factory=RefusalLimit)

    def __post_init__(self) -> None:
        if not self.enrollment_tokens:
            raise ServiceConfigError(
                "no enrollment token: set SOTTOVOCE_ENROLLMENT_TOKENS (comma-separated) or "
                "--token-file, so only the app's devices can enroll"
            )
        checks = {
            "round duration": self.round_seconds > 0,
            "sweep interval": self.sweep_seconds > 0,
            "body limit": self.max_body_bytes >= 1024,
        }
        for what, ok in checks.items():
            if not ok:
                raise ServiceConfigError(f"the {what} is out of range")
        try:
            privacy = self.policy.region(self.region).privacy
        except SottovoceError as error:
            raise ServiceConfigError(str(error)) from None
        z = privacy.noise_multiplier if self.noise_multiplier is None else self.noise_multiplier
        if not z >= privacy.noise_multiplier:
            raise ServiceConfigError(
                f"the noise multiplier {z:g} is below the policy's minimum of "
                f"{privacy.noise_multiplier:g} for region {self.region}; devices refuse such rounds"
            )


def open_aggregator(config: ServiceConfig, *, clock: Clock | None = None) -> RegionAggregator:
    """The region's aggregator on the configured database (:func:`._postgres.open_database`:
    a SQLite file, created if missing, or a ``postgresql://`` URL), on
    ``clock`` (default: the config's); its schema is migrated to this version's."""
    conn = open_database(config.database, application=f"sottovoce-{config.region}")
    try:
        return RegionAggregator(
            conn,
            policy=config.policy,
            region=config.region,
            signing_key=config.keys.signing,
            hpke_key=config.keys.hpke,
            model_id=config.model_id,
            dim=int(config.base_weights.shape[0]),
            base_weights=config.base_weights,
            clock=config.clock if clock is None else clock,
            accumulate=config.accumulate,
        )
    except (ValueError, SottovoceError) as error:  # keys the policy does not publish, region
        conn.close()
        raise ServiceConfigError(str(error)) from None


# -- the round schedule ----------------------------------------------------------------------


@dataclass
class RoundScheduler:
    """Sweep, then keep one round open while the budget allows (see the module docstring)."""

    noise_multiplier: float | None  # None: the policy's minimum
    round_seconds: float
    open_rounds: bool = True
    clock: Clock = system_clock
    _waiting_until: datetime | None = field(default=None, init=False)

    def tick(self, aggregator: RegionAggregator, now: datetime | None = None) -> dict[str, Any]:
        """One pass; returns what it did (also logged as one JSON line)."""
        now = self.clock() if now is None else now
        did: dict[str, Any] = {"ended": aggregator.sweep(now)}
        waiting = self._waiting_until is not None and now < self._waiting_until
        if self.open_rounds and not waiting and aggregator.current_round() is None:
            did.update(self._open(aggregator, now))
        # A pass that changed nothing is routine: only debug, or the log is one line a minute.
        level = logging.INFO if did["ended"] or len(did) > 1 else logging.DEBUG
        log.log(level, "schedule", extra={"fields": did})
        return did

    def _open(self, aggregator: RegionAggregator, now: datetime) -> dict[str, Any]:
        try:
            spec = aggregator.open_round(
                noise_multiplier=self.noise_multiplier,
                deadline=now + timedelta(seconds=self.round_seconds),
            )
        except RoundOverBudget as error:
            ledger = aggregator.ledger
            self._waiting_until = ledger.period_start_for(now) + ledger.region.privacy.period
            return {"budget_exhausted": True, "epsilon_after": error.epsilon_after,
                    "waiting_until": self._waiting_until.isoformat()}  # fmt: skip
        self._waiting_until = None
        return {"opened": spec.spec.round_id, "epsilon_after": spec.spec.epsilon_after}


def build_app(config: ServiceConfig) -> FastAPI:
    """The region's service for ``config``; a configuration the aggregator refuses (keys the
    policy does not publish, an unknown region) raises ``ServiceConfigError`` here, before any
    server starts. The app opens its own aggregator, on its worker thread, when it starts."""
    aggregator = open_aggregator(config)
    try:
        # The accountant (opacus, torch) loads here, at start, not inside the first round
        # close's write transaction, where it would hold the database lock for seconds; and a
        # budget that cannot pay for a single round is an error now, not a silent wait.
        check_one_round_fits(aggregator, config.noise_multiplier)
    finally:
        aggregator.close()
    scheduler = RoundScheduler(
        noise_multiplier=config.noise_multiplier,
        round_seconds=config.round_seconds,
        open_rounds=config.schedule_rounds,
        clock=config.clock,
    )
    return create_app(
        lambda: open_aggregator(config),
        enrollment_tokens=set(config.enrollment_tokens),
        scheduler=scheduler.tick,
        tick_seconds=config.sweep_seconds,
        max_body_bytes=config.max_body_bytes,
        refusal_limit=config.refusal_limit,
        docs=config.docs,
    )


def server_config(
    config: ServiceConfig, *, host: str, port: int, log_level: str = "info"
) -> uvicorn.Config:
    """uvicorn's config for :func:`build_app` of ``config``: its connection limits and JSON
    logs (what ``sottovoce aggregator serve`` runs)."""
    return uvicorn_config(build_app(config), host=host, port=port, limits=config.connections,
                          log_config=json_log_config(log_level))  # fmt: skip


def check_one_round_fits(aggregator: RegionAggregator, noise_multiplier: float | None) -> float:
    """The epsilon of one round of the policy's mechanism in a fresh period; raises
    ``ServiceConfigError``, with the arithmetic, when that alone is over the budget."""
    privacy = aggregator.ledger.region.privacy
    try:
        used = aggregator.round_mechanism(noise_multiplier)
    except ValueError as error:
        raise ServiceConfigError(str(error)) from None
    z = used.noise_multiplier
    one = epsilon_of([(used.noise_multiplier, used.sampling_rate, 1, used.sensitivity)],
                     delta=privacy.delta, accountant=privacy.accountant)  # fmt: skip
    if not one <= privacy.epsilon:
        raise ServiceConfigError(
            f"one round costs epsilon {one:.3g} (noise multiplier {z:g}, sampling rate "
            f"{privacy.sampling_rate:g}, sensitivity {used.sensitivity:.4g} C, "
            f"{privacy.mode.value} mode, delta {privacy.delta:g}), above region "
            f"{aggregator.ledger.region.id}'s "
            f"budget of {privacy.epsilon:g} per {format_duration(privacy.period)}: no round "
            "could ever open. Raise --noise-multiplier, or lower the policy's sampling rate"
        )
    return one


# -- structured logs -------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event, and the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


def json_log_config(level: str = "info") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for uvicorn and the service: JSON lines on stderr.

    uvicorn's access log is off (it would print raw paths, which can hold a pseudonym); the
    service logs each request itself with the route's template instead.
    """
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    loggers = {
        name: {"handlers": ["stderr"], "level": level.upper(), "propagate": False}
        for name in ("sottovoce", "uvicorn", "uvicorn.error")
    }
    loggers["uvicorn.access"] = {"handlers": [], "level": "WARNING", "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {"stderr": handler},
        "loggers": loggers,
    }
