"""Datasets for the simulator: who interacted with what, and the public catalog around it.

Data flow position: an adapter (:func:`load_lastfm` for HetRec 2011 Last.fm, in
:mod:`._lastfm`, or :func:`load_interactions_csv` for any dataset, in :mod:`._csv`) reads files
into a frozen :class:`Dataset` (:mod:`._data`); ``split_holdout`` in :mod:`._evaluate` then
holds out part of every user's items, and only after that does :func:`build_item_vectors`
derive the catalog's item vectors, from public catalog data with every held-out (user, item)
pair left out, so no vector knows what evaluation will ask. The rest of the simulator imports
every dataset name from here.

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

    SimulationError
    └── DatasetError    a dataset file that is missing or does not fit its format; names the
                        file, the line and the field (codes: dataset_missing, dataset_invalid,
                        dataset_too_small)
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Collection, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from sottovoce.device import ITEM_DIM
from sottovoce.sim._csv import load_interactions_csv
from sottovoce.sim._data import (
    EVENT_TYPES,
    MAX_ID_LENGTH,
    POSITIVE_TYPES,
    BadRow,
    Dataset,
    DatasetError,
    Interaction,
    SkippedRows,
    TagAssignment,
    Vector,
    id_key,
    positive_items,
    sample_users,
)
from sottovoce.sim._lastfm import load_lastfm

__all__ = [
    "CATALOG_NOTE",
    "COOCCURRENCE_NOTE",
    "EVENT_TYPES",
    "MAX_ID_LENGTH",
    "POSITIVE_TYPES",
    "BadRow",
    "Dataset",
    "DatasetError",
    "Interaction",
    "SkippedRows",
    "TagAssignment",
    "Vector",
    "build_item_vectors",
    "cooccurrence_vectors",
    "device_content",
    "id_key",
    "item_vector_source",
    "load_interactions_csv",
    "load_lastfm",
    "positive_items",
    "sample_users",
    "tag_vectors",
]


# --- Item vectors ------------------------------------------------------------------------


COOCCURRENCE_NOTE = (
    "not the device alone: this dataset has no item features or public tags, so every item's "
    "vector comes from the co-occurrence of all users' training interactions (central data a "
    "device would not have); read it as an upper bound on what a device does with content"
)
# The same for the whole run: the devices' catalog (the session reranker's item features) is
# built from those vectors too.
CATALOG_NOTE = (
    "item vectors from the co-occurrence of all users' training interactions (this dataset has "
    "no item features or public tags): central data a device would not have. The local_only "
    "row and the session reranker's rows (its item features) rest on them; the collaborative "
    "rows (federated, federated_dp) do not"
)


def item_vector_source(dataset: Dataset) -> str:
    """Where :func:`build_item_vectors` takes the dataset's item vectors from: ``features``
    (shipped with the data), ``tags`` (Last.fm's public tag profiles) or ``cooccurrence``
    (every user's training interactions, pooled: central data, which a device would not have;
    the ``local_only`` row is then not the device alone)."""
    if dataset.item_vectors:
        return "features"
    return "tags" if dataset.tags else "cooccurrence"


def device_content(
    dataset: Dataset, vectors: Mapping[str, Vector]
) -> npt.NDArray[np.float64] | None:
    """``vectors`` in the catalog's order as a device may blend them with the collaborative
    model (:class:`sottovoce.device._blend.Blend`): only public content (``features`` or
    ``tags``, :func:`item_vector_source`); None for vectors from co-occurrence, which are
    central data a device would not have."""
    if item_vector_source(dataset) == "cooccurrence":
        return None
    return np.stack([vectors[i] for i in dataset.items])


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
