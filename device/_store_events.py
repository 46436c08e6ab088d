"""Events in the store: a batch is checked, consented, written and its derived state merged in
one transaction, all or nothing; stored events are read back as derivation facts.

Cost (``bench/ingest.py``): a batch of plain dicts (``_plain_events.SMALL_BATCH`` or more) is
read into its rows by a hand-written reader that gives what pydantic's path gives or declines
(:func:`._plain_events.plain_rows`); any other batch is validated by pydantic in one call and
each body written by a serializer made for its type (:func:`._rows.encode`). Its rows are
inserted 64 to a statement (:mod:`._many_rows`) without first asking which ids exist (the unique
index on ``event_id`` refuses a replay; a savepoint then undoes the batch's rows and the slow
path sorts replays out); its derived state is computed column-wise
(:func:`._derive_columns.derive_batch`, which asks the catalog only for the vectors of the
tracks that weigh in the taste) and merged by upserts, one row per (user, track) and (user,
artist) it touched and 64 rows a statement, NULLs bound as marks
(:class:`._rows.CounterUpsert`); the cyclic collector is held off for the length of the append
(:func:`_collector_paused`). Of what remains, SQLite's writes (the event's row in three B-trees,
the counters' upserts, the commit) are about half, reading the batch about 20%, derivation about
15%.
"""

from __future__ import annotations

import gc
import logging
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from sottovoce.device._derive import Fact, FactBatch
from sottovoce.device._derive_columns import derive_batch
from sottovoce.device._errors import EventConflict
from sottovoce.device._events import Event
from sottovoce.device._plain_events import plain_rows
from sottovoce.device._rows import (
    INSERT_EVENTS,
    EventRows,
    _chunks,
    _validate,
    event_rows,
    refuse_ahead,
    stored_fact,
    to_ms,
)
from sottovoce.device._sqlite import _immediate
from sottovoce.device._store_catalog import Catalog
from sottovoce.device._store_consent import Consent
from sottovoce.device._store_decisions import DecisionTrail, Noted
from sottovoce.device._store_derived import DerivedState
from sottovoce.device._store_file import StoreFile
from sottovoce.device._store_users import Users
from sottovoce.device._store_values import AppendResult
from sottovoce.policy import (
    ConsentState,
    DataClass,
    Policy,
    PolicyViolation,
    Purpose,
    consent_refusal,
)

__all__ = ["Events"]

log = logging.getLogger("sottovoce.device")


class Events:
    """The ``events`` table."""

    def __init__(
        self, file: StoreFile, *, users: Users, consent: Consent, trail: DecisionTrail,
        catalog: Catalog, derived: DerivedState, policy: Policy, region_id: str,
    ) -> None:  # fmt: skip
        self._file, self._users, self._consent, self._trail = file, users, consent, trail
        self._catalog, self._derived = catalog, derived
        self._policy = policy
        self._region = policy.region(region_id)

    def append_many(self, events: Iterable[Event | Mapping[str, Any]]) -> AppendResult:
        """Store a batch of events in one transaction, all or nothing (see
        :meth:`sottovoce.device.EventStore.append_many`)."""
        with _collector_paused():
            return self._append_many(events)

    def _append_many(self, events: Iterable[Event | Mapping[str, Any]]) -> AppendResult:
        items = list(events)
        parsed = plain_rows(items)
        if parsed is None:  # not plain dicts it is sure of: pydantic reads (and refuses) them
            parsed = event_rows(_validate(items))
        if not parsed.ts:
            return AppendResult(0)
        times = parsed.ts
        region = self._region
        refuse_ahead(items, times, now=self._file.clock(), skew=region.clock_skew)
        refusal: PolicyViolation | None = None
        result = AppendResult(0)
        noted: Noted = {}
        with self._file.write(f"storing a batch of {len(times)} events"):
            refs: dict[str, int] = {}
            verdicts: list[tuple[str, int | None, ConsentState]] = []
            for user_id in sorted(set(parsed.user_id)):
                ref = self._users.ref(user_id, create=False)
                state = self._consent.state(ref, self._users.hash(user_id))
                refusal = consent_refusal(region, Purpose.PERSONALIZATION, state)
                if refusal is not None:  # refusals are always logged; nothing is stored
                    self._log_store_events(state, ref)
                    break
                verdicts.append((user_id, ref, state))
            else:
                for user_id, known, state in verdicts:
                    ref = self._users.ref(user_id, create=True) if known is None else known
                    refs[user_id] = ref
                    noted.update(self._note(user_id, ref, state))
                horizon = self._file.clock() - region.ttl(DataClass.RAW_EVENTS)
                cutoff = to_ms(horizon)
                # Events already past raw-event retention are not kept: storing them would
                # break retention, and a replay of a purged event would count twice.
                live: Sequence[int] = range(len(times))
                expired: tuple[str, ...] = ()
                if min(times) < cutoff:
                    live = [i for i, ts in enumerate(times) if ts >= cutoff]
                    expired = tuple(parsed.event_id[i] for i, ts in enumerate(times) if ts < cutoff)
                result = self._store(parsed, live=live, refs=refs, expired=expired)
                if expired:
                    result = replace(result, retention_cutoff=horizon)
        self._trail.noted.update(noted)  # committed: these are in the log now
        if refusal is not None:
            raise refusal
        if result.expired and result.expired == len(times):
            log.warning("append: every event of the batch was dropped: %s (check the events' "
                        "timestamps and the store's clock)", result)  # fmt: skip
        return result

    def _log_store_events(self, state: ConsentState, ref: int | None) -> None:
        inputs = self._trail.inputs("store_events", ref)
        self._trail.record(self._trail.engine.store_events(state, inputs=inputs), ref)

    def _note(self, user_id: str, ref: int, state: ConsentState) -> Noted:
        """Log an allowed append when its reason or the policy changed (routine: built and
        logged on change only); what was logged, to remember once committed."""
        key = ("store_events", self._users.hash(user_id))
        seen = (self._trail.engine.consent_reason(Purpose.PERSONALIZATION, state),
                self._policy.hash)  # fmt: skip
        if self._trail.noted.get(key) == seen:
            return {}
        self._log_store_events(state, ref)
        return {key: seen}

    def _store(
        self,
        parsed: EventRows,
        *,
        live: Sequence[int],
        refs: Mapping[str, int],
        expired: tuple[str, ...],
    ) -> AppendResult:
        """Write the events ``live`` (indices into ``parsed``) of an allowed batch that are
        new, and merge their derived state."""
        if not live:
            return AppendResult(0, (), expired)
        conn = self._file.conn
        first = conn.execute("SELECT coalesce(max(seq), 0) + 1 FROM events").fetchone()[0]

        def rows(indices: Sequence[int]) -> tuple[FactBatch, Sequence[str], Sequence[str]]:
            """The facts, ids and bodies of ``parsed[indices]``, numbered from ``first``."""
            picked = parsed
            if len(indices) < len(parsed.ts):  # else all of them, in order: nothing to pick
                picked = parsed.pick(indices)
            batch = picked.facts(first_seq=first, refs=refs)
            return self._resolve_artists(batch), picked.event_id, picked.body

        batch, ids, texts = rows(live)
        duplicates: list[str] = []
        try:
            # Most batches are all new: insert first, and sort out replays only when the
            # unique index on event_id refuses one (the savepoint undoes the partial insert).
            with _immediate(conn, name="new_events"):
                INSERT_EVENTS.run(conn, _event_rows(batch, ids, texts))
        except sqlite3.IntegrityError:
            fresh, duplicates = self._dedupe(ids, batch.user, texts, live)
            if not fresh:
                return AppendResult(0, tuple(duplicates), expired)
            batch, ids, texts = rows([live[k] for k in fresh])
            INSERT_EVENTS.run(conn, _event_rows(batch, ids, texts))
        self._derived.merge(derive_batch(batch, self._catalog.vectors))
        return AppendResult(len(ids), tuple(duplicates), expired)

    def _resolve_artists(self, batch: FactBatch) -> FactBatch:
        """Fill in, from the local catalog, the artists the app left out."""
        # An event without a track has no artist either: as many artists as tracks missing
        # means none left out (counted in C, before any loop over the batch).
        if batch.artist.count(None) == batch.track.count(None):
            return batch
        missing = {k: track for k, (track, artist) in enumerate(zip(batch.track, batch.artist,
                   strict=True)) if artist is None and track is not None}  # fmt: skip
        self._catalog.load(missing.values())
        catalog, artists = self._catalog.cache.entries, list(batch.artist)
        for k, track in missing.items():
            known = catalog.get(track)
            if known is not None:
                artists[k] = known[0]
        return batch._replace(artist=artists)

    def _dedupe(
        self, ids: Sequence[str], users: Sequence[int], bodies: Sequence[str], live: Sequence[int]
    ) -> tuple[list[int], list[str]]:
        """Which of the rows ``ids`` (users, bodies) are new (positions), and the ids of
        replays; an id stored (or repeated in the batch) with other content is an
        ``EventConflict`` (its ``index`` is its place in the batch as sent: ``live``)."""
        known: dict[str, tuple[int, str]] = {}
        for chunk in _chunks(ids, 500):
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT event_id, user_ref, body FROM events WHERE event_id IN ({marks})"
            known.update((r[0], (r[1], r[2])) for r in self._file.conn.execute(sql, chunk))
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

    def facts(self, user_id: str) -> list[Fact]:
        """The user's stored events as derivation facts, in arrival order (for training)."""
        ref = self._users.ref(user_id, create=False)
        rows = self._file.conn.execute(
            "SELECT seq, event_id, user_ref, type, ts, track_id, artist_id, body FROM events "
            "WHERE user_ref = ? ORDER BY seq", (ref,)
        )  # fmt: skip
        return list(map(stored_fact, rows))


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector held off for the length of one append.

    A batch makes several objects per event (models, their dicts, rows), all freed by
    reference counting when the append returns. Collections in between find nothing to free,
    but they promote the batch's live objects to older generations, which then bring on full
    collections over the whole process's heap: in ``bench/ingest.py`` those cost about as much
    as validating the events. An append nested in a paused one, or one in a process that turned
    the collector off, leaves the setting as it found it. The setting is the process's: other
    threads run without collections while an append lasts, and one that turns the collector
    off meanwhile finds it on again when the append ends.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _event_rows(batch: FactBatch, ids: Sequence[str], bodies: Sequence[str]) -> list[Sequence[Any]]:
    """The stored rows (seq, id, user, type, ts, track, artist, body), as columns."""
    return [batch.seq, ids, batch.user, batch.type, batch.ts, batch.track, batch.artist, bodies]
