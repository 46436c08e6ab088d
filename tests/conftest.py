"""Shared fixtures: the example policy, real store files in tmp_path, and an event builder."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sottovoce.device import EventStore
from sottovoce.policy import Policy, Purpose, example_policy

T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
NOW = T0 + timedelta(days=1)  # the stores' clock: tests never depend on the wall clock


@pytest.fixture(scope="session")
def policy() -> Policy:
    return example_policy()


class Events:
    """Builds valid event dicts with fresh ids and a clock that moves forward."""

    def __init__(self, user: str = "user-1") -> None:
        self.user = user
        self.clock = T0
        self._ids = itertools.count()

    def __call__(self, type: str, *, after: float = 10.0, **fields: Any) -> dict[str, Any]:
        self.clock += timedelta(seconds=after)
        event = {"type": type, "event_id": f"{self.user}.{next(self._ids)}", "user_id": self.user,
                 "ts": self.clock.isoformat(), **fields}  # fmt: skip
        if type in {"play_start", "play_end", "pause", "resume", "skip", "seek", "like",
                    "dislike"}:  # fmt: skip
            event.setdefault("track_id", "t1")
            event.setdefault("artist_id", "a1")
        defaults = {
            "play_start": {"duration_ms": 200_000},
            "play_end": {"ms_played": 200_000, "duration_ms": 200_000},
            "pause": {"position_ms": 1_000},
            "resume": {"position_ms": 1_000},
            "skip": {"position_ms": 5_000},
            "seek": {"from_ms": 0, "to_ms": 60_000},
            "search": {"query": "night drive"},
            "navigate": {"screen": "home"},
            "context": {"device_type": "phone", "network": "wifi", "local_time": "08:30"},
        }
        for key, value in defaults.get(type, {}).items():
            event.setdefault(key, value)
        return event


@pytest.fixture
def events() -> Events:
    return Events()


StoreFactory = Callable[..., EventStore]


@pytest.fixture
def open_store(tmp_path: Path, policy: Policy) -> Iterator[StoreFactory]:
    """Open real store files under tmp_path; they are closed at the end of the test."""
    opened: list[EventStore] = []

    def factory(region: str = "us", name: str = "device.db", **kwargs: Any) -> EventStore:
        kwargs.setdefault("clock", lambda: NOW)
        store = EventStore.open(tmp_path / name, policy=policy, region=region, **kwargs)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


@pytest.fixture
def eu_store(open_store: StoreFactory) -> EventStore:
    """An EU device whose user-1 is 30 and has opted in to personalization."""
    store = open_store("eu")
    store.set_age("user-1", 30)
    store.grant("user-1", Purpose.PERSONALIZATION)
    return store
