"""What reranking and training read from the store: the user's state, cached between writes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime

import numpy as np
import numpy.typing as npt

from sottovoce.device._derive import (
    SESSION_GAP_MS,
    Fact,
    Taste,
    is_play,
)
from sottovoce.device._features import ITEM_DIM, History, Snapshot, apply_context
from sottovoce.device._rows import (
    _fact,
    _revive,
    to_ms,
)
from sottovoce.device._store_core import StoreCore, _UserState
from sottovoce.policy import (
    Decision,
)


class RankingReads(StoreCore):
    """Reads for :mod:`._personalize`; see :meth:`snapshot` for the caching."""

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
        key, seen = ("personalize", user), (decision.reason, decision.policy_hash)
        if self._noted.get(key) != seen:
            with self._write():
                self._log(decision, ref)
            self._noted[key] = seen
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
