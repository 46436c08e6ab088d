"""Derived state in the store: per-track and per-artist statistics, sessions, the taste vector
and the latest context, merged from each batch's derivation (:mod:`._derive`) in the batch's
own transaction, rebuilt from the events on request, and read back as plain rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sottovoce.device._derive import SESSION_GAP_MS, DerivedRows, Run, Taste, derive
from sottovoce.device._rows import UPSERT_ARTIST, UPSERT_TRACK, _fact, _revive, _row_order
from sottovoce.device._schema import EVENT_DERIVED
from sottovoce.device._store_catalog import Catalog
from sottovoce.device._store_file import StoreFile
from sottovoce.device._store_users import Users

__all__ = ["DerivedState"]


class DerivedState:
    """The tables of :data:`._schema.EVENT_DERIVED`."""

    def __init__(self, file: StoreFile, *, users: Users, catalog: Catalog) -> None:
        self._file, self._users, self._catalog = file, users, catalog

    def merge(self, derived: DerivedRows) -> None:
        """Add a batch's derived rows to what is stored (inside the batch's write)."""
        conn = self._file.conn
        UPSERT_TRACK.insert.run(conn, UPSERT_TRACK.columns(derived.tracks))
        UPSERT_ARTIST.insert.run(conn, UPSERT_ARTIST.columns(derived.artists))
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
        """Merge a batch's listening runs with the stored sessions they touch."""
        conn = self._file.conn
        low = min(r.start for r in runs) - SESSION_GAP_MS
        high = max(r.end for r in runs) + SESSION_GAP_MS
        stored = conn.execute(
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
            conn.executemany("DELETE FROM sessions WHERE id = ?", [(i,) for i in old])
            conn.execute(
                "INSERT INTO sessions (user_ref, start_ts, end_ts, events, plays, completions, "
                "skips, ms_played) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (user, run.start, run.end, run.events, run.plays, run.completions, run.skips,
                 run.ms_played),
            )  # fmt: skip

    def rebuild(self) -> int:
        """Recompute all derived state from the stored events; returns the events replayed."""
        replayed = 0
        conn = self._file.conn
        with self._file.write():
            for table in EVENT_DERIVED:
                conn.execute(f"DELETE FROM {table}")
            users = [r[0] for r in conn.execute("SELECT DISTINCT user_ref FROM events")]
            for user in users:
                facts = [
                    _fact(row, _revive(row[7]))
                    for row in conn.execute(
                        "SELECT seq, event_id, user_ref, type, ts, track_id, artist_id, body "
                        "FROM events WHERE user_ref = ? ORDER BY seq",
                        (user,),
                    )
                ]
                # The fact-by-fact reference derivation (append derives large batches
                # column-wise), so a rebuild also checks what appends maintained.
                vectors = self._catalog.vectors(f.track for f in facts)
                self.merge(derive(facts, vectors).rows())
                replayed += len(facts)
        return replayed

    def rows(self, user_id: str | None) -> dict[str, list[dict[str, Any]]]:
        """All derived state (of one user, or everyone), as plain rows for export and checks."""
        where, args = "", []
        if user_id is not None:
            where, args = "WHERE user_ref = ?", [self._users.ref(user_id, create=False)]
        out: dict[str, list[dict[str, Any]]] = {}
        for table in EVENT_DERIVED:
            rows = list(self._file.rows(f"SELECT * FROM {table} {where}", args))
            for row in rows:
                row.pop("id", None)
                if table == "taste":
                    taste = Taste(row["ref_ts"], row["weight"], np.frombuffer(row.pop("total")))
                    mean = taste.mean()
                    row["vector"] = None if mean is None else [float(x) for x in mean]
            out[table] = sorted(rows, key=_row_order)
        return out
