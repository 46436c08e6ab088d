"""Centralized baselines: the device ranker's architecture trained on everyone's pooled examples.

Data flow position: the simulator builds each training user's examples on their device
(``Personalizer.examples``) and pools them; :func:`train_central` trains the same MLP
(``FEATURES`` -> 128 -> 64 -> 1, ReLU, one logit) with the same loss (weighted mean binary
cross-entropy with logits) and optimizer (Adam, the TFLite model's betas and epsilon) in torch,
and returns weights in the ranker's flat layout, so they load into the real TFLite ``Ranker``
with ``set_weights`` and serve exactly as a federated release would. :func:`train_central_dp`
does the same under DP-SGD (opacus). These are the upper references that federated training
is compared with: what the model could learn if all the data sat in one place.

torch and opacus are imported inside the functions (the aggregator extra has them); importing
this module needs neither.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from sottovoce.device import FEATURES, PARAMETER_COUNT, Ranker

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

FloatArray = npt.NDArray[np.float32]

HIDDEN = (128, 64)
SHAPES = (
    (FEATURES, HIDDEN[0]),
    (HIDDEN[0],),
    (HIDDEN[0], HIDDEN[1]),
    (HIDDEN[1],),
    (HIDDEN[1], 1),
    (1,),
)
"""W1, b1, W2, b2, W3, b3 in the ranker's flat order; matrices row-major [in, out]."""
assert sum(math.prod(s) for s in SHAPES) == PARAMETER_COUNT, "the ranker's layout changed"
ADAM_BETAS, ADAM_EPSILON = (0.9, 0.999), 1e-7  # the TFLite model's own Adam


@cache
def _packaged_weights() -> FloatArray:
    return Ranker.load().get_weights().copy()


def initial_weights() -> FloatArray:
    """The packaged ranker's weights: where federated training starts too."""
    return _packaged_weights().copy()


def unflatten(weights: npt.ArrayLike) -> list[FloatArray]:
    """The flat weight vector as [W1, b1, W2, b2, W3, b3]."""
    flat = np.asarray(weights, dtype=np.float32)
    if flat.shape != (PARAMETER_COUNT,):
        raise ValueError(f"weights: expected {PARAMETER_COUNT} floats, got {list(flat.shape)}")
    bounds = np.cumsum([0, *(math.prod(s) for s in SHAPES)])
    return [flat[a:b].reshape(s) for s, a, b in zip(SHAPES, bounds[:-1], bounds[1:], strict=True)]


def scores(weights: npt.ArrayLike, x: npt.ArrayLike) -> FloatArray:
    """The ranker's logits for rows ``x``, computed in numpy (float32)."""
    w1, b1, w2, b2, w3, b3 = unflatten(weights)
    rows = np.asarray(x, dtype=np.float32)
    h1 = np.maximum(rows @ w1 + b1, 0)
    h2 = np.maximum(h1 @ w2 + b2, 0)
    out: FloatArray = (h2 @ w3 + b3).reshape(-1)
    return out


def weighted_loss(
    weights: npt.ArrayLike, x: npt.ArrayLike, y: npt.ArrayLike, w: npt.ArrayLike
) -> float:
    """The ranker's training loss: weighted mean binary cross-entropy with logits."""
    s = scores(weights, x).astype(np.float64)
    labels, row_weights = np.asarray(y, np.float64), np.asarray(w, np.float64)
    losses = np.maximum(s, 0) - s * labels + np.log1p(np.exp(-np.abs(s)))
    return float((row_weights * losses).sum() / max(row_weights.sum(), 1e-12))


def train_central(
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    w: npt.ArrayLike,
    *,
    epochs: int = 5,
    batch: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    init: npt.ArrayLike | None = None,
) -> FloatArray:
    """Train on pooled examples (``x`` [N, FEATURES], labels ``y``, row weights ``w``) with
    shuffled mini-batches; returns flat weights for ``Ranker.set_weights``.

    Starts from ``init`` (default: the packaged ranker's weights, as federated training does).
    The same seed gives the same weights.
    """
    import torch

    xt, yt, wt = _tensors(x, y, w)
    _check_run(epochs=epochs, batch=batch, lr=lr)
    model = _MLP(initial_weights() if init is None else init)
    optimizer = torch.optim.Adam(
        model.module.parameters(), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPSILON
    )
    order = torch.Generator().manual_seed(seed)
    with _one_thread():
        for _ in range(epochs):
            permutation = torch.randperm(xt.shape[0], generator=order)
            for start in range(0, xt.shape[0], batch):
                pick = permutation[start : start + batch]
                optimizer.zero_grad()
                losses = _example_losses(model.module, xt[pick], yt[pick])
                _backward((wt[pick] * losses).sum() / wt[pick].sum().clamp_min(1e-12))
                optimizer.step()
    return model.flat()


@dataclass(frozen=True)
class PrivateTraining:
    """The weights of a DP-SGD run and its privacy: ``epsilon`` is what the accountant reports
    for the steps actually taken, at ``delta``."""

    weights: FloatArray
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int


def train_central_dp(
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    w: npt.ArrayLike,
    *,
    epsilon: float,
    delta: float,
    epochs: int = 5,
    batch: int = 256,
    max_grad_norm: float = 1.0,
    lr: float = 1e-3,
    seed: int = 0,
    init: npt.ArrayLike | None = None,
    accountant: str = "rdp",
    clipping: Literal["ghost", "per_sample"] = "ghost",
) -> PrivateTraining:
    """DP-SGD on pooled examples with opacus: Poisson-sampled batches (expected size
    ``batch``), each example's gradient clipped to ``max_grad_norm``, Gaussian noise scaled so
    that ``epochs`` epochs spend at most (``epsilon``, ``delta``); Adam on the noisy gradients.

    The privacy unit is one *example* of pooled data, not one user: a user contributes many
    examples, so this is weaker than the user-level DP of federated rounds (DP-FedAvg) at the
    same epsilon; compare accuracy, not epsilons, across the two. Each example's loss is
    ``w * bce`` averaged over the batch (the per-example terms must not depend on each other).
    Seeded: batches (``PoissonBatches``) and noise come from generators seeded with ``seed``.

    ``clipping`` says how opacus finds each example's gradient norm; both clip the same
    gradients to the same norm and add the same noise, so the weights agree to float rounding
    (a test holds them together). ``"ghost"`` (the default) is opacus' ghost clipping: for
    these linear layers an example's squared gradient norm is its input's squared norm times
    its output gradient's, so no per-example gradient is ever written out, and a second
    backward pass sums the gradients with each example's clipping factor. ``"per_sample"``
    writes out every example's gradient (opacus' hooks): five times slower on this model.
    """
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader

    xt, yt, wt = _tensors(x, y, w)
    _check_run(epochs=epochs, batch=batch, lr=lr)
    if not (epsilon > 0 and 0 < delta < 1 and max_grad_norm > 0):
        raise ValueError("epsilon and max_grad_norm must be > 0 and delta in (0, 1)")
    if clipping not in ("ghost", "per_sample"):
        raise ValueError(f"clipping: expected 'ghost' or 'per_sample', got {clipping!r}")
    ghost = clipping == "ghost"
    model = _MLP(initial_weights() if init is None else init)
    optimizer = torch.optim.Adam(
        model.module.parameters(), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPSILON
    )
    batches = PoissonBatches(int(xt.shape[0]), batch=batch, seed=seed)
    loader = DataLoader(_rows(xt, yt, wt), batch_sampler=batches, collate_fn=_as_batch)
    with warnings.catch_warnings(), _one_thread():
        # Seeded generators are the point here (reproducible baselines, not production noise);
        # "optimal order is the largest alpha" only says the RDP bound could be tighter, so the
        # reported epsilon is still an upper bound; the backward-hook note is opacus internals.
        for message in ("Secure RNG", "Optimal order", "Full backward hook"):
            warnings.filterwarnings("ignore", message=f".*{message}.*")
        engine = PrivacyEngine(accountant=accountant)
        private = engine.make_private_with_epsilon(
            module=model.module,
            optimizer=optimizer,
            data_loader=loader,
            target_epsilon=epsilon,
            target_delta=delta,
            epochs=epochs,
            max_grad_norm=max_grad_norm,
            noise_generator=torch.Generator().manual_seed(seed + 1),
            poisson_sampling=False,  # the batches above are Poisson-sampled already
            grad_sample_mode="ghost" if ghost else "hooks",
            **({"criterion": torch.nn.BCEWithLogitsLoss()} if ghost else {}),
        )
        if ghost:
            module, optimizer, criterion, loader = private
        else:
            module, optimizer, loader = private
        steps = 0
        for _ in range(epochs):
            for xb, yb, wb in loader:
                optimizer.zero_grad()
                if ghost:
                    # each example's loss w * bce; opacus clips its gradient, sums, noises
                    (criterion(module(xb).reshape(-1), yb) * wb).backward()
                else:
                    losses = _example_losses(module, xb, yb)
                    _backward((wb * losses).sum() / max(int(xb.shape[0]), 1))
                optimizer.step()
                steps += 1
        spent = float(engine.get_epsilon(delta))
    return PrivateTraining(
        weights=model.flat(),
        epsilon=spent,
        delta=delta,
        noise_multiplier=float(optimizer.noise_multiplier),
        sample_rate=batches.rate,
        steps=steps,
    )


class PoissonBatches:
    """DP-SGD's batches as opacus' Poisson sampling makes them: ``ceil(rows / batch)`` steps
    an epoch, each taking every row independently with probability ``rate`` = one over the
    steps (so about ``batch`` rows), which is the sampling the accountant's figure assumes.

    opacus' own sampler flips one coin per row each step: a step over 920,000 pooled examples
    spent more time drawing its coins than training. Here a step draws only the gaps between
    the rows it takes: in a run of independent coins of probability q the gaps between heads
    are independent geometric variables of parameter q, so the rows taken have the same
    distribution, at a cost that follows the batch rather than the rows. Seeded (numpy).
    """

    def __init__(self, rows: int, *, batch: int, seed: int) -> None:
        if rows < 1 or batch < 1:
            raise ValueError("rows and batch must be at least 1")
        self.rows = rows
        self.steps = math.ceil(rows / batch)
        self.rate = 1 / self.steps
        expected = rows * self.rate  # gaps drawn at a time: almost always one chunk a step
        self._chunk = int(expected + 4 * math.sqrt(expected)) + 16
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield self.draw()

    def draw(self) -> list[int]:
        """One step's rows, in increasing order."""
        if self.rate >= 1.0:
            return list(range(self.rows))
        chunk = self._chunk
        taken: list[npt.NDArray[np.int64]] = []
        last = -1  # the row of the latest head
        while True:
            heads = last + np.cumsum(self._rng.geometric(self.rate, size=chunk))
            inside = heads[heads < self.rows]
            taken.append(inside)
            if len(inside) < chunk:
                rows: list[int] = np.concatenate(taken).tolist()
                return rows
            last = int(heads[-1])


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread for a while: on a model this small, thread hand-offs cost more
    than they bring, and on a busy machine they cost a hundredfold."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_run(*, epochs: int, batch: int, lr: float) -> None:
    if epochs < 1 or batch < 1 or not (math.isfinite(lr) and lr > 0):
        raise ValueError("epochs and batch must be at least 1 and lr a finite number > 0")


def _tensors(
    x: npt.ArrayLike, y: npt.ArrayLike, w: npt.ArrayLike
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    import torch

    rows = np.ascontiguousarray(x, dtype=np.float32)
    labels = np.ascontiguousarray(y, dtype=np.float32).reshape(-1)
    weights = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
    if rows.ndim != 2 or rows.shape[1] != FEATURES or rows.shape[0] == 0:
        raise ValueError(f"x: expected rows of shape [N >= 1, {FEATURES}], got {list(rows.shape)}")
    if labels.shape[0] != rows.shape[0] or weights.shape[0] != rows.shape[0]:
        raise ValueError("y and w need one value per row of x")
    if not (np.isfinite(rows).all() and np.isfinite(weights).all()):
        raise ValueError("x and w must be finite")
    if ((labels < 0) | (labels > 1)).any() or (weights < 0).any() or not weights.any():
        raise ValueError("labels must lie in [0, 1], weights be >= 0 and not all zero")
    return torch.from_numpy(rows), torch.from_numpy(labels), torch.from_numpy(weights)


class _MLP:
    """The ranker's network in torch, its three linear layers kept at hand for the weights."""

    def __init__(self, weights: npt.ArrayLike) -> None:
        import torch

        self.layers = [
            torch.nn.Linear(FEATURES, HIDDEN[0]),
            torch.nn.Linear(HIDDEN[0], HIDDEN[1]),
            torch.nn.Linear(HIDDEN[1], 1),
        ]
        first, second, third = self.layers
        self.module = torch.nn.Sequential(first, torch.nn.ReLU(), second, torch.nn.ReLU(), third)
        parts = unflatten(weights)
        with torch.no_grad():
            for n, layer in enumerate(self.layers):
                # torch keeps a linear layer's matrix as [out, in]; the ranker as [in, out]
                layer.weight.copy_(torch.from_numpy(parts[2 * n].T.copy()))
                layer.bias.copy_(torch.from_numpy(parts[2 * n + 1].copy()))

    def flat(self) -> FloatArray:
        """The weights in the ranker's flat layout."""
        import torch

        with torch.no_grad():
            parts = [t.reshape(-1) for layer in self.layers for t in (layer.weight.T, layer.bias)]
            flat: FloatArray = torch.cat(parts).numpy().astype(np.float32)
        return flat


def _rows(*tensors: torch.Tensor) -> Dataset[tuple[torch.Tensor, ...]]:
    """The pooled examples as a dataset that also hands out a whole batch at once: a step asks
    for about ``batch`` rows (``PoissonBatches``), and gathering them with one index per tensor
    costs a tenth of fetching and stacking them one by one."""
    import torch
    from torch.utils.data import TensorDataset

    class Rows(TensorDataset):
        def __getitems__(self, rows: list[int]) -> tuple[torch.Tensor, ...]:
            picked = torch.as_tensor(rows, dtype=torch.long)
            return tuple(t[picked] for t in self.tensors)

    return Rows(*tensors)


def _as_batch(batch: Any) -> Any:
    """The loader's collate step: the dataset already gathered the batch."""
    return batch


def _example_losses(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    import torch

    logits = module(x).reshape(-1)
    losses: torch.Tensor = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, y, reduction="none"
    )
    return losses


def _backward(loss: torch.Tensor) -> None:
    import torch

    torch.autograd.backward(loss)
