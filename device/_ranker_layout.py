"""What the ranker takes and gives: its input width, its parameter and state layout, and the
checks every input passes before it reaches the model.

The model file (built by ``sottovoce.device._build_ranker``) and this code must agree on these
numbers; :class:`~sottovoce.device._ranker.Ranker` refuses a file that does not. Feature rows
come from :mod:`._features`; flat weight and state vectors are what the store keeps and sync
ships.

Every refusal is a :class:`RankerError` (a ``DeviceError``) that names the input.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import numpy.typing as npt

from sottovoce.device._errors import DeviceError

FEATURES = 96
"""Feature floats per candidate row: the model's input width."""

HIDDEN = (128, 64)
"""Widths of the two ReLU hidden layers; the output is one logit per row."""

LAYERS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("W1", (FEATURES, HIDDEN[0])),
    ("b1", (HIDDEN[0],)),
    ("W2", (HIDDEN[0], HIDDEN[1])),
    ("b2", (HIDDEN[1],)),
    ("W3", (HIDDEN[1], 1)),
    ("b3", (1,)),
)
"""The parameters in the order of the flat weight vector; matrices are row-major [in, out]."""

PARAMETER_COUNT = sum(math.prod(shape) for _, shape in LAYERS)
STATE_SIZE = 3 * PARAMETER_COUNT + 1
"""Weights, Adam first moments, Adam second moments, then the step counter (as a float)."""

ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.999
ADAM_EPSILON = 1e-7

SIGNATURES = ("infer", "train", "get_weights", "set_weights", "get_state", "set_state")
MODEL_FILE = "ranker.tflite"
MANIFEST_FILE = "ranker.json"

FloatArray = npt.NDArray[np.float32]


class RankerError(DeviceError):
    """A model file that is not a usable ranker, or an input the ranker cannot take."""

    code = "ranker_error"


def default_model_path() -> Path:
    """The ranker file shipped with this package."""
    return Path(__file__).with_name(MODEL_FILE)


def feature_rows(x: npt.ArrayLike) -> FloatArray:
    """``x`` as contiguous float32 rows of ``FEATURES`` columns (values not checked)."""
    try:
        rows = np.ascontiguousarray(x, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise RankerError(f"x: not an array of feature rows: {error}") from None
    if rows.ndim != 2 or rows.shape[1] != FEATURES:
        raise RankerError(
            f"x: expected feature rows of shape [N, {FEATURES}], got {list(rows.shape)}"
        )
    return rows


def float_vector(values: npt.ArrayLike, size: int, name: str) -> FloatArray:
    """``values`` as ``size`` finite float32s; ``name`` says which input it is."""
    try:
        vector = np.ascontiguousarray(values, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise RankerError(f"{name}: not a float vector: {error}") from None
    if vector.shape != (size,):
        raise RankerError(f"{name}: expected {size} floats, got shape {list(vector.shape)}")
    finite = np.isfinite(vector)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise RankerError(f"{name}: values must be finite; element {bad} is {vector[bad]}")
    return vector


def labelled_batch(
    x: npt.ArrayLike, y: npt.ArrayLike, w: npt.ArrayLike | None
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """A labelled batch checked for training: finite rows, labels in [0, 1], weights >= 0
    (default 1)."""
    rows = feature_rows(x)
    n = rows.shape[0]
    if not np.isfinite(rows).all():
        raise RankerError("x: feature rows must be finite (no NaN or infinity)")
    labels = float_vector(y, n, "y (one label per row)")
    if ((labels < 0) | (labels > 1)).any():
        raise RankerError("y: labels must lie in [0, 1]")
    weights = np.ones(n, dtype=np.float32) if w is None else float_vector(w, n, "w (per row)")
    if (weights < 0).any():
        raise RankerError("w: row weights must be >= 0 and not all zero")
    return rows, labels, weights


def learning_rate(lr: float) -> np.float32:
    """``lr`` as the model takes it: a finite number > 0."""
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise RankerError(f"lr: the learning rate must be a finite number > 0, not {lr!r}")
    return np.float32(lr)


def optimizer_state(state: npt.ArrayLike) -> FloatArray:
    """``state`` checked as what ``Ranker.get_state`` returns: ``STATE_SIZE`` finite floats,
    a whole step count, second moments >= 0, and no moments before the first step."""
    vector = float_vector(state, STATE_SIZE, "state")
    p = PARAMETER_COUNT
    step = float(vector[3 * p])
    if step < 0 or step != int(step):
        raise RankerError(f"state: the step count must be a whole number >= 0, not {step}")
    if (vector[2 * p : 3 * p] < 0).any():
        raise RankerError("state: Adam second moments must be >= 0")
    if step == 0 and vector[p : 3 * p].any():
        # The model reads the moments as zero before its first step.
        raise RankerError("state: Adam moments must be zero while the step count is 0")
    return vector
