"""The core of the device store that the rest builds on: the connection, transactions,
users and their consent state, decision logging, and the catalog cache.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Self, overload

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator
from sqlite_utils import Database

from sottovoce.device._derive import (
    Vector,
)
from sottovoce.device._errors import (
    CatalogError,
    StoreError,
)
from sottovoce.device._events import USER_PATTERN
from sottovoce.device._features import ITEM_DIM, History, HistoryTable, fit_rows
from sottovoce.device._rows import (
    _chunks,
    _utcnow,
    to_ms,
)
from sottovoce.device._schema import (
    DATA_TABLES,
)
from sottovoce.device._sqlite import _Checkpointer, _immediate, guarded, store_errors
from sottovoce.policy import (
    PURPOSE_DATA,
    ConsentState,
    Decision,
    DecisionEngine,
    DecisionLog,
    Policy,
    Purpose,
)

Durability = Literal["normal", "full"]
WHOLE_CATALOG = 20_000  # a catalog up to this size is cached whole on first use
_CACHE_KIB = 8192  # page cache per connection; the hot upserts are B-tree work


CatalogId = Annotated[str, Strict(), Field(min_length=1, max_length=128, pattern=USER_PATTERN)]


class CatalogItem(BaseModel):
    """Public metadata of one track, with its feature vector (no user data)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Strict, as events are: no bytes or numbers taken for ids, no text or bools for numbers.
    track_id: CatalogId
    artist_id: CatalogId | None = None
    title: Annotated[str, Strict(), Field(pattern=r"^[^\x00]*$")] | None = None
    vector: tuple[Annotated[float, Strict()], ...] = Field(min_length=1, max_length=1024)

    @field_validator("vector")
    @classmethod
    def _finite(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not np.all(np.isfinite(value)):
            raise ValueError("vector values must be finite")
        return value


@dataclass(frozen=True)
class AppendResult:
    """What an append did: how many events were new, which were replays, which too old.

    ``expired_ids`` are events older than the region keeps raw events (older than
    ``retention_cutoff``, the store's clock minus the raw-event retention): not stored, not
    counted. ``str(result)`` says all of it in a sentence.
    """

    accepted: int
    duplicate_ids: tuple[str, ...] = ()
    expired_ids: tuple[str, ...] = ()
    retention_cutoff: datetime | None = None

    @property
    def duplicates(self) -> int:
        return len(self.duplicate_ids)

    @property
    def expired(self) -> int:
        """How many events were dropped because they were already past retention."""
        return len(self.expired_ids)

    def __str__(self) -> str:
        text = f"stored {self.accepted} new events, {self.duplicates} replays ignored"
        if self.expired:
            cutoff = (
                ""
                if self.retention_cutoff is None
                else (f" (older than {self.retention_cutoff.isoformat(timespec='seconds')})")
            )
            text += (f", {self.expired} dropped: already past the region's raw-event "
                     f"retention{cutoff}")  # fmt: skip
        return text


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
    # (catalog epoch, the row in tables.tracks of every catalog row), see _store_ranking
    history_by_item: tuple[int, npt.NDArray[np.int64]] | None = None


class RankingTables(NamedTuple):
    """One user's history as arrays, so that ranking gathers rows instead of looking up
    candidates one by one. Artist arrays are indexed by artist code (:class:`CatalogCache`)
    and end with the entry for "no artist" (or an artist the user never met)."""

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


class CatalogCache:
    """The catalog as loaded so far, for ranking: entries, feature-ready vectors (a row per
    track, in load order, so ranking indexes instead of stacking) and an integer code per
    artist (kept through :meth:`clear`: cached user state refers to artists by code)."""

    def __init__(self) -> None:
        self.artist_codes: dict[str, int] = {}
        self.epoch = -1  # counts clears: row numbers are valid within one epoch
        self.clear()

    def clear(self) -> None:
        self.epoch += 1
        self.entries: dict[str, tuple[str | None, Vector]] = {}
        self.rows: dict[str, int] = {}  # track -> row of fitted and artist_of_row
        self.fitted = np.zeros((0, ITEM_DIM), dtype=np.float32)
        self.artist_of_row = np.zeros(0, dtype=np.int64)  # artist code, -1 when none
        self.complete = False  # every catalog track is loaded

    def code(self, artist: str) -> int:
        return self.artist_codes.setdefault(artist, len(self.artist_codes))

    def add(self, rows: Iterable[tuple[str, str | None, bytes]]) -> None:
        """Add catalog rows (track id, artist id, float32 vector bytes) not loaded yet."""
        loaded: list[tuple[str, str | None, Vector]] = []
        for track, artist, blob in rows:
            vector = np.frombuffer(blob, dtype=np.float32).astype(np.float64)
            self.entries[track] = (artist, vector)
            loaded.append((track, artist, vector))
        if not loaded:
            return
        start = len(self.rows)
        self.rows.update((t, start + i) for i, (t, _, _) in enumerate(loaded))
        fitted = fit_rows([v for _, _, v in loaded]).astype(np.float32)
        codes = [-1 if a is None else self.code(a) for _, a, _ in loaded]
        self.fitted = np.concatenate([self.fitted, fitted])
        self.artist_of_row = np.concatenate([self.artist_of_row, codes])


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


class StoreCore:
    """State and helpers shared by every part of :class:`EventStore`."""

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
        self._items = CatalogCache()
        self._hashes: dict[str, str] = {}
        # Routine decisions (allowed appends, personalization) are logged only when their
        # reason or policy changes, or the log would become a listening timeline kept for
        # years; this remembers, per (action, user), the (reason, policy hash) last logged.
        self._noted: dict[tuple[str, str], tuple[str, str]] = {}
        self._states: dict[int, _UserState] = {}  # see snapshot()
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

    def now(self) -> datetime:
        """The store's clock (the one it was opened with): retention, rounds and budgets."""
        return self._clock()

    def close(self) -> None:
        self._checkpointer.stop()
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def db(self) -> Database:
        """The underlying sqlite-utils database, for reading (write through this class)."""
        return self._db

    def user_hash(self, user_id: str) -> str:
        """The salted hash under which ``user_id`` is stored (the id itself never is)."""
        cached = self._hashes.get(user_id)
        if cached is None:
            digest = hmac.new(self._salt, user_id.encode(), hashlib.sha256).hexdigest()
            cached = self._hashes[user_id] = digest[:32]
        return cached

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
        self._items.clear()
        return len(parsed)

    def _load_catalog(self, track_ids: Iterable[str]) -> None:
        items = self._items
        wanted = list(dict.fromkeys(t for t in track_ids if t not in items.entries))
        first_use = not items.entries and not items.complete
        if wanted and first_use and self.count("catalog") <= WHOLE_CATALOG:
            self.catalog()  # one scan now instead of a query for every batch of new tracks
            return
        for chunk in _chunks(wanted, 500):
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT track_id, artist_id, vector FROM catalog WHERE track_id IN ({marks})"
            items.add(self._conn.execute(sql, chunk))

    def _vectors(self, track_ids: Iterable[str | None]) -> dict[str, Vector]:
        tracks = {t for t in track_ids if t is not None}
        self._load_catalog(tracks)
        entries = self._items.entries
        return {t: entries[t][1] for t in tracks if t in entries}

    @guarded("reading the catalog")
    def catalog(self) -> Mapping[str, tuple[str | None, Vector]]:
        """The whole local catalog, track id -> (artist, vector), in track id order, from the
        in-memory cache."""
        items = self._items
        if not items.complete:
            items.clear()  # loaded again as a whole, so that rows follow track id order
            items.add(self._conn.execute(
                "SELECT track_id, artist_id, vector FROM catalog ORDER BY track_id"))  # fmt: skip
            items.complete = True
        return items.entries

    def generation(self) -> int:
        """A number that changes whenever the store's contents may have changed, by this
        connection or another one: what anything cached from the store is checked against."""
        version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        if version != self._data_version:  # another connection wrote: nothing cached holds
            self._states.clear()
            self._data_version = version
            self._generation += 1
        return self._generation

    @guarded("counting rows")
    def count(self, table: str = "events") -> int:
        return int(self._conn.execute(f"SELECT count(*) FROM [{table}]").fetchone()[0])

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
    def _write(self, doing: str = "writing to the store") -> Iterator[None]:
        """A write transaction; whatever it changes, cached user state is stale after it.
        SQLite's failures leave it as typed errors (``StoreFull``, ``StoreCorrupt``, ...)."""
        try:
            with store_errors(self._conn, path=self.path, doing=doing), _immediate(self._conn):
                yield
        finally:
            self._states.clear()
            self._generation += 1

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
