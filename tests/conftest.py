"""Shared fixtures: the example policy, real store files in tmp_path, an event builder, and a
real PostgreSQL server on loopback (`postgres`, `pg_url`, `backend`, `private_postgres`)."""

from __future__ import annotations

import contextlib
import io
import itertools
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple
from unittest.mock import patch

import numpy as np
import pytest

from sottovoce._pgserver import URL_ENV, PostgresAt, ThrowawayPostgres
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


def consenting(store: EventStore, user: str, *purposes: Purpose, age: int = 30) -> EventStore:
    """``store`` once ``user`` has said they are ``age`` and granted ``purposes``, in order."""
    store.set_age(user, age)
    for purpose in purposes:
        store.grant(user, purpose)
    return store


def fill_listening(
    store: EventStore,
    user: str = "ann",
    *,
    events: int,
    consent: tuple[Purpose, ...] = (Purpose.FEDERATED_TRAINING,),
) -> list[Any]:
    """Fill ``store`` with the demo catalog (seed 1) and ``events`` of ``user``'s listening (seed
    2, favourite genres 2 and 5), then grant ``consent``; the catalog's tracks."""
    import random

    from sottovoce._demo import listen, make_catalog

    tracks, rows = make_catalog(random.Random(1))
    store.upsert_catalog(rows)
    store.append_many(listen(random.Random(2), user, tracks, {2, 5}, events))
    for purpose in consent:
        store.grant(user, purpose)
    return tracks


@pytest.fixture
def eu_store(open_store: StoreFactory) -> EventStore:
    """An EU device whose user-1 is 30 and has opted in to personalization."""
    return consenting(open_store("eu"), "user-1", Purpose.PERSONALIZATION)


# -- rounds a device will join -----------------------------------------------------------------

TAKING_PART: dict[str, Any] = {"sampling_rate": 1.0, "population": 1000, "delta": 1e-5,
                               "epsilon": 40.0}  # fmt: skip
"""Privacy overrides for tests where every device must be in every round (q = 1): a population
and a delta that the policy accepts for it, and a budget that pays for a few such rounds."""


def hit_rate(score: Callable[[list[str]], Any], train: list[list[str]], held: list[str],
             layout: Any, *, k: int = 10) -> float:  # fmt: skip
    """The share of users whose held-out item is in the top ``k`` of ``score(items)`` (one
    score per item of ``layout``'s catalog), their own items excluded."""
    hits = []
    for items, out in zip(train, held, strict=True):
        scores = np.array(score(items), np.float64)
        scores[[layout.index[i] for i in items]] = -np.inf
        hits.append(layout.index[out] in np.argsort(-scores, kind="stable")[:k])
    return float(np.mean(hits))


def policy_where_all_take_part(base: Policy | None = None, **privacy: Any) -> Policy:
    """``base`` (default: the example) with every region's mechanism sampling every device."""
    from sottovoce.policy import policy_from_data

    data = (base or example_policy()).model_dump(mode="json")
    for region in data["regions"]:
        region["privacy"].update({**TAKING_PART, **privacy})
    return policy_from_data(data)


def policy_publishing(region: str, *, hpke: Any = None, signing: Any = None,
                      base: Policy | None = None) -> Policy:  # fmt: skip
    """``base`` (default: the example) with ``region``'s aggregator publishing the public half of
    ``hpke`` (an X25519 private key) and of ``signing`` (Ed25519): only the keys given change, the
    others stay the example's."""
    import base64

    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from sottovoce.policy import policy_from_data

    data = (base or example_policy()).model_dump(mode="json")
    (found,) = [r for r in data["regions"] if r["id"] == region]
    given = {"hpke": hpke, "signing": signing}
    for key in found["aggregator"]["public_keys"]:
        private = given[key["use"]]
        if private is not None:
            public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            key["key"] = base64.b64encode(public).decode()
    return policy_from_data(data)


def open_keygen_region(db: Path, keys: Path, policy: Policy) -> None:
    """What ``sottovoce aggregator serve`` does first with the keys ``keygen`` wrote to ``keys``:
    open the EU region's database ``db`` under ``policy`` (which logs the policy it applies)."""
    import sqlite3

    from sottovoce.aggregator import RegionAggregator, load_keys

    loaded = load_keys(keys)
    agg = RegionAggregator(sqlite3.connect(db, isolation_level=None), policy=policy, region="eu",
                           signing_key=loaded.signing, hpke_key=loaded.hpke, model_id="ab" * 32,
                           dim=4, clock=lambda: NOW)  # fmt: skip
    agg.close()


def round_spec(policy: Policy, region: str, *, model_id: str, model_version: int = 0,
               now: datetime = NOW, **overrides: Any) -> Any:  # fmt: skip
    """A round spec exactly as ``region``'s aggregator would sign it at ``now`` under ``policy``
    (its mechanism, its current budget period), with ``overrides``."""
    from sottovoce.sync import RoundSpec
    from sottovoce.sync._budget import period_start_for

    privacy = policy.region(region).privacy
    fields: dict[str, Any] = {
        "round_id": f"{region}-r1", "region": region, "model_id": model_id,
        "model_version": model_version, "mode": privacy.mode.value,
        "clipping_norm": privacy.clipping_norm, "noise_multiplier": privacy.noise_multiplier,
        "sampling_rate": privacy.sampling_rate, "min_cohort": privacy.min_cohort,
        "expected_cohort": privacy.expected_cohort, "deadline": now + timedelta(hours=1),
        "epsilon_spent": 0.0, "epsilon_after": 0.5, "delta": privacy.delta,
        "period_start": period_start_for(now, policy.region(region)),
    }  # fmt: skip
    fields.update(overrides)
    return RoundSpec.model_validate(fields)


def wait_until_serving(url: str, server: Any, log: Path, *, seconds: float = 60.0) -> None:
    """Wait for ``sottovoce aggregator serve`` (the ``subprocess.Popen`` ``server``, logging to
    ``log``) to answer its health check at ``url``; fails with its log if it exits or stalls."""
    import time

    import httpx

    deadline = time.monotonic() + seconds
    while True:
        assert server.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/v1/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"the aggregator did not answer: {log.read_text()}"
        time.sleep(0.1)


class Ran(NamedTuple):
    """What a command run by :func:`run_cli` gave: its exit status and its output."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> Ran:
    """``sottovoce ARGS`` through the console script's entry point, in this process (a process
    per call would make CLI tests several times slower)."""
    from sottovoce.cli import main

    out, err = io.StringIO(), io.StringIO()
    code: object = 0
    with (patch.object(sys, "argv", ["sottovoce", *args]), contextlib.redirect_stdout(out),
          contextlib.redirect_stderr(err)):  # fmt: skip
        try:
            main()
        except SystemExit as done:
            code = done.code
    return Ran(code if isinstance(code, int) else int(code is not None), out.getvalue(),
               err.getvalue())  # fmt: skip


# -- a real PostgreSQL for the backend tests ---------------------------------------------------


def _postgres_off() -> None:
    import os

    if os.environ.get("SOTTOVOCE_TEST_PG") == "off":
        pytest.skip("SOTTOVOCE_TEST_PG=off: no PostgreSQL for this run")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresAt]:
    """The run's PostgreSQL server: the one at ``SOTTOVOCE_TEST_PG_URL`` (``scripts/test``
    starts one for the whole run), else a throwaway server started here for the session.
    Skips only when ``SOTTOVOCE_TEST_PG=off``."""
    import os

    _postgres_off()
    if os.environ.get(URL_ENV):
        yield PostgresAt(os.environ[URL_ENV])
        return
    with ThrowawayPostgres() as server:
        yield server.server


@pytest.fixture
def pg_url(postgres: PostgresAt, request: pytest.FixtureRequest) -> Iterator[str]:
    """A ``postgresql://`` URL of a fresh, empty database on the run's server, dropped (its
    connections closed) after the test."""
    import re
    import secrets

    test = re.sub(r"[^a-z0-9_]+", "_", request.node.name.lower())[:40]
    name = f"t_{test}_{secrets.token_hex(4)}"
    url = postgres.new_database(name)
    yield url
    postgres.drop_database(name)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The database a region's aggregator opens, once per backend: an SQLite file's path in
    ``tmp_path`` (``.../region.db``), then a fresh PostgreSQL database's URL (``pg_url``)."""
    if request.param == "sqlite":
        return str(tmp_path / "region.db")
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def private_postgres() -> Iterator[ThrowawayPostgres]:
    """A started server of the test's own, for tests that restart, stop or kill it; removed
    after the test. Skips only when ``SOTTOVOCE_TEST_PG=off``."""
    _postgres_off()
    with ThrowawayPostgres() as server:
        yield server
