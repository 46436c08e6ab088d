"""A device's part in its region's collaborative model (:mod:`._collaborative`): install the
signed releases, join the rounds, score the catalog (the model blended with the catalog's item
vectors, :mod:`._blend`).

A round's model is derived from its releases in every region (:func:`~._collaborative.pool`):
the device verifies each against that region's key in its policy. It uploads to its own
region's aggregator alone.

Joining a round takes the same steps, checks and records as training the ranker: both go
through :mod:`._join` (the spec against the device's own policy, model and ledger, the charge,
the coin, consent, then sealing and the outbox in one transaction). What the device uploads
is :func:`~._collaborative.collaborative_upload` of the items the user listened to (a play of
at least half the track or 30 s) or liked, minus disliked ones, each with how many times
(:func:`listening`: its plays, a like counting as one), which weighs it in the user's row.

The model lives in the store's ``collaborative`` slot (DP counts, table, vectors and the factor
rounds' releases side by side: all public, derived from signed releases).
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

from sottovoce.device._blend import Blend
from sottovoce.device._collaborative import (
    CollaborativeModel,
    Layout,
    Statistic,
    collaborative_upload,
    pool,
)
from sottovoce.device._errors import DeviceError
from sottovoce.device._join import Ticket, enter_round, seal_and_record
from sottovoce.device._store import EventStore, ModelWeights
from sottovoce.policy import PrivacyMode
from sottovoce.sync import ModelRelease, RoundSpec, verify_release
from sottovoce.sync._noise import sensitivity_factor

__all__ = ["Collaborator", "advance", "listening"]

SLOT = "collaborative"
Published = tuple[ModelRelease, RoundSpec]  # a region's release and the spec of its round
MIN_PLAY_MS = 30_000


def listening(store: EventStore, user_id: str) -> dict[str, int]:
    """How many times the user listened to each track (plays of at least half of it, or 30 s)
    or liked it (once per like); a track the user disliked is left out, whatever came before."""
    times: dict[str, int] = {}
    disliked: set[str] = set()
    for fact in store.facts(user_id):
        if fact.track is None:
            continue
        if fact.type == "dislike":
            disliked.add(fact.track)
        elif fact.type == "like" or (fact.type == "play_end" and (
            fact.ms_played >= MIN_PLAY_MS or 2 * fact.ms_played >= max(fact.duration_ms, 1)
        )):  # fmt: skip
            times[fact.track] = times.get(fact.track, 0) + 1
    return {track: n for track, n in sorted(times.items()) if track not in disliked}


def advance(model: CollaborativeModel | None, layout: Layout, release: npt.NDArray[np.float64], *,
            noise_std: float) -> CollaborativeModel:  # fmt: skip
    """The model after one more round's (pooled) release: the count round's table when there
    is no model yet, the next factor round's refit after that."""
    if model is None:
        return CollaborativeModel.from_counts(layout, release, noise_std=noise_std)
    return model.refit(release, noise_std=noise_std)


class Collaborator:
    """Install releases, join rounds and score for one device store and one layout."""

    def __init__(self, store: EventStore, layout: Layout, *,
                 noise_rng: np.random.Generator | None = None) -> None:  # fmt: skip
        self.store, self.layout, self._noise_rng = store, layout, noise_rng
        self.version, self.model = 0, None
        self._blended: tuple[object, CollaborativeModel, Blend] | None = None
        stored = store.load_model(SLOT)
        if stored is not None and stored.model_id == layout.model_id:
            self.version, self.model = stored.version, _unpack(layout, stored.weights)

    def install(
        self, release: ModelRelease, spec: RoundSpec, *, others: Sequence[Published] = ()
    ) -> CollaborativeModel:
        """Verify the release of ``spec``'s round against the region's pinned key, and the same
        round's releases of other regions (``others``, each against its region's key in the
        policy), and derive the model from them pooled (the specs give each noise's scale,
        which weighs the regions and sets the table's ridge)."""
        if release.version != spec.model_version + 1 or release.version <= self.version:
            raise DeviceError(f"release {release.version} is not the release of round "
                              f"{spec.round_id!r} after version {self.version}")  # fmt: skip
        if spec.region != self.store.region.id:
            raise DeviceError(f"the round of {spec.region!r} is not this device's region's")
        regions = [spec.region, *(s.region for _, s in others)]
        if len(set(regions)) != len(regions):
            raise DeviceError("a round's releases name one region twice")
        statistics = []
        for r, s in ((release, spec), *others):
            pinned = base64.b64decode(self.store.policy.region(s.region).key("signing").key)
            weights = verify_release(r, pinned)
            if r.model_id != self.layout.model_id or s.model_id != self.layout.model_id:
                raise DeviceError("the release is not for this device's collaborative layout")
            if r.version != release.version or s.model_version != spec.model_version:
                raise DeviceError(f"{s.region}'s release {r.version} is not of this round")
            std = noise_std(s, self.layout.dim)
            statistics.append(Statistic(weights.astype(np.float64), std, s.expected_cohort))
        mean, std = (pooled := pool(statistics)).mean, pooled.noise_std
        model = advance(self.model, self.layout, mean, noise_std=std)
        self.store.save_model(SLOT, model_id=self.layout.model_id, version=release.version,
                              weights=_pack(model))  # fmt: skip
        self.version, self.model = release.version, model
        return model

    def scores(self, user_id: str, *, content: bool = True) -> npt.NDArray[np.float64]:
        """A score per catalog item for the user (the layout's order): the model blended with
        the store's catalog vectors (:class:`~._blend.Blend`; an item missing from the catalog
        has none), or with ``content=False`` the model alone."""
        if self.model is None:
            raise DeviceError("no collaborative model installed yet")
        items = listening(self.store, user_id)
        if not content:
            return self.model.scores(items)
        return self._blend(self.model).scores(items)

    def _blend(self, model: CollaborativeModel) -> Blend:
        """The blend of ``model`` with the catalog as it is now (kept while neither changes:
        holding the catalog's mapping keeps its identity from being reused)."""
        catalog = self.store.catalog()
        if (
            self._blended is None
            or self._blended[0] is not catalog
            or self._blended[1] is not model
        ):
            vectors = [v for _, v in catalog.values()]
            content = np.zeros((self.layout.items, len(vectors[0]) if vectors else 1))
            for track, (_, vector) in catalog.items():
                if (at := self.layout.index.get(track)) is not None:
                    content[at] = vector
            self._blended = (catalog, model, Blend(model, content))
        return self._blended[2]

    def contribute(self, user_id: str, *, spec: RoundSpec, eligible: bool = True) -> str | None:
        """Join the round of ``spec``; returns the queued upload's idempotency key, or ``None``
        when the spec's coin keeps the device out (see the module docstring)."""
        ticket = enter_round(self.store, user_id, spec, model_id=self.layout.model_id,
                             version=self.version, dim=self.layout.dim,
                             eligible=eligible)  # fmt: skip
        if not isinstance(ticket, Ticket):
            return ticket  # the coin said no (None), or this round's upload is queued already
        if not eligible:
            raise DeviceError("the device is not eligible for training now")
        upload = collaborative_upload(self.model, self.layout, listening(self.store, user_id),
                                      clipping_norm=spec.clipping_norm)  # fmt: skip
        current = ModelWeights(
            self.layout.model_id,
            self.version,
            _pack(self.model) if self.model else np.zeros(1, np.float32),
        )
        return seal_and_record(self.store, user_id, spec, ticket, upload=upload, model=current,
                               state=np.zeros(0, np.float32), rng=self._noise_rng)  # fmt: skip


def noise_std(spec: RoundSpec, dim: int) -> float:
    """The standard deviation of the noise on one released number of the round: central, the
    aggregator's ``z C s / n``; local, every upload's own noise averaged over the minimum cohort
    (the least the mean of a published local round has)."""
    s = sensitivity_factor(dim)
    if spec.mode is PrivacyMode.CENTRAL:
        return spec.noise_multiplier * spec.clipping_norm * s / max(spec.expected_cohort, 1.0)
    return float(spec.noise_multiplier * spec.clipping_norm * s / np.sqrt(max(spec.min_cohort, 1)))


def _pack(model: CollaborativeModel) -> npt.NDArray[np.float32]:
    """``[fitted, k, p, noise | counts | table | vectors (k x rank) | sketch (k x p)]``."""
    sketch = np.zeros((len(model.table), 0)) if model.sketch is None else model.sketch
    head = np.array([float(model.fitted), len(model.table), sketch.shape[1], model.noise])
    parts = [head, model.counts, model.table.astype(np.float64), model.vectors.ravel(),
             sketch.ravel()]  # fmt: skip
    return np.concatenate(parts).astype(np.float32)


def _unpack(layout: Layout, packed: Iterable[float]) -> CollaborativeModel:
    flat = np.asarray(packed, np.float64)
    fitted, k, p, noise = bool(flat[0]), int(flat[1]), int(flat[2]), float(flat[3])
    at = 4 + layout.items
    counts, table = flat[4:at], flat[at : at + k].astype(np.int64)
    at += k
    vectors = flat[at : at + k * layout.rank].reshape(k, layout.rank)
    at += k * layout.rank
    sketch = flat[at : at + k * p].reshape(k, p) if p else None
    return CollaborativeModel(layout, counts, table, vectors, fitted, sketch, noise)
