"""The device's local catalog: public track metadata and feature vectors (no user data),
kept in the ``catalog`` table and cached in memory as ranking reads it (:class:`CatalogCache`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from pydantic import ValidationError

from sottovoce.device._derive import Vector
from sottovoce.device._errors import CatalogError
from sottovoce.device._features import ITEM_DIM, fit_rows
from sottovoce.device._rows import _chunks
from sottovoce.device._sqlite import guarded
from sottovoce.device._store_file import StoreFile
from sottovoce.device._store_values import CatalogItem

__all__ = ["WHOLE_CATALOG", "Catalog", "CatalogCache"]

WHOLE_CATALOG = 20_000  # a catalog up to this size is cached whole on first use


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
        self.vectors: dict[str, Vector] = {}  # track -> vector, as in entries
        self.rows: dict[str, int] = {}  # track -> row of fitted and artist_of_row
        self.fitted = np.zeros((0, ITEM_DIM), dtype=np.float32)
        self.artist_of_row = np.zeros(0, dtype=np.int64)  # artist code, -1 when none
        self.complete = False  # every catalog track is loaded

    def code(self, artist: str) -> int:
        return self.artist_codes.setdefault(artist, len(self.artist_codes))

    def add(self, rows: Iterable[tuple[str, str | None, bytes]]) -> None:
        """Add catalog rows (track id, artist id, float32 vector bytes) not loaded yet.

        The vectors are read as one array; the cache hands out its rows as read-only views."""
        columns = list(zip(*rows, strict=True))
        if not columns:
            return
        tracks, artists, blobs = columns
        widths = set(map(len, blobs))
        if len(widths) != 1:  # upsert keeps one dimension: only a file changed outside it
            raise CatalogError(f"catalog vectors of several sizes: {sorted(widths)} bytes")
        matrix = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), -1)
        whole = matrix.astype(np.float64)
        whole.flags.writeable = False  # its rows are handed out: read them only
        vectors: list[Vector] = list(whole)
        self.entries.update(zip(tracks, zip(artists, vectors, strict=True), strict=True))
        self.vectors.update(zip(tracks, vectors, strict=True))
        start = len(self.rows)
        self.rows.update(zip(tracks, range(start, start + len(tracks)), strict=True))
        fitted = fit_rows(whole).astype(np.float32)
        codes = [-1 if a is None else self.code(a) for a in artists]
        self.fitted = np.concatenate([self.fitted, fitted])
        self.artist_of_row = np.concatenate([self.artist_of_row, codes])


class Catalog:
    """The ``catalog`` table, read through :attr:`cache`."""

    def __init__(self, file: StoreFile) -> None:
        self._file = file
        self.cache = CatalogCache()

    def upsert(self, items: Iterable[CatalogItem | Mapping[str, Any]]) -> int:
        """Add or replace public catalog items; every vector must have the same dimension."""
        try:
            parsed = [CatalogItem.model_validate(item) for item in items]
        except ValidationError as error:
            raise CatalogError(f"invalid catalog item: {error}") from None
        if not parsed:
            return 0
        with self._file.write():
            dim = self._file.meta_or_none("catalog_dim")
            dims = {len(item.vector) for item in parsed} | ({int(dim)} if dim else set())
            if len(dims) != 1:
                raise CatalogError(
                    f"catalog vectors must all have one dimension; got {sorted(dims)}"
                )
            self._file.db.table("catalog").upsert_all(
                (
                    {"track_id": i.track_id, "artist_id": i.artist_id, "title": i.title,
                     "vector": np.asarray(i.vector, dtype=np.float32).tobytes()}
                    for i in parsed
                ),
                pk="track_id",
            )  # fmt: skip
            self._file.conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('catalog_dim', ?)",
                (str(dims.pop()),),
            )
        self.cache.clear()
        return len(parsed)

    @guarded("reading the catalog")
    def whole(self) -> Mapping[str, tuple[str | None, Vector]]:
        """The whole local catalog, track id -> (artist, vector), in track id order, from the
        in-memory cache."""
        items = self.cache
        if not items.complete:
            items.clear()  # loaded again as a whole, so that rows follow track id order
            items.add(self._file.conn.execute(
                "SELECT track_id, artist_id, vector FROM catalog ORDER BY track_id"))  # fmt: skip
            items.complete = True
        return items.entries

    def load(self, track_ids: Iterable[str]) -> None:
        """Bring ``track_ids`` into the cache (those in the catalog and not loaded yet)."""
        items = self.cache
        wanted = sorted(set(track_ids).difference(items.entries))  # sorted: a stable order
        first_use = not items.entries and not items.complete
        if wanted and first_use and self._size() <= WHOLE_CATALOG:
            self.whole()  # one scan now instead of a query for every batch of new tracks
            return
        for chunk in _chunks(wanted, 500):
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT track_id, artist_id, vector FROM catalog WHERE track_id IN ({marks})"
            items.add(self._file.conn.execute(sql, chunk))

    def vectors(self, track_ids: Iterable[str | None]) -> Mapping[str, Vector]:
        """Track id -> catalog vector, for every one of ``track_ids`` that has one (and maybe
        other tracks: what is cached, handed out without a copy, so read it only)."""
        self.load(set(filter(None, track_ids)))  # ids are never empty: only None is dropped
        return self.cache.vectors

    def _size(self) -> int:
        return int(self._file.conn.execute("SELECT count(*) FROM catalog").fetchone()[0])
