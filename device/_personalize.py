"""Reranking and local training on the device: the store's state, scored by the TFLite ranker.

Data flow position: the app hands :meth:`Personalizer.rerank` a candidate list (a cached
playlist, a retrieval pool); the store gives a snapshot of the user's state (a fixed number of
queries), :mod:`._features` turns it into rows, the ranker scores them, and the post-processing
here applies guards no model may override: disliked tracks never in the top k, at most
``max_per_artist`` of one artist there, an artist skipped in this session pushed down, and a
bounded, seeded share of exploration. Each item comes back with a short reason.
:meth:`Personalizer.rank_catalog` does the same for the device's whole catalog, scoring it in
chunks (``CHUNK_SIZE`` rows: the model's activations stay in cache) and returning its top.

When the app reports the device eligible and the user consents to federated training,
:meth:`Personalizer.local_round` trains the ranker on the user's own history (inside the TFLite
model) and returns ``local weights - global weights``, the delta that sync will seal.
"""

from __future__ import annotations

import base64
import itertools
import math
import random
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from sottovoce.device._errors import DeviceError
from sottovoce.device._features import ARTIST, COSINE, SESSION, TRACK, features
from sottovoce.device._join import Ticket, enter_round, seal_and_record
from sottovoce.device._ranker import PARAMETER_COUNT, Ranker
from sottovoce.device._store import EventStore, ModelWeights
from sottovoce.device._training import Examples, build_examples
from sottovoce.policy import Purpose
from sottovoce.sync import (
    ModelRelease,
    RoundSpec,
    verify_release,
)

MAX_EXPLORE_SHARE = 0.3
MAX_STEPS = 2_000
CHUNK_SIZE = 1_024  # feature rows scored at a time: the model's activations stay in cache


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


@dataclass(frozen=True)
class RerankOptions:
    top_k: int = 10
    max_per_artist: int = 2
    explore_share: float = 0.1  # of the top k, at most MAX_EXPLORE_SHARE
    seed: int | None = None  # exploration is reproducible with a seed
    session_skip_penalty: float = 1.5  # logit points per skip of the artist this session

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.max_per_artist < 1:
            raise ValueError("top_k and max_per_artist must be at least 1")
        if not 0 <= self.explore_share <= MAX_EXPLORE_SHARE:
            raise ValueError(f"explore_share must be between 0 and {MAX_EXPLORE_SHARE}")


class RankedItem(NamedTuple):
    track_id: str
    score: float
    reason: str
    explored: bool = False


@dataclass(frozen=True)
class Ranking:
    """Items in order; ``personalized`` is False when the app's order came back untouched."""

    items: tuple[RankedItem, ...]
    personalized: bool
    note: str = ""

    @property
    def track_ids(self) -> list[str]:
        return [item.track_id for item in self.items]


@dataclass(frozen=True)
class LocalRound:
    """The result of training on one user's history: the delta and how it was made."""

    delta: npt.NDArray[np.float32]
    base_version: int
    examples: int
    steps: int
    loss_before: float
    loss_after: float


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
        options: RerankOptions = RerankOptions(),
    ) -> Ranking:
        """Order ``candidates`` (track ids) for the user, each with a short reason."""
        decision = self.store.personalization(user_id)
        if not decision.allowed:
            return _unpersonalized(candidates, decision.sentence)
        if not candidates:
            return Ranking((), personalized=True)
        return self._rank(user_id, candidates, now=now, options=options, chunk_size=CHUNK_SIZE)

    def rank_catalog(
        self,
        user_id: str,
        *,
        now: datetime | None = None,
        options: RerankOptions = RerankOptions(),
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
        decision = self.store.personalization(user_id)
        if not decision.allowed:
            return _unpersonalized(list(self.store.catalog())[:limit], decision.sentence)
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
        """Score in chunks, then apply the guards and exploration to the whole list."""
        self._serve(user_id)
        snapshot, inputs = self.store.ranking_inputs(user_id, candidates, now=now)
        n = len(inputs)
        if not n:
            return Ranking((), personalized=True)
        parts = []
        for start in range(0, n, chunk_size):
            chunk = inputs.chunk(start, min(n, start + chunk_size))
            x = features(snapshot, chunk)
            parts.append((
                self.ranker.infer(x),
                chunk.artist_skips,  # the session's skips of the candidate's artist
                chunk.tracks[:, 5] > 0,  # disliked
                # may be explored: never played, and (in a session) its artist not skipped
                (chunk.tracks[:, 7] > 0) & (chunk.artist_skips == 0) if inputs.in_session
                else chunk.tracks[:, 7] > 0,
                _reasons(x),
            ))  # fmt: skip
        logits, skips, disliked, fresh, codes = (
            np.concatenate(column) if len(column) > 1 else column[0]
            for column in zip(*parts, strict=True)
        )
        scores = logits.astype(np.float64)
        if inputs.in_session:  # outside a session every skip count is 0: nothing to take off
            scores = scores - options.session_skip_penalty * skips
        order, explored = _arrange(scores, disliked, fresh, inputs.artist_codes, options)
        if limit is not None:
            order = order[:limit]
        reasons = _REASON_TEXTS[codes[order]]
        flags = np.zeros(n, dtype=bool)
        flags[list(explored)] = True
        flags = flags[order]
        reasons[flags] = _REASONS[0]
        ids = inputs.track_ids
        # Built in C (zip, map, and tuple.__new__ on complete tuples instead of RankedItem's
        # Python-level __new__): a whole catalog's items would otherwise take longer than
        # scoring it.
        rows = zip(map(ids.__getitem__, order.tolist()), scores[order].tolist(), reasons.tolist(),
                   flags.tolist(), strict=True)  # fmt: skip
        items = tuple(map(tuple.__new__, itertools.repeat(RankedItem), rows))
        return Ranking(items, personalized=True)

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
        trainer = self._trainer = self._trainer or _trainer_for(self.ranker)
        trainer.set_weights(self.global_weights)
        trainer.reset_optimizer()
        rng = np.random.default_rng(seed)
        size = min(batch, len(data))
        picks = np.array([rng.choice(len(data), size=size, replace=False) for _ in range(steps)])
        losses = trainer.train_batches(data.x, data.y, data.w, picks, lr=lr)
        local = trainer.get_weights()
        head = float(np.mean(losses[: max(1, steps // 10)]))
        tail = float(np.mean(losses[-max(1, steps // 10) :]))
        result = LocalRound(delta=local - self.global_weights, base_version=self.version,
                            examples=len(data), steps=steps, loss_before=head,
                            loss_after=tail)  # fmt: skip
        return result, trainer.get_state()

    def examples(self, user_id: str, *, seed: int = 0, limit: int = 2_000) -> Examples:
        """Training examples from the user's history (the most recent ``limit``)."""
        return build_examples(self.store.facts(user_id), self.store.catalog(), seed=seed,
                              limit=limit)  # fmt: skip


def _local_slot(store: EventStore, user_id: str) -> str:
    return f"local:{store.user_hash(user_id)}"


_TRAINERS = threading.local()


def _trainer_for(ranker: Ranker) -> Ranker:
    """This thread's training interpreter for the ranker's model file, loaded once per thread.

    Training sets the trainer's weights and optimizer state before its first step and a
    thread trains one round at a time, so every personalizer of a thread (a simulation's worker
    opens one per device and round) can share it; serving rankers never do.
    """
    trainers: dict[tuple[str, str], Ranker] = _TRAINERS.__dict__.setdefault("by_model", {})
    key = (ranker.source, ranker.model_id)
    trainer = trainers.get(key)
    if trainer is None:
        trainer = Ranker.load(Path(ranker.source))
        if trainer.model_id != ranker.model_id:
            raise DeviceError(f"{ranker.source} changed on disk since the ranker was loaded")
        trainers[key] = trainer
    return trainer


def _unpersonalized(candidates: Sequence[str], why: str) -> Ranking:
    items = tuple(RankedItem(t, 0.0, "in the app's order") for t in candidates)
    return Ranking(items, personalized=False, note=f"not personalized: {why}")


def _arrange(
    scores: npt.NDArray[np.float64],
    disliked: npt.NDArray[np.bool_],
    fresh: npt.NDArray[np.bool_],
    artists: npt.NDArray[np.int64],
    options: RerankOptions,
) -> tuple[npt.NDArray[np.int64], set[int]]:
    """Final order (candidate indices) and the explored candidates: guards first, then
    exploration. ``artists`` are artist codes, -1 for none. What is linear in the number of
    candidates runs in numpy; Python walks only the top of the list."""
    n = len(scores)
    ranked = np.argsort(-scores, kind="stable")
    k = min(options.top_k, n - int(np.count_nonzero(disliked)))
    top: list[int] = []
    per_artist: dict[int, int] = {}
    for i, artist, refused in _walk(ranked, artists, disliked):  # stops once top is full
        if len(top) == k:
            break
        capped = artist >= 0 and per_artist.get(artist, 0) >= options.max_per_artist
        if refused or capped:
            continue
        top.append(i)
        if artist >= 0:
            per_artist[artist] = per_artist.get(artist, 0) + 1
    chosen = disliked.copy()
    chosen[top] = True
    rest = ranked[~chosen[ranked]]  # still in score order
    if len(top) < k:  # too few artists to honour the cap: fill in score order
        fill = rest[: k - len(top)].tolist()
        position = np.empty(n, dtype=np.int64)
        position[ranked] = np.arange(n)
        top = sorted(top + fill, key=position.__getitem__)
        chosen[fill] = True
        rest = ranked[~chosen[ranked]]
    before = list(top)
    explored = _explore(top, rest, fresh, artists, options)
    if explored:  # what exploration displaced leads the rest, in score order
        kept = set(top)
        displaced = np.array([i for i in before if i not in kept], dtype=np.int64)
        chosen[list(explored)] = True
        rest = np.concatenate([displaced, rest[~chosen[rest]]])
    tail = ranked[disliked[ranked]]
    return np.concatenate([np.array(top, dtype=np.int64), rest, tail]), explored


def _walk(
    order: npt.NDArray[np.int64],
    artists: npt.NDArray[np.int64],
    disliked: npt.NDArray[np.bool_],
    step: int = 64,
) -> Iterator[tuple[int, int, bool]]:
    """(index, artist, disliked) in ``order``, as Python values, converted a slice at a time
    (the walk usually stops within the first slice)."""
    for start in range(0, len(order), step):
        part = order[start : start + step]
        yield from zip(part.tolist(), artists[part].tolist(), disliked[part].tolist(), strict=True)


def _explore(
    top: list[int],
    rest: npt.NDArray[np.int64],
    fresh: npt.NDArray[np.bool_],
    artists: npt.NDArray[np.int64],
    options: RerankOptions,
) -> set[int]:
    """Swap a bounded, seeded share of the top k (never the first two places) for tracks the
    user has never played, from artists not skipped this session, keeping the artist cap.
    Changes ``top`` in place; returns the explored candidates."""
    slots = math.floor(options.explore_share * len(top))
    first = min(2, len(top))
    if not slots or len(top) <= first:
        return set()
    pool = rest[fresh[rest]]  # in score order
    rng = random.Random(options.seed)
    counts: dict[int, int] = {}

    def bump(artist: int, by: int) -> None:
        if artist >= 0:
            counts[artist] = counts.get(artist, 0) + by

    for artist in artists[top].tolist():
        bump(artist, 1)
    explored: set[int] = set()
    for place in rng.sample(range(first, len(top)), min(slots, len(top) - first)):
        leaving = int(artists[top[place]])
        bump(leaving, -1)
        fits = pool
        full = [a for a, c in counts.items() if c >= options.max_per_artist]
        if full:  # usually an artist or two: a comparison each (np.isin costs more)
            of_pool = artists[pool]
            capped = of_pool == full[0]
            for artist in full[1:]:
                capped |= of_pool == artist
            fits = pool[~capped]
        if not len(fits):
            bump(leaving, 1)
            continue
        pick = int(rng.choice(fits))  # the same draw as from a list: fits[randbelow(len)]
        pool = pool[pool != pick]
        top[place] = pick
        explored.add(pick)
        bump(int(artists[pick]), 1)
    return explored


_REASONS: tuple[str, ...] = (
    "something new to explore",
    "you disliked this",
    "lower: you skipped this artist just now",
    "you liked this",
    "you often finish this track",
    "you often finish this artist",
    "close to what you've been playing",
    "new to you",
    "ranked by your listening",
)


_REASON_TEXTS = np.array(_REASONS, dtype=object)


def _reasons(x: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
    """Index into ``_REASONS`` for every row: the first rule that holds (0 is exploration)."""
    rules = (
        x[:, TRACK + 5] > 0,  # disliked
        x[:, SESSION + 2] > 0,  # artist skipped this session
        x[:, TRACK + 4] > 0,  # liked
        (x[:, TRACK] > 0) & (x[:, TRACK + 1] >= 0.7),
        (x[:, ARTIST] >= math.log1p(3)) & (x[:, ARTIST + 1] >= 0.6),
        x[:, COSINE] >= 0.5,
        (x[:, TRACK + 7] > 0) & (x[:, ARTIST + 7] > 0),
    )
    codes = np.full(len(x), len(rules) + 1, dtype=np.int64)
    for code in range(len(rules), 0, -1):  # the earliest rule that holds is written last
        codes[rules[code - 1]] = code
    return codes
