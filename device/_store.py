"""The device's local store: events, consent and derived state in one SQLite file.

Data flow position: the app hands events to :meth:`EventStore.append` / :meth:`append_many`;
the store checks consent against the region's policy, writes the events and merges their
derived state (:mod:`._derive`) in the same transaction, so a reader never sees events without
their derived state or the other way round. Reranking and local training read from here; nothing
in this file leaves the device.

Guarantees: an append either stores every event of the batch or none (``InvalidEventBatch``,
``EventConflict`` and policy refusals leave the file untouched); once ``append`` returns, the
events survive a crash of the process (WAL; ``durability="full"`` also survives power loss);
replaying an event id with the same content is a no-op reported as a duplicate.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlite_utils import Database

from sottovoce.device._derive import (
    SESSION_GAP_MS,
    Derived,
    Fact,
    Run,
    Taste,
    Vector,
    derive,
    is_play,
)
from sottovoce.device._errors import (
    CatalogError,
    EventConflict,
    InvalidInput,
    StoreError,
)
from sottovoce.device._events import Event
from sottovoce.device._features import ITEM_DIM, History, Snapshot, apply_context, fit_rows
from sottovoce.device._rows import (
    _INSERT_EVENT,
    _MS,
    _NOT_STORED,
    _UPSERT_ARTIST,
    _UPSERT_TRACK,
    _chunks,
    _counter_values,
    _fact,
    _revive,
    _row_order,
    _utcnow,
    _validate,
    from_ms,
    to_ms,
)
from sottovoce.device._schema import (
    DATA_TABLES,
    EVENT_DERIVED,
    RETENTION_FILTER,
    USER_TABLES,
)
from sottovoce.device._sqlite import _Checkpointer, _immediate, _migrate
from sottovoce.policy import (
    PURPOSE_DATA,
    ConsentState,
    DataClass,
    Decision,
    DecisionEngine,
    DecisionLog,
    Policy,
    PolicyViolation,
    Purpose,
    consent_refusal,
)
from sottovoce.sync import OutboxItem, SealedDelta

Durability = Literal["normal", "full"]
_CACHE_KIB = 8192  # page cache per connection; the hot upserts are B-tree work


class CatalogItem(BaseModel):
    """Public metadata of one track, with its feature vector (no user data)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    track_id: str = Field(min_length=1, max_length=128)
    artist_id: str | None = Field(default=None, min_length=1, max_length=128)
    title: str | None = None
    vector: tuple[float, ...] = Field(min_length=1, max_length=1024)

    @field_validator("vector")
    @classmethod
    def _finite(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not np.all(np.isfinite(value)):
            raise ValueError("vector values must be finite")
        return value


@dataclass(frozen=True)
class AppendResult:
    """What an append did: how many events were new, which were replays, which too old.

    ``expired_ids`` are events older than the region keeps raw events: not stored, not counted.
    """

    accepted: int
    duplicate_ids: tuple[str, ...] = ()
    expired_ids: tuple[str, ...] = ()

    @property
    def duplicates(self) -> int:
        return len(self.duplicate_ids)


@dataclass
class _UserState:
    """What ranking reads about one user, cached until a write touches it."""

    tracks: dict[str, History]
    artists: dict[str, History]
    taste: Vector | None = None
    session: tuple[int, int] | None = None  # start, end of the latest session
    session_totals: tuple[int, int] = (0, 0)  # skips, plays in it
    session_artists: tuple[dict[str, int], dict[str, int]] = ({}, {})  # per artist
    context: tuple[str, str, str, int] | None = None


@dataclass(frozen=True)
class ModelWeights:
    """Ranker weights kept in the store, for the model file ``model_id``."""

    model_id: str
    version: int
    weights: npt.NDArray[np.float32]
    state: npt.NDArray[np.float32] | None = None


@dataclass(frozen=True)
class PurgeReport:
    """Rows deleted per table by a retention purge, a withdrawal or an erasure."""

    deleted: Mapping[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.deleted.values())


class EventStore:
    """One device's store. Open with :meth:`open`; use as a context manager to close it."""

    def __init__(
        self,
        db: Database,
        *,
        path: Path,
        policy: Policy,
        region_id: str,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._db = db
        self._conn = db.conn
        self.path = path
        self.policy = policy
        self.region = policy.region(region_id)
        self._salt = bytes.fromhex(self._meta("salt"))
        self._catalog: dict[str, tuple[str | None, Vector]] = {}
        self._hashes: dict[str, str] = {}
        self._catalog_complete = False
        self._noted: dict[tuple[str, str], tuple[str, str]] = {}
        self._states: dict[int, _UserState] = {}  # see snapshot()
        self._fitted_rows: dict[str, int] = {}  # catalog track -> row of self._fitted
        self._fitted = np.zeros((0, ITEM_DIM), dtype=np.float32)
        self._data_version: int | None = None
        self._generation = 0
        self._verdicts: dict[str, tuple[int, Decision]] = {}  # personalization, per user
        self._clock = clock
        self._engine = DecisionEngine(
            policy, region_id, digest_key=bytes.fromhex(self._meta("digest_key")), clock=clock
        )
        self._decisions = DecisionLog(self._conn)
        self._checkpointer = _Checkpointer(path)
        self._checkpointer.start()

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        policy: Policy,
        region: str,
        durability: Durability = "normal",
        clock: Callable[[], datetime] = _utcnow,
    ) -> EventStore:
        """Open (or create) the store at ``path`` for a device in ``region`` of ``policy``.

        ``clock`` gives "now" for retention and consent times (tests and simulations pass
        their own). Opening with a policy other than the one the store last followed is
        allowed (policies get new versions) and logged as a decision.
        """
        region_obj = policy.region(region)  # raises UnknownRegion before touching the file
        path = Path(path)
        try:
            conn = sqlite3.connect(path, timeout=30.0)
        except sqlite3.Error as error:
            raise StoreError(f"cannot open {path}: {error}") from None
        try:
            db = Database(conn, execute_plugins=False, recursive_triggers=False)
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"{path}: cannot use write-ahead logging (journal mode {mode})")
            db.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
            db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
            # WAL checkpoints (copying the log back into the file, with fsyncs) run on a
            # background thread instead of inside whichever append crosses the threshold.
            db.execute("PRAGMA wal_autocheckpoint=0")
            db.execute("PRAGMA secure_delete=ON")  # erased rows do not linger in free pages
            _migrate(db, path)
            with _immediate(conn):
                stored = {r[0]: r[1] for r in conn.execute("SELECT key, value FROM meta")}
                if stored.get("region", region_obj.id) != region_obj.id:
                    raise StoreError(
                        f"{path} belongs to region {stored['region']!r}, not {region_obj.id!r}; "
                        "a device's data never moves between regions"
                    )
                conn.executemany(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                    [("salt", secrets.token_hex(32)), ("region", region_obj.id),
                     ("created_ts", str(to_ms(clock())))],
                )  # fmt: skip
        except sqlite3.DatabaseError as error:
            conn.close()
            raise StoreError(f"{path} is not a usable sottovoce store: {error}") from None
        except BaseException:
            conn.close()
            raise
        store = cls(db, path=path, policy=policy, region_id=region_obj.id, clock=clock)
        store._follow(policy, stored.get("policy_hash"))
        return store

    def _follow(self, policy: Policy, previous: str | None) -> None:
        """Record which policy the store follows; a change of policy is a logged decision."""
        if previous == policy.hash:
            return
        with self._write():
            self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('policy_hash', ?)",
                               (policy.hash,))  # fmt: skip
            decision = self._engine.apply_policy(previous=previous,
                                                 inputs={"previous": previous})  # fmt: skip
            self._log(decision, None)

    def close(self) -> None:
        self._checkpointer.stop()
        self._conn.close()

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def db(self) -> Database:
        """The underlying sqlite-utils database, for reading (write through this class)."""
        return self._db

    # -- identity and consent --------------------------------------------------------------
    def user_hash(self, user_id: str) -> str:
        """The salted hash under which ``user_id`` is stored (the id itself never is)."""
        cached = self._hashes.get(user_id)
        if cached is None:
            digest = hmac.new(self._salt, user_id.encode(), hashlib.sha256).hexdigest()
            cached = self._hashes[user_id] = digest[:32]
        return cached

    def set_age(self, user_id: str, age: int) -> PurgeReport:
        """Record the user's declared age; age gating of every purpose depends on it.

        An age below the region's minimum purges what personalization covered, as a
        withdrawal would, and the decision is logged.
        """
        if isinstance(age, bool) or not isinstance(age, int) or not 0 <= age <= 150:
            raise InvalidInput(f"age must be a whole number from 0 to 150, got {age!r}")
        deleted: dict[str, int] = {}
        with self._write():
            ref = self._ref(user_id, create=True)
            self._conn.execute("UPDATE users SET age = ? WHERE user_ref = ?", (age, ref))
            state = self._consent_state(ref, self.user_hash(user_id))
            if consent_refusal(self.region, Purpose.PERSONALIZATION, state) is not None:
                deleted = self._purge_purpose(ref, Purpose.PERSONALIZATION)
            decision = self._engine.record_age(
                state, inputs=self._inputs("record_age", ref), deleted=deleted
            )
            self._log(decision, ref)
        return PurgeReport(deleted)

    def grant(self, user_id: str, purpose: Purpose, *, at: datetime | None = None) -> None:
        """Record that the user consents to ``purpose``."""
        self._record_consent(user_id, purpose, granted=True, at=at)

    def withdraw(
        self, user_id: str, purpose: Purpose, *, at: datetime | None = None
    ) -> PurgeReport:
        """Record a withdrawal and purge, in the same transaction, what ``purpose`` covered."""
        return self._record_consent(user_id, purpose, granted=False, at=at)

    def consent_state(self, user_id: str) -> ConsentState:
        return self._consent_state(self._ref(user_id, create=False), self.user_hash(user_id))

    def refusal(self, user_id: str, purpose: Purpose) -> PolicyViolation | None:
        """Why the region's policy forbids ``purpose`` for this user now, or ``None``."""
        return consent_refusal(self.region, purpose, self.consent_state(user_id))

    def allows(self, user_id: str, purpose: Purpose) -> bool:
        return self.refusal(user_id, purpose) is None

    # -- events ----------------------------------------------------------------------------
    def append(self, event: Event | Mapping[str, Any]) -> AppendResult:
        """Store one event (see :meth:`append_many`)."""
        return self.append_many((event,))

    def append_many(self, events: Iterable[Event | Mapping[str, Any]]) -> AppendResult:
        """Store a batch of events in one transaction, all or nothing.

        Raises ``InvalidEventBatch`` listing every invalid event, ``EventConflict`` for an id
        stored with other content, or the policy's ``ConsentMissing``/``AgeRestricted`` when a
        user's events may not be kept; in each case nothing of the batch is stored.
        """
        parsed = _validate(list(events))
        if not parsed:
            return AppendResult(0)
        # Fields are read from __dict__: pydantic's __getattr__ is slow for absent ones.
        rows: list[tuple[Any, ...]] = [
            (
                e.event_id,
                e.user_id,
                e.type,
                to_ms(e.ts),
                e.__dict__.get("track_id"),
                e.__dict__.get("artist_id"),
                e.model_dump_json(exclude=_NOT_STORED),
            )
            for e in parsed
        ]
        refusal: PolicyViolation | None = None
        result = AppendResult(0)
        noted: dict[tuple[str, str], tuple[str, str]] = {}
        with self._write():
            refs: dict[str, int] = {}
            verdicts = []
            for user_id in sorted({row[1] for row in rows}):
                ref = self._ref(user_id, create=False)
                state = self._consent_state(ref, self.user_hash(user_id))
                refusal = consent_refusal(self.region, Purpose.PERSONALIZATION, state)
                if refusal is not None:  # refusals are always logged; nothing is stored
                    inputs = self._inputs("store_events", ref)
                    self._log(self._engine.store_events(state, inputs=inputs), ref)
                    break
                verdicts.append((user_id, ref, state))
            else:
                for user_id, ref, state in verdicts:
                    refs[user_id] = ref if ref is not None else self._ref(user_id, create=True)
                    decision = self._engine.store_events(
                        state, inputs=self._inputs("store_events", refs[user_id])
                    )
                    key = ("store_events", self.user_hash(user_id))
                    if self._changed(key, decision):
                        self._log(decision, refs[user_id])
                        noted[key] = (decision.reason, decision.policy_hash)
                cutoff = to_ms(self._clock()) - self.region.ttl(DataClass.RAW_EVENTS) // _MS
                # Events already past raw-event retention are not kept: storing them would
                # break retention, and a replay of a purged event would count twice.
                live = [i for i, r in enumerate(rows) if r[3] >= cutoff]
                expired = tuple(r[0] for r in rows if r[3] < cutoff)
                kept = [(rows[i][0], refs[rows[i][1]], *rows[i][2:]) for i in live]
                result = self._store(kept, [parsed[i] for i in live], expired)
        self._noted.update(noted)  # committed: these are in the log now
        if refusal is not None:
            raise refusal
        return result

    def _store(
        self, rows: list[tuple[Any, ...]], parsed: list[Event], expired: tuple[str, ...]
    ) -> AppendResult:
        """Write the new events of an allowed batch and merge their derived state."""
        fresh, duplicates = self._dedupe(rows)
        if not fresh:
            return AppendResult(0, tuple(duplicates), expired)
        fresh = self._resolve_artists(fresh)
        first = self._conn.execute("SELECT coalesce(max(seq), 0) + 1 FROM events").fetchone()
        stored = [(first[0] + i, *row) for i, (_, row) in enumerate(fresh)]
        self._conn.executemany(_INSERT_EVENT, stored)
        facts = [_fact(row, parsed[i]) for (i, _), row in zip(fresh, stored, strict=True)]
        self._merge(derive(facts, self._vectors(f.track for f in facts)))
        return AppendResult(len(fresh), tuple(duplicates), expired)

    def _dedupe(
        self, rows: list[tuple[Any, ...]]
    ) -> tuple[list[tuple[int, tuple[Any, ...]]], list[str]]:
        ids = [row[0] for row in rows]
        known: dict[str, tuple[int, str]] = {}
        for chunk in _chunks(ids, 500):
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT event_id, user_ref, body FROM events WHERE event_id IN ({marks})"
            known.update((r[0], (r[1], r[2])) for r in self._conn.execute(sql, chunk))
        fresh: list[tuple[int, tuple[Any, ...]]] = []
        duplicates: list[str] = []
        for index, row in enumerate(rows):
            prior = known.get(row[0])
            if prior is not None:
                if prior != (row[1], row[6]):
                    raise EventConflict(row[0], index=index)
                duplicates.append(row[0])
                continue
            known[row[0]] = (row[1], row[6])
            fresh.append((index, row))
        return fresh, duplicates

    def _resolve_artists(
        self, fresh: list[tuple[int, tuple[Any, ...]]]
    ) -> list[tuple[int, tuple[Any, ...]]]:
        """Fill in artists the app left out from the local catalog."""
        missing = [row[4] for _, row in fresh if row[4] is not None and row[5] is None]
        if not missing:
            return fresh
        self._load_catalog(missing)
        out = []
        for index, row in fresh:
            track = row[4]
            if track is not None and row[5] is None and track in self._catalog:
                out.append((index, (*row[:5], self._catalog[track][0], row[6])))
            else:
                out.append((index, row))
        return out

    # -- derived state ---------------------------------------------------------------------
    def _merge(self, derived: Derived) -> None:
        conn = self._conn
        conn.executemany(
            _UPSERT_TRACK,
            [(u, t, c.artist, *_counter_values(c)) for (u, t), c in derived.tracks.items()],
        )
        conn.executemany(
            _UPSERT_ARTIST, [(u, a, *_counter_values(c)) for (u, a), c in derived.artists.items()]
        )
        for user, runs in derived.runs.items():
            self._merge_runs(user, runs)
        for user, new in derived.taste.items():
            taste = new
            row = conn.execute(
                "SELECT ref_ts, weight, total FROM taste WHERE user_ref = ?", (user,)
            ).fetchone()
            if row is not None:
                stored = np.frombuffer(row[2], dtype=np.float64)
                if stored.shape == new.total.shape:  # else the catalog changed dimension
                    taste = Taste(row[0], row[1], stored).merge(new)
            conn.execute(
                "INSERT OR REPLACE INTO taste (user_ref, ref_ts, weight, total) "
                "VALUES (?, ?, ?, ?)",
                (user, taste.ref, taste.weight, taste.total.astype(np.float64).tobytes()),
            )
        conn.executemany(
            "INSERT INTO context (user_ref, ts, seq, device_type, network, local_time) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (user_ref) DO UPDATE SET ts = excluded.ts, "
            "seq = excluded.seq, device_type = excluded.device_type, network = excluded.network, "
            "local_time = excluded.local_time WHERE (excluded.ts, excluded.seq) > (ts, seq)",
            [(u, at[0], at[1], *ctx) for u, (at, ctx) in derived.context.items()],
        )

    def _merge_runs(self, user: int, runs: list[Run]) -> None:
        low = min(r.start for r in runs) - SESSION_GAP_MS
        high = max(r.end for r in runs) + SESSION_GAP_MS
        stored = self._conn.execute(
            "SELECT id, start_ts, end_ts, events, plays, completions, skips, ms_played "
            "FROM sessions WHERE user_ref = ? AND end_ts >= ? AND start_ts <= ?",
            (user, low, high),
        ).fetchall()
        pieces: list[tuple[int | None, Run]] = [(r[0], Run(*r[1:])) for r in stored]
        pieces += [(None, r) for r in runs]
        pieces.sort(key=lambda p: p[1].start)
        groups: list[tuple[list[int | None], Run]] = []
        for ident, run in pieces:
            if groups and run.start - groups[-1][1].end <= SESSION_GAP_MS:
                groups[-1][0].append(ident)
                groups[-1][1].absorb(run)
            else:
                merged = Run(run.start, run.end)
                merged.absorb(run)
                groups.append(([ident], merged))
        for idents, run in groups:
            if len(idents) == 1 and idents[0] is not None:
                continue  # a stored session nothing touched
            old = [i for i in idents if i is not None]
            self._conn.executemany("DELETE FROM sessions WHERE id = ?", [(i,) for i in old])
            self._conn.execute(
                "INSERT INTO sessions (user_ref, start_ts, end_ts, events, plays, completions, "
                "skips, ms_played) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (user, run.start, run.end, run.events, run.plays, run.completions, run.skips,
                 run.ms_played),
            )  # fmt: skip

    def rebuild_derived(self) -> int:
        """Recompute all derived state from the stored events; returns the events replayed.

        Derived state outlives raw events when the policy keeps it longer, so a rebuild after a
        retention purge keeps only what the remaining events support.
        """
        replayed = 0
        with self._write():
            for table in EVENT_DERIVED:
                self._conn.execute(f"DELETE FROM {table}")
            users = [r[0] for r in self._conn.execute("SELECT DISTINCT user_ref FROM events")]
            for user in users:
                facts = [
                    _fact(row, _revive(row[7]))
                    for row in self._conn.execute(
                        "SELECT seq, event_id, user_ref, type, ts, track_id, artist_id, body "
                        "FROM events WHERE user_ref = ? ORDER BY seq",
                        (user,),
                    )
                ]
                self._merge(derive(facts, self._vectors(f.track for f in facts)))
                replayed += len(facts)
        return replayed

    def derived_state(self, user_id: str | None = None) -> dict[str, list[dict[str, Any]]]:
        """All derived state (of one user, or everyone), as plain rows for export and checks."""
        where, args = "", []
        if user_id is not None:
            where, args = "WHERE user_ref = ?", [self._ref(user_id, create=False)]
        out: dict[str, list[dict[str, Any]]] = {}
        for table in EVENT_DERIVED:
            rows = list(self._rows(f"SELECT * FROM {table} {where}", args))
            for row in rows:
                row.pop("id", None)
                if table == "taste":
                    taste = Taste(row["ref_ts"], row["weight"], np.frombuffer(row.pop("total")))
                    mean = taste.mean()
                    row["vector"] = None if mean is None else [float(x) for x in mean]
            out[table] = sorted(rows, key=_row_order)
        return out

    # -- catalog ---------------------------------------------------------------------------
    def upsert_catalog(self, items: Iterable[CatalogItem | Mapping[str, Any]]) -> int:
        """Add or replace public catalog items; every vector must have the same dimension."""
        try:
            parsed = [CatalogItem.model_validate(item) for item in items]
        except ValidationError as error:
            raise CatalogError(f"invalid catalog item: {error}") from None
        if not parsed:
            return 0
        with self._write():
            dim = self._meta("catalog_dim", default=None)
            dims = {len(item.vector) for item in parsed} | ({int(dim)} if dim else set())
            if len(dims) != 1:
                raise CatalogError(
                    f"catalog vectors must all have one dimension; got {sorted(dims)}"
                )
            self._db.table("catalog").upsert_all(
                (
                    {"track_id": i.track_id, "artist_id": i.artist_id, "title": i.title,
                     "vector": np.asarray(i.vector, dtype=np.float32).tobytes()}
                    for i in parsed
                ),
                pk="track_id",
            )  # fmt: skip
            self._conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('catalog_dim', ?)",
                (str(dims.pop()),),
            )
        self._catalog.clear()
        self._fitted_rows.clear()
        self._fitted = np.zeros((0, ITEM_DIM), dtype=np.float32)
        self._catalog_complete = False
        return len(parsed)

    def _load_catalog(self, track_ids: Iterable[str]) -> None:
        wanted = list(dict.fromkeys(t for t in track_ids if t not in self._catalog))
        for chunk in _chunks(wanted, 500):
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT track_id, artist_id, vector FROM catalog WHERE track_id IN ({marks})"
            loaded = []
            for track, artist, blob in self._conn.execute(sql, chunk):
                vector = np.frombuffer(blob, dtype=np.float32).astype(np.float64)
                self._catalog[track] = (artist, vector)
                loaded.append((track, vector))
            if loaded:  # feature-ready rows, so ranking indexes instead of stacking
                start = len(self._fitted_rows)
                self._fitted_rows.update((t, start + i) for i, (t, _) in enumerate(loaded))
                fitted = fit_rows([v for _, v in loaded])
                self._fitted = np.concatenate([self._fitted, fitted.astype(np.float32)])

    def _vectors(self, track_ids: Iterable[str | None]) -> dict[str, Vector]:
        tracks = {t for t in track_ids if t is not None}
        self._load_catalog(tracks)
        return {t: self._catalog[t][1] for t in tracks if t in self._catalog}

    # -- retention and rights --------------------------------------------------------------
    def purge_expired(self, *, now: datetime | None = None) -> PurgeReport:
        """Delete what the region's retention rules no longer allow to keep."""
        moment = now or self._clock()
        now_ms = to_ms(moment)
        deleted: dict[str, int] = {}
        with self._write():
            for data_class, tables in DATA_TABLES.items():
                cutoff = now_ms - self.region.ttl(data_class) // _MS
                for table, column in tables:
                    only = f" AND {RETENTION_FILTER[table]}" if table in RETENTION_FILTER else ""
                    sql = f"DELETE FROM {table} WHERE {column} < ?{only}"
                    deleted[table] = self._conn.execute(sql, (cutoff,)).rowcount
            audit_cutoff = moment - self.region.ttl(DataClass.AUDIT_LOG)
            deleted["decision_log"] = self._decisions.prune(audit_cutoff)
            pruned = self._decisions.pruned_total()
            self._conn.execute("DELETE FROM decision_subjects WHERE idx < ?", (pruned,))
            inputs = {"action": "purge_retention", "now": now_ms}
            decision = self._engine.purge(deleted=deleted, inputs=inputs, log_pruned_total=pruned)
            self._log(decision, None)
            self._decisions.checkpoint()  # routine maintenance is a good time to sign
        return PurgeReport(deleted)

    def erase_user(self, user_id: str) -> PurgeReport:
        """Erase everything stored about the user: events, derived state, personal model,
        consent history and profile, with the random key that tied decisions to them.

        Kept: the user's objections (purposes they withdrew, under their salted hash), so that
        erasing an opted-out user never opts them back in.
        """
        deleted: dict[str, int] = {}
        with self._write():
            ref = self._ref(user_id, create=False)
            inputs = self._inputs("erase", None)  # a one-off subject: nothing to link
            for table in (*USER_TABLES, "consent", "users"):
                sql = f"DELETE FROM {table} WHERE user_ref = ?"
                deleted[table] = self._conn.execute(sql, (ref,)).rowcount
            self._log(self._engine.erase(deleted=deleted, inputs=inputs), None)
        return PurgeReport(deleted)

    def export_user(self, user_id: str) -> dict[str, Any]:
        """Everything stored for the user, as JSON-ready data (an access request)."""
        with self._write():  # a write: the export itself is a logged decision
            ref = self._ref(user_id, create=False)
            profile = next(self._rows("SELECT * FROM users WHERE user_ref = ?", [ref]), None)
            consent = [
                {**row, "granted": bool(row["granted"]), "at": from_ms(row["ts"]).isoformat()}
                for row in self._rows(
                    "SELECT purpose, granted, ts, policy_hash, region FROM consent "
                    "WHERE user_ref = ? ORDER BY id",
                    [ref],
                )
            ]
            events = [
                {"seq": row["seq"], **json.loads(row["body"])}
                for row in self._rows(
                    "SELECT seq, body FROM events WHERE user_ref = ? ORDER BY seq", [ref]
                )
            ]
            derived = self.derived_state(user_id)
            models = [
                {"model_id": row["model_id"], "version": row["version"],
                 "updated_at": from_ms(row["updated_ts"]).isoformat(),
                 "parameters": len(row["weights"]) // 4}
                for row in self._rows(
                    "SELECT model_id, version, updated_ts, weights FROM model_state "
                    "WHERE user_ref = ?", [ref])
            ]  # fmt: skip
            inputs = self._inputs("export", ref)
            decision = self._engine.export(inputs=inputs, count=len(events))
            self._log(decision, ref)
            decisions = [
                {"index": index, **json.loads(entry)}
                for index, entry in self._conn.execute(
                    "SELECT l.idx, l.entry FROM decision_log l JOIN decision_subjects s "
                    "ON s.idx = l.idx WHERE s.user_ref = ? AND l.entry != '' ORDER BY l.idx",
                    (ref,),
                )
            ]
        return {
            "format": "sottovoce.access-export/1",
            "exported_at": self._clock().isoformat(),
            "user_id": user_id,
            "user_hash": self.user_hash(user_id),
            "region": self.region.id,
            "policy_hash": self.policy.hash,
            "profile": profile,
            "consent": consent,
            "events": events,
            "derived": derived,
            "personal_models": models,  # trained on the user's events (weights not listed)
            "decisions": decisions,
        }

    # -- reading for the ranker -------------------------------------------------------------
    def personalization(self, user_id: str) -> Decision:
        """May the user's listening personalize what they see? Logged when the answer changes.

        Reranking asks on every call; logging every call would grow the log with each screen
        the app shows, so a decision is appended only when it differs from the last one this
        store made for the user (and the first time).
        """
        user = self.user_hash(user_id)
        cached = self._verdicts.get(user)
        if cached is not None and cached[0] == self.generation():
            return cached[1]  # nothing was written since: the answer cannot have changed
        ref = self._ref(user_id, create=False)
        decision = self._engine.personalize(
            self._consent_state(ref, user), inputs=self._inputs("personalize", ref)
        )
        key = ("personalize", user)
        if self._changed(key, decision):
            with self._write():
                self._log(decision, ref)
            self._noted[key] = (decision.reason, decision.policy_hash)
        self._verdicts[user] = (self.generation(), decision)
        return decision

    def facts(self, user_id: str) -> list[Fact]:
        """The user's stored events as derivation facts, in arrival order (for training)."""
        ref = self._ref(user_id, create=False)
        rows = self._conn.execute(
            "SELECT seq, event_id, user_ref, type, ts, track_id, artist_id, body FROM events "
            "WHERE user_ref = ? ORDER BY seq", (ref,)
        )  # fmt: skip
        return [_fact(row, _revive(row[7])) for row in rows]

    def catalog(self) -> Mapping[str, tuple[str | None, Vector]]:
        """The whole local catalog, track id -> (artist, vector), from the in-memory cache."""
        if not self._catalog_complete:
            self._load_catalog([r[0] for r in self._conn.execute("SELECT track_id FROM catalog")])
            self._catalog_complete = True
        return self._catalog

    def snapshot(
        self, user_id: str, tracks: Sequence[str], *, now: datetime | None = None
    ) -> tuple[Snapshot, list[str | None], npt.NDArray[np.float32]]:
        """The user's state for ranking ``tracks``, with each track's artist and its
        feature-ready item vector (a row per track, zeros when not in the catalog).

        Served from an in-memory copy of the user's derived state, loaded with a handful of
        queries the first time and dropped by any write that touches it (here, or by another
        connection: ``PRAGMA data_version``), so reranking costs no query per candidate and
        usually none at all.
        """
        now_ms = to_ms(now or self._clock())
        self._load_catalog(tracks)
        known = [self._catalog.get(t) for t in tracks]
        artists = [k[0] if k else None for k in known]
        rows = np.fromiter((self._fitted_rows.get(t, -1) for t in tracks), np.int64, len(tracks))
        vectors = self._fitted[np.maximum(rows, 0)] if len(self._fitted) else (
            np.zeros((len(tracks), ITEM_DIM), dtype=np.float32))  # fmt: skip
        vectors[rows < 0] = 0.0
        ref = self._ref(user_id, create=False)
        snap = Snapshot(now=now_ms)
        if ref is None:
            return snap, artists, vectors
        state = self._user_state(ref)
        snap.tracks, snap.artists, snap.taste = state.tracks, state.artists, state.taste
        if state.session is not None and now_ms - state.session[1] <= SESSION_GAP_MS:
            snap.session_skips, snap.session_plays = state.session_totals
            snap.session_artist_skips, snap.session_artist_plays = state.session_artists
        apply_context(snap, state.context)
        return snap, artists, vectors

    def generation(self) -> int:
        """A number that changes whenever the store's contents may have changed, by this
        connection or another one: what anything cached from the store is checked against."""
        version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        if version != self._data_version:  # another connection wrote: nothing cached holds
            self._states.clear()
            self._data_version = version
            self._generation += 1
        return self._generation

    def _user_state(self, ref: int) -> _UserState:
        self.generation()
        state = self._states.get(ref)
        if state is None:
            state = self._states[ref] = self._load_user_state(ref)
        return state

    def _load_user_state(self, ref: int) -> _UserState:
        state = _UserState(tracks=self._histories("track_stats", "track_id", ref),
                           artists=self._histories("artist_stats", "artist_id", ref))  # fmt: skip
        row = self._conn.execute(
            "SELECT ref_ts, weight, total FROM taste WHERE user_ref = ?", (ref,)
        ).fetchone()
        if row is not None:
            state.taste = Taste(row[0], row[1], np.frombuffer(row[2])).mean()
        session = self._conn.execute(
            "SELECT start_ts, end_ts FROM sessions WHERE user_ref = ? ORDER BY end_ts DESC "
            "LIMIT 1", (ref,)
        ).fetchone()  # fmt: skip
        if session is not None:
            state.session = (session[0], session[1])
            self._session_state(state, ref, session[0])
        state.context = self._conn.execute(
            "SELECT device_type, network, local_time, ts FROM context WHERE user_ref = ?", (ref,)
        ).fetchone()
        return state

    def _histories(self, table: str, key: str, ref: int) -> dict[str, History]:
        # Plain row tuples, already in History's field order (a NamedTuple per row costs).
        rows = self._conn.execute(
            f"SELECT {key}, plays, completions, skips, early_skips, feedback, "
            f"coalesce(last_played_ts, -1) FROM {table} WHERE user_ref = ?",
            (ref,),
        )
        return {r[0]: r[1:] for r in rows}

    def _session_state(self, state: _UserState, ref: int, start: int) -> None:
        """Plays and skips so far in the latest session, overall and per artist."""
        skips: dict[str, int] = {}
        plays: dict[str, int] = {}
        total_skips = total_plays = 0
        for kind, artist, body in self._conn.execute(
            "SELECT type, artist_id, body FROM events WHERE user_ref = ? AND ts >= ? "
            "AND type IN ('skip', 'play_end')", (ref, start)
        ):  # fmt: skip
            if kind == "skip":
                total_skips += 1
                if artist:
                    skips[artist] = skips.get(artist, 0) + 1
            else:
                event = json.loads(body)
                if is_play(event["ms_played"], event["duration_ms"]):
                    total_plays += 1
                    if artist:
                        plays[artist] = plays.get(artist, 0) + 1
        state.session_totals = (total_skips, total_plays)
        state.session_artists = (skips, plays)

    # -- model weights ---------------------------------------------------------------------
    def save_model(
        self, slot: str, *, model_id: str, version: int, weights: npt.NDArray[np.floating[Any]],
        state: npt.NDArray[np.floating[Any]] | None = None, user_id: str | None = None,
    ) -> None:  # fmt: skip
        """Store ranker weights (and optimizer state) in one write: readers see old or new.

        A model trained on a user's history (``user_id`` given) is their data: withdrawal,
        erasure and retention treat it like the rest of their derived state.
        """
        with self._write():
            ref = None if user_id is None else self._ref(user_id, create=True)
            self._conn.execute(
                "INSERT OR REPLACE INTO model_state (slot, user_ref, model_id, version, weights, "
                "state, updated_ts) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (slot, ref, model_id, version, np.asarray(weights, dtype=np.float32).tobytes(),
                 None if state is None else np.asarray(state, dtype=np.float32).tobytes(),
                 to_ms(self._clock())),
            )  # fmt: skip

    def load_model(self, slot: str) -> ModelWeights | None:
        row = self._conn.execute(
            "SELECT model_id, version, weights, state FROM model_state WHERE slot = ?", (slot,)
        ).fetchone()
        if row is None:
            return None
        state = None if row[3] is None else np.frombuffer(row[3], dtype=np.float32)
        return ModelWeights(row[0], row[1], np.frombuffer(row[2], dtype=np.float32), state)

    def contribution(self, user_id: str, spec: Mapping[str, Any]) -> Decision:
        """May the user's training go into this round? A refusal is logged here; an allowance
        is logged with the round it allowed (:meth:`record_round`)."""
        ref = self._ref(user_id, create=False)
        state = self._consent_state(ref, self.user_hash(user_id))
        inputs = self._inputs("contribute_delta", ref, round=spec.get("round_id"))
        decision = self._engine.contribute_delta(state, inputs=inputs, spec=spec)
        if not decision.allowed:
            with self._write():
                self._log(decision, ref)
        return decision

    # -- the outbox (implements sottovoce.sync.Outbox) --------------------------------------
    def device_secret(self) -> bytes:
        """The device's secret: keys its pseudonyms and round sampling; never leaves it."""
        return bytes.fromhex(self._meta("device_secret"))

    def signing_key(self, period: str) -> Ed25519PrivateKey:
        """The device's Ed25519 key for a period (made on first use; one per period)."""
        with self._write():
            self._conn.execute(
                "INSERT OR IGNORE INTO device_keys (period, signing_key) VALUES (?, ?)",
                (period, secrets.token_hex(32)),
            )
            row = self._conn.execute(
                "SELECT signing_key FROM device_keys WHERE period = ?", (period,)
            ).fetchone()
        return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(row[0]))

    def record_round(
        self,
        user_id: str,
        *,
        sealed: SealedDelta,
        deadline: datetime,
        model: ModelWeights,
        state: npt.NDArray[np.float32],
        decision: Decision,
    ) -> None:
        """Record a local round: the personal model, its sealed delta in the outbox and the
        decision, in one transaction (a crash leaves all three or none)."""
        now = to_ms(self._clock())
        with self._write():
            ref = self._ref(user_id, create=True)
            self._conn.execute(
                "INSERT OR REPLACE INTO model_state (slot, user_ref, model_id, version, weights, "
                "state, updated_ts) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (f"local:{self.user_hash(user_id)}", ref, model.model_id, model.version,
                 model.weights.astype(np.float32).tobytes(), state.astype(np.float32).tobytes(),
                 now),
            )  # fmt: skip
            self._conn.execute(
                "INSERT INTO outbox (idempotency_key, user_ref, region, round_id, deadline_ts, "
                "body, state, attempts, next_attempt_ts, created_ts) "
                "VALUES (?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?)",
                (sealed.idempotency_key, ref, sealed.region, sealed.round_id, to_ms(deadline),
                 sealed.to_wire(), now, now),
            )  # fmt: skip
            self._log(decision, ref)

    def due(self, *, now: datetime, limit: int = 100) -> list[OutboxItem]:
        rows = self._conn.execute(
            "SELECT idempotency_key, region, round_id, deadline_ts, body, attempts FROM outbox "
            "WHERE state = 'pending' AND next_attempt_ts <= ? ORDER BY created_ts LIMIT ?",
            (to_ms(now), limit),
        )
        return [OutboxItem(key, region, round_id, from_ms(deadline), bytes(body), attempts)
                for key, region, round_id, deadline, body, attempts in rows]  # fmt: skip

    def attempted(self, key: str, *, now: datetime, retry_at: datetime) -> None:
        with self._write():
            self._conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt_ts = ? "
                "WHERE idempotency_key = ? AND state = 'pending'", (to_ms(retry_at), key)
            )  # fmt: skip

    def acknowledge(self, key: str, *, now: datetime) -> None:
        self._finish(key, "acknowledged", None, now)

    def drop(self, key: str, *, reason: str, now: datetime) -> None:
        self._finish(key, "dropped", reason, now)

    def _finish(self, key: str, state: str, reason: str | None, now: datetime) -> None:
        # Only a pending delta moves on: an acknowledgement never turns into a drop or back.
        with self._write():
            self._conn.execute(
                "UPDATE outbox SET state = ?, reason = ?, done_ts = ? "
                "WHERE idempotency_key = ? AND state = 'pending'",
                (state, reason, to_ms(now), key),
            )

    def in_outbox(self, key: str) -> bool:
        """Whether a delta with this idempotency key was queued (in any state)."""
        row = self._conn.execute("SELECT 1 FROM outbox WHERE idempotency_key = ?", (key,))
        return row.fetchone() is not None

    def outbox_states(self) -> dict[str, int]:
        """How many deltas are in each state."""
        rows = self._conn.execute("SELECT state, count(*) FROM outbox GROUP BY state")
        return {state: int(n) for state, n in rows}

    def count(self, table: str = "events") -> int:
        return int(self._conn.execute(f"SELECT count(*) FROM [{table}]").fetchone()[0])

    # -- internals -------------------------------------------------------------------------
    def _record_consent(
        self, user_id: str, purpose: Purpose, *, granted: bool, at: datetime | None
    ) -> PurgeReport:
        purpose = Purpose(purpose)
        deleted: dict[str, int] = {}
        at_ms = to_ms(at or self._clock())
        with self._write():
            user = self._ref(user_id, create=True)
            self._conn.execute(
                "INSERT INTO consent (user_ref, purpose, granted, ts, policy_hash, region) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (user, purpose.value, int(granted), at_ms, self.policy.hash, self.region.id),
            )
            if granted:
                self._conn.execute("DELETE FROM objections WHERE user_hash = ? AND purpose = ?",
                                   (self.user_hash(user_id), purpose.value))  # fmt: skip
            else:
                self._conn.execute(
                    "INSERT OR REPLACE INTO objections (user_hash, purpose, ts) VALUES (?, ?, ?)",
                    (self.user_hash(user_id), purpose.value, at_ms),
                )
                deleted = self._purge_purpose(user, purpose)
            inputs = self._inputs("record_consent", user, purpose=purpose.value)
            decision = self._engine.record_consent(
                purpose, granted=granted, inputs=inputs, deleted=deleted
            )
            self._log(decision, user)
        return PurgeReport(deleted)

    def _inputs(self, action: str, ref: int | None, **details: Any) -> dict[str, Any]:
        """What a decision is about; only its keyed digest enters the log.

        The subject is the user's random key from their row (erasure deletes it, and with it
        any way to tie the log to them); an unregistered user gets a one-off key.
        """
        subject = None
        if ref is not None:
            row = self._conn.execute("SELECT subject FROM users WHERE user_ref = ?", (ref,))
            subject = row.fetchone()[0]
        return {"action": action, "subject": subject or secrets.token_hex(16), **details}

    @contextmanager
    def _write(self) -> Iterator[None]:
        """A write transaction; whatever it changes, cached user state is stale after it."""
        try:
            with _immediate(self._conn):
                yield
        finally:
            self._states.clear()
            self._generation += 1

    def _changed(self, key: tuple[str, str], decision: Decision) -> bool:
        """Whether ``decision`` differs from the last routine one logged under ``key``.

        Logging every append or rerank would turn the log into a listening timeline kept for
        years: routine decisions are logged when their reason or policy changes (and once per
        open store); refusals to store events are logged every time. The caller records what
        it logged with :meth:`_noted_after_commit` once its transaction has committed.
        """
        return self._noted.get(key) != (decision.reason, decision.policy_hash)

    def _log(self, decision: Decision, ref: int | None) -> None:
        index = self._decisions.append(decision)
        if ref is not None:
            self._conn.execute(
                "INSERT INTO decision_subjects (idx, user_ref) VALUES (?, ?)", (index, ref)
            )

    @property
    def decisions(self) -> DecisionLog:
        """The device's decision log (verify it, prove entries, sign checkpoints)."""
        return self._decisions

    def _purge_purpose(self, ref: int, purpose: Purpose) -> dict[str, int]:
        """Delete the user's data that ``purpose`` covered (on withdrawal or age gating)."""
        deleted: dict[str, int] = {}
        for data_class in sorted(PURPOSE_DATA[purpose]):
            for table, _ in DATA_TABLES.get(data_class, ()):
                sql = f"DELETE FROM {table} WHERE user_ref = ?"
                deleted[table] = self._conn.execute(sql, (ref,)).rowcount
        return deleted

    def _consent_state(self, ref: int | None, user_hash: str) -> ConsentState:
        """The user's choices (objections kept through erasure first, then their history)."""
        objections = self._conn.execute(
            "SELECT purpose FROM objections WHERE user_hash = ?", (user_hash,)
        ).fetchall()
        choices = {Purpose(p): False for (p,) in objections}
        if ref is None:
            return ConsentState(choices=choices)
        rows = self._conn.execute(
            "SELECT purpose, granted FROM consent WHERE user_ref = ? ORDER BY id", (ref,)
        ).fetchall()
        choices.update((Purpose(p), bool(g)) for p, g in rows)
        age = self._conn.execute("SELECT age FROM users WHERE user_ref = ?", (ref,)).fetchone()
        return ConsentState(choices=choices, age=None if age is None else age[0])

    @overload
    def _ref(self, user_id: str, *, create: Literal[True]) -> int: ...
    @overload
    def _ref(self, user_id: str, *, create: bool) -> int | None: ...

    def _ref(self, user_id: str, *, create: bool) -> int | None:
        """The store's integer reference to a user (registering them when ``create``)."""
        user = self.user_hash(user_id)
        row = self._conn.execute("SELECT user_ref FROM users WHERE user_hash = ?", (user,))
        found = row.fetchone()
        if found is not None:
            return int(found[0])
        if not create:
            return None
        cursor = self._conn.execute(
            "INSERT INTO users (user_hash, created_ts, subject) VALUES (?, ?, ?)",
            (user, to_ms(self._clock()), secrets.token_hex(16)),
        )
        return int(cursor.lastrowid or 0)

    def _meta(self, key: str, default: str | None = "") -> str:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            if default == "":
                raise StoreError(f"{self.path} has no {key!r}; it is not a sottovoce store")
            return default or ""
        return str(row[0])

    def _rows(self, sql: str, args: Sequence[Any]) -> Iterator[dict[str, Any]]:
        cursor = self._conn.execute(sql, args)
        names = [d[0] for d in cursor.description]
        for row in cursor:
            yield dict(zip(names, row, strict=True))
