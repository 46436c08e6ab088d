"""The per-region privacy ledger: what each period has spent, and whether a round may open.

Step 6 of the data flow ends a round by stepping the privacy accountant; this module is that
accountant's memory. Each aggregated round is one row (its noise multiplier, sampling rate and
number of steps), kept in the region's database so a restarted aggregator sees the whole
history. Epsilon is never summed from rows: it is recomputed by replaying the period's rounds
into an opacus accountant (RDP, or PRV when the policy says so), so the bound stays tight and a
change of the policy's delta or accountant applies to the rounds already run.

Periods are fixed windows counted from the Unix epoch (1970-01-01T00:00:00Z) in steps of the
policy's period, so a period cannot be stretched or restarted by choosing when it begins. A round is
charged to the period it was opened in.

In DP-FedAvg terms the sampling rate is the chance that a given device contributes to a round
(expected cohort / eligible population) and the noise multiplier is the noise's standard
deviation divided by the clipping norm. ``sensitivity`` is how far one device can move what is
noised, in units of the clipping norm (:func:`sottovoce.sync._budget.mechanism`: just over 1 in
central mode, just over 2 in local mode, where the sampling rate charged is 1): the accountant
sees the Gaussian with noise multiplier ``noise_multiplier / sensitivity``.

opacus (and so torch) is imported only when an epsilon is computed, so the aggregator package
imports without them.

::

    AggregatorError
    └── RoundOverBudget  the round would take the period's epsilon above the policy's budget
                         (also a policy.BudgetExhausted, code budget_exhausted)
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from sottovoce._database import Connection, backend_of, columns_of
from sottovoce._sqlite import write_transaction
from sottovoce.aggregator._errors import AggregatorError
from sottovoce.policy import Accountant, BudgetExhausted, Region
from sottovoce.sync._budget import EPOCH, RDP_ORDERS, period_start_for

__all__ = ["EPOCH", "RDP_ORDERS", "LedgerEntry", "PrivacyLedger", "RoundOverBudget", "epsilon_of"]


# RDP orders to search when converting to (epsilon, delta). opacus' default grid stops at 63,
# which is loose (and warns) when much noise is spent on few rounds; the device's ledger
# (dp-accounting) searches the same grid, so the two agree on the same mechanism.

_SCHEMA = """
CREATE TABLE IF NOT EXISTS privacy_ledger (
    region TEXT NOT NULL,
    period_start TEXT NOT NULL,
    round_id TEXT NOT NULL,
    noise_multiplier REAL NOT NULL,
    sampling_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    sensitivity REAL NOT NULL DEFAULT 1.0,
    epsilon_after REAL NOT NULL,
    at TEXT NOT NULL,
    PRIMARY KEY (region, round_id)
);
CREATE INDEX IF NOT EXISTS privacy_ledger_period ON privacy_ledger (region, period_start);
"""


class RoundOverBudget(AggregatorError, BudgetExhausted):
    """A round that would take the period's epsilon above the policy's budget (a policy
    violation like any other, with the ledger's numbers attached)."""

    code = "budget_exhausted"

    def __init__(
        self,
        *,
        region: str,
        period_start: datetime,
        epsilon_after: float,
        budget: float,
        spent: float,
    ) -> None:
        self.region = region
        self.period_start = period_start
        self.epsilon_after = epsilon_after
        self.budget = budget
        self.spent = spent
        super().__init__(
            f"region {region}: this round would raise the privacy spent in the period starting "
            f"{_iso(period_start)} from epsilon {spent:.4g} to {epsilon_after:.4g}, above the "
            f"policy's budget of {budget:.4g}; wait for the next period or use more noise"
        )


@dataclass(frozen=True)
class LedgerEntry:
    """One recorded round: its mechanism, and the period's epsilon once it had run."""

    round_id: str
    period_start: datetime
    noise_multiplier: float
    sampling_rate: float
    steps: int
    epsilon_after: float
    at: datetime
    sensitivity: float = 1.0


_Round = tuple[float, float, int, float]  # (noise multiplier, sampling rate, steps, sensitivity)


class PrivacyLedger:
    """The privacy spent by one region, period by period, in a table it creates (SQLite or
    PostgreSQL).

    ``ledger.can_open(z, q, period_start=p)`` before a round opens;
    ``ledger.charge_round(round_id, z, q, period_start=p, at=now)`` when it is aggregated
    (both take ``sensitivity=``, in units of the clipping norm; default 1).
    """

    def __init__(self, conn: Connection, *, region: Region) -> None:
        self._conn = conn
        self._region = region
        with self._write():
            schema = _SCHEMA
            if backend_of(conn) == "postgres":  # SQLite's implicit rowid orders same-time rows
                key = "PRIMARY KEY (region"
                schema = schema.replace(key, f"rowid BIGSERIAL, {key}")
            for statement in schema.split(";"):
                if statement.strip():
                    conn.execute(statement)
            columns = columns_of(conn, "privacy_ledger")
            if "sensitivity" not in columns:  # files made before sensitivity was recorded
                conn.execute("ALTER TABLE privacy_ledger ADD COLUMN sensitivity REAL NOT NULL"
                             " DEFAULT 1.0")  # fmt: skip

    @property
    def region(self) -> Region:
        return self._region

    def period_start_for(self, at: datetime) -> datetime:
        """The start of the fixed period that contains ``at`` (a timezone-aware time)."""
        return period_start_for(_aware(at, "at"), self._region)

    def spent(self, period_start: datetime) -> float:
        """The epsilon (at the policy's delta) spent by the rounds recorded in this period."""
        return self._epsilon(self._history(self._check_start(period_start)))

    def epsilon_if(
        self,
        noise_multiplier: float,
        sampling_rate: float,
        *,
        period_start: datetime,
        steps: int = 1,
        sensitivity: float = 1.0,
    ) -> float:
        """The period's epsilon if one more round with these parameters ran."""
        round_ = _mechanism(noise_multiplier, sampling_rate, steps, sensitivity)
        return self._epsilon([*self._history(self._check_start(period_start)), round_])

    def can_open(
        self,
        noise_multiplier: float,
        sampling_rate: float,
        *,
        period_start: datetime,
        steps: int = 1,
        sensitivity: float = 1.0,
    ) -> bool:
        """Whether a round with these parameters stays within the period's budget."""
        after = self.epsilon_if(noise_multiplier, sampling_rate, period_start=period_start,
                                steps=steps, sensitivity=sensitivity)  # fmt: skip
        return _within(after, self._region.privacy.epsilon)

    def charge_round(
        self,
        round_id: str,
        noise_multiplier: float,
        sampling_rate: float,
        *,
        period_start: datetime,
        at: datetime,
        steps: int = 1,
        sensitivity: float = 1.0,
    ) -> float:
        """Charge an aggregated round to its period; returns the period's epsilon after it.

        Raises :class:`RoundOverBudget` (and records nothing) when the round would take the
        period above the policy's epsilon. Recording the same round again with the same
        parameters (a retry after a crash) returns its epsilon and charges nothing more.
        """
        start = self._check_start(period_start)
        at = _aware(at, "at")
        if at < start:
            raise ValueError(f"round {round_id!r} is recorded at {at}, before its period {start}")
        round_ = _mechanism(noise_multiplier, sampling_rate, steps, sensitivity)
        with self._write():
            previous = self._recorded(round_id)
            if previous is not None:
                return _same_round(previous, round_, start)
            history = self._history(start)
            after = self._epsilon([*history, round_])
            budget = self._region.privacy.epsilon
            if not _within(after, budget):
                spent = self._epsilon(history)
                raise RoundOverBudget(
                    region=self._region.id,
                    period_start=start,
                    epsilon_after=after,
                    budget=budget,
                    spent=spent,
                )
            self._conn.execute(
                "INSERT INTO privacy_ledger (region, period_start, round_id, noise_multiplier,"
                " sampling_rate, steps, sensitivity, epsilon_after, at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (self._region.id, _iso(start), round_id, *round_, after, _iso(at)),
            )
        return after

    def entries(self, period_start: datetime) -> list[LedgerEntry]:
        """The rounds recorded in a period, oldest first."""
        rows = self._conn.execute(
            "SELECT round_id, period_start, noise_multiplier, sampling_rate, steps,"
            " epsilon_after, at, sensitivity FROM privacy_ledger"
            " WHERE region = ? AND period_start = ?"
            " ORDER BY at, rowid",
            (self._region.id, _iso(self._check_start(period_start))),
        ).fetchall()
        return [_entry(row) for row in rows]

    # -- internals ---------------------------------------------------------------------------

    def _check_start(self, period_start: datetime) -> datetime:
        start = _aware(period_start, "period_start")
        if self.period_start_for(start) != start:
            raise ValueError(
                f"{start.isoformat()} is not the start of a period; "
                "use period_start_for() to find the period of a time"
            )
        return start

    def _history(self, period_start: datetime) -> list[_Round]:
        rows = self._conn.execute(
            "SELECT noise_multiplier, sampling_rate, steps, sensitivity FROM privacy_ledger"
            " WHERE region = ? AND period_start = ?",
            (self._region.id, _iso(period_start)),
        ).fetchall()
        return [(float(s), float(q), int(n), float(c)) for s, q, n, c in rows]

    def _recorded(self, round_id: str) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self._conn.execute(
            "SELECT round_id, period_start, noise_multiplier, sampling_rate, steps,"
            " epsilon_after, at, sensitivity FROM privacy_ledger WHERE region = ? AND round_id = ?",
            (self._region.id, round_id),
        ).fetchone()
        return row

    def _epsilon(self, rounds: Sequence[_Round]) -> float:
        return epsilon_of(
            rounds, delta=self._region.privacy.delta, accountant=self._region.privacy.accountant
        )

    def _write(self) -> AbstractContextManager[None]:
        # Reading the history and inserting the round must be one write transaction, or two
        # aggregators could both see room for one more round. Inside a caller's transaction
        # (say, one that also publishes the release) it nests as a savepoint.
        return write_transaction(self._conn, name="privacy_ledger")


def epsilon_of(
    rounds: Sequence[tuple[float, ...]], *, delta: float, accountant: Accountant
) -> float:
    """The epsilon at ``delta`` of composing Poisson-subsampled Gaussian rounds.

    ``rounds`` are (noise multiplier, sampling rate, steps[, sensitivity]); order does not
    matter. The accountant sees the noise multiplier divided by the sensitivity (default 1).
    """
    grouped: dict[tuple[float, float], int] = {}
    for sigma, q, steps, *rest in rounds:
        effective = sigma / (rest[0] if rest else 1.0)
        grouped[effective, q] = grouped.get((effective, q), 0) + int(steps)
    if not grouped:
        return 0.0
    # The accountants' history is exactly this list of (noise multiplier, sample rate, steps);
    # setting it at once replays a long period without one step() call per round.
    history = [(sigma, q, steps) for (sigma, q), steps in grouped.items()]
    if accountant is Accountant.PRV:
        return _prv_epsilon(tuple(history), delta)
    return _rdp_spent(history, delta, RDP_ORDERS)


@functools.lru_cache(maxsize=256)
def _prv_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """opacus' PRV accountant's epsilon for ``history``. Cached like the RDP curves: a period's
    epsilon is asked for when a round opens, closes and is reported. The RDP bound that sizes
    the accountant's discretization (:func:`_safe_domain_size`) reads cached curves: at a
    sampling rate below 1 that bound was most of an answer's 0.4 s, asked again for every new
    round of the same mechanism."""
    prv = _prv_accountant()()
    prv.history = list(history)
    # Its privacy random variable takes log(0) where a subsampled round's loss is bounded;
    # numpy warns, and the value it yields there is the one the analysis means.
    with np.errstate(divide="ignore"):
        return float(prv.get_epsilon(delta=delta))


@functools.cache
def _prv_accountant() -> type[Any]:
    """opacus' ``PRVAccountant`` with its domain sized by :func:`_safe_domain_size` (the same
    number as its own ``compute_safe_domain_size``, from cached curves; everything else is
    opacus'). tests/aggregator/test_ledger_curves.py holds its epsilon equal to opacus'."""
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import Domain

    class _CachedCurvesPRV(PRVAccountant):  # type: ignore[misc]
        def _get_domain(self, prvs: Sequence[Any], num_self_compositions: Sequence[int],
                        eps_error: float, delta_error: float) -> Any:  # fmt: skip
            # opacus' PRVAccountant._get_domain, with the size from the cached curves.
            history = [(p.noise_multiplier, p.sample_rate, steps)
                       for p, steps in zip(prvs, num_self_compositions, strict=True)]  # fmt: skip
            size = _safe_domain_size(history, eps_error=eps_error, delta_error=delta_error)
            total = sum(num_self_compositions)
            mesh_size = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
            return Domain.create_aligned(-size, size, mesh_size)

    return _CachedCurvesPRV


def _safe_domain_size(
    history: Sequence[tuple[float, float, int]], *, eps_error: float, delta_error: float
) -> float:
    """opacus' ``compute_safe_domain_size`` (Gopi et al. 2021, remark 5.6, as opacus adapts
    it): the RDP epsilon of the whole history at ``delta_error / 4`` and of each mechanism
    once at ``delta_error / (8 n)`` for ``n`` rounds in all, the largest, at least
    ``eps_error``, plus 3; at opacus' default orders, as its ``RDPAccountant`` computes it,
    from cached curves."""
    from opacus.accountants import RDPAccountant

    orders = tuple(RDPAccountant.DEFAULT_ALPHAS)
    total = sum(steps for _, _, steps in history)
    size = _rdp_spent(history, delta_error / 4, orders)
    for sigma, q, _ in history:
        size = max(size, _rdp_spent([(sigma, q, 1)], delta_error / (8 * total), orders))
    return max(size, eps_error) + 3


def _rdp_spent(
    history: Sequence[tuple[float, float, int]], delta: float, orders: tuple[float, ...]
) -> float:
    # What opacus' RDPAccountant computes with this history and these orders: the sum, in
    # history order, of each entry's RDP curve times its steps, converted at ``delta``. The
    # same operations on the same curves give the same float; only the curves are cached.
    from opacus.accountants.analysis import rdp as analysis

    rdp = sum([_rdp_curve(sigma, q, orders) * steps for sigma, q, steps in history])
    with warnings.catch_warnings():
        # Much noise on few unsampled rounds puts the best order at the grid's end; the bound
        # is still valid (only looser), so opacus' advice is not news for every round.
        warnings.filterwarnings("ignore", "Optimal order is the largest alpha")
        eps, _ = analysis.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=256)
def _rdp_curve(
    sigma: float, q: float, orders: tuple[float, ...] = RDP_ORDERS
) -> npt.NDArray[np.float64]:
    """One round's RDP at every order of ``orders`` (opacus' ``compute_rdp``, one step).

    Cached: the ledger recomputes a period's epsilon when a round opens, when it closes and
    when it is reported, each time over every round of the period, and a subsampled curve at
    a large sampling rate takes about half a second. tests/aggregator/test_ledger_curves.py
    holds the result equal to opacus' accountant's, bit for bit.
    """
    from opacus.accountants.analysis import rdp as analysis

    curve = np.asarray(
        analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders)),
        dtype=np.float64,
    )
    curve.setflags(write=False)
    return curve


def _mechanism(
    noise_multiplier: float, sampling_rate: float, steps: int, sensitivity: float = 1.0
) -> _Round:
    sigma, q, c = float(noise_multiplier), float(sampling_rate), float(sensitivity)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"the noise multiplier must be a positive number, got {sigma!r}")
    if not (math.isfinite(q) and 0 < q <= 1):
        raise ValueError(f"the sampling rate must be in (0, 1], got {q!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a whole number >= 1, got {steps!r}")
    if not (math.isfinite(c) and c >= 1):
        raise ValueError(f"the sensitivity must be a number >= 1 (units of C), got {c!r}")
    return sigma, q, steps, c


def _within(epsilon: float, budget: float) -> bool:
    # Written so that NaN (an accountant that could not bound the loss) counts as over budget.
    return epsilon <= budget


def _same_round(row: tuple[Any, ...], round_: _Round, start: datetime) -> float:
    entry = _entry(row)
    recorded = (entry.noise_multiplier, entry.sampling_rate, entry.steps, entry.sensitivity)
    if recorded != round_ or (entry.period_start != start):
        raise ValueError(
            f"round {entry.round_id!r} is already recorded with other parameters "
            f"(noise multiplier {entry.noise_multiplier}, sampling rate {entry.sampling_rate}, "
            f"{entry.steps} steps, period {_iso(entry.period_start)})"
        )
    return entry.epsilon_after


def _entry(row: tuple[Any, ...]) -> LedgerEntry:
    round_id, start, sigma, q, steps, epsilon, at, sensitivity = row
    return LedgerEntry(
        round_id=str(round_id),
        period_start=datetime.fromisoformat(start),
        noise_multiplier=float(sigma),
        sampling_rate=float(q),
        steps=int(steps),
        epsilon_after=float(epsilon),
        at=datetime.fromisoformat(at),
        sensitivity=float(sensitivity),
    )


def _aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (a naive time has no fixed period)")
    return value.astimezone(UTC)


def _iso(value: datetime) -> str:
    # One fixed-width UTC spelling, so equal times are equal strings and text order is time order.
    return value.astimezone(UTC).isoformat(timespec="microseconds")
