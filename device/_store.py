"""The device's local store: events, consent and derived state in one SQLite file.

Data flow position: the app hands events to :meth:`EventStore.append` / :meth:`append_many`;
the store checks consent against the region's policy, writes the events and merges their
derived state (:mod:`._derive`) in the same transaction, so a reader never sees events without
their derived state or the other way round. Reranking and local training read from here; nothing
in this file leaves the device.

Guarantees: an append either stores every event of the batch or none (``InvalidEventBatch``
and ``EventConflict`` leave the file untouched; a policy refusal stores only the refusal, in the
decision log); once ``append`` returns, the events survive a crash of the process (WAL;
``durability="full"`` also survives power loss); replaying an event id with the same content is
a no-op reported as a duplicate.

:class:`EventStore` is a façade: each method hands its call to one component, and the
components (modules ``device/_store_*.py``) share the store's one file and connection
(:class:`._store_file.StoreFile`)::

    _users    _store_users.Users             user ids as salted hashes and row references
    _trail    _store_decisions.DecisionTrail the policy engine and the decision log
    _consent  _store_consent.Consent         consent and age, and the decisions resting on them
    _catalog  _store_catalog.Catalog         public track metadata and vectors, cached
    _derived  _store_derived.DerivedState    stats, sessions, taste, context
    _events   _store_events.Events           appending batches of events
    _rights   _store_rights.Rights           retention, erasure, access export
    _models   _store_models.Models           ranker weights per slot
    _ledger   _store_ledger.DeviceLedger     the device's own privacy ledger
    _outbox   _store_outbox.DeviceOutbox     sealed deltas waiting to be uploaded
    _ranking  _store_ranking.RankingReads    what reranking reads, cached between writes
    keys      _store_keys.DeviceKeys         the device secret and signing keys (public)

The device's secret and private keys stay inside :class:`._store_keys.DeviceKeys`: nothing on
this class returns them, nor the connection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from sottovoce.device._derive import Fact, Vector
from sottovoce.device._events import Event
from sottovoce.device._features import Snapshot
from sottovoce.device._rows import _utcnow
from sottovoce.device._sqlite import guarded
from sottovoce.device._store_catalog import Catalog
from sottovoce.device._store_consent import Consent
from sottovoce.device._store_decisions import DecisionTrail
from sottovoce.device._store_derived import DerivedState
from sottovoce.device._store_events import Events
from sottovoce.device._store_file import StoreFile
from sottovoce.device._store_keys import DeviceKeys
from sottovoce.device._store_ledger import DeviceLedger
from sottovoce.device._store_models import Models
from sottovoce.device._store_outbox import DeviceOutbox
from sottovoce.device._store_ranking import RankingInputs, RankingReads
from sottovoce.device._store_rights import Rights
from sottovoce.device._store_users import Users
from sottovoce.device._store_values import (
    AppendResult,
    CatalogItem,
    Durability,
    ModelWeights,
    PurgeReport,
)
from sottovoce.policy import ConsentState, Decision, DecisionLog, Policy, PolicyViolation, Purpose
from sottovoce.sync import Charge, OutboxItem, SealedDelta, SpecRefused

__all__ = ["AppendResult", "CatalogItem", "Durability", "EventStore", "ModelWeights", "PurgeReport"]


class EventStore:
    """One device's store. Open with :meth:`open`; use as a context manager to close it."""

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        policy: Policy,
        region: str,
        durability: Durability = "normal",
        clock: Callable[[], datetime] = _utcnow,
        device_secret: bytes | None = None,
    ) -> EventStore:
        """Open (or create) the store at ``path`` for a device in ``region`` of ``policy``.

        ``clock`` gives "now" for retention and consent times (tests and simulations pass
        their own). Opening with a policy other than the one the store last followed is
        allowed (policies get new versions) and logged as a decision. ``device_secret`` is for
        reproducible simulations only: it replaces the random secret of a store being created
        (pseudonyms and round sampling then repeat from run to run); an app never passes one.
        """
        if device_secret is not None and len(device_secret) != 32:
            raise ValueError("a device secret is 32 bytes")
        region_id = policy.region(region).id  # raises UnknownRegion before touching the file
        file = StoreFile.open(Path(path), region_id=region_id, durability=durability,
                              clock=clock, device_secret=device_secret)  # fmt: skip
        store = cls(file, policy=policy, region_id=region_id)
        store._follow(policy, file.meta_or_none("policy_hash"))
        return store

    def __init__(self, file: StoreFile, *, policy: Policy, region_id: str) -> None:
        """Assemble the components on an open file (use :meth:`open`)."""
        self._file = file
        self.path = file.path
        self.policy = policy
        self.region = policy.region(region_id)
        self._users = users = Users(file)
        self._trail = trail = DecisionTrail(file, policy=policy, region_id=region_id)
        self._consent = consent = Consent(file, users=users, trail=trail, policy=policy,
                                          region_id=region_id)  # fmt: skip
        self._catalog = catalog = Catalog(file)
        self._derived = derived = DerivedState(file, users=users, catalog=catalog)
        self._events = Events(file, users=users, consent=consent, trail=trail, catalog=catalog,
                              derived=derived, policy=policy, region_id=region_id)  # fmt: skip
        self._rights = Rights(file, users=users, trail=trail, derived=derived, policy=policy,
                              region_id=region_id)  # fmt: skip
        self._models = models = Models(file, users=users)
        self._ledger = ledger = DeviceLedger(file)
        self._outbox = DeviceOutbox(file, users=users, trail=trail, models=models, ledger=ledger)
        self._ranking = RankingReads(file, users=users, catalog=catalog)
        self.keys = DeviceKeys(file)
        """The device's keys: its public key per period, its coin for a round, sealing."""

    def _follow(self, policy: Policy, previous: str | None) -> None:
        """Record which policy the store follows; a change of policy is a logged decision."""
        if previous == policy.hash:
            return
        with self._file.write():
            self._file.conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('policy_hash', ?)",
                (policy.hash,),
            )
            engine = self._trail.engine
            decision = engine.apply_policy(previous=previous, inputs={"previous": previous})
            self._trail.record(decision, None)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def now(self) -> datetime:
        """The store's clock (the one it was opened with): retention, rounds and budgets."""
        return self._file.clock()

    def generation(self) -> int:
        """A number that changes whenever the store's contents may have changed, by this
        connection or another one: what anything cached from the store is checked against."""
        return self._file.generation()

    def one_read(self) -> AbstractContextManager[None]:
        """One read that checks several caches (a rerank): the store asks SQLite whether the
        file changed once for all of them (see ``StoreFile.one_read``)."""
        return self._file.one_read()

    @guarded("counting rows")
    def count(self, table: str = "events") -> int:
        return int(self._file.conn.execute(f"SELECT count(*) FROM [{table}]").fetchone()[0])

    @property
    def decisions(self) -> DecisionLog:
        """The device's decision log (verify it, prove entries, sign checkpoints)."""
        return self._trail.log

    def user_hash(self, user_id: str) -> str:
        """The salted hash under which ``user_id`` is stored (the id itself never is)."""
        return self._users.hash(user_id)

    # -- consent -----------------------------------------------------------------------------
    def set_age(self, user_id: str, age: int) -> PurgeReport:
        """Record the user's declared age; age gating of every purpose depends on it.

        An age below the region's minimum purges what personalization covered, as a
        withdrawal would, and the decision is logged.
        """
        return self._consent.set_age(user_id, age)

    def grant(self, user_id: str, purpose: Purpose, *, at: datetime | None = None) -> None:
        """Record that the user consents to ``purpose``."""
        self._consent.record(user_id, purpose, granted=True, at=at)

    def withdraw(
        self, user_id: str, purpose: Purpose, *, at: datetime | None = None
    ) -> PurgeReport:
        """Record a withdrawal and purge, in the same transaction, what ``purpose`` covered."""
        return self._consent.record(user_id, purpose, granted=False, at=at)

    def consent_state(self, user_id: str) -> ConsentState:
        return self._consent.of(user_id)

    def refusal(self, user_id: str, purpose: Purpose) -> PolicyViolation | None:
        """Why the region's policy forbids ``purpose`` for this user now, or ``None``."""
        return self._consent.refusal(user_id, purpose)

    def allows(self, user_id: str, purpose: Purpose) -> bool:
        return self.refusal(user_id, purpose) is None

    def personalization(self, user_id: str) -> Decision:
        """May the user's listening personalize what they see? Logged when the answer changes
        (reranking asks on every call)."""
        return self._consent.personalization(user_id)

    def contribution(
        self, user_id: str, round_id: str, *, refused: SpecRefused | None = None
    ) -> Decision:
        """May the user's training go into this round? ``refused`` is the device's own
        refusal of the round spec. A refusal is logged here; an allowance is logged with the
        round it allowed (:meth:`queue_local_round`)."""
        return self._consent.contribution(user_id, round_id, refused=refused)

    # -- events and derived state ------------------------------------------------------------
    def append(self, event: Event | Mapping[str, Any]) -> AppendResult:
        """Store one event (see :meth:`append_many`)."""
        return self._events.append_many((event,))

    def append_many(self, events: Iterable[Event | Mapping[str, Any]]) -> AppendResult:
        """Store a batch of events in one transaction, all or nothing.

        Raises ``InvalidEventBatch`` listing every invalid event (an event timed further ahead
        of the store's clock than the region's ``clock_skew`` is invalid), ``EventConflict`` for
        an id stored with other content, or the policy's ``ConsentMissing``/``AgeRestricted``
        when a user's events may not be kept; in each case nothing of the batch is stored.
        """
        return self._events.append_many(events)

    def facts(self, user_id: str) -> list[Fact]:
        """The user's stored events as derivation facts, in arrival order (for training)."""
        return self._events.facts(user_id)

    def rebuild_derived(self) -> int:
        """Recompute all derived state from the stored events; returns the events replayed.

        Derived state outlives raw events when the policy keeps it longer, so a rebuild after a
        retention purge keeps only what the remaining events support.
        """
        return self._derived.rebuild()

    @guarded("reading derived state")
    def derived_state(self, user_id: str | None = None) -> dict[str, list[dict[str, Any]]]:
        """All derived state (of one user, or everyone), as plain rows for export and checks."""
        return self._derived.rows(user_id)

    # -- catalog -----------------------------------------------------------------------------
    def upsert_catalog(self, items: Iterable[CatalogItem | Mapping[str, Any]]) -> int:
        """Add or replace public catalog items; every vector must have the same dimension."""
        return self._catalog.upsert(items)

    def catalog(self) -> Mapping[str, tuple[str | None, Vector]]:
        """The whole local catalog, track id -> (artist, vector), in track id order, from the
        in-memory cache."""
        return self._catalog.whole()

    # -- retention and the user's rights -----------------------------------------------------
    def purge_expired(self, *, now: datetime | None = None) -> PurgeReport:
        """Delete what the region's retention rules no longer allow to keep."""
        return self._rights.purge_expired(now=now)

    def erase_user(self, user_id: str) -> PurgeReport:
        """Erase everything stored about the user: events, derived state, personal model,
        consent history and profile, with the random key that tied decisions to them.

        Kept: the user's objections (purposes they withdrew, under their salted hash), so that
        erasing an opted-out user never opts them back in.
        """
        return self._rights.erase_user(user_id)

    def export_user(self, user_id: str) -> dict[str, Any]:
        """Everything stored for the user, as JSON-ready data (an access request)."""
        return self._rights.export_user(user_id)

    # -- ranking reads -----------------------------------------------------------------------
    def snapshot(
        self, user_id: str, tracks: Sequence[str], *, now: datetime | None = None
    ) -> tuple[Snapshot, list[str | None], npt.NDArray[np.float32]]:
        """The user's state for ranking ``tracks``, with each track's artist and its
        feature-ready item vector (see :meth:`._store_ranking.RankingReads.snapshot`)."""
        return self._ranking.snapshot(user_id, tracks, now=now)

    def ranking_inputs(
        self, user_id: str, tracks: Sequence[str] | None = None, *, now: datetime | None = None
    ) -> tuple[Snapshot, RankingInputs]:
        """What ranking ``tracks`` (default: the whole catalog) needs, as row numbers into
        cached arrays (see :meth:`._store_ranking.RankingReads.ranking_inputs`)."""
        return self._ranking.ranking_inputs(user_id, tracks, now=now)

    # -- model weights and the privacy ledger ------------------------------------------------
    def save_model(
        self, slot: str, *, model_id: str, version: int, weights: npt.NDArray[np.floating[Any]],
        state: npt.NDArray[np.floating[Any]] | None = None, user_id: str | None = None,
    ) -> None:  # fmt: skip
        """Store ranker weights (and optimizer state) in one write: readers see old or new.

        A model trained on a user's history (``user_id`` given) is their data: withdrawal,
        erasure and retention treat it like the rest of their derived state.
        """
        self._models.save(slot, model_id=model_id, version=version, weights=weights,
                          state=state, user_id=user_id)  # fmt: skip

    def load_model(self, slot: str) -> ModelWeights | None:
        return self._models.load(slot)

    def privacy_history(self, region: str) -> list[Charge]:
        """The device's privacy ledger for a region: every round it was charged for."""
        return self._ledger.history(region)

    def charge(self, charge: Charge) -> None:
        """Add a round to the device's privacy ledger (once per round)."""
        self._ledger.charge(charge)

    # -- the outbox (sottovoce.sync.Outbox) --------------------------------------------------
    def queue_local_round(
        self,
        user_id: str,
        *,
        sealed: SealedDelta,
        deadline: datetime,
        model: ModelWeights,
        state: npt.NDArray[np.float32],
        decision: Decision,
        charge: Charge | None = None,
    ) -> None:
        """Queue a local round's upload: the personal model, its sealed delta in the outbox,
        the decision and (local mode) the round's privacy charge, in one transaction (a crash
        leaves all of them or none)."""
        self._outbox.queue(user_id, sealed=sealed, deadline=deadline, model=model, state=state,
                           decision=decision, charge=charge)  # fmt: skip

    def due(self, *, now: datetime, limit: int = 100) -> list[OutboxItem]:
        """Pending uploads whose next attempt is due, oldest first."""
        return self._outbox.due(now=now, limit=limit)

    def attempted(self, key: str, *, now: datetime, retry_at: datetime) -> None:
        """A failed attempt: try again no earlier than ``retry_at``."""
        self._outbox.attempted(key, now=now, retry_at=retry_at)

    def acknowledge(self, key: str, *, now: datetime) -> None:
        """The aggregator took the delta: logged (``delta_acknowledged``) for its user."""
        self._outbox.acknowledge(key, now=now)

    def drop(self, key: str, *, reason: str, now: datetime) -> None:
        """The delta will never count (``reason``: the aggregator's refusal, ``round_closed`` or
        ``deadline_passed``): logged (``delta_dropped``) for its user."""
        self._outbox.drop(key, reason=reason, now=now)

    def in_outbox(self, key: str) -> bool:
        """Whether a delta with this idempotency key was queued (in any state)."""
        return self._outbox.contains(key)

    def outbox_states(self) -> dict[str, int]:
        """How many deltas are in each state."""
        return self._outbox.states()
