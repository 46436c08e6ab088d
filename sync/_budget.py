"""The privacy mechanism of a round, and the device's own ledger of what it has spent (pure).

One definition of the mechanism serves both sides, so the aggregator's ledger (opacus) and the
device's (Google's ``dp-accounting``, pure Python, no torch) analyse the same thing
(docs/privacy.md has the derivation), with the kind of accountant the policy names: RDP on both
sides, or, for the policy's ``prv``, opacus' PRV accountant on the aggregator and dp-accounting's
PLD accountant on the device (both numerical accountants of the privacy loss distribution, and
tighter than RDP; :func:`device_accountant`):

- **central** mode: every device samples itself into a round with probability ``q``; the
  aggregator sums every on-time clipped delta (norm <= C), rounds the sum to a fixed-point grid,
  adds discrete Gaussian noise of standard deviation ``z * C`` and divides by the fixed expected
  cohort. Adding or removing one device moves the sum by at most C, and the grid adds at most
  sqrt(dim) grid steps (:func:`~sottovoce.sync._noise.sensitivity_factor`): the accountant's event
  per round is ``PoissonSampled(q, Gaussian(z / s))`` with ``s`` that factor.
- **local** mode: each device adds all of the noise (``z * C`` on the grid) to its own clipped
  delta, which the aggregator sees. Two neighbouring histories of one device can move its
  clipped delta by 2C, and the aggregator sees whether a device uploaded, so there is no
  amplification by sampling: the event per upload is ``Gaussian(z / (2 s))``.

:class:`Charge` is one round in a device's ledger; :func:`epsilon` composes charges;
:func:`check_budget` is the device's refusal of a spec that would take it beyond its policy,
whatever the spec claims.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from sottovoce.policy import Accountant, PrivacyMode, Region
from sottovoce.sync._errors import SpecRefused
from sottovoce.sync._noise import sensitivity_factor
from sottovoce.sync._wire import RoundSpec

__all__ = [
    "EPOCH",
    "RDP_ORDERS",
    "Charge",
    "Mechanism",
    "charge_for",
    "check_budget",
    "device_accountant",
    "epsilon",
    "mechanism",
    "period_start_for",
]

EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
"""Where budget period 0 starts; every period starts at EPOCH + k * period."""

# The RDP orders both ledgers search (dp-accounting's default grid, extended).
RDP_ORDERS: Final[tuple[float, ...]] = (
    *(1 + x / 10 for x in range(1, 100)),
    *range(11, 64),
    128,
    256,
    512,
    1024,
)
_ORDERS: Final = np.array(RDP_ORDERS)  # as dp-accounting's RdpAccountant holds them


@dataclass(frozen=True)
class Mechanism:
    """What the accountant charges for one round: ``Gaussian(noise_multiplier /
    sensitivity)``, Poisson-subsampled at ``sampling_rate`` (1.0: not subsampled)."""

    noise_multiplier: float  # z: the noise's standard deviation over C
    sampling_rate: float  # q the accountant may use (1.0 in local mode)
    sensitivity: float  # in units of C

    @property
    def effective_noise_multiplier(self) -> float:
        return self.noise_multiplier / self.sensitivity


def mechanism(mode: PrivacyMode, *, noise_multiplier: float, sampling_rate: float,
              dim: int) -> Mechanism:  # fmt: skip
    """The mechanism a round of ``mode`` runs on a model of ``dim`` parameters."""
    grid = sensitivity_factor(dim)
    if mode is PrivacyMode.CENTRAL:
        return Mechanism(noise_multiplier, sampling_rate, grid)
    return Mechanism(noise_multiplier, 1.0, 2.0 * grid)


@dataclass(frozen=True)
class Charge:
    """One round in a device's ledger."""

    round_id: str
    region: str
    period_start: datetime
    mechanism: Mechanism
    at: datetime
    mode: PrivacyMode


def period_start_for(at: datetime, region: Region) -> datetime:
    """The start of the policy's fixed budget period that contains ``at``."""
    period = region.privacy.period
    return EPOCH + ((at.astimezone(UTC) - EPOCH) // period) * period


def device_accountant(accountant: Accountant) -> str:
    """The device's accountant (for :func:`epsilon`) for the policy's ``accountant``: ``rdp``
    for RDP, ``pld`` (dp-accounting's privacy loss distributions) for opacus' PRV."""
    return "pld" if accountant is Accountant.PRV else "rdp"


def epsilon(mechanisms: Sequence[Mechanism], *, delta: float, accountant: str = "rdp") -> float:
    """The epsilon at ``delta`` of composing ``mechanisms`` (dp-accounting: RDP, or PLD)."""
    if not mechanisms:
        return 0.0
    counts: dict[tuple[float, float], int] = {}
    for m in mechanisms:
        key = (m.effective_noise_multiplier, m.sampling_rate)
        counts[key] = counts.get(key, 0) + 1
    if accountant == "pld":
        return _composed_pld(tuple(sorted(counts.items())), delta)
    return _composed_rdp(sorted(counts.items()), delta)


def _composed_rdp(counts: Sequence[tuple[tuple[float, float], int]], delta: float) -> float:
    # What dp-accounting's RdpAccountant does when it composes these events (each
    # ``SelfComposedDpEvent(PoissonSampled(q, Gaussian(z)), count)``, in this order): add
    # ``count`` times the event's RDP curve to a zero curve, then convert at ``delta``. The same
    # operations on the same curves, so the same float; only the curves are cached.
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    total = np.zeros_like(RDP_ORDERS, dtype=np.float64)
    for (z, q), count in counts:
        total += count * _rdp_curve(z, q)
    with _quiet_absl():
        return float(rdp.compute_epsilon(_ORDERS, total, delta)[0])


@functools.lru_cache(maxsize=256)
def _rdp_curve(z: float, q: float) -> npt.NDArray[np.float64]:
    """One round's RDP at every order of ``RDP_ORDERS``, as dp-accounting's RdpAccountant
    computes it for the event (an unsampled Gaussian is its q = 1 case).

    Cached: every device of a region asks about the same mechanism each round with one more
    round composed, and a subsampled curve at a large sampling rate takes most of a second
    (0.86 s measured at q = 0.5), while adding curves and converting takes a millisecond.
    The function is dp-accounting's internal one; tests/sync/test_budget_curves.py holds the
    result equal to its public accountant's, bit for bit.
    """
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    with _quiet_absl():
        curve = rdp._compute_rdp_poisson_subsampled_gaussian(
            q=q if q < 1.0 else 1.0, noise_multiplier=z, orders=_ORDERS
        )
    curve = np.asarray(curve, dtype=np.float64)
    curve.setflags(write=False)
    return curve


PLD_INTERVAL = 1e-3
"""The device's PLD discretisation (dp-accounting's ``value_discretization_interval``)."""


@functools.lru_cache(maxsize=1024)
def _composed_pld(counts: tuple[tuple[tuple[float, float], int], ...], delta: float) -> float:
    # What dp-accounting's PLDAccountant does when it composes these events (each
    # ``SelfComposedDpEvent(PoissonSampled(q, Gaussian(z)), count)``, in this order, under
    # add-or-remove-one): compose each event's PLD, self-composed ``count`` times (an unsampled
    # Gaussian as one Gaussian of z / sqrt(count)), into the identity, then convert at
    # ``delta``. The same operations on the same distributions, so the same float; only each
    # sampled Gaussian's own PLD is cached (tests/sync/test_budget_curves.py holds the result
    # equal to the public accountant's, bit for bit).
    from dp_accounting.pld import privacy_loss_distribution as pld
    from dp_accounting.privacy_accountant import NeighboringRelation

    total = pld.identity(value_discretization_interval=PLD_INTERVAL)
    for (z, q), count in counts:
        if q <= 0.0:
            continue  # never sampled: no event
        if z == 0.0:
            return math.inf  # no noise: not private
        if q < 1.0:
            part = _sampled_gaussian_pld(z, q).self_compose(count)
        else:
            part = pld.from_gaussian_mechanism(
                standard_deviation=z / math.sqrt(count),
                value_discretization_interval=PLD_INTERVAL,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            )
        total = total.compose(part)
    with _quiet_absl():
        return float(total.get_epsilon_for_delta(delta))


@functools.lru_cache(maxsize=64)
def _sampled_gaussian_pld(z: float, q: float) -> Any:
    """One round's PLD of a Poisson-sampled Gaussian, as dp-accounting's PLDAccountant builds
    it for the event.

    Cached: every device of a region asks about the same mechanism each round with one more
    round composed, and building the sampled distribution was most of a check (a check of five
    rounds at q = 0.5 took 61 ms, 25 with this cached). dp-accounting's distributions are not
    changed by composing them (each composition is a new one; a test composes a cached one
    twice and gets the public accountant's figure both times).
    """
    from dp_accounting.pld import privacy_loss_distribution as pld
    from dp_accounting.privacy_accountant import NeighboringRelation

    with _quiet_absl():
        return pld.from_gaussian_mechanism(
            standard_deviation=z,
            value_discretization_interval=PLD_INTERVAL,
            sampling_prob=q,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        )


@contextmanager
def _quiet_absl() -> Iterator[None]:
    # dp-accounting logs a warning for each fractional order whose series does not converge
    # (large q, small z) and leaves that order out: the bound stays valid, the log is noise.
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def charge_for(spec: RoundSpec, *, dim: int, at: datetime) -> Charge:
    """The charge of taking part in ``spec``'s round, from the spec's own parameters."""
    used = mechanism(spec.mode, noise_multiplier=spec.noise_multiplier,
                     sampling_rate=spec.sampling_rate, dim=dim)  # fmt: skip
    return Charge(spec.round_id, spec.region, spec.period_start, used, at, spec.mode)


def check_budget(
    spec: RoundSpec, region: Region, *, history: Sequence[Charge], dim: int, now: datetime
) -> Charge:
    """The charge for ``spec`` if it keeps the device within its policy; else ``SpecRefused``.

    Refuses, whatever the spec claims: noise below the policy's minimum, a sampling rate or
    denominator other than the policy's, a budget period that is not the policy's period at
    the device's own time, and a round whose recomputed epsilon, composed with every round
    already charged in the period (and, with a device cap, in the cap's window), exceeds the
    budget. ``history`` is the device's ledger; a round already in it costs nothing more.
    """
    privacy = region.privacy

    def refuse(rule: str, detail: str, code: str | None = None) -> SpecRefused:
        return SpecRefused(f"refusing round {spec.round_id!r}: {detail}", rule=rule, code=code)

    if spec.noise_multiplier < privacy.noise_multiplier:
        raise refuse("noise_multiplier", f"its noise multiplier {spec.noise_multiplier:g} is "
                     f"below the policy's minimum of {privacy.noise_multiplier:g}")  # fmt: skip
    if not math.isclose(spec.sampling_rate, privacy.sampling_rate, rel_tol=1e-9):
        raise refuse("sampling_rate", f"its sampling rate {spec.sampling_rate:g} is not the "
                     f"policy's {privacy.sampling_rate:g}")  # fmt: skip
    if not math.isclose(spec.expected_cohort, privacy.expected_cohort, rel_tol=1e-9):
        raise refuse("expected_cohort", f"it divides by {spec.expected_cohort:g} devices, not "
                     f"the policy's expected cohort of {privacy.expected_cohort:g}")  # fmt: skip
    start = period_start_for(now, region)
    if spec.period_start != start:
        raise refuse("period", f"its budget period starts {spec.period_start.isoformat()}; the "
                     f"policy's current period starts {start.isoformat()}")  # fmt: skip
    charge = charge_for(spec, dim=dim, at=now)
    if any(c.round_id == spec.round_id and c.region == spec.region for c in history):
        return charge  # already charged (a retry after a crash): nothing more to spend
    in_period = [c.mechanism for c in history if c.period_start == start]
    kind = device_accountant(privacy.accountant)
    after = epsilon([*in_period, charge.mechanism], delta=privacy.delta, accountant=kind)
    if not after <= privacy.epsilon:  # NaN counts as over
        spent = epsilon(in_period, delta=privacy.delta, accountant=kind)
        raise refuse("epsilon", f"by this device's own ledger it would bring the period's "
                     f"epsilon from {spent:.4g} to {after:.4g}, above the policy's budget of "
                     f"{privacy.epsilon:g} (the spec claims {spec.epsilon_after:.4g})",
                     code="budget_exhausted")  # fmt: skip
    cap = privacy.device_cap
    if cap is not None:
        window = [c.mechanism for c in history if c.at > now - cap.window]
        total = epsilon([*window, charge.mechanism], delta=privacy.delta, accountant=kind)
        if not total <= cap.epsilon:
            raise refuse("device_cap", f"it would bring this device's epsilon over the last "
                         f"{cap.window.days} days to {total:.4g}, above the policy's cap of "
                         f"{cap.epsilon:g}", code="budget_exhausted")  # fmt: skip
    return charge
