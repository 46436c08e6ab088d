"""What reranking and training read from the store: the user's state, cached between writes.

Ranking reads it through :meth:`RankingReads.ranking_inputs`: the user's history as arrays
(:class:`RankingTables`, built on first use after a write) and, per candidate, a catalog row, a
history row and an artist code, so feature columns are gathered by index a chunk at a time
(:class:`RankingInputs`); only finding a candidate's catalog row is a dictionary lookup, and
ranking the whole catalog needs none.
"""

from __future__ import annotations

import itertools
import json
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from sottovoce.device._derive import SESSION_GAP_MS, Taste, Vector, is_play
from sottovoce.device._features import (
    ITEM_DIM,
    Candidates,
    History,
    HistoryTable,
    Snapshot,
    apply_context,
)
from sottovoce.device._rows import to_ms
from sottovoce.device._store_catalog import Catalog
from sottovoce.device._store_file import StoreFile
from sottovoce.device._store_users import Users

__all__ = ["RankingInputs", "RankingReads", "RankingTables"]


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
    tables: RankingTables | None = None  # built from the above on first use by ranking
    # (catalog epoch, the row in tables.tracks of every catalog row), see _history_by_item
    history_by_item: tuple[int, npt.NDArray[np.int64]] | None = None


class RankingTables(NamedTuple):
    """One user's history as arrays, so that ranking gathers rows instead of looking up
    candidates one by one. Artist arrays are indexed by artist code
    (:class:`._store_catalog.CatalogCache`) and end with the entry for "no artist" (or an
    artist the user never met)."""

    track_rows: dict[str, int]  # track -> row of tracks
    tracks: HistoryTable
    artist_rows: npt.NDArray[np.int64]  # artist code -> row of artists, -1 for none
    artists: HistoryTable
    session_skips: npt.NDArray[np.float64]  # artist code -> skips in the latest session
    session_plays: npt.NDArray[np.float64]

    def by_code(self, codes: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Artist codes as indices of the artist arrays: codes made after these tables were
        built (artists the user never met) and -1 point at the last entry."""
        return np.where(codes < len(self.artist_rows) - 1, codes, -1)


class RankingReads:
    """Reads for :mod:`._personalize`; see :meth:`snapshot` for the caching."""

    def __init__(self, file: StoreFile, *, users: Users, catalog: Catalog) -> None:
        self._file, self._users, self._catalog = file, users, catalog
        self._states: dict[str, _UserState | None] = {}  # per user id, see snapshot()
        self._states_at = -1  # the file's generation they were read at

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
        snap, _ = self._user_snapshot(user_id, now)
        rows, _ = self._item_rows(tracks)
        entries = self._catalog.cache.entries
        known = [entries.get(t) for t in tracks]
        return snap, [k[0] if k else None for k in known], self._fitted(rows)

    def ranking_inputs(
        self, user_id: str, tracks: Sequence[str] | None = None, *, now: datetime | None = None
    ) -> tuple[Snapshot, RankingInputs]:
        """What ranking ``tracks`` (default: the whole catalog, in track id order) needs: the
        user's state, and per candidate row numbers into cached arrays, from which
        :meth:`RankingInputs.chunk` gathers feature columns a slice at a time. Equivalent to
        :meth:`snapshot` (``tests/device/test_rerank.py`` holds the features equal), without
        a dictionary lookup per candidate beyond finding its catalog row and history."""
        snap, state = self._user_snapshot(user_id, now)
        items = self._catalog.cache
        if tracks is None:
            ids: Sequence[str] = tuple(self._catalog.whole())  # rank keeps it as it is
            rows, all_known = np.arange(len(ids), dtype=np.int64), True
        else:
            ids, (rows, all_known) = tracks, self._item_rows(tracks)
        tables = _NO_TABLES if state is None else self._tables(state)
        if len(items.artist_of_row):
            codes = items.artist_of_row[rows]
            if not all_known:
                codes[rows < 0] = -1  # row -1 is not in the catalog
        else:
            codes = np.full(len(ids), -1, dtype=np.int64)
        track_rows = self._track_rows(state, tables, ids, rows, all_known=all_known)
        by_code = tables.by_code(codes)
        in_session = bool(snap.session_artist_skips or snap.session_artist_plays)
        inputs = RankingInputs(
            track_ids=ids, artist_codes=codes, now=snap.now, items=items.fitted, item_rows=rows,
            tables=tables, track_rows=track_rows, artist_rows=tables.artist_rows[by_code],
            session_rows=by_code if in_session else None, all_known=all_known,
        )  # fmt: skip
        return snap, inputs

    def _user_snapshot(
        self, user_id: str, now: datetime | None
    ) -> tuple[Snapshot, _UserState | None]:
        now_ms = to_ms(now or self._file.clock())
        snap = Snapshot(now=now_ms)
        state = self._user_state(user_id)
        if state is None:
            return snap, None
        snap.tracks, snap.artists, snap.taste = state.tracks, state.artists, state.taste
        if state.session is not None and now_ms - state.session[1] <= SESSION_GAP_MS:
            snap.session_skips, snap.session_plays = state.session_totals
            snap.session_artist_skips, snap.session_artist_plays = state.session_artists
        apply_context(snap, state.context)
        return snap, state

    def _item_rows(self, tracks: Sequence[str]) -> tuple[npt.NDArray[np.int64], bool]:
        """Each track's row in the catalog cache (loading what is missing), -1 if unknown,
        and whether every track has one."""
        found, complete = _lookup(self._catalog.cache.rows, tracks)
        if not complete:
            self._catalog.load(t for t, r in zip(tracks, found.tolist(), strict=True) if r < 0)
            found, complete = _lookup(self._catalog.cache.rows, tracks)
        return found, complete

    def _track_rows(
        self,
        state: _UserState | None,
        tables: RankingTables,
        ids: Sequence[str],
        rows: npt.NDArray[np.int64],
        *,
        all_known: bool,
    ) -> npt.NDArray[np.int64]:
        """Each candidate's row in the user's track history (-1: none), through its catalog
        row (an array gather); only candidates outside the catalog are looked up by id."""
        if state is None or not tables.track_rows:
            return np.full(len(ids), -1, dtype=np.int64)
        by_item = self._history_by_item(state, tables)
        found = by_item[rows]
        if not all_known:
            outside = np.flatnonzero(rows < 0)
            index = tables.track_rows
            found[outside] = [index.get(ids[i], -1) for i in outside.tolist()]
        return found

    def _history_by_item(self, state: _UserState, tables: RankingTables) -> npt.NDArray[np.int64]:
        """The row in the user's track history of every catalog row loaded (-1: none).

        Built once per user state and catalog epoch: the tracks the user met are loaded into
        the catalog cache first, so rows loaded later (padded with -1) are tracks they never
        met."""
        items = self._catalog.cache
        if state.history_by_item is None or state.history_by_item[0] != items.epoch:
            self._catalog.load(tables.track_rows)
            known = [(items.rows[t], i) for t, i in tables.track_rows.items() if t in items.rows]
            by_item = np.full(len(items.rows) + 1, -1, dtype=np.int64)  # [-1]: not in catalog
            if known:
                where, history = zip(*known, strict=True)
                by_item[list(where)] = history
            state.history_by_item = (items.epoch, by_item)
        by_item = state.history_by_item[1]
        if len(by_item) < len(items.rows) + 1:  # rows loaded since: tracks they never met
            by_item = np.concatenate([by_item, np.full(len(items.rows) + 1 - len(by_item), -1)])
            state.history_by_item = (items.epoch, by_item)
        return by_item

    def _fitted(self, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        fitted = self._catalog.cache.fitted
        if not len(fitted):
            return np.zeros((len(rows), ITEM_DIM), dtype=np.float32)
        vectors = fitted[np.maximum(rows, 0)]
        vectors[rows < 0] = 0.0
        return vectors

    def _tables(self, state: _UserState) -> RankingTables:
        if state.tables is None:
            code = self._catalog.cache.code
            artists = {code(a): h for a, h in state.artists.items()}
            skips, plays = state.session_artists
            for artist in (*skips, *plays):
                code(artist)
            size = len(self._catalog.cache.artist_codes) + 1  # every artist above has a code now
            artist_rows = np.full(size, -1, dtype=np.int64)
            artist_rows[list(artists)] = np.arange(len(artists))
            session = []
            for counts in (skips, plays):
                column = np.zeros(size)
                column[[code(a) for a in counts]] = list(counts.values())
                session.append(column)
            state.tables = RankingTables(
                {t: i for i, t in enumerate(state.tracks)},
                HistoryTable.of(list(state.tracks.values())),
                artist_rows,
                HistoryTable.of(list(artists.values())),
                *session,
            )
        return state.tables

    def _user_state(self, user_id: str) -> _UserState | None:
        """The user's cached state (None: a user the store does not know), loaded on the
        first read after a write."""
        generation = self._file.generation()
        if generation != self._states_at:  # written since: nothing cached holds
            self._states.clear()
            self._states_at = generation
        try:
            return self._states[user_id]
        except KeyError:
            ref = self._users.ref(user_id, create=False)
            state = self._states[user_id] = None if ref is None else self._load_user_state(ref)
            return state

    def _load_user_state(self, ref: int) -> _UserState:
        state = _UserState(tracks=self._histories("track_stats", "track_id", ref),
                           artists=self._histories("artist_stats", "artist_id", ref))  # fmt: skip
        row = self._file.conn.execute(
            "SELECT ref_ts, weight, total FROM taste WHERE user_ref = ?", (ref,)
        ).fetchone()
        if row is not None:
            state.taste = Taste(row[0], row[1], np.frombuffer(row[2])).mean()
        session = self._file.conn.execute(
            "SELECT start_ts, end_ts FROM sessions WHERE user_ref = ? ORDER BY end_ts DESC "
            "LIMIT 1", (ref,)
        ).fetchone()  # fmt: skip
        if session is not None:
            state.session = (session[0], session[1])
            self._session_state(state, ref, session[0])
        state.context = self._file.conn.execute(
            "SELECT device_type, network, local_time, ts FROM context WHERE user_ref = ?", (ref,)
        ).fetchone()
        return state

    def _histories(self, table: str, key: str, ref: int) -> dict[str, History]:
        # Plain row tuples, already in History's field order (a NamedTuple per row costs).
        rows = self._file.conn.execute(
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
        for kind, artist, body in self._file.conn.execute(
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


def _lookup(index: Mapping[str, int], keys: Sequence[str]) -> tuple[npt.NDArray[np.int64], bool]:
    """``index[key]`` for every key, -1 when absent, and whether none is (the lookups run in
    C: no Python loop)."""
    n = len(keys)
    if n > 1:  # usually every key is present: one itemgetter call costs a third as much
        try:
            return np.fromiter(operator.itemgetter(*keys)(index), np.int64, n), True
        except KeyError:
            pass
    found = np.fromiter(map(index.get, keys, itertools.repeat(-1)), np.int64, n)
    return found, not (found < 0).any()


_NO_TABLES = RankingTables({}, HistoryTable.of([]), np.full(1, -1, dtype=np.int64),
                           HistoryTable.of([]), np.zeros(1), np.zeros(1))  # fmt: skip


@dataclass(frozen=True)
class RankingInputs:
    """Candidates as row numbers into the store's cached arrays (see
    :meth:`RankingReads.ranking_inputs`); :meth:`chunk` gathers the feature columns of a
    slice, so ranking many items never holds more than a chunk of feature rows."""

    track_ids: Sequence[str]
    artist_codes: npt.NDArray[np.int64]  # -1: no artist (the artist cap counts by code)
    now: int
    items: npt.NDArray[np.float32]
    item_rows: npt.NDArray[np.int64]
    tables: RankingTables
    track_rows: npt.NDArray[np.int64]
    artist_rows: npt.NDArray[np.int64]
    session_rows: npt.NDArray[np.int64] | None  # None outside a session
    all_known: bool  # every candidate is in the catalog
    _at: dict[int, npt.NDArray[np.float64]] = field(default_factory=dict)  # see _history

    def __len__(self) -> int:
        return len(self.track_ids)

    @property
    def in_session(self) -> bool:
        """Whether the user is in a session (else every candidate's session counts are 0)."""
        return self.session_rows is not None

    def chunk(self, start: int, stop: int) -> Candidates:
        rows = self.item_rows[start:stop]
        if not len(self.items):
            items = np.zeros((len(rows), ITEM_DIM), dtype=np.float32)
        elif self.all_known:
            items = self.items[rows]
        else:
            items = self.items[np.maximum(rows, 0)]
            items[rows < 0] = 0.0  # not in the catalog
        tables = self.tables
        if self.session_rows is None:
            skips = plays = np.zeros(len(rows))
        else:
            session = self.session_rows[start:stop]
            skips, plays = tables.session_skips[session], tables.session_plays[session]
        return Candidates(
            items,
            self._history(tables.tracks, self.track_rows[start:stop]),
            self._history(tables.artists, self.artist_rows[start:stop]),
            skips,
            plays,
        )

    def _history(self, table: HistoryTable, rows: npt.NDArray[np.int64]) -> npt.NDArray[Any]:
        if len(table.columns) > len(self.track_ids):
            return table.gather(rows, self.now)
        # More candidates than the user has history rows: recency once per row, not candidate.
        at = self._at.get(id(table))
        if at is None:
            at = self._at[id(table)] = table.at(self.now)
        return at[rows]
