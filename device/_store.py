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

Cost (``bench/ingest.py``): a batch is validated and encoded by pydantic in one call each, its
rows are inserted without first asking which ids exist (the unique index on ``event_id`` refuses
a replay; a savepoint then undoes the batch's rows and the slow path sorts replays out), and
its derived state is computed column-wise (:func:`._derive.derive_batch`), so no Python loop
runs per event beyond building each stored row.

The class is assembled from parts: :mod:`._store_core` (connection, users, consent state,
decision logging, catalog), :mod:`._store_ranking` (what reranking reads, cached between
writes) and :mod:`._store_outbox` (model weights and the outbox); this module holds opening,
consent, events, derived state, retention and the user's rights.
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from operator import attrgetter
from pathlib import Path
from typing import Any

import numpy as np
from sqlite_utils import Database

from sottovoce.device._derive import (
    SESSION_GAP_MS,
    DerivedRows,
    FactBatch,
    Run,
    Taste,
    derive,
    derive_batch,
)
from sottovoce.device._errors import (
    EventConflict,
    InvalidInput,
    StoreError,
)
from sottovoce.device._events import Event
from sottovoce.device._rows import (
    _INSERT_EVENT,
    _MS,
    _UPSERT_ARTIST,
    _UPSERT_TRACK,
    _chunks,
    _fact,
    _revive,
    _row_order,
    _utcnow,
    _validate,
    encode,
    fact_batch,
    from_ms,
    refuse_ahead,
    to_ms,
)
from sottovoce.device._schema import (
    DATA_TABLES,
    EVENT_DERIVED,
    RETENTION_FILTER,
    USER_TABLES,
)
from sottovoce.device._sqlite import _immediate, _migrate, guarded
from sottovoce.device._store_core import (
    _CACHE_KIB,
    AppendResult,
    CatalogItem,
    Durability,
    ModelWeights,
    PurgeReport,
)
from sottovoce.device._store_outbox import OutboxPart
from sottovoce.device._store_ranking import RankingReads
from sottovoce.policy import (
    ConsentState,
    DataClass,
    Policy,
    PolicyViolation,
    Purpose,
    consent_refusal,
)

__all__ = ["AppendResult", "CatalogItem", "Durability", "EventStore", "ModelWeights", "PurgeReport"]

log = logging.getLogger("sottovoce.device")
_USER_ID, _EVENT_ID = attrgetter("user_id"), attrgetter("event_id")


class EventStore(RankingReads, OutboxPart):
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
            fresh = not _has_meta(conn)
            _migrate(db, path)
            with _immediate(conn):
                stored = {r[0]: r[1] for r in conn.execute("SELECT key, value FROM meta")}
                if device_secret is not None:
                    if not fresh and stored.get("device_secret") != device_secret.hex():
                        raise StoreError(f"{path} exists: its device secret cannot be replaced")
                    conn.execute("UPDATE meta SET value = ? WHERE key = 'device_secret'",
                                 (device_secret.hex(),))  # fmt: skip
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

    @guarded("reading the user's consent")
    def consent_state(self, user_id: str) -> ConsentState:
        return self._consent_state(self._ref(user_id, create=False), self.user_hash(user_id))

    def refusal(self, user_id: str, purpose: Purpose) -> PolicyViolation | None:
        """Why the region's policy forbids ``purpose`` for this user now, or ``None``."""
        return consent_refusal(self.region, purpose, self.consent_state(user_id))

    def allows(self, user_id: str, purpose: Purpose) -> bool:
        return self.refusal(user_id, purpose) is None

    def append(self, event: Event | Mapping[str, Any]) -> AppendResult:
        """Store one event (see :meth:`append_many`)."""
        return self.append_many((event,))

    def append_many(self, events: Iterable[Event | Mapping[str, Any]]) -> AppendResult:
        """Store a batch of events in one transaction, all or nothing.

        Raises ``InvalidEventBatch`` listing every invalid event (an event timed further ahead
        of the store's clock than the region's ``clock_skew`` is invalid), ``EventConflict`` for
        an id stored with other content, or the policy's ``ConsentMissing``/``AgeRestricted``
        when a user's events may not be kept; in each case nothing of the batch is stored.
        """
        parsed = _validate(list(events))
        if not parsed:
            return AppendResult(0)
        times, bodies = encode(parsed)
        refuse_ahead(parsed, times, now=self._clock(), skew=self.region.clock_skew)
        refusal: PolicyViolation | None = None
        result = AppendResult(0)
        noted: dict[tuple[str, str], tuple[str, str]] = {}
        with self._write(f"storing a batch of {len(parsed)} events"):
            refs: dict[str, int] = {}
            verdicts = []
            for user_id in sorted(set(map(_USER_ID, parsed))):
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
                    key = ("store_events", self.user_hash(user_id))
                    seen = (self._engine.consent_reason(Purpose.PERSONALIZATION, state),
                            self.policy.hash)  # fmt: skip
                    if self._noted.get(key) != seen:  # routine: built and logged on change only
                        inputs = self._inputs("store_events", refs[user_id])
                        self._log(self._engine.store_events(state, inputs=inputs), refs[user_id])
                        noted[key] = seen
                horizon = self._clock() - self.region.ttl(DataClass.RAW_EVENTS)
                cutoff = to_ms(horizon)
                # Events already past raw-event retention are not kept: storing them would
                # break retention, and a replay of a purged event would count twice.
                live: Sequence[int] = range(len(parsed))
                expired: tuple[str, ...] = ()
                if min(times) < cutoff:
                    live = [i for i, ts in enumerate(times) if ts >= cutoff]
                    expired = tuple(parsed[i].event_id for i, ts in enumerate(times) if ts < cutoff)
                result = self._store(parsed, times=times, bodies=bodies, live=live, refs=refs,
                                     expired=expired)  # fmt: skip
                if expired:
                    result = replace(result, retention_cutoff=horizon)
        self._noted.update(noted)  # committed: these are in the log now
        if refusal is not None:
            raise refusal
        if result.expired and result.expired == len(parsed):
            log.warning("append: every event of the batch was dropped: %s (check the events' "
                        "timestamps and the store's clock)", result)  # fmt: skip
        return result

    def _store(
        self,
        parsed: list[Event],
        *,
        times: list[int],
        bodies: list[str],
        live: Sequence[int],
        refs: Mapping[str, int],
        expired: tuple[str, ...],
    ) -> AppendResult:
        """Write the events ``live`` (indices into ``parsed``) of an allowed batch that are
        new, and merge their derived state."""
        if not live:
            return AppendResult(0, (), expired)
        first = self._conn.execute("SELECT coalesce(max(seq), 0) + 1 FROM events").fetchone()[0]

        def rows(indices: Sequence[int]) -> tuple[FactBatch, list[str], list[str]]:
            """The facts, ids and bodies of ``parsed[indices]``, numbered from ``first``."""
            events, at, texts = parsed, times, bodies
            if len(indices) < len(parsed):  # else all of them, in order: nothing to pick
                events = [parsed[i] for i in indices]
                at, texts = [times[i] for i in indices], [bodies[i] for i in indices]
            batch = fact_batch(events, first_seq=first, refs=refs, times=at)
            return self._resolve_artists(batch), list(map(_EVENT_ID, events)), texts

        batch, ids, texts = rows(live)
        duplicates: list[str] = []
        try:
            # Most batches are all new: insert first, and sort out replays only when the
            # unique index on event_id refuses one (the savepoint undoes the partial insert).
            with _immediate(self._conn, name="new_events"):
                self._conn.executemany(_INSERT_EVENT, _event_rows(batch, ids, texts))
        except sqlite3.IntegrityError:
            fresh, duplicates = self._dedupe(ids, batch.user, texts, live)
            if not fresh:
                return AppendResult(0, tuple(duplicates), expired)
            batch, ids, texts = rows([live[k] for k in fresh])
            self._conn.executemany(_INSERT_EVENT, _event_rows(batch, ids, texts))
        self._merge(derive_batch(batch, self._vectors(set(batch.track))))
        return AppendResult(len(ids), tuple(duplicates), expired)

    def _resolve_artists(self, batch: FactBatch) -> FactBatch:
        """Fill in, from the local catalog, the artists the app left out."""
        missing = {k: track for k, (track, artist) in enumerate(zip(batch.track, batch.artist,
                   strict=True)) if artist is None and track is not None}  # fmt: skip
        if not missing:
            return batch
        self._load_catalog(missing.values())
        catalog, artists = self._items.entries, list(batch.artist)
        for k, track in missing.items():
            known = catalog.get(track)
            if known is not None:
                artists[k] = known[0]
        return batch._replace(artist=artists)

    def _dedupe(
        self, ids: list[str], users: Sequence[int], bodies: list[str], live: Sequence[int]
    ) -> tuple[list[int], list[str]]:
        """Which of the rows ``ids`` (users, bodies) are new (positions), and the ids of
        replays; an id stored (or repeated in the batch) with other content is an
        ``EventConflict`` (its ``index`` is its place in the batch as sent: ``live``)."""
        known: dict[str, tuple[int, str]] = {}
        for chunk in _chunks(ids, 500):
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT event_id, user_ref, body FROM events WHERE event_id IN ({marks})"
            known.update((r[0], (r[1], r[2])) for r in self._conn.execute(sql, chunk))
        fresh: list[int] = []
        duplicates: list[str] = []
        for k, (event_id, user, body) in enumerate(zip(ids, users, bodies, strict=True)):
            prior = known.get(event_id)
            if prior is not None:
                if prior != (user, body):
                    raise EventConflict(event_id, index=live[k])
                duplicates.append(event_id)
                continue
            known[event_id] = (user, body)
            fresh.append(k)
        return fresh, duplicates

    def _merge(self, derived: DerivedRows) -> None:
        conn = self._conn
        conn.executemany(_UPSERT_TRACK, derived.tracks)
        conn.executemany(_UPSERT_ARTIST, derived.artists)
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
                # The fact-by-fact reference derivation (append derives large batches
                # column-wise), so a rebuild also checks what appends maintained.
                self._merge(derive(facts, self._vectors(f.track for f in facts)).rows())
                replayed += len(facts)
        return replayed

    @guarded("reading derived state")
    def derived_state(self, user_id: str | None = None) -> dict[str, list[dict[str, Any]]]:
        """All derived state (of one user, or everyone), as plain rows for export and checks."""
        return self._derived_state(user_id)

    def _derived_state(self, user_id: str | None) -> dict[str, list[dict[str, Any]]]:
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

    def purge_expired(self, *, now: datetime | None = None) -> PurgeReport:
        """Delete what the region's retention rules no longer allow to keep."""
        moment = now or self._clock()
        now_ms = to_ms(moment)
        deleted: dict[str, int] = {}
        with self._write("purging by retention"):
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
        with self._write("erasing the user's data"):
            ref = self._ref(user_id, create=False)
            inputs = self._inputs("erase", None)  # a one-off subject: nothing to link
            for table in (*USER_TABLES, "consent", "users"):
                sql = f"DELETE FROM {table} WHERE user_ref = ?"
                deleted[table] = self._conn.execute(sql, (ref,)).rowcount
            self._log(self._engine.erase(deleted=deleted, inputs=inputs), None)
        return PurgeReport(deleted)

    def export_user(self, user_id: str) -> dict[str, Any]:
        """Everything stored for the user, as JSON-ready data (an access request)."""
        with self._write("exporting the user's data"):  # the export is a logged decision
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
            derived = self._derived_state(user_id)
            models = [
                {"model_id": row["model_id"], "version": row["version"],
                 "updated_at": from_ms(row["updated_ts"]).isoformat(),
                 "parameters": len(row["weights"]) // 4}
                for row in self._rows(
                    "SELECT model_id, version, updated_ts, weights FROM model_state "
                    "WHERE user_ref = ?", [ref])
            ]  # fmt: skip
            uploads = [
                _upload(row)
                for row in self._rows(
                    "SELECT round_id, region, state, reason, attempts AS retries, "
                    "length(body) AS bytes, created_ts AS queued_ts, deadline_ts, done_ts "
                    "FROM outbox WHERE user_ref = ? ORDER BY created_ts", [ref])
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
            # Model updates queued to leave the device, and what became of each (never the
            # update itself); the decisions below keep the trail after outbox retention.
            "uploads": uploads,
            "decisions": decisions,
        }

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


def _event_rows(batch: FactBatch, ids: list[str], bodies: list[str]) -> Iterator[tuple[Any, ...]]:
    """The stored rows (seq, id, user, type, ts, track, artist, body), made one at a time as
    SQLite takes them."""
    return zip(batch.seq, ids, batch.user, batch.type, batch.ts, batch.track, batch.artist,
               bodies, strict=True)  # fmt: skip


def _upload(row: dict[str, Any]) -> dict[str, Any]:
    """An outbox row as an access export shows it: times in ISO 8601; no delta, no key."""
    queued, deadline, done = row.pop("queued_ts"), row.pop("deadline_ts"), row.pop("done_ts")
    return {**row, "queued_at": from_ms(queued).isoformat(),
            "deadline": from_ms(deadline).isoformat(),
            "finished_at": None if done is None else from_ms(done).isoformat()}  # fmt: skip


def _has_meta(conn: sqlite3.Connection) -> bool:
    """Whether the file already holds a store (its ``meta`` table)."""
    found = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ).fetchone()
    return found is not None
