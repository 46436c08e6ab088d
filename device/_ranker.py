"""The compact on-device ranker: a TFLite MLP that scores candidates and trains in place.

Rerank hands feature rows (``FEATURES`` floats per candidate) to :meth:`Ranker.infer`; local
training feeds labelled batches to :meth:`Ranker.train_step`, one Adam step each, run inside the
model. Weights and optimizer state go in and out as flat float32 vectors
(:meth:`~Ranker.get_weights`, :meth:`~Ranker.get_state`), so the device store keeps them in
SQLite and the sync package ships weight deltas; the model file itself never changes on a
device. Its identity is the sha256 of its bytes (:attr:`Ranker.model_id`): a release carries
weights for one ``model_id`` only.

The file is built with TensorFlow by ``sottovoce.device._build_ranker`` and committed; this
module never imports TensorFlow. It runs on ``ai_edge_litert`` (``tflite_runtime`` as a
fallback). The ranker is three modules: this one, the runtime; :mod:`._ranker_layout`, the
input width, parameter and state layout and the checks on every input; :mod:`._tflite_ops`,
which proves by reading the flatbuffer itself that the file needs no Flex or custom op that a
pip runtime could not run. The names of the other two are imported from here as well.

Errors: :class:`RankerError` (a ``DeviceError``) for a file that is not a usable ranker and for
inputs the model cannot take.
"""

from __future__ import annotations

import hashlib
import importlib
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from sottovoce.device._ranker_layout import (
    ADAM_BETA1,
    ADAM_BETA2,
    ADAM_EPSILON,
    FEATURES,
    HIDDEN,
    LAYERS,
    MANIFEST_FILE,
    MODEL_FILE,
    PARAMETER_COUNT,
    SIGNATURES,
    STATE_SIZE,
    FloatArray,
    RankerError,
    default_model_path,
    feature_rows,
    float_vector,
    labelled_batch,
    learning_rate,
    optimizer_state,
)
from sottovoce.device._tflite_ops import (
    OperatorCode,
    check_builtin_only,
    check_builtin_only_bytes,
    model_ops,
    operator_codes,
)

__all__ = [  # what other modules (features, training, the simulator, benchmarks) import here
    "ADAM_BETA1",
    "ADAM_BETA2",
    "ADAM_EPSILON",
    "FEATURES",
    "HIDDEN",
    "LAYERS",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "PARAMETER_COUNT",
    "SIGNATURES",
    "STATE_SIZE",
    "FloatArray",
    "OperatorCode",
    "Ranker",
    "RankerError",
    "check_builtin_only",
    "check_builtin_only_bytes",
    "default_model_path",
    "model_ops",
    "operator_codes",
]


def _interpreter_class() -> Any:
    # Imported on first use: the store, features and tests of other parts need none of it.
    for module in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        try:
            return importlib.import_module(module).Interpreter
        except ImportError:
            continue
    raise RankerError("no TFLite runtime: install ai-edge-litert (or tflite-runtime)")


class Ranker:
    """One ranker model in its own single-threaded interpreter.

    Open one with :meth:`load` (a file; by default the packaged model) or ``Ranker(content)``
    (the bytes of a model).

    Calls are serialised by a lock, so a ranker may be shared between threads, but one call
    runs at a time; give a background trainer its own ``Ranker``.
    """

    def __init__(self, content: bytes, *, source: str = "model") -> None:
        check_builtin_only_bytes(content, what=source)
        self.source = source
        self.model_id = hashlib.sha256(content).hexdigest()
        """The model's identity: hex sha256 of the file's bytes."""
        self._lock = threading.Lock()
        try:
            self._interpreter = _interpreter_class()(model_content=content, num_threads=1)
        except (ValueError, RuntimeError) as error:
            raise RankerError(f"{source}: the TFLite runtime cannot load it: {error}") from None
        found = set(self._interpreter.get_signature_list())
        missing = [name for name in SIGNATURES if name not in found]
        if missing:
            raise RankerError(f"{source}: not a ranker, signatures missing: {', '.join(missing)}")
        # The signature runners cost ~3 us a call over the raw interpreter at 500 rows.
        self._runners = {name: self._interpreter.get_signature_runner(name) for name in SIGNATURES}
        self.parameter_count = int(self._call("get_weights")["weights"].size)
        width = self.signatures["infer"]["inputs"]["x"]["shape"][-1]
        if width != FEATURES or self.parameter_count != PARAMETER_COUNT:
            raise RankerError(
                f"{source}: a model for {width} features and {self.parameter_count} parameters; "
                f"this code needs {FEATURES} features and {PARAMETER_COUNT} parameters"
            )

    @classmethod
    def load(cls, path: Path | None = None) -> Ranker:
        """Load a ranker file; by default the one shipped with this package."""
        path = default_model_path() if path is None else Path(path)
        try:
            content = path.read_bytes()
        except OSError as error:
            raise RankerError(f"cannot read ranker file {path}: {error.strerror}") from None
        return cls(content, source=str(path))

    def __repr__(self) -> str:
        return f"Ranker(model_id={self.model_id[:12]}…, parameters={self.parameter_count})"

    @property
    def signatures(self) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
        """Each signature's inputs and outputs: name -> {"shape": [...], "dtype": "float32"}.

        ``-1`` in a shape is the batch dimension.
        """

        def describe(details: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
            return {
                name: {
                    "shape": [int(d) for d in detail["shape_signature"]],
                    "dtype": np.dtype(detail["dtype"]).name,
                }
                for name, detail in sorted(details.items())
            }

        return {
            name: {
                "inputs": describe(runner.get_input_details()),
                "outputs": describe(runner.get_output_details()),
            }
            for name, runner in self._runners.items()
        }

    def infer(self, x: npt.ArrayLike) -> FloatArray:
        """One score (a logit) per row of ``x``: float32 [N, FEATURES] -> [N].

        Rows are not checked for NaN (that would cost a tenth of the call); a NaN feature
        gives a NaN score for its row only.
        """
        rows = feature_rows(x)
        if rows.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        scores: FloatArray = self._call("infer", x=rows)["scores"]
        return scores

    def train_step(
        self,
        x: npt.ArrayLike,
        y: npt.ArrayLike,
        w: npt.ArrayLike | None = None,
        lr: float = 1e-3,
    ) -> float:
        """One Adam step on the weighted mean binary cross-entropy of a labelled batch.

        ``x`` is [N, FEATURES], ``y`` the labels in [0, 1], ``w`` optional row weights >= 0
        (default 1). Returns the batch loss before the step. Nothing changes if a check fails.
        """
        rows, labels, weights = labelled_batch(x, y, w)
        if rows.shape[0] == 0:
            raise RankerError("x: a training batch needs at least one row")
        if not weights.any():
            raise RankerError("w: row weights must be >= 0 and not all zero")
        out = self._call("train", x=rows, y=labels, w=weights, lr=learning_rate(lr))
        return float(out["loss"])

    def train_batches(
        self,
        x: npt.ArrayLike,
        y: npt.ArrayLike,
        w: npt.ArrayLike | None,
        batches: npt.ArrayLike,
        lr: float = 1e-3,
    ) -> npt.NDArray[np.float64]:
        """One Adam step per row of ``batches`` (row indices into ``x``, ``y``, ``w``): what
        :meth:`train_step` on each picked batch does, with the inputs checked once, not per
        step. Returns each step's loss (before its step).

        ``batches`` is [steps, batch] integers. Nothing changes if a check fails; every batch
        must have a row of weight > 0.
        """
        rows, labels, weights = labelled_batch(x, y, w)
        n = rows.shape[0]
        picks = np.asarray(batches)
        if picks.ndim != 2 or picks.shape[1] == 0 or not np.issubdtype(picks.dtype, np.integer):
            raise RankerError(f"batches: expected [steps, batch] row indices, got {picks.shape}")
        if picks.size and (picks.min() < 0 or picks.max() >= n):
            raise RankerError(f"batches: row indices must lie in [0, {n})")
        if not weights[picks].any(axis=1).all():
            raise RankerError("w: row weights must be >= 0 and not all zero in every batch")
        rate = learning_rate(lr)
        train = self._runners["train"]
        losses = np.empty(picks.shape[0], dtype=np.float64)
        with self._lock:  # all the steps as one call: nothing else runs between them
            for step, pick in enumerate(picks):
                try:
                    out = train(x=rows[pick], y=labels[pick], w=weights[pick], lr=rate)
                except (ValueError, RuntimeError) as error:
                    raise RankerError(f"{self.source}: train failed in the runtime at step "
                                      f"{step}: {error}") from None  # fmt: skip
                losses[step] = out["loss"]
        return losses

    def get_weights(self) -> FloatArray:
        """The flat weight vector: ``PARAMETER_COUNT`` floats in ``LAYERS`` order."""
        weights: FloatArray = self._call("get_weights")["weights"]
        return weights

    def set_weights(self, weights: npt.ArrayLike) -> None:
        """Replace the weights; the optimizer state stays (see :meth:`reset_optimizer`)."""
        self._call("set_weights", weights=float_vector(weights, PARAMETER_COUNT, "weights"))

    def get_state(self) -> FloatArray:
        """Weights, Adam first and second moments, then the step count: ``STATE_SIZE`` floats."""
        state: FloatArray = self._call("get_state")["state"]
        return state

    def set_state(self, state: npt.ArrayLike) -> None:
        """Restore what :meth:`get_state` returned."""
        self._call("set_state", state=optimizer_state(state))

    def reset_optimizer(self) -> None:
        """Keep the weights, forget the Adam moments and step count (e.g. for a new round)."""
        zeros = np.zeros(STATE_SIZE - PARAMETER_COUNT, dtype=np.float32)
        self._call("set_state", state=np.concatenate([self.get_weights(), zeros]))

    def _call(self, name: str, **inputs: Any) -> dict[str, Any]:
        with self._lock:
            try:
                result: dict[str, Any] = self._runners[name](**inputs)
            except (ValueError, RuntimeError) as error:
                raise RankerError(f"{self.source}: {name} failed in the runtime: {error}") from None
        return result
