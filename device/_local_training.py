"""Local training: a round of Adam steps on one user's examples, in a second interpreter of the
ranker's model file.

Data flow position: :meth:`~._personalize.Personalizer.local_round` and
:meth:`~._personalize.Personalizer.contribute` check the device's eligibility and the user's
consent, build the examples (:func:`._training.build_examples`) and call :func:`train_round`. It
starts from the global weights with a fresh optimizer and returns a :class:`LocalRound`, whose
``delta`` (local weights - global weights) is what sync seals, and the trainer's state, which the
store keeps with the personal model. The trainer is the thread's own interpreter
(:func:`trainer_for`), so reranks keep serving on theirs meanwhile.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from sottovoce.device._errors import DeviceError
from sottovoce.device._ranker import Ranker
from sottovoce.device._training import Examples


@dataclass(frozen=True)
class LocalRound:
    """The result of training on one user's history: the delta and how it was made."""

    delta: npt.NDArray[np.float32]
    base_version: int
    examples: int
    steps: int
    loss_before: float
    loss_after: float


def train_round(
    trainer: Ranker, data: Examples, *, base: npt.NDArray[np.float32], version: int, steps: int,
    batch: int, lr: float, seed: int,
) -> tuple[LocalRound, npt.NDArray[np.float32]]:  # fmt: skip
    """``steps`` Adam steps from the weights ``base`` (of release ``version``), each on
    ``batch`` examples drawn without replacement with ``seed``; the round and the trainer's
    state after it. ``loss_before`` and ``loss_after`` are the mean losses of the first and the
    last tenth of the steps."""
    trainer.set_weights(base)
    trainer.reset_optimizer()
    rng = np.random.default_rng(seed)
    size = min(batch, len(data))
    picks = np.array([rng.choice(len(data), size=size, replace=False) for _ in range(steps)])
    losses = trainer.train_batches(data.x, data.y, data.w, picks, lr=lr)
    local = trainer.get_weights()
    head = float(np.mean(losses[: max(1, steps // 10)]))
    tail = float(np.mean(losses[-max(1, steps // 10) :]))
    result = LocalRound(delta=local - base, base_version=version, examples=len(data),
                        steps=steps, loss_before=head, loss_after=tail)  # fmt: skip
    return result, trainer.get_state()


_TRAINERS = threading.local()


def trainer_for(ranker: Ranker) -> Ranker:
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
