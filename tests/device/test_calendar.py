"""Calendar edges on the device: month end, year end, a leap day and a daylight-saving change.

Inside, every time is UTC; local time only appears at the edges (an event's ``ts`` may carry
any offset). Each test picks its own clock, far from the date it runs on.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest import consenting

from sottovoce.device import EventStore
from sottovoce.policy import Policy, Purpose

BERLIN_SUMMER, BERLIN_WINTER = timezone(timedelta(hours=2)), timezone(timedelta(hours=1))


def _store(tmp_path: Path, policy: Policy, now: datetime) -> EventStore:
    store = EventStore.open(tmp_path / "d.db", policy=policy, region="eu", clock=lambda: now)
    consenting(store, "u", Purpose.PERSONALIZATION)
    return store


def _like(event_id: str, ts: datetime) -> dict[str, Any]:
    return {"type": "like", "event_id": event_id, "user_id": "u", "track_id": "t",
            "ts": ts.isoformat()}  # fmt: skip


def test_retention_cutoff_across_a_leap_day(tmp_path: Path, policy: Policy) -> None:
    # The EU keeps raw events 30 days: on 2028-03-30T00:00Z that reaches back over the leap
    # day to 2028-02-29T00:00Z exactly (29 February is one of the 30 days).
    now = datetime(2028, 3, 30, tzinfo=UTC)
    store = _store(tmp_path, policy, now)
    edge = datetime(2028, 2, 29, tzinfo=UTC)
    result = store.append_many([_like("old", edge - timedelta(seconds=1)),
                                _like("new", edge + timedelta(seconds=1))])  # fmt: skip
    assert result.accepted == 1 and result.expired_ids == ("old",)
    assert result.retention_cutoff == edge
    store.close()


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (datetime(2026, 11, 30, 23, 50, tzinfo=UTC), datetime(2026, 12, 1, 0, 5, tzinfo=UTC)),
        (datetime(2026, 12, 31, 23, 50, tzinfo=UTC), datetime(2027, 1, 1, 0, 5, tzinfo=UTC)),
        (datetime(2028, 2, 28, 23, 50, tzinfo=UTC), datetime(2028, 2, 29, 0, 5, tzinfo=UTC)),
    ],
    ids=["month-end", "year-end", "leap-day"],
)
def test_a_session_straddles_midnight_at_a_month_or_year_end(
    tmp_path: Path, policy: Policy, before: datetime, after: datetime
) -> None:
    store = _store(tmp_path, policy, after + timedelta(days=1))
    assert store.append_many([_like("a", before), _like("b", after)]).accepted == 2
    sessions = store.derived_state("u")["sessions"]
    assert len(sessions) == 1 and sessions[0]["events"] == 2  # 15 minutes apart in UTC
    store.close()


def test_a_daylight_saving_change_is_measured_in_utc(tmp_path: Path, policy: Policy) -> None:
    # Berlin falls back on 2026-10-25 at 03:00 CEST: 01:50 summer time and 02:10 winter time
    # are 20 minutes apart on the wall but 80 minutes apart in fact, two sessions.
    first = datetime(2026, 10, 25, 1, 50, tzinfo=BERLIN_SUMMER)
    second = datetime(2026, 10, 25, 2, 10, tzinfo=BERLIN_WINTER)
    assert second - first == timedelta(minutes=80)
    store = _store(tmp_path, policy, datetime(2026, 10, 26, tzinfo=UTC))
    store.append_many([_like("a", first), _like("b", second)])
    sessions = store.derived_state("u")["sessions"]
    assert len(sessions) == 2
    starts = sorted(s["start_ts"] for s in sessions)
    assert starts == [int(first.timestamp() * 1000), int(second.timestamp() * 1000)]
    # The app's own spelling of the time comes back in the access export (the edge).
    exported = {e["event_id"]: e["ts"] for e in store.export_user("u")["events"]}
    assert datetime.fromisoformat(exported["b"]) == second
    store.close()


def test_purge_at_a_month_end_is_exact(tmp_path: Path, policy: Policy) -> None:
    clock: list[datetime] = [datetime(2026, 12, 30, tzinfo=UTC)]
    now: Callable[[], datetime] = lambda: clock[0]  # noqa: E731
    store = EventStore.open(tmp_path / "d.db", policy=policy, region="eu", clock=now)
    consenting(store, "u", Purpose.PERSONALIZATION)
    store.append_many([_like("nov", datetime(2026, 11, 30, 23, 59, tzinfo=UTC)),
                       _like("dec", datetime(2026, 12, 1, 0, 1, tzinfo=UTC))])  # fmt: skip
    clock[0] = datetime(2026, 12, 31, tzinfo=UTC)  # 30 days after 2026-12-01T00:00Z
    assert store.purge_expired().deleted["events"] == 1
    assert [e["event_id"] for e in store.export_user("u")["events"]] == ["dec"]
    store.close()
