"""The privacy ledger against an independent accountant (Google's dp-accounting), on real SQLite."""

from __future__ import annotations

import itertools
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("opacus")
dp_accounting = pytest.importorskip("dp_accounting")

from sottovoce.aggregator._ledger import (  # noqa: E402
    EPOCH,
    PrivacyLedger,
    RoundOverBudget,
    epsilon_of,
)
from sottovoce.policy import Accountant, Policy, PrivacyBudget, Region  # noqa: E402

AT = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
DELTA = 1e-5

# (noise multiplier, sampling rate, steps): from few noisy rounds to many sparse ones.
SETTINGS = [
    (1.1, 0.05, 100),
    (0.8, 0.1, 10),
    (1.0, 0.01, 1000),
    (2.0, 0.001, 10_000),
    (0.6, 0.02, 300),
    (10.0, 0.02, 50),
]


def region_with(policy: Policy, **privacy: Any) -> Region:
    """The first region with its privacy budget changed, validated as a policy's would be (a
    delta of 1e-5 needs a population of at most 10,000), on the RDP accountant unless
    ``accountant`` says otherwise (the example policy's is PRV)."""
    region = policy.regions[0]
    data = region.privacy.model_dump() | {"delta": DELTA, "population": 10_000,
                                          "sampling_rate": 0.01, "accountant": Accountant.RDP,
                                          **privacy}  # fmt: skip
    return region.model_copy(update={"privacy": PrivacyBudget.model_validate(data)})


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(tmp_path / "aggregator.db")
    yield connection
    connection.close()


def dp_accounting_rdp(*rounds: tuple[float, ...]) -> float:
    """(noise multiplier, sampling rate, steps[, sensitivity]) rounds, composed by dp-accounting:
    the Gaussian of noise multiplier sigma / sensitivity, Poisson-sampled unless q is 1."""
    accountant = dp_accounting.rdp.RdpAccountant()
    for sigma, q, steps, *sensitivity in rounds:
        event: Any = dp_accounting.GaussianDpEvent(sigma / (sensitivity[0] if sensitivity else 1))
        if q < 1:
            event = dp_accounting.PoissonSampledDpEvent(q, event)
        accountant.compose(event, steps)
    return float(accountant.get_epsilon(DELTA))


@pytest.mark.parametrize(("sigma", "q", "steps"), SETTINGS)
def test_rdp_epsilon_agrees_with_dp_accounting(
    policy: Policy, conn: sqlite3.Connection, sigma: float, q: float, steps: int
) -> None:
    ledger = PrivacyLedger(conn, region=region_with(policy, epsilon=100.0))
    start = ledger.period_start_for(AT)
    expected = dp_accounting_rdp((sigma, q, steps))
    assert ledger.epsilon_if(sigma, q, period_start=start, steps=steps) == pytest.approx(
        expected, rel=0.01
    )


def test_replayed_rounds_agree_with_dp_accounting(policy: Policy, conn: sqlite3.Connection) -> None:
    # Rounds with different mechanisms compose; the ledger replays them from its table.
    ledger = PrivacyLedger(conn, region=region_with(policy, epsilon=100.0))
    start = ledger.period_start_for(AT)
    rounds = [(1.1, 0.05, 1)] * 30 + [(0.9, 0.02, 5)] * 10 + [(1.1, 0.05, 1)] * 20
    for i, (sigma, q, steps) in enumerate(rounds):
        ledger.charge_round(
            f"r{i}", sigma, q, period_start=start, at=AT + timedelta(minutes=i), steps=steps
        )
    expected = dp_accounting_rdp((1.1, 0.05, 50), (0.9, 0.02, 50))
    assert ledger.spent(start) == pytest.approx(expected, rel=0.01)
    assert ledger.entries(start)[-1].epsilon_after == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize(("sigma", "q", "steps"), SETTINGS[:4])
def test_prv_is_selectable_and_near_rdp(
    policy: Policy, conn: sqlite3.Connection, sigma: float, q: float, steps: int
) -> None:
    rdp = PrivacyLedger(conn, region=region_with(policy, epsilon=100.0))
    prv = PrivacyLedger(conn, region=region_with(policy, epsilon=100.0, accountant=Accountant.PRV))
    start = rdp.period_start_for(AT)
    eps_rdp = rdp.epsilon_if(sigma, q, period_start=start, steps=steps)
    eps_prv = prv.epsilon_if(sigma, q, period_start=start, steps=steps)
    assert eps_prv != eps_rdp
    # PRV accounting is numerically near-exact, so it lands below RDP's bound (here 9-16%),
    # up to its own error of 0.01 in epsilon.
    assert 0.8 * eps_rdp <= eps_prv <= eps_rdp + 0.01


@pytest.mark.parametrize(("sigma", "q", "steps"), [(1.1, 0.05, 100), (0.8, 0.1, 10)])
def test_prv_agrees_with_dp_accounting_pld(
    policy: Policy, conn: sqlite3.Connection, sigma: float, q: float, steps: int
) -> None:
    ledger = PrivacyLedger(
        conn, region=region_with(policy, epsilon=100.0, accountant=Accountant.PRV)
    )
    start = ledger.period_start_for(AT)
    pld = dp_accounting.pld.PLDAccountant()
    pld.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    expected = float(pld.get_epsilon(DELTA))
    assert ledger.epsilon_if(sigma, q, period_start=start, steps=steps) == pytest.approx(
        expected, abs=0.02
    )


# -- sensitivity: how far one device moves what is noised, in units of C ----------------------


@pytest.mark.parametrize(
    "mechanism",
    [(1.0, 0.01, 1, 1.0001), (1.1, 0.05, 100, 1.5), (4.0, 1.0, 3, 2.0003), (2.0, 1.0, 1, 2.0)],
    ids=str,
)
def test_a_sensitivity_charges_the_gaussian_of_sigma_over_it(
    policy: Policy, conn: sqlite3.Connection, mechanism: tuple[float, float, int, float]
) -> None:
    sigma, q, steps, sensitivity = mechanism
    ledger = PrivacyLedger(conn, region=region_with(policy, epsilon=100.0))
    start = ledger.period_start_for(AT)
    charged = ledger.epsilon_if(sigma, q, period_start=start, steps=steps,
                                sensitivity=sensitivity)  # fmt: skip
    assert charged == pytest.approx(dp_accounting_rdp((sigma, q, steps, sensitivity)), rel=0.01)
    # Exactly the round of noise multiplier sigma / sensitivity, and more than without it.
    assert charged == ledger.epsilon_if(sigma / sensitivity, q, period_start=start, steps=steps)
    assert charged > ledger.epsilon_if(sigma, q, period_start=start, steps=steps)
    assert ledger.can_open(sigma, q, period_start=start, steps=steps, sensitivity=sensitivity)
    after = ledger.charge_round("r1", sigma, q, period_start=start, at=AT, steps=steps,
                                sensitivity=sensitivity)  # fmt: skip
    assert after == charged == ledger.spent(start)
    (entry,) = ledger.entries(start)
    assert (entry.noise_multiplier, entry.sampling_rate, entry.steps, entry.sensitivity) == (
        sigma, q, steps, sensitivity)  # fmt: skip


def test_epsilon_of_takes_rounds_with_and_without_a_sensitivity() -> None:
    rdp = Accountant.RDP
    plain = epsilon_of([(1.1, 0.05, 10)], delta=DELTA, accountant=rdp)
    assert epsilon_of([(1.1, 0.05, 10, 1.0)], delta=DELTA, accountant=rdp) == plain
    scaled = epsilon_of([(2.2, 0.05, 10, 2.0)], delta=DELTA, accountant=rdp)
    assert scaled == pytest.approx(plain, rel=1e-12)
    # Mixed rounds compose whatever their order; the same effective mechanism groups.
    mixed = [(1.1, 0.05, 4), (2.0, 1.0, 1, 2.0), (1.1, 0.05, 6, 1.0)]
    assert epsilon_of(mixed, delta=DELTA, accountant=rdp) == pytest.approx(
        epsilon_of(mixed[::-1], delta=DELTA, accountant=rdp), rel=1e-12)  # fmt: skip
    assert epsilon_of(mixed, delta=DELTA, accountant=rdp) == pytest.approx(
        dp_accounting_rdp((1.1, 0.05, 10), (1.0, 1.0, 1)), rel=0.01)  # fmt: skip
    assert epsilon_of([], delta=DELTA, accountant=rdp) == 0.0


def test_a_round_recorded_again_with_another_sensitivity_is_refused(
    policy: Policy, conn: sqlite3.Connection
) -> None:
    ledger = PrivacyLedger(conn, region=region_with(policy, epsilon=8.0))
    start = ledger.period_start_for(AT)
    once = ledger.charge_round("r1", 1.0, 0.01, period_start=start, at=AT, sensitivity=1.5)
    assert ledger.charge_round("r1", 1.0, 0.01, period_start=start, at=AT,
                               sensitivity=1.5) == once  # fmt: skip
    with pytest.raises(ValueError, match="already recorded"):
        ledger.charge_round("r1", 1.0, 0.01, period_start=start, at=AT)  # sensitivity 1
    assert len(ledger.entries(start)) == 1


@pytest.mark.parametrize("sensitivity", [0.0, 0.5, 0.999, -1.0, float("nan"), float("inf")])
def test_a_sensitivity_below_one_clipping_norm_is_rejected(
    policy: Policy, conn: sqlite3.Connection, sensitivity: float
) -> None:
    # One device always moves a clipped sum by up to C: less would undercharge.
    ledger = PrivacyLedger(conn, region=region_with(policy))
    start = ledger.period_start_for(AT)
    with pytest.raises(ValueError, match="sensitivity"):
        ledger.epsilon_if(1.0, 0.01, period_start=start, sensitivity=sensitivity)
    with pytest.raises(ValueError, match="sensitivity"):
        ledger.charge_round("r", 1.0, 0.01, period_start=start, at=AT, sensitivity=sensitivity)
    assert ledger.entries(start) == []


def test_a_ledger_file_from_before_sensitivities_reads_its_rounds_at_sensitivity_one(
    policy: Policy, conn: sqlite3.Connection
) -> None:
    region = region_with(policy, epsilon=8.0)
    old = PrivacyLedger(sqlite3.connect(":memory:"), region=region)
    start = old.period_start_for(AT)
    before = old.charge_round("r0", 1.1, 0.05, period_start=start, at=AT)
    # The table as files made before this column hold it.
    conn.execute(
        "CREATE TABLE privacy_ledger (region TEXT NOT NULL, period_start TEXT NOT NULL,"
        " round_id TEXT NOT NULL, noise_multiplier REAL NOT NULL, sampling_rate REAL NOT NULL,"
        " steps INTEGER NOT NULL, epsilon_after REAL NOT NULL, at TEXT NOT NULL,"
        " PRIMARY KEY (region, round_id))"
    )
    conn.execute("INSERT INTO privacy_ledger VALUES (?, ?, 'r0', 1.1, 0.05, 1, ?, ?)",
                 (region.id, start.isoformat(timespec="microseconds"), before,
                  AT.isoformat(timespec="microseconds")))  # fmt: skip
    conn.commit()
    ledger = PrivacyLedger(conn, region=region)
    assert [(e.round_id, e.sensitivity) for e in ledger.entries(start)] == [("r0", 1.0)]
    assert ledger.spent(start) == pytest.approx(before)
    after = ledger.charge_round("r1", 1.1, 0.05, period_start=start, at=AT, sensitivity=2.0)
    assert after == pytest.approx(dp_accounting_rdp((1.1, 0.05, 1), (1.1, 0.05, 1, 2.0)),
                                  rel=0.01)  # fmt: skip


def test_history_survives_a_restart(policy: Policy, tmp_path: Path) -> None:
    region = region_with(policy, epsilon=8.0)
    path = tmp_path / "aggregator.db"
    first = sqlite3.connect(path)
    ledger = PrivacyLedger(first, region=region)
    start = ledger.period_start_for(AT)
    for i in range(5):
        ledger.charge_round(f"r{i}", 1.1, 0.05, period_start=start, at=AT + timedelta(hours=i))
    spent, entries = ledger.spent(start), ledger.entries(start)
    first.close()

    second = sqlite3.connect(path)
    reopened = PrivacyLedger(second, region=region)
    assert reopened.entries(start) == entries
    assert reopened.spent(start) == pytest.approx(spent)
    after = reopened.charge_round("r5", 1.1, 0.05, period_start=start, at=AT + timedelta(hours=5))
    assert after == pytest.approx(dp_accounting_rdp((1.1, 0.05, 6)), rel=0.01)
    second.close()


def test_a_round_over_budget_is_refused_and_not_recorded(
    policy: Policy, conn: sqlite3.Connection
) -> None:
    ledger = PrivacyLedger(conn, region=region_with(policy, epsilon=1.0))
    start = ledger.period_start_for(AT)
    recorded = 0
    while ledger.can_open(2.0, 0.1, period_start=start):
        ledger.charge_round(f"r{recorded}", 2.0, 0.1, period_start=start, at=AT)
        recorded += 1
        assert recorded < 1000
    assert recorded > 0
    spent = ledger.spent(start)
    assert spent <= 1.0

    with pytest.raises(RoundOverBudget) as refused:
        ledger.charge_round("over", 2.0, 0.1, period_start=start, at=AT)
    error = refused.value
    assert error.code == "budget_exhausted"
    assert error.budget == 1.0
    assert error.epsilon_after > 1.0
    assert error.spent == pytest.approx(spent)
    assert "budget" in str(error)
    assert error.region in str(error)

    assert len(ledger.entries(start)) == recorded
    assert "over" not in {entry.round_id for entry in ledger.entries(start)}
    assert ledger.spent(start) == pytest.approx(spent)
    # A round with much more noise may still fit.
    assert ledger.can_open(50.0, 0.1, period_start=start)


def test_a_new_period_starts_with_a_fresh_budget(policy: Policy, conn: sqlite3.Connection) -> None:
    region = region_with(policy, epsilon=1.0)
    ledger = PrivacyLedger(conn, region=region)
    start = ledger.period_start_for(AT)
    i = 0
    while ledger.can_open(2.0, 0.1, period_start=start):
        ledger.charge_round(f"r{i}", 2.0, 0.1, period_start=start, at=AT)
        i += 1
    assert i > 0
    assert not ledger.can_open(2.0, 0.1, period_start=start)

    later = AT + region.privacy.period
    following = ledger.period_start_for(later)
    assert following == start + region.privacy.period
    assert ledger.spent(following) == 0.0
    assert ledger.can_open(2.0, 0.1, period_start=following)
    first = ledger.charge_round("next", 2.0, 0.1, period_start=following, at=later)
    assert first == pytest.approx(dp_accounting_rdp((2.0, 0.1, 1)), rel=0.01)
    assert not ledger.can_open(2.0, 0.1, period_start=start)


def test_epsilon_grows_with_every_round(policy: Policy, conn: sqlite3.Connection) -> None:
    ledger = PrivacyLedger(conn, region=region_with(policy, epsilon=8.0))
    start = ledger.period_start_for(AT)
    spent = [ledger.spent(start)]
    for i in range(12):
        predicted = ledger.epsilon_if(1.1, 0.05, period_start=start)
        after = ledger.charge_round(f"r{i}", 1.1, 0.05, period_start=start, at=AT)
        assert after == predicted
        spent.append(ledger.spent(start))
    assert spent[0] == 0.0
    assert all(b > a for a, b in itertools.pairwise(spent))
    assert [e.epsilon_after for e in ledger.entries(start)] == pytest.approx(spent[1:])


def test_recording_a_round_twice_charges_once(policy: Policy, conn: sqlite3.Connection) -> None:
    ledger = PrivacyLedger(conn, region=region_with(policy, epsilon=8.0))
    start = ledger.period_start_for(AT)
    once = ledger.charge_round("r1", 1.1, 0.05, period_start=start, at=AT)
    again = ledger.charge_round("r1", 1.1, 0.05, period_start=start, at=AT)
    assert again == once
    assert len(ledger.entries(start)) == 1
    with pytest.raises(ValueError, match="already recorded"):
        ledger.charge_round("r1", 0.5, 0.05, period_start=start, at=AT)


def test_rounds_are_kept_per_region(policy: Policy, conn: sqlite3.Connection) -> None:
    eu = PrivacyLedger(conn, region=region_with(policy, epsilon=8.0))
    other = policy.regions[1]
    us = PrivacyLedger(conn, region=other)
    start = eu.period_start_for(AT)
    eu.charge_round("r1", 1.1, 0.05, period_start=start, at=AT)
    assert us.spent(start) == 0.0
    assert us.entries(start) == []


def test_a_callers_rollback_discards_the_round(policy: Policy, conn: sqlite3.Connection) -> None:
    # Inside the caller's transaction the ledger nests; the caller decides whether it commits.
    ledger = PrivacyLedger(conn, region=region_with(policy, epsilon=8.0))
    start = ledger.period_start_for(AT)
    conn.execute("CREATE TABLE releases (version INTEGER)")
    conn.execute("INSERT INTO releases VALUES (1)")
    assert conn.in_transaction
    ledger.charge_round("r1", 1.1, 0.05, period_start=start, at=AT)
    conn.rollback()
    assert ledger.entries(start) == []


def test_periods_are_fixed_and_cannot_be_chosen(policy: Policy, conn: sqlite3.Connection) -> None:
    region = region_with(policy, period=timedelta(days=30))
    ledger = PrivacyLedger(conn, region=region)
    start = ledger.period_start_for(AT)
    assert (start - EPOCH) % timedelta(days=30) == timedelta(0)
    assert ledger.period_start_for(start) == start
    assert ledger.period_start_for(start + timedelta(days=30) - timedelta(microseconds=1)) == start
    with pytest.raises(ValueError, match="not the start of a period"):
        ledger.epsilon_if(1.0, 0.1, period_start=start + timedelta(days=1))
    with pytest.raises(ValueError, match="not the start of a period"):
        ledger.charge_round("r", 1.0, 0.1, period_start=AT, at=AT)
    with pytest.raises(ValueError, match="timezone-aware"):
        ledger.period_start_for(datetime(2026, 11, 1, 9, 0))
    with pytest.raises(ValueError, match="before its period"):
        ledger.charge_round("r", 1.0, 0.1, period_start=start, at=start - timedelta(seconds=1))


@pytest.mark.parametrize(
    ("sigma", "q", "steps"),
    [
        (0.0, 0.1, 1),
        (-1.0, 0.1, 1),
        (float("nan"), 0.1, 1),
        (1.0, 0.0, 1),
        (1.0, 1.5, 1),
        (1.0, 0.1, 0),
    ],
)
def test_bad_mechanisms_are_rejected(
    policy: Policy, conn: sqlite3.Connection, sigma: float, q: float, steps: int
) -> None:
    ledger = PrivacyLedger(conn, region=region_with(policy))
    start = ledger.period_start_for(AT)
    with pytest.raises(ValueError):
        ledger.epsilon_if(sigma, q, period_start=start, steps=steps)


@given(
    at=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    seconds=st.integers(min_value=1, max_value=400 * 86400),
)
def test_every_time_falls_in_exactly_one_period(policy: Policy, at: datetime, seconds: int) -> None:
    period = timedelta(seconds=seconds)
    ledger = PrivacyLedger(sqlite3.connect(":memory:"), region=region_with(policy, period=period))
    start = ledger.period_start_for(at)
    assert start <= at < start + period
    assert (start - EPOCH) % period == timedelta(0)


def test_the_ledger_imports_without_torch() -> None:
    code = (
        "import sys, sottovoce.aggregator._ledger; "
        "assert 'torch' not in sys.modules and 'opacus' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "edge",
    [
        datetime(2026, 12, 1, tzinfo=UTC),  # a month end
        datetime(2027, 1, 1, tzinfo=UTC),  # a year end
        datetime(2028, 2, 29, tzinfo=UTC),  # a leap day
        datetime(2028, 3, 1, tzinfo=UTC),  # the day after it
        datetime(2026, 10, 25, 3, 0, tzinfo=timezone(timedelta(hours=2))),  # Berlin falls back
    ],
    ids=["month-end", "year-end", "leap-day", "after-leap-day", "dst"],
)
def test_daily_periods_turn_over_at_calendar_edges_in_utc(
    policy: Policy, conn: sqlite3.Connection, edge: datetime
) -> None:
    """With a one-day period, periods start at UTC midnight whatever the calendar around it;
    a time given in local time with an offset belongs to the period of its UTC instant."""
    ledger = PrivacyLedger(conn, region=region_with(policy, period=timedelta(days=1)))
    midnight = edge.astimezone(UTC).replace(hour=0, minute=0)
    assert ledger.period_start_for(edge) == midnight
    before = ledger.period_start_for(midnight - timedelta(microseconds=1))
    assert before == midnight - timedelta(days=1)  # contiguous: one ends where the next starts
    # The same instant written in two offsets is in one period.
    assert ledger.period_start_for(edge.astimezone(timezone(timedelta(hours=-5)))) == midnight
    # A round opened before midnight is charged to its own period, even if it closes after.
    start = ledger.period_start_for(midnight - timedelta(minutes=30))
    ledger.charge_round("late", 1.0, 0.01, period_start=start, at=midnight + timedelta(minutes=5))
    assert [e.round_id for e in ledger.entries(start)] == ["late"]
    assert ledger.entries(midnight) == []
