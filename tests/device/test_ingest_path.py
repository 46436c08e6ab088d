"""The batched append path's shortcuts give what the plain code gives: event times in epoch
milliseconds, the collector held off for one append and left as it was found."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from conftest import NOW, Events, StoreFactory
from hypothesis import given
from hypothesis import strategies as st

from sottovoce.device import InvalidEventBatch
from sottovoce.device._events import EVENT_LIST_ADAPTER
from sottovoce.device._rows import epoch_ms, to_ms

# Times an event may hold (2000 to 2100), a day inside at each end for the offsets.
instants = st.datetimes(min_value=datetime(2000, 1, 2), max_value=datetime(2099, 12, 30))
offsets = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
zones = st.one_of(offsets, st.just(UTC), st.just(ZoneInfo("Europe/Paris")))


def _parsed(times: list[str]) -> list[datetime]:
    """Times as the append path sees them: parsed from text by the event model."""
    events = [{"type": "like", "event_id": f"e{i}", "user_id": "u", "track_id": "t", "ts": ts}
              for i, ts in enumerate(times)]  # fmt: skip
    return [event.ts for event in EVENT_LIST_ADAPTER.validate_python(events)]


@given(naive=st.lists(instants, min_size=1, max_size=30), zone=offsets)
def test_times_parsed_with_one_offset_convert_exactly(naive: list[datetime], zone: Any) -> None:
    stamps = _parsed([t.replace(tzinfo=zone).isoformat() for t in naive])
    assert epoch_ms(stamps) == [to_ms(ts) for ts in stamps]


@given(naive=st.lists(st.tuples(instants, zones), min_size=1, max_size=30))
def test_times_in_any_zones_convert_exactly(naive: list[tuple[datetime, Any]]) -> None:
    """Instances as an app hands them: one zone object or several, with or without a fixed
    offset (Paris changes its offset twice a year)."""
    stamps = [t.replace(tzinfo=zone) for t, zone in naive]
    assert epoch_ms(stamps) == [to_ms(ts) for ts in stamps]


def test_one_zone_with_daylight_saving_is_not_taken_for_a_fixed_offset() -> None:
    paris = ZoneInfo("Europe/Paris")
    winter = datetime(2026, 1, 15, 12, tzinfo=paris)
    summer = datetime(2026, 7, 15, 12, tzinfo=paris)
    assert epoch_ms([winter, summer]) == [to_ms(winter), to_ms(summer)]
    assert to_ms(summer) - to_ms(winter) == (181 * 24 - 1) * 3600 * 1000


def test_utc_text_shares_one_zone_object() -> None:
    """What makes the fast conversion apply to the common batch (all in UTC, from text)."""
    stamps = _parsed(["2026-11-01T09:00:00Z", "2026-11-01T10:00:00+00:00", "2026-11-02T00:00Z"])
    assert len({id(ts.tzinfo) for ts in stamps}) == 1
    assert epoch_ms(stamps) == [to_ms(ts) for ts in stamps]


class Probe:
    """The stores' clock, noting whether the collector was on each time the store asked."""

    def __init__(self) -> None:
        self.collector_on: list[bool] = []

    def __call__(self) -> datetime:
        self.collector_on.append(gc.isenabled())
        return NOW


@pytest.fixture
def collector() -> Iterator[None]:
    """The collector's setting, restored after the test."""
    enabled = gc.isenabled()
    try:
        yield
    finally:
        (gc.enable if enabled else gc.disable)()


@pytest.mark.usefixtures("collector")
def test_an_append_holds_the_collector_off_and_turns_it_back_on(
    open_store: StoreFactory, events: Events
) -> None:
    probe = Probe()
    store = open_store(clock=probe)
    gc.enable()
    del probe.collector_on[:]
    assert store.append_many([events("play_end") for _ in range(200)]).accepted == 200
    assert probe.collector_on and not any(probe.collector_on), "off while appending"
    assert gc.isenabled()


@pytest.mark.usefixtures("collector")
def test_a_refused_append_turns_the_collector_back_on(
    open_store: StoreFactory, events: Events
) -> None:
    probe = Probe()
    store = open_store(clock=probe)
    gc.enable()
    del probe.collector_on[:]
    ahead = {**events("like"), "ts": (NOW + timedelta(days=1)).isoformat()}
    with pytest.raises(InvalidEventBatch):  # refused after the clock was read
        store.append_many([events("like"), ahead])
    assert probe.collector_on == [False]
    assert gc.isenabled()


@pytest.mark.usefixtures("collector")
def test_an_append_leaves_a_collector_turned_off_off(
    open_store: StoreFactory, events: Events
) -> None:
    store = open_store()
    gc.disable()
    assert store.append_many([events("like") for _ in range(50)]).accepted == 50
    assert not gc.isenabled()
