"""Reranking and local training on the device: the store's state, scored by the TFLite ranker.

:class:`Personalizer` is the façade an app holds, for one device store and one ranker model. It
decides which weights serve (the user's personal model while it was trained from the global
version in use, else the global one) and installs verified releases.

Data flow position: the app hands :meth:`Personalizer.rerank` a candidate list (a cached
playlist, a retrieval pool); the user's consent decides whether it is personalized; the store
gives a snapshot of the user's state (a fixed number of queries), and :mod:`._rerank` scores
the candidates and applies the guards no model may override (disliked tracks never in the top
k, an artist cap, an artist skipped this session pushed down, bounded seeded exploration), each
item with a short reason. :meth:`Personalizer.rank_catalog` does the same for the device's
whole catalog and returns its top.

When the app reports the device eligible and the user consents to federated training,
:meth:`Personalizer.local_round` trains the ranker on the user's own history (inside the TFLite
model, :mod:`._local_training`) and returns ``local weights - global weights``, the delta that
sync will seal; :meth:`Personalizer.contribute` does so for a round of the region
(:mod:`._join` admits the device and seals and records the delta).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import numpy.typing as npt

from sottovoce.device._errors import DeviceError
from sottovoce.device._join import Ticket, enter_round, seal_and_record
from sottovoce.device._local_training import LocalRound, train_round, trainer_for
from sottovoce.device._ranker import PARAMETER_COUNT, Ranker
from sottovoce.device._rerank import (
    CHUNK_SIZE,
    RankedItem,
    Ranking,
    RerankOptions,
    rank,
    unpersonalized,
)
from sottovoce.device._store import EventStore, ModelWeights
from sottovoce.device._training import Examples, build_examples
from sottovoce.policy import Purpose
from sottovoce.sync import (
    ModelRelease,
    RoundSpec,
    verify_release,
)

__all__ = [  # the package exports these; the rerank and training types are imported from here
    "CHUNK_SIZE",
    "Eligibility",
    "LocalRound",
    "NotEligible",
    "Personalizer",
    "RankedItem",
    "Ranking",
    "RerankOptions",
]

MAX_STEPS = 2_000
_DEFAULT_OPTIONS = RerankOptions()


class NotEligible(DeviceError):
    """The app did not report the device fit for training (charging, unmetered, idle)."""

    code = "not_eligible"


@dataclass(frozen=True)
class Eligibility:
    """What the app reports about the device right now."""

    charging: bool
    unmetered: bool
    idle: bool

    def missing(self) -> list[str]:
        return [name for name in ("charging", "unmetered", "idle") if not getattr(self, name)]


class Personalizer:
    """Reranks and trains for one device store with one ranker model."""

    def __init__(
        self,
        store: EventStore,
        *,
        ranker: Ranker | None = None,
        noise_rng: np.random.Generator | None = None,
    ) -> None:
        """``noise_rng`` draws local-mode noise (default: seeded from the OS); simulations pass
        a seeded one to repeat a run."""
        self.store = store
        self._noise_rng = noise_rng
        self.ranker = ranker or Ranker.load()
        self.version = 0
        self.global_weights = self.ranker.get_weights()
        stored = store.load_model("global")
        if stored is not None and stored.model_id == self.ranker.model_id:
            self.version, self.global_weights = stored.version, stored.weights
        self._serving: tuple[str, int] | None = None  # (slot, store generation) held now
        self._trainer: Ranker | None = None  # training never touches the serving ranker

    def _serve(self, user_id: str) -> None:
        """Load the user's personal model if it was trained from the current global version.

        Checked against the store's generation, so a personal model that withdrawal, erasure,
        retention or another process removed stops serving at once.
        """
        serving = (_local_slot(self.store, user_id), self.store.generation())
        if serving == self._serving:
            return
        local = self.store.load_model(serving[0])
        fresh = local is not None and local.model_id == self.ranker.model_id
        if fresh and local is not None and local.version == self.version:
            self.ranker.set_weights(local.weights)
        else:
            self.ranker.set_weights(self.global_weights)
        self._serving = serving

    def install_verified_weights(
        self, weights: npt.NDArray[np.float32], *, version: int, model_id: str
    ) -> None:
        """Swap in the weights of a release whose signature was already verified (as
        :meth:`install_release` does) atomically: in the store, then in memory.

        The release must be for this model file and newer than the model in use: a replayed
        or older release is refused, never installed.
        """
        if model_id != self.ranker.model_id:
            raise DeviceError(f"release is for model {model_id[:12]}…, this device runs "
                              f"{self.ranker.model_id[:12]}…")  # fmt: skip
        if version <= self.version:
            raise DeviceError(f"release version {version} is not newer than {self.version}")
        weights = np.asarray(weights, dtype=np.float32)
        if weights.shape != (PARAMETER_COUNT,) or not np.all(np.isfinite(weights)):
            raise DeviceError(f"a release must carry {PARAMETER_COUNT} finite weights")
        self.store.save_model("global", model_id=model_id, version=version, weights=weights)
        self.version, self.global_weights = version, weights
        self._serving = None

    def install_release(self, release: ModelRelease) -> None:
        """Verify a downloaded release against the region's pinned signing key (from the
        policy) and swap it in: same model file, newer version, finite weights, or refused."""
        pinned = base64.b64decode(self.store.region.key("signing").key)
        weights = verify_release(release, pinned)
        self.install_verified_weights(weights, version=release.version,
                                      model_id=release.model_id)  # fmt: skip

    # -- rerank ----------------------------------------------------------------------------
    def rerank(
        self,
        user_id: str,
        candidates: Sequence[str],
        *,
        now: datetime | None = None,
        options: RerankOptions = _DEFAULT_OPTIONS,
    ) -> Ranking:
        """Order ``candidates`` (track ids) for the user, each with a short reason."""
        with self.store.one_read():  # the consent, the model and the user's state: one check
            decision = self.store.personalization(user_id)
            if not decision.allowed:
                return unpersonalized(candidates, decision.sentence)
            if not candidates:
                return Ranking((), personalized=True)
            return self._rank(user_id, candidates, now=now, options=options,
                              chunk_size=CHUNK_SIZE)  # fmt: skip

    def rank_catalog(
        self,
        user_id: str,
        *,
        now: datetime | None = None,
        options: RerankOptions = _DEFAULT_OPTIONS,
        limit: int | None = None,
        chunk_size: int = CHUNK_SIZE,
    ) -> Ranking:
        """Order the device's whole catalog for the user (a "for you" shelf, a radio seed).

        The result is what ``rerank(user_id, list(store.catalog()), ...)`` returns (the same
        guards, exploration and reasons), cut to its first ``limit`` items when given: a
        shelf needs its top, and building an item per catalog track costs more than scoring
        it. Scoring runs ``chunk_size`` items at a time, with features gathered from arrays the
        store caches between writes, so memory stays at a chunk of feature rows.
        """
        if chunk_size < 1 or (limit is not None and limit < 0):
            raise ValueError("chunk_size must be at least 1 and limit at least 0")
        with self.store.one_read():
            decision = self.store.personalization(user_id)
            if not decision.allowed:
                return unpersonalized(list(self.store.catalog())[:limit], decision.sentence)
            return self._rank(user_id, None, now=now, options=options, chunk_size=chunk_size,
                              limit=limit)  # fmt: skip

    def _rank(
        self,
        user_id: str,
        candidates: Sequence[str] | None,
        *,
        now: datetime | None,
        options: RerankOptions,
        chunk_size: int,
        limit: int | None = None,
    ) -> Ranking:
        """Serve the user's model, then score and arrange (see :func:`._rerank.rank`)."""
        self._serve(user_id)
        snapshot, inputs = self.store.ranking_inputs(user_id, candidates, now=now)
        return rank(self.ranker, snapshot, inputs, options=options, chunk_size=chunk_size,
                    limit=limit)  # fmt: skip

    # -- local training ----------------------------------------------------------------------
    def local_round(
        self,
        user_id: str,
        *,
        eligibility: Eligibility,
        steps: int = 200,
        batch: int = 32,
        lr: float = 3e-3,
        seed: int = 0,
        examples: int = 2_000,
    ) -> LocalRound:
        """Train on the user's own history; the result's ``delta`` is local - global.

        The personal model is stored (it serves this user's reranks); nothing is queued to
        send (see :meth:`contribute`).
        """
        result, state = self._train(user_id, eligibility=eligibility, steps=steps, batch=batch,
                                    lr=lr, seed=seed, examples=examples)  # fmt: skip
        self.store.save_model(_local_slot(self.store, user_id), model_id=self.ranker.model_id,
                              version=self.version, weights=result.delta + self.global_weights,
                              state=state, user_id=user_id)  # fmt: skip
        return result

    def contribute(
        self,
        user_id: str,
        *,
        spec: RoundSpec,
        eligibility: Eligibility,
        steps: int = 200,
        seed: int = 0,
        examples: int = 2_000,
    ) -> str | None:
        """Take part in a federated round; returns the queued delta's idempotency key, or
        ``None`` when the device's coin (the spec's sampling rate) keeps it out of the round.

        The spec is checked against the device's own copy of the policy, its model and its own
        privacy ledger first (``SpecRefused``, logged, nothing trained or queued); then the
        user's consent decides (logged); then the device trains, seals the delta (clip, noise in
        local mode from the OS CSPRNG, pseudonym, signature, HPKE to the region's key) and
        records the round, the personal model, the outbox entry and (local mode) its privacy
        charge in one transaction. In central mode a device that could take part is charged when
        it evaluates the round, before its coin (see docs/privacy.md).
        """
        ticket = enter_round(self.store, user_id, spec, model_id=self.ranker.model_id,
                             version=self.version, dim=self.ranker.parameter_count,
                             eligible=not eligibility.missing())  # fmt: skip
        if not isinstance(ticket, Ticket):
            return ticket  # the coin said no (None), or this round's delta is queued already
        result, state = self._train(user_id, eligibility=eligibility, steps=steps, batch=32,
                                    lr=3e-3, seed=seed, examples=examples)  # fmt: skip
        model = ModelWeights(self.ranker.model_id, self.version,
                             result.delta + self.global_weights)  # fmt: skip
        return seal_and_record(self.store, user_id, spec, ticket, upload=result.delta,
                               model=model, state=state, rng=self._noise_rng)  # fmt: skip

    def _train(
        self, user_id: str, *, eligibility: Eligibility, steps: int, batch: int, lr: float,
        seed: int, examples: int,
    ) -> tuple[LocalRound, npt.NDArray[np.float32]]:  # fmt: skip
        missing = eligibility.missing()
        if missing:
            raise NotEligible(f"the device is not eligible for training: not {', '.join(missing)}")
        refusal = self.store.refusal(user_id, Purpose.FEDERATED_TRAINING)
        if refusal is not None:
            raise refusal
        if not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps must be between 1 and {MAX_STEPS}")
        data = self.examples(user_id, seed=seed, limit=examples)
        if len(data) == 0:
            raise DeviceError("no training examples in the user's history yet")
        # A second interpreter of the same file: reranks keep serving while this trains.
        trainer = self._trainer = self._trainer or trainer_for(self.ranker)
        return train_round(trainer, data, base=self.global_weights, version=self.version,
                           steps=steps, batch=batch, lr=lr, seed=seed)  # fmt: skip

    def examples(self, user_id: str, *, seed: int = 0, limit: int = 2_000) -> Examples:
        """Training examples from the user's history (the most recent ``limit``)."""
        return build_examples(self.store.facts(user_id), self.store.catalog(), seed=seed,
                              limit=limit)  # fmt: skip


def _local_slot(store: EventStore, user_id: str) -> str:
    return f"local:{store.user_hash(user_id)}"
