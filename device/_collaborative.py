"""What listeners share, learned without their histories leaving the device: federated matrix
factorisation over a DP-selected item table.

The region's collaborative model is a sequence of released statistics, each one round's noised
mean of the devices' uploads (the aggregator's ``statistic`` releases). Every upload is one
vector in the layout :class:`Layout` fixes for the catalog:

    [ counts (one per catalog item) | B (table x rank) ]

- the **count round** (the first): a device uploads ``C * c / |c|``, its own items' indicator
  ``c`` scaled to the clipping norm; the release is a DP count of how many devices have each
  item. It gives the popularity prior and picks the **item table**: the ``table`` items with
  the highest counts, among those whose count clears four noise deviations (an item few devices
  have is left out rather than learned from noise);
- every **factor round** after it (alternating least squares): the device solves its own user
  vector ``u`` in closed form against the current item table ``V`` (it never leaves the device)
  and uploads ``B = c u'`` (``c``: its row over the table's items, each weighed by how much
  the user listened to it, :func:`listening_weights`, and by its count, :attr:`item_weights`),
  scaled to the clipping norm. The first factor round starts from a public random table
  (seeded by the layout). From the release anyone solves the next table,
  ``V = B (G + lambda_v I)^-1``, where ``G``, the sum of the devices' ``u u'``, is not
  uploaded: every device solved ``u = A V' c`` with the same public
  ``A = (V'V + lambda_u I)^-1``, so ``V' B = (V'V + lambda_u I) G`` and ``G = A V' B`` follows
  from the release (each device's scaling included). The whole clipping norm goes to ``B``.

Scoring reads every factor round's release at once. Each is ``S W + noise`` for the table's
item co-occurrence ``S`` (the sum of the devices' scaled ``c c'``) and that round's public
``W = V A``: together they are a block Krylov sketch of ``S`` (Musco and Musco, NeurIPS 2015).
The count round's release, read over the table's items, is one more column of it: the mean of
the same devices' count uploads (each device's items, unweighted), released with noise of the
same kind, and the direction most listeners share, measured with the whole clipping norm in one
column. Reading it costs no privacy: the count round is released anyway.
The device scores by the sketch's left singular vectors ``U`` above the noise's spectral edge
``e = sigma (sqrt(k) + sqrt(p))``, as ``U diag(f) U' c``: a denoised, regularised projection of
the user's row onto what listeners share. Each direction's weight ``f`` is the smaller of how
far its singular value ``s`` stands above the edge (``1 - e^2 / s^2``, a Wiener-style
shrinkage) and a ridge's ``s^2 / (s^2 + lambda)`` (``lambda = 0.1 |sketch|^2 / rank``, the
squared Frobenius norm: the same relative ridge as the factor rounds'). Under DP the edge
decides; without noise (``e = 0``) the ridge keeps the sketch's weak directions from fitting
what few users share.

Every region's aggregator releases its own devices' statistics; a device derives its model from
the same round's releases of **every** region, pooled (:func:`pool`: each region's mean weighed
by the inverse of its noise's variance), so that a region learns from the whole population while
its devices upload to it alone. A region's release is a DP statistic of that region's devices
only; to a device of another region it is public data (its privacy accounting is unchanged).

The population's row (the table's DP counts, each weighed as a user's item is) is projected the
same way and added to each user's projected row as one more of their items would be: with the
length of the user's projection over ``sqrt(n + 1)`` for ``n`` of their items in the table. A
user with many items keeps their own taste; one with a few, or on data where co-listening says
little beyond popularity, leans on what everyone listens to.

Scoring on the device: the projection above for table items, and every other item after them by
its DP count (a device blends it with the catalog's item vectors: :mod:`._blend`). The ridge
terms are set from the data and the published noise, never tuned per dataset: the user's
``lambda_u = 0.1 trace(V'V) / rank`` and the table's ``lambda_v`` = the larger of
``0.1 trace(G) / rank`` and twice the spectral norm the noise on ``G`` can reach.

What a release reveals (see docs/privacy.md): DP counts of items and DP sums of user-vector
statistics per table item, under the region's mechanism; no user vector and no history.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import numpy.typing as npt

from sottovoce.device._errors import DeviceError

__all__ = [
    "CollaborativeModel",
    "Layout",
    "Statistic",
    "collaborative_upload",
    "devices_gram",
    "listening_weights",
    "pool",
]

Array = npt.NDArray[np.float64]
Listening = Mapping[str, float] | Iterable[str]
"""A user's items: how much they listened to each (a count of plays), or just the items (each
counted once)."""
RIDGE = 0.1  # every ridge term (:func:`_ridge`), relative to the scale of what it regularises
TABLE = 2_000  # at most this many items in the table (the DP count may admit fewer)
RANK, PRIVATE_RANK = 32, 16  # under DP noise a lower rank keeps more signal per number
ITEM_EXPONENT = 0.25
NOISE_DEVIATIONS = 4.0  # a table item's count must clear this many noise deviations


@dataclass(frozen=True)
class Layout:
    """The public shape of a region's collaborative model: the catalog (its order), the item
    table's size and rank, and the seed of the first factor round's table."""

    catalog: tuple[str, ...]
    table: int = TABLE
    rank: int = RANK
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.catalog:
            raise DeviceError("a collaborative layout needs a catalog")
        if len(set(self.catalog)) != len(self.catalog):
            raise DeviceError("the catalog lists an item twice")
        if not 1 <= self.rank <= 256 or self.table < 1:
            raise DeviceError("the rank must be 1 to 256 and the table at least 1 item")

    @property
    def items(self) -> int:
        return len(self.catalog)

    @property
    def table_size(self) -> int:
        return min(self.table, self.items)

    @property
    def dim(self) -> int:
        return self.items + self.table_size * self.rank

    @cached_property
    def model_id(self) -> str:
        """SHA-256 of the layout: what the aggregator's rounds and releases name."""
        digest = hashlib.sha256("\n".join(self.catalog).encode()).hexdigest()
        text = json.dumps({"kind": "sottovoce.collaborative/2", "catalog": digest,
                           "table": self.table_size, "rank": self.rank, "seed": self.seed},
                          sort_keys=True)  # fmt: skip
        return hashlib.sha256(text.encode()).hexdigest()

    @cached_property
    def index(self) -> dict[str, int]:
        return {item: n for n, item in enumerate(self.catalog)}

    def indicator(self, items: Iterable[str]) -> Array:
        """The catalog-order 0/1 vector of ``items`` (items not in the catalog are ignored)."""
        return self.weighted(dict.fromkeys(items, 1.0))

    def weighted(self, weights: Mapping[str, float]) -> Array:
        """The catalog-order vector of each item's weight (items not in the catalog ignored)."""
        out = np.zeros(self.items)
        picked = [(self.index[i], w) for i, w in weights.items() if i in self.index]
        if picked:
            at, values = zip(*picked, strict=True)
            out[list(at)] = values
        return out

    def split(self, vector: Array) -> tuple[Array, Array]:
        """A release or upload's (counts, B)."""
        v = np.asarray(vector, np.float64)
        if v.shape != (self.dim,):
            raise DeviceError(f"expected {self.dim} numbers for this layout, got {v.shape}")
        return v[: self.items], v[self.items :].reshape(self.table_size, self.rank)


@dataclass(frozen=True)
class CollaborativeModel:
    """What a device knows of its region's collaborative model: the DP counts, the item table's
    items (catalog positions), the table's vectors for the next round, and after factor rounds
    their releases side by side (the sketch it scores with)."""

    layout: Layout
    counts: Array  # DP count per catalog item (the popularity prior)
    table: npt.NDArray[np.int64]  # catalog positions of the table's items, by count
    vectors: Array  # table x rank
    fitted: bool = False  # False after the count round: scores by count alone
    sketch: Array | None = None  # table x (rank * factor rounds): every factor release's B
    noise: float = 0.0  # the largest noise deviation on one released number (every round's)

    @classmethod
    def from_counts(cls, layout: Layout, release: Array, *, noise_std: float) -> CollaborativeModel:
        """After the count round: the table and the public random starting vectors.

        ``noise_std`` is the noise's standard deviation on one released count (clipping norm x
        noise multiplier x sensitivity factor / expected cohort: all public)."""
        counts, _ = layout.split(release)
        order = _top(counts, layout.table_size)
        clear = counts[order] > NOISE_DEVIATIONS * noise_std
        table = order[clear] if clear.any() else order[:1]
        rng = np.random.default_rng([layout.seed, 5])
        start = rng.standard_normal((layout.table_size, layout.rank)) / np.sqrt(layout.rank)
        return cls(layout, counts.copy(), table.astype(np.int64), start[: len(table)], False,
                   noise=noise_std)  # fmt: skip

    def refit(self, release: Array, *, noise_std: float) -> CollaborativeModel:
        """After a factor round: the next item table, ``V = B (G + lambda_v I)^-1`` with
        ``G = A V' B`` (see the module docstring), and the release added to the sketch."""
        _, b = self.layout.split(release)
        b = b[: len(self.table)]
        d, v = self.layout.rank, self.vectors
        g = devices_gram(v, b)
        # The noise on G is A V' N for the noise N on B (iid, noise_std): its spectral norm is
        # at most noise_std * 2 sqrt(d) * max s / (s^2 + lambda_u) over V's singular values s.
        s = np.linalg.svd(v, compute_uv=False)
        lambda_u = _ridge(float(np.trace(v.T @ v)), d)
        reach = noise_std * 2.0 * np.sqrt(d) * float(np.max(s / (s**2 + lambda_u)))
        ridge = max(_ridge(max(float(np.trace(g)), 0.0), d), 2.0 * reach)
        vectors = np.linalg.solve(g + ridge * np.eye(d), b.T).T
        sketch = b if self.sketch is None else np.hstack([self.sketch, b])
        return CollaborativeModel(self.layout, self.counts, self.table, vectors, True, sketch,
                                  max(self.noise, noise_std))  # fmt: skip

    @cached_property
    def basis(self) -> Array:
        """The sketch's left singular vectors, with the table's DP counts as its first column,
        each scaled by the square root of its weight: the smaller of ``1 - e^2 / s^2`` (those at
        or below the noise's edge ``e`` dropped) and ``s^2 / (s^2 + lambda)`` (see the module
        docstring). Scores are ``basis basis' c``."""
        if self.sketch is None:
            return np.zeros((len(self.table), 0))
        sketch = np.hstack([self.counts[self.table, None], self.sketch])
        k, p = sketch.shape
        u, s, _ = np.linalg.svd(sketch, full_matrices=False)
        edge = self.noise * (np.sqrt(k) + np.sqrt(p))  # the noise's largest singular value
        keep = s > max(edge, 1e-12 * float(s.max(initial=0.0)))
        ridge = _ridge(float(np.sum(s**2)), self.layout.rank)  # |sketch|_F^2 = sum s^2
        weight = np.minimum(1.0 - (edge / s[keep]) ** 2, s[keep] ** 2 / (s[keep] ** 2 + ridge))
        return np.asarray(u[:, keep] * np.sqrt(weight), np.float64)

    @cached_property
    def population(self) -> Array:
        """The population's row (the table's DP counts, each weighed as a user's item is, by
        :attr:`item_weights`) projected like a user's row, at unit length (zeros if nothing of
        it is above the noise)."""
        basis = self.basis
        m = np.maximum(self.counts[self.table], 0.0) * self.item_weights
        projected = basis @ (basis.T @ m)
        norm = float(np.linalg.norm(projected))
        return projected / norm if norm > 0 else projected

    def projected(self, rows: Array) -> Array:
        """Users' rows (from :meth:`row`; one, or one per line) projected on the sketch's denoised
        directions, each with the population's projected row added as one more of the user's
        items: ``|projection| / sqrt(n + 1)`` of it for ``n`` items (a unit row of ``n`` items
        gives each about ``1 / sqrt(n)`` of its length). A user with many items keeps their own
        taste; one with a few leans on what everyone listens to."""
        basis = self.basis
        inside = (rows @ basis) @ basis.T
        length = np.linalg.norm(inside, axis=-1, keepdims=True)
        n = np.count_nonzero(rows, axis=-1)[..., None]
        return np.asarray(inside + length / np.sqrt(n + 1) * self.population, np.float64)

    @cached_property
    def item_weights(self) -> Array:
        """Each table item's weight in a user's row, count^-1/4: popular items would otherwise
        fill every user's vector (the scaling of EigenRec, Nikolakopoulos et al. 2019; one fixed
        exponent for every dataset)."""
        counts = self.counts[self.table]
        floor = max(float(counts.max()) * 1e-3, 1e-12)
        weights: Array = np.maximum(counts, floor) ** -ITEM_EXPONENT
        return weights / float(weights.max())

    def row(self, items: Listening) -> Array:
        """The user's weighted, unit-length row over the table (zeros if none of its items):
        each item by how much the user listened to it (:func:`listening_weights`) and by its
        count (:attr:`item_weights`)."""
        c = self.layout.weighted(listening_weights(items))[self.table] * self.item_weights
        norm = np.linalg.norm(c)
        return c / norm if norm else c

    def user_vector(self, items: Listening) -> Array:
        """The user's vector against the table, solved on the device (it never leaves it)."""
        return self.solve(self.row(items))

    def solve(self, c: Array) -> Array:
        """The user vector of a row from :meth:`row`."""
        if not np.any(c):
            return np.zeros(self.layout.rank)
        return _user_solve(self.vectors, c)

    def scores(self, items: Listening) -> Array:
        """A score per catalog item for a user with ``items``: table items by the sketch's
        denoised projection of the user's row with the population's added as one more item
        (:meth:`projected`), above every other item, which follow by DP count. With nothing to
        project (no factor round yet, no direction above the noise, or none of the user's items
        in the table), table items too go by DP count."""
        counts = self.counts
        spread = max(float(np.abs(counts).max()), 1e-12)
        out = counts / spread / 2 - 2.0  # in [-2.5, -1.5]: below every table item
        basis = self.basis
        row = self.row(items)
        if basis.shape[1] and row.any():
            inside = self.projected(row)
            out[self.table] = inside - inside.min()  # >= 0
        else:  # every table item would score the same
            out[self.table] = counts[self.table] / spread / 2  # by count alone
        return out


@dataclass(frozen=True)
class Statistic:
    """One region's release of a round: the noised mean of its devices' uploads, the standard
    deviation of the noise on each of its numbers, and the cohort the mean is over (all
    public: the release and its round's spec)."""

    mean: Array
    noise_std: float
    cohort: float


def pool(statistics: Iterable[Statistic]) -> Statistic:
    """The regions' releases of one round as one: their means weighed by the inverse of their
    noise's variance (the least noise any weighting of them reaches), or by their cohorts when
    one of them has no noise (exact sums: the pooled mean over every device)."""
    parts = list(statistics)
    if not parts:
        raise DeviceError("no release to pool")
    if len(parts) == 1:
        return parts[0]
    if min(p.noise_std for p in parts) > 0:
        weights = np.array([p.noise_std**-2 for p in parts])
    else:
        weights = np.array([p.cohort for p in parts], np.float64)
    weights /= weights.sum()
    mean = sum(w * np.asarray(p.mean, np.float64) for w, p in zip(weights, parts, strict=True))
    std = float(np.sqrt(sum((w * p.noise_std) ** 2 for w, p in zip(weights, parts, strict=True))))
    return Statistic(np.asarray(mean, np.float64), std, sum(p.cohort for p in parts))


def listening_weights(items: Listening) -> dict[str, float]:
    """Each of a user's items' weight in their row: ``(1 + s) / 2`` for the share ``s`` of the
    user's items that they listened to at most as much, from just above 1/2 (the least played)
    to 1 (the most). Only the order of the amounts counts, so plays, ratings or any other
    measure of how much give the same weights for the same order, and items without amounts
    all weigh 1 (confidence from how often a user returns to an item: Hu, Koren and Volinsky,
    ICDM 2008; here by rank, so no scale is assumed)."""
    amounts = _amounts(items)
    values = np.fromiter(amounts.values(), np.float64, len(amounts))
    share = np.searchsorted(np.sort(values), values, side="right") / max(len(values), 1)
    return dict(zip(amounts, ((1.0 + share) / 2.0).tolist(), strict=True))


def _amounts(items: Listening) -> dict[str, float]:
    """``items`` as item -> amount (each 1 when only the items are given)."""
    return dict(items) if isinstance(items, Mapping) else dict.fromkeys(items, 1.0)


def collaborative_upload(
    model: CollaborativeModel | None, layout: Layout, items: Listening, *, clipping_norm: float
) -> Array:
    """The vector a device uploads in the next round: its count (no model yet: which items it
    has, each once) or its factor statistics (a model with a table: its row, weighed by how much
    it listened), scaled to exactly ``clipping_norm``."""
    items = _amounts(items)
    out = np.zeros(layout.dim)
    if model is None:
        c = layout.indicator(items)
        norm = np.linalg.norm(c)
        if norm:
            out[: layout.items] = clipping_norm * c / norm
        return out
    c = model.row(items)
    u = model.solve(c)
    if not np.any(c) or not np.any(u):
        return out
    b = np.zeros((layout.table_size, layout.rank))
    b[: len(model.table)] = np.outer(c, u)
    out[layout.items :] = clipping_norm * b.ravel() / np.linalg.norm(b)
    return out


def _top(values: Array, k: int) -> npt.NDArray[np.int64]:
    """The positions of the ``k`` largest ``values``, largest first, ties by position: what
    ``np.argsort(-values, kind="stable")[:k]`` gives, without sorting the whole catalog (every
    device derives the table from the count release: 3 ms on 31,000 items, 0.4 ms this way)."""
    if k >= len(values) or not np.all(np.isfinite(values)):
        return np.argsort(-values, kind="stable")[:k]
    kth = np.partition(values, len(values) - k)[len(values) - k]  # the k-th largest
    above = np.flatnonzero(values > kth)
    chosen = np.union1d(above, np.flatnonzero(values == kth)[: k - len(above)])
    return chosen[np.argsort(-values[chosen], kind="stable")]


def devices_gram(vectors: Array, b: Array) -> Array:
    """``G``, the sum of the devices' (scaled) ``u u'``, from the sum of their ``c u'`` (``b``)
    and the table ``vectors`` they solved against: ``G = (V'V + lambda_u I)^-1 V' B``."""
    g = _user_solve(vectors, b)  # each column of B solved as a device solves its row
    return np.asarray((g + g.T) / 2, np.float64)


def _user_solve(vectors: Array, c: Array) -> Array:
    """``(V'V + lambda_u I)^-1 V' c``: a user vector from a row (or each column of ``c``)."""
    gram = vectors.T @ vectors
    d = gram.shape[0]
    ridge = _ridge(float(np.trace(gram)), d)
    return np.asarray(np.linalg.solve(gram + ridge * np.eye(d), vectors.T @ c))


def _ridge(energy: float, rank: int) -> float:
    """A ridge term: ``RIDGE`` times ``energy`` (a trace, a sum of squared singular values)
    over ``rank``, i.e. a tenth of the mean squared singular value per direction."""
    return max(RIDGE * energy / rank, 1e-12)
