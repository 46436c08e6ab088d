"""Datasets for the simulator: who interacted with what, and the public catalog around it.

Data flow position: an adapter (:func:`load_lastfm` for HetRec 2011 Last.fm, or
:func:`load_interactions_csv` for any dataset) reads files into a frozen :class:`Dataset`;
``split_holdout`` in :mod:`._evaluate` then holds out part of every user's items, and only after
that does :func:`build_item_vectors` derive the catalog's item vectors, from public catalog data
with every held-out (user, item) pair left out, so no vector knows what evaluation will ask.

Where item vectors come from (``ITEM_DIM`` floats, unit length, or all zero):

- item features shipped with the data (an item-features CSV): used as given; the device reads
  the first ``ITEM_DIM`` of wider ones;
- Last.fm: the artists' tag profiles (``user_taggedartists.dat``, tags applied by the public's
  users), TF-IDF weighted and reduced by a truncated SVD (:func:`tag_vectors`);
- a CSV without features: co-occurrence of *training* interactions only, a truncated SVD of
  the item-user matrix (:func:`cooccurrence_vectors`).

An item with no data left (no tag, no training interaction) gets the zero vector: the device
treats it as it treats a track missing from its catalog, rather than as a made-up direction.

Errors::

    SottovoceError
    └── DatasetError    a dataset file that is missing or does not fit its format; names the
                        file, the line and the field (codes: dataset_missing, dataset_invalid,
                        dataset_too_small)
"""

from __future__ import annotations

import csv
import io
import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from sottovoce._errors import SottovoceError
from sottovoce.device import ITEM_DIM

Vector = npt.NDArray[np.float64]

EVENT_TYPES = ("play", "complete", "skip", "like", "dislike")
"""What one interaction row says: listened (``value`` times), listened to the end, skipped
early, liked, disliked."""

POSITIVE_TYPES = frozenset({"play", "complete", "like"})
"""Interactions that say the user wants the item: the only items a holdout may hold out."""

MAX_ID_LENGTH = 100  # room left in the device's 128-character event ids for a counter
_ID = re.compile(r"^\S{1,100}$")
_FILES = ("user_artists.dat", "user_taggedartists.dat", "artists.dat")


class DatasetError(SottovoceError):
    """A dataset file that is missing or does not fit its format.

    ``path``, ``line`` (1-based, the header is line 1) and ``field`` say where, when known.
    """

    code = "dataset_invalid"

    def __init__(
        self,
        message: str,
        *,
        path: Path | None = None,
        line: int | None = None,
        field: str | None = None,
        code: str | None = None,
    ) -> None:
        self.path, self.line, self.field = path, line, field
        where = [str(path)] if path is not None else []
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message, code=code)


class Interaction(NamedTuple):
    """One thing a user did with an item. ``timestamp`` is epoch ms, None when unknown."""

    item: str
    timestamp: int | None
    event_type: str  # one of EVENT_TYPES
    value: float = 1.0  # how many times, for "play" (a play count); 1 otherwise


class TagAssignment(NamedTuple):
    """A public user's tag on an item (Last.fm's tag assignments)."""

    user: str
    item: str
    tag: str


@dataclass(frozen=True, eq=False)
class Dataset:
    """Users, items, every user's interactions and the public catalog metadata around them.

    ``item_vectors`` holds the vectors that came *with* the data (an item-features file) and
    is empty when they are to be derived after the split with :func:`build_item_vectors`.
    ``tags`` are the public tag assignments that Last.fm vectors are derived from.
    """

    name: str
    users: tuple[str, ...]
    items: tuple[str, ...]
    interactions: Mapping[str, tuple[Interaction, ...]]
    artists: Mapping[str, str | None]
    item_vectors: Mapping[str, Vector] = field(default_factory=lambda: MappingProxyType({}))
    tags: tuple[TagAssignment, ...] = ()
    titles: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def build(
        cls,
        name: str,
        interactions: Mapping[str, Sequence[Interaction]],
        *,
        catalog: Collection[str] = (),
        artists: Mapping[str, str | None] | None = None,
        item_vectors: Mapping[str, Vector] | None = None,
        tags: Sequence[TagAssignment] = (),
        titles: Mapping[str, str] | None = None,
    ) -> Dataset:
        """A dataset whose items are those interacted with plus ``catalog`` (sorted ids)."""
        items = {i.item for rows in interactions.values() for i in rows} | set(catalog)
        ordered = tuple(sorted(items, key=id_key))
        artist_of = artists or {}
        vectors = {k: np.asarray(v, dtype=np.float64) for k, v in (item_vectors or {}).items()}
        return cls(
            name=name,
            users=tuple(sorted(interactions, key=id_key)),
            items=ordered,
            interactions=MappingProxyType({u: tuple(r) for u, r in interactions.items()}),
            artists=MappingProxyType({i: artist_of.get(i) for i in ordered}),
            item_vectors=MappingProxyType(vectors),
            tags=tuple(t for t in tags if t.item in items),
            titles=MappingProxyType({i: t for i, t in (titles or {}).items() if i in items}),
        )

    def touched(self, user: str) -> frozenset[str]:
        """Every item the user interacted with in any way."""
        return frozenset(i.item for i in self.interactions.get(user, ()))

    def positives(self, user: str) -> frozenset[str]:
        """Items the user listened to or liked."""
        return positive_items(self.interactions.get(user, ()))

    @property
    def size(self) -> int:
        """The number of interaction rows."""
        return sum(len(rows) for rows in self.interactions.values())

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, users={len(self.users)}, items={len(self.items)}, "
            f"interactions={self.size}, tags={len(self.tags)})"
        )


def positive_items(interactions: Sequence[Interaction]) -> frozenset[str]:
    return frozenset(i.item for i in interactions if i.event_type in POSITIVE_TYPES)


def id_key(value: str) -> tuple[int, int, str]:
    """Sort key putting numeric ids in numeric order ("2" before "10"), then the others."""
    return (0, int(value), "") if value.isdigit() else (1, 0, value)


# --- Last.fm (HetRec 2011) -----------------------------------------------------------------


def load_lastfm(
    path: Path | str,
    *,
    users: int | None = None,
    seed: int = 0,
    min_artists: int = 10,
) -> Dataset:
    """HetRec 2011 Last.fm 2K: users' play counts per artist (an item is an artist).

    Every (user, artist, weight) row becomes one ``play`` interaction with ``value`` = the play
    count and no timestamp. ``users`` keeps a deterministic random sample (by ``seed``) of that
    many users among those with at least ``min_artists`` artists (:func:`sample_users`); the
    items are the artists those users listened to. Tag assignments on those artists are kept
    from *all* users: they are the public catalog's description of the artists, not the
    sampled users' behaviour.
    """
    root = Path(path)
    if not root.is_dir():
        raise DatasetError("no such Last.fm directory", path=root, code="dataset_missing")
    for name in _FILES:
        if not (root / name).is_file():
            raise DatasetError(
                f"missing {name}: is this the HetRec 2011 Last.fm 2K folder?",
                path=root,
                code="dataset_missing",
            )
    per_user: dict[str, list[Interaction]] = defaultdict(list)
    plays = root / "user_artists.dat"
    for line, (user, artist, weight) in _rows(plays, ("userID", "artistID", "weight")):
        count = _number(weight, path=plays, line=line, name="weight")
        if count <= 0:
            raise DatasetError("a play count must be > 0", path=plays, line=line, field="weight")
        per_user[user].append(Interaction(artist, None, "play", count))
    tagging = ("userID", "artistID", "tagID", "day", "month", "year")
    tags = [TagAssignment(*row[:3]) for _, row in _rows(root / "user_taggedartists.dat", tagging)]
    names = ("id", "name", "url", "pictureURL")
    titles = {row[0]: row[1] for _, row in _rows(root / "artists.dat", names, ids=1)}
    listened = {i.item for rows in per_user.values() for i in rows}
    full = Dataset.build(
        "lastfm-hetrec2011-2k",
        per_user,
        artists={a: a for a in listened},  # an item is an artist
        tags=tags,
        titles={a: t for a, t in titles.items() if a in listened},
    )
    if users is None:
        return full
    return sample_users(full, users, seed=seed, min_interactions=min_artists)


def sample_users(
    dataset: Dataset, users: int, *, seed: int = 0, min_interactions: int = 10
) -> Dataset:
    """A deterministic random sample of ``users`` users among those with at least
    ``min_interactions`` interactions. Items are what they touched plus the items that came
    with features; tags and titles of those items stay."""
    eligible = [u for u in dataset.users if len(dataset.interactions[u]) >= min_interactions]
    if not 1 <= users <= len(eligible):
        raise DatasetError(
            f"asked for {users} users; {len(eligible)} users have at least "
            f"{min_interactions} interactions",
            code="dataset_too_small",
        )
    chosen = random.Random(seed).sample(eligible, users)
    return Dataset.build(
        f"{dataset.name}[{users} users, seed {seed}]",
        {u: dataset.interactions[u] for u in chosen},
        catalog=dataset.item_vectors,
        artists=dataset.artists,
        item_vectors=dataset.item_vectors,
        tags=dataset.tags,
        titles=dataset.titles,
    )


def _rows(path: Path, columns: Sequence[str], *, ids: int = 2) -> list[tuple[int, list[str]]]:
    """(line number, fields) of a tab-separated file with the given header; the first ``ids``
    fields are checked as ids."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # some HetRec files are Latin-1
    lines = text.splitlines()
    if not lines or lines[0].split("\t")[: len(columns)] != list(columns):
        header = "<tab>".join(columns)
        raise DatasetError(f"expected the tab-separated header {header}", path=path, line=1)
    # One match per line covers the common case; a line that fails is then diagnosed.
    good = re.compile("\t".join([rf"[^\s]{{1,{MAX_ID_LENGTH}}}"] * ids) + r"(\t|$)").match
    rows = []
    for number, content in enumerate(lines[1:], start=2):
        if not content.strip():
            continue
        fields = content.split("\t")
        if len(fields) < len(columns) or not good(content):
            if len(fields) < len(columns):
                raise DatasetError(
                    f"expected {len(columns)} tab-separated fields, got {len(fields)}",
                    path=path,
                    line=number,
                )
            for name, value in zip(columns[:ids], fields[:ids], strict=True):
                _check_id(value, path=path, line=number, name=name)
        rows.append((number, fields))
    return rows


# --- A generic interactions CSV ---------------------------------------------------------


def load_interactions_csv(
    path: Path | str, *, item_features: Path | str | None = None, name: str | None = None
) -> Dataset:
    """Any dataset as CSV: ``user_id,item_id,timestamp,event_type`` or
    ``user_id,item_id,timestamp,value`` (UTF-8, with that header).

    - ids: 1 to 100 characters, no whitespace;
    - ``timestamp``: empty when unknown, ISO 8601 (naive ones are read as UTC), or Unix time as
      a number: seconds, or milliseconds when it has 13 or more digits;
    - ``event_type``: one of ``play``, ``complete``, ``skip``, ``like``, ``dislike``;
    - ``value``: a positive weight such as a play count (each row is then a ``play``).

    ``item_features`` is an optional CSV ``item_id[,artist_id],f1,f2,...``: one row per item,
    numeric features, used as the item vectors; its items join the catalog even if nobody
    interacted with them. Without it, vectors are derived from training interactions
    (:func:`build_item_vectors`) and items have no artist. Any bad row raises
    :class:`DatasetError` naming the file, line and field.
    """
    path = Path(path)
    per_user: dict[str, list[Interaction]] = defaultdict(list)
    header, rows = _read_csv(path)
    kind = "event_type" if "event_type" in header else "value"
    _check_header(path, header, ["user_id", "item_id", "timestamp", kind])
    for line, row in rows:
        user = _check_id(row[0], path=path, line=line, name="user_id")
        item = _check_id(row[1], path=path, line=line, name="item_id")
        ts = _timestamp(row[2], path=path, line=line)
        if kind == "event_type":
            if row[3] not in EVENT_TYPES:
                raise DatasetError(
                    f"{row[3]!r} is not one of {', '.join(EVENT_TYPES)}",
                    path=path,
                    line=line,
                    field="event_type",
                )
            per_user[user].append(Interaction(item, ts, row[3]))
        else:
            value = _number(row[3], path=path, line=line, name="value")
            if value <= 0:
                raise DatasetError(
                    "a value must be a positive weight", path=path, line=line, field="value"
                )
            per_user[user].append(Interaction(item, ts, "play", value))
    if not per_user:
        raise DatasetError("no interaction rows", path=path)
    vectors: dict[str, Vector] = {}
    artists: dict[str, str | None] = {}
    if item_features is not None:
        vectors, artists = _load_features(Path(item_features))
    return Dataset.build(
        name or path.stem, per_user, catalog=vectors, artists=artists, item_vectors=vectors
    )


def _load_features(path: Path) -> tuple[dict[str, Vector], dict[str, str | None]]:
    vectors: dict[str, Vector] = {}
    artists: dict[str, str | None] = {}
    header, rows = _read_csv(path)
    if not header or header[0] != "item_id":
        raise DatasetError("the header must start with item_id", path=path, line=1)
    first = 2 if len(header) > 1 and header[1] == "artist_id" else 1
    names = header[first:]
    if not names:
        raise DatasetError("no feature columns after item_id", path=path, line=1)
    for line, row in rows:
        item = _check_id(row[0], path=path, line=line, name="item_id")
        if item in vectors:
            raise DatasetError(
                f"item {item!r} appears twice", path=path, line=line, field="item_id"
            )
        if first == 2:
            artists[item] = (
                _check_id(row[1], path=path, line=line, name="artist_id") if row[1] else None
            )
        vectors[item] = np.array(
            [
                _number(v, path=path, line=line, name=n)
                for n, v in zip(names, row[first:], strict=True)
            ]
        )
    if not vectors:
        raise DatasetError("no item rows", path=path)
    return vectors, artists


def _read_csv(path: Path) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """The header and (line number, fields) rows of a UTF-8 CSV file; every row must have the
    header's width, blank lines are skipped."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DatasetError(
            f"cannot read: {error.strerror}", path=path, code="dataset_missing"
        ) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DatasetError(f"not UTF-8 text ({error.reason})", path=path, line=line) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader, [])]
    except csv.Error as error:
        raise DatasetError(f"unreadable CSV header: {error}", path=path, line=1) from None
    if not header:
        raise DatasetError("empty file (a header is required)", path=path, line=1)
    return header, _numbered(path, reader, len(header))


def _numbered(path: Path, reader: Any, width: int) -> Iterator[tuple[int, list[str]]]:
    try:
        for row in reader:
            if not row:
                continue
            if len(row) != width:
                raise DatasetError(
                    f"expected {width} fields, got {len(row)}", path=path, line=reader.line_num
                )
            yield reader.line_num, [v.strip() for v in row]
    except csv.Error as error:
        raise DatasetError(f"unreadable CSV: {error}", path=path, line=reader.line_num) from None


def _check_header(path: Path, header: list[str], expected: list[str]) -> None:
    if header != expected:
        other = [
            "user_id",
            "item_id",
            "timestamp",
            "value" if expected[3] != "value" else "event_type",
        ]
        raise DatasetError(
            f"the header must be {','.join(expected)} or {','.join(other)}, not {','.join(header)}",
            path=path,
            line=1,
        )


def _check_id(value: str, *, path: Path, line: int, name: str) -> str:
    if not _ID.match(value):
        raise DatasetError(
            f"an id must be 1 to {MAX_ID_LENGTH} characters without whitespace, not {value!r}",
            path=path,
            line=line,
            field=name,
        )
    return value


def _number(value: str, *, path: Path, line: int, name: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise DatasetError(f"not a number: {value!r}", path=path, line=line, field=name) from None
    if not math.isfinite(number):
        raise DatasetError(f"not a finite number: {value!r}", path=path, line=line, field=name)
    return number


def _timestamp(value: str, *, path: Path, line: int) -> int | None:
    if not value:
        return None
    try:
        if re.fullmatch(r"\d+(\.\d*)?", value):
            digits = len(value.split(".", maxsplit=1)[0])
            return int(float(value) * (1 if digits >= 13 else 1000))
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, OverflowError):
        raise DatasetError(
            f"not a timestamp (ISO 8601 or Unix time): {value!r}",
            path=path,
            line=line,
            field="timestamp",
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


# --- Item vectors ------------------------------------------------------------------------


def build_item_vectors(
    dataset: Dataset,
    *,
    train: Mapping[str, Sequence[Interaction]],
    dim: int = ITEM_DIM,
    seed: int = 0,
) -> dict[str, Vector]:
    """One vector per item of the dataset, using nothing a holdout hides.

    ``train`` is every user's training interactions (``Split.train``); a (user, item) pair of
    the dataset that is not in it is held out. Features shipped with the data are returned as
    given; Last.fm tag vectors leave out every tag a user applied to an item held out for
    that user; otherwise vectors come from training interactions alone. Items with nothing to
    go on get zeros.
    """
    if dataset.item_vectors:
        width = len(next(iter(dataset.item_vectors.values())))
        zero = np.zeros(width)
        return {i: dataset.item_vectors.get(i, zero).copy() for i in dataset.items}
    if dataset.tags:
        held = {
            (u, item)
            for u in dataset.users
            for item in dataset.touched(u) - {i.item for i in train.get(u, ())}
        }
        return tag_vectors(
            dataset.tags, items=dataset.items, exclude_pairs=held, dim=dim, seed=seed
        )
    return cooccurrence_vectors(train, items=dataset.items, dim=dim, seed=seed)


def tag_vectors(
    tags: Sequence[TagAssignment],
    *,
    items: Sequence[str],
    exclude_pairs: Collection[tuple[str, str]] = frozenset(),
    dim: int = ITEM_DIM,
    seed: int = 0,
) -> dict[str, Vector]:
    """Items' tag profiles as unit vectors: TF-IDF (tf = 1 + log of how many users applied the
    tag, idf = log(tagged items / items with the tag)), rows normalized, truncated SVD to
    ``dim``. Tag rows whose (user, item) is in ``exclude_pairs`` are ignored."""
    index = {item: n for n, item in enumerate(items)}
    counts = Counter(
        (t.item, t.tag) for t in tags if t.item in index and (t.user, t.item) not in exclude_pairs
    )
    if not counts:
        return {item: np.zeros(dim) for item in items}
    tag_index: dict[str, int] = {}
    pairs = sorted(counts.items())  # the SVD must not depend on row order
    rows = np.array([index[i] for (i, _), _ in pairs])
    cols = np.array([tag_index.setdefault(t, len(tag_index)) for (_, t), _ in pairs])
    df = np.bincount(cols, minlength=len(tag_index))
    documents = len(set(rows.tolist()))
    values = (1 + np.log([c for _, c in pairs])) * np.log(documents / df[cols])
    return _embed(rows, cols, values, items=items, width=len(tag_index), dim=dim, seed=seed)


def cooccurrence_vectors(
    train: Mapping[str, Sequence[Interaction]],
    *,
    items: Sequence[str],
    dim: int = ITEM_DIM,
    seed: int = 0,
) -> dict[str, Vector]:
    """Items as unit vectors from who listened to them in ``train``: the item-user matrix of
    positive interactions (log(1 + total value) per pair), rows normalized, truncated SVD."""
    index = {item: n for n, item in enumerate(items)}
    totals: dict[tuple[int, int], float] = defaultdict(float)
    for u, user in enumerate(sorted(train, key=id_key)):
        for i in train[user]:
            if i.event_type in POSITIVE_TYPES and i.item in index:
                totals[index[i.item], u] += i.value
    if not totals:
        return {item: np.zeros(dim) for item in items}
    keys = sorted(totals)
    rows, cols = np.array(keys).T
    values = np.log1p([totals[k] for k in keys])
    return _embed(rows, cols, values, items=items, width=len(train), dim=dim, seed=seed)


def _embed(
    rows: npt.NDArray[np.int64],
    cols: npt.NDArray[np.int64],
    values: npt.NDArray[np.float64],
    *,
    items: Sequence[str],
    width: int,
    dim: int,
    seed: int,
) -> dict[str, Vector]:
    """Unit-length ``dim``-wide embeddings (U·S) of the rows of a sparse matrix given as
    coordinates; all-zero rows stay zero."""
    height = len(items)
    if not np.any(values):  # e.g. one tag on every tagged item: nothing tells items apart
        return {item: np.zeros(dim) for item in items}
    norms = np.sqrt(np.bincount(rows, weights=values**2, minlength=height))
    values = values / np.where(norms > 0, norms, 1.0)[rows]
    u, s = _truncated_svd(rows, cols, values, shape=(height, width), k=dim, seed=seed)
    out = np.zeros((height, dim))
    out[:, : s.shape[0]] = u * s
    lengths = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, lengths, out=out, where=lengths > 1e-12)
    out[lengths[:, 0] <= 1e-12] = 0.0
    return {item: out[n] for n, item in enumerate(items)}


_OVERSAMPLE, _POWER_ITERATIONS = 24, 4


def _truncated_svd(
    rows: npt.NDArray[np.int64],
    cols: npt.NDArray[np.int64],
    values: npt.NDArray[np.float64],
    *,
    shape: tuple[int, int],
    k: int,
    seed: int,
) -> tuple[Vector, Vector]:
    """The top ``k`` left singular vectors and values of a sparse matrix given as coordinates:
    exact when a side is short, else a randomized SVD with power iterations (Halko et al.
    2011). Signs are fixed so the largest entry of each singular vector is positive.

    Tall matrices are only ever multiplied, never factorized: LAPACK's QR and SVD of a tall
    matrix run threaded and slow down a hundredfold on a busy machine, while the small
    Gram matrices here decompose in microseconds.
    """
    m, n = shape
    k = min(k, m, n)

    def times(x: Vector) -> Vector:  # A @ x, one bincount per column
        return np.column_stack(
            [np.bincount(rows, values * x[cols, j], minlength=m) for j in range(x.shape[1])]
        )

    def times_t(x: Vector) -> Vector:  # A.T @ x
        return np.column_stack(
            [np.bincount(cols, values * x[rows, j], minlength=n) for j in range(x.shape[1])]
        )

    if min(m, n) <= k + _OVERSAMPLE:  # exact, from the Gram matrix of the short side
        basis = np.eye(m) if m <= n else times(np.eye(n))
        if m > n:
            basis = _orthonormal(basis)
    else:
        rng = np.random.default_rng(seed)
        basis = _orthonormal(times(rng.standard_normal((n, k + _OVERSAMPLE))))
        for _ in range(_POWER_ITERATIONS):
            basis = _orthonormal(times(_orthonormal(times_t(basis))))
    # A ~ Q Q^T A: the left singular vectors of A are Q times those of B = Q^T A, which come
    # from the small B B^T.
    small = times_t(basis)
    eigenvalues, vectors = np.linalg.eigh(small.T @ small)
    order = np.argsort(eigenvalues)[::-1][:k]
    u = basis @ vectors[:, order]
    s = np.sqrt(np.clip(eigenvalues[order], 0.0, None))
    signs = np.sign(u[np.abs(u).argmax(axis=0), np.arange(u.shape[1])])
    return u * np.where(signs == 0, 1.0, signs), s


def _orthonormal(y: Vector) -> Vector:
    """An orthonormal basis of the columns of ``y`` (Cholesky-QR done twice, through the
    eigen-decomposition of the small Gram matrix; directions with no weight are dropped)."""
    for _ in range(2):
        eigenvalues, vectors = np.linalg.eigh(y.T @ y)
        keep = eigenvalues > max(float(eigenvalues.max()), 0.0) * 1e-12
        if not keep.any():
            return np.zeros((y.shape[0], 0))
        y = y @ (vectors[:, keep] / np.sqrt(eigenvalues[keep]))
    return y
