"""What one simulated device does, in a worker process: the real ``sottovoce.device`` code on
its own SQLite store.

Every simulated user is a device: :func:`setup_device` creates its store, records its consent
and age as the region's policy asks, loads the public catalog and the user's training
interactions as events, and returns what evaluation needs from the device (the feature rows of
the user's candidate pool, with and without the personal state) and the user's training
examples (for the centralized baselines, which pool them). :func:`contribute` installs the
latest release if the device does not have it yet and takes part in a round: the spec's coin,
consent, local training, clipping, noise in local mode, sealing, and the outbox, exactly as
on a phone. Uploading is the coordinator's job (it holds the connection to the aggregator).

Workers are separate processes (both cores); these functions take and return plain values.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from sottovoce._errors import SottovoceError
from sottovoce.device import Eligibility, EventStore, Personalizer
from sottovoce.device._features import Snapshot, assemble
from sottovoce.device._ranker import FEATURES, Ranker
from sottovoce.policy import ConsentMode, Policy, Purpose, parse_policy
from sottovoce.sync import ModelRelease, RoundSpec

ELIGIBLE = Eligibility(True, True, True)  # charging, on wifi, idle: the app's call
_CATALOG: dict[str, dict[str, Any]] = {}


def init_worker(catalog: list[dict[str, Any]]) -> None:
    """Process initializer: the public catalog, from which each device caches its part, and
    the device library's accountant loaded (dp-accounting imports scipy: a second or so that
    would otherwise fall on the first round of every worker)."""
    _CATALOG.clear()
    _CATALOG.update((row["track_id"], row) for row in catalog)
    import dp_accounting.rdp  # noqa: F401


@cache
def _policy(text: str) -> Policy:
    return parse_policy(text, format="json")


@dataclass(frozen=True)
class DeviceTask:
    """Where a device lives and what it is: its store, user, region and policy (JSON)."""

    path: Path
    user: str
    region: str
    policy_json: str
    seed: int

    def secret(self) -> bytes:
        # Reproducible runs: the device secret (pseudonyms, round sampling) comes from the seed.
        return hashlib.sha256(f"{self.seed}:device:{self.user}".encode()).digest()

    def open(self, now: datetime) -> EventStore:
        return EventStore.open(self.path, policy=_policy(self.policy_json), region=self.region,
                               clock=lambda: now, device_secret=self.secret())  # fmt: skip


@dataclass(frozen=True)
class DeviceSetup:
    user: str
    events: int
    pool_x: npt.NDArray[np.float32]  # the candidate pool's feature rows, personal state in
    pool_x_global: npt.NDArray[np.float32]  # the same rows without any personal state
    x: npt.NDArray[np.float32]  # training examples (for the pooled baselines)
    y: npt.NDArray[np.float32]
    w: npt.NDArray[np.float32]


def setup_device(
    task: DeviceTask,
    events: list[dict[str, Any]],
    candidates: tuple[str, ...],
    now: datetime,
    *,
    examples: int,
    catalog: tuple[str, ...],
) -> DeviceSetup:
    """Create the device's store with its consent, catalog and history (see the docstring).

    ``catalog`` is the part of the public catalog the device caches (as an app caches what it
    shows): what the user played, the candidates, and a sample that training draws its
    negatives from.
    """
    store = task.open(now)
    try:
        region = store.region
        store.set_age(task.user, 30)
        for purpose in (Purpose.PERSONALIZATION, Purpose.FEDERATED_TRAINING):
            if region.consent[purpose] is ConsentMode.OPT_IN:
                store.grant(task.user, purpose)
        store.upsert_catalog(_CATALOG[item] for item in catalog if item in _CATALOG)
        for start in range(0, len(events), 1_000):
            store.append_many(events[start : start + 1_000])
        pool_x = pool_x_global = np.zeros((0, FEATURES), np.float32)
        if candidates:
            snapshot, artists, vectors = store.snapshot(task.user, candidates)
            pool_x = assemble(snapshot, candidates, artists, vectors)
            bare = Snapshot(now=snapshot.now)  # a device that knows nothing about its user
            pool_x_global = assemble(bare, candidates, artists, vectors)
        if not examples:  # a device of the collaborative model alone: no ranker to train
            return DeviceSetup(task.user, len(events), pool_x, pool_x_global, pool_x[:, 0],
                               pool_x[:, 0], pool_x[:, 0])  # fmt: skip
        data = Personalizer(store, ranker=_packaged_ranker()).examples(
            task.user, seed=task.seed, limit=examples
        )
        return DeviceSetup(task.user, len(events), pool_x, pool_x_global, data.x, data.y, data.w)
    finally:
        store.close()


@cache
def _packaged() -> tuple[Ranker, npt.NDArray[np.float32]]:
    ranker = Ranker.load()
    return ranker, ranker.get_weights()


def _packaged_ranker() -> Ranker:
    """The worker's one interpreter of the packaged model, at its packaged weights: every
    device of a worker runs the same file, and loading it per task cost more than training
    steps. (A device's own weights come from its store; the interpreter only runs them.)"""
    ranker, weights = _packaged()
    ranker.set_weights(weights)
    return ranker


@lru_cache(maxsize=4)
def _release(wire: bytes) -> ModelRelease:
    """A release parsed once per worker (every device of a region installs the same one); each
    device still verifies it against its own pinned key when it installs it."""
    return ModelRelease.from_wire(wire)


@dataclass(frozen=True)
class Contribution:
    user: str
    key: str | None  # the queued delta's idempotency key; None when the coin said no
    installed: int  # the global model version the device trained on
    refused: str | None = None  # a typed refusal's code (consent, spec), if any


def contribute(
    task: DeviceTask,
    spec: RoundSpec,
    release: bytes | None,
    now: datetime,
    *,
    steps: int,
    examples: int,
    round_seed: int,
) -> Contribution:
    """Take part in the round of ``spec`` on the newest model (``release``, wire JSON)."""
    store = task.open(now)
    try:
        rng = np.random.default_rng([task.seed, round_seed, int.from_bytes(task.secret()[:4])])
        personalizer = Personalizer(store, ranker=_packaged_ranker(), noise_rng=rng)
        if release is not None:
            parsed = _release(release)
            if parsed.version > personalizer.version:
                personalizer.install_release(parsed)
        try:
            key = personalizer.contribute(task.user, spec=spec, eligibility=ELIGIBLE,
                                          steps=steps, seed=round_seed,
                                          examples=examples)  # fmt: skip
        except SottovoceError as error:
            return Contribution(task.user, None, personalizer.version, error.code)
        return Contribution(task.user, key, personalizer.version)
    finally:
        store.close()
