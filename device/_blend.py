"""The collaborative model blended with content, as much as the listener's own history says
content adds.

The collaborative model (:mod:`._collaborative`) ranks the item table by what listeners share;
the catalog's item vectors (public content: tags, genres, audio features) say which items are
alike. On the device a user's table items are scored by both:

    score = t + beta * cos

- ``t``: the model's score of each table item (:meth:`CollaborativeModel.scores`), scaled to
  [0, 1] over the table;
- ``cos``: the cosine between the item's vector and the user's profile, the sum of the unit
  vectors of every catalog item the user has (each once; the ``local_only`` row's profile).

Items outside the table keep the model's order, below every table item.

Content joins only if it says something about what listeners share (:attr:`Blend.agrees`): over
pairs of table items, their similarity in the model must correlate with their vectors' cosine
more than it does after a random relabelling of the items, in all but 5 % of relabellings (a
Mantel permutation test). Vectors that say nothing of co-listening (random ones, say) leave the
model's scores as they are.

``beta`` is then the user's own, learned on the device from their history. The device hides
each of the user's table items in turn, scores the table from the rest under each ``beta`` of
:data:`BETAS`, and sees how high the hidden item comes (``1 / log2(1 + rank)``, the discount of
NDCG). So that a few items cannot swing it, ``beta`` is the mean, over :data:`RESAMPLES`
bootstrap resamples of the hidden items, of the ``beta`` that ranks the resample best (bagging;
a seeded generator, so the same history always gives the same ``beta``). Where content ranks
this listener's items no better, most resamples find 0 best, and ``beta`` stays near it.

Nothing of this leaves the device and nothing is uploaded for it: it reads the model (public,
derived from releases), the catalog (public) and the user's own history. It costs no privacy.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import numpy.typing as npt

from sottovoce.device._collaborative import CollaborativeModel, Listening, _amounts
from sottovoce.device._errors import DeviceError

__all__ = ["BETAS", "LEVEL", "PERMUTATIONS", "RESAMPLES", "Blend"]

Array = npt.NDArray[np.float64]
BETAS = np.array([0.0, 0.125, 0.25, 0.5, 1.0, 2.0])  # 0, then 1/8 to 2 in factors of two
RESAMPLES = 32
PERMUTATIONS, LEVEL = 99, 0.05  # the test of whether content agrees with the model


@dataclass(frozen=True, eq=False)  # compared by identity: it holds arrays
class Blend:
    """A region's collaborative ``model`` and the catalog's item vectors (``content``: one row
    per catalog item in the layout's order; a zero row: no vector), blended per user as the
    module docstring says."""

    model: CollaborativeModel
    content: Array

    def __post_init__(self) -> None:
        content = np.asarray(self.content, np.float64)
        if content.ndim != 2 or len(content) != self.model.layout.items:
            raise DeviceError(f"content needs one vector per catalog item "
                              f"({self.model.layout.items}), got an array of shape "
                              f"{content.shape}")  # fmt: skip
        object.__setattr__(self, "content", content)

    @cached_property
    def _table(self) -> Array:
        return _unit_rows(self.content[self.model.table])

    @cached_property
    def agrees(self) -> bool:
        """Whether content says anything about what listeners share: the correlation, over
        pairs of table items, between their similarity in the model (``basis basis'``) and
        their vectors' cosine, against the same under :data:`PERMUTATIONS` random relabellings
        of the items (a Mantel test, one-sided at :data:`LEVEL`; seeded)."""
        basis = self.model.basis
        if basis.shape[1] == 0 or len(self._table) < 3:
            return False
        pairs = np.triu_indices(len(basis), 1)
        shared = _centred((basis @ basis.T)[pairs])
        cosines = self._table @ self._table.T
        if not shared.any() or not _centred(cosines[pairs]).any():
            return False

        def correlation(order: npt.NDArray[np.int64]) -> float:
            alike = _centred(cosines[np.ix_(order, order)][pairs])
            return float(shared @ alike / np.sqrt((shared @ shared) * (alike @ alike)))

        observed = correlation(np.arange(len(basis)))
        rng = np.random.default_rng(0)
        above = sum(correlation(rng.permutation(len(basis))) >= observed
                    for _ in range(PERMUTATIONS))  # fmt: skip
        return observed > 0 and (1 + above) / (1 + PERMUTATIONS) <= LEVEL

    def scores(self, items: Listening) -> Array:
        """A score per catalog item: the model's (:meth:`CollaborativeModel.scores`) with its
        table items blended with content by the user's :meth:`weight`."""
        model = self.model
        out = model.scores(items)
        profile = self._profile(items)
        beta = self._weight(model.row(items), profile)
        if beta == 0.0:
            return out
        blended = _unit_range(out[model.table]) + beta * (self._table @ _unit(profile))
        out[model.table] = blended - blended.min()  # >= 0: above every other item, as before
        return out

    def weight(self, items: Listening) -> float:
        """The user's ``beta`` (see the module docstring): 0 when content does not
        :attr:`agree` with the model, none of the user's items is in the table, or no blend
        ranks their hidden items better than the model alone."""
        return self._weight(self.model.row(items), self._profile(items))

    def _weight(self, row: Array, profile: Array) -> float:
        """:meth:`weight` from the user's row over the table and their profile."""
        model = self.model
        own = np.flatnonzero(row)
        m = len(own)
        if not m or not self.agrees:
            return 0.0
        rows = np.repeat(row[None, :], m, axis=0)
        rows[np.arange(m), own] = 0.0  # each row hides one of the user's table items
        t = _unit_range(_table_scores(model, _unit_rows(rows)))
        profiles = profile[None, :] - self._table[own]  # each without its item
        cos = _unit_rows(profiles) @ self._table.T
        others = np.ones(len(model.table), bool)
        others[own] = False  # candidates: the items the user does not have, and the hidden one
        gains = np.empty((len(BETAS), m))
        for b, beta in enumerate(BETAS):
            f = t + beta * cos
            hidden = f[np.arange(m), own]
            rank = 1 + np.count_nonzero((f > hidden[:, None]) & others, axis=1)
            gains[b] = 1.0 / np.log2(1.0 + rank)
        picks = np.random.default_rng(0).integers(0, m, (RESAMPLES, m))
        best = gains[:, picks].sum(axis=2).argmax(axis=0)  # per resample, the first best beta
        return float(BETAS[best].mean())

    def _profile(self, items: Listening) -> Array:
        """The sum of the unit vectors of the user's catalog items, each once."""
        index = self.model.layout.index
        at = [index[i] for i in _amounts(items) if i in index]
        return np.asarray(_unit_rows(self.content[at]).sum(axis=0), np.float64)


def _table_scores(model: CollaborativeModel, rows: Array) -> Array:
    """What :meth:`CollaborativeModel.scores` gives the table's items for each unit row of
    ``rows``: the projection, or the DP counts where there is nothing to project."""
    out = np.repeat(model.counts[model.table][None, :], len(rows), axis=0)
    if model.basis.shape[1]:
        some = rows.any(axis=1)
        out[some] = model.projected(rows[some])
    return out


def _unit(vector: Array) -> Array:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def _centred(values: Array) -> Array:
    return np.asarray(values - values.mean(), np.float64)


def _unit_rows(rows: Array) -> Array:
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    out = np.zeros_like(rows, np.float64)
    return np.asarray(np.divide(rows, norms, out=out, where=norms > 0), np.float64)


def _unit_range(values: Array) -> Array:
    """``values`` (a vector, or one per row) scaled to [0, 1] (constant ones to 0)."""
    low = values.min(axis=-1, keepdims=True)
    spread = values.max(axis=-1, keepdims=True) - low
    out = np.zeros_like(values, np.float64)
    return np.asarray(np.divide(values - low, spread, out=out, where=spread > 0), np.float64)
