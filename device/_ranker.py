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
fallback), and :func:`check_builtin_only` proves, by reading the flatbuffer itself, that the
file needs no Flex or custom op that a pip runtime could not run.

Errors: :class:`RankerError` (a ``DeviceError``) for a file that is not a usable ranker and for
inputs the model cannot take.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

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


# --- The flatbuffer, read without any TFLite library -------------------------------------------

_BUILTIN_CUSTOM = 32
# Used when the runtime's schema module is not importable (tflite_runtime ships none): the ops
# this model uses and common neighbours. Other codes are shown as BUILTIN_<code>.
_FALLBACK_BUILTIN_NAMES = {
    0: "ADD",
    2: "CONCATENATION",
    9: "FULLY_CONNECTED",
    14: "LOGISTIC",
    18: "MUL",
    19: "RELU",
    22: "RESHAPE",
    25: "SOFTMAX",
    28: "TANH",
    32: "CUSTOM",
    36: "GATHER",
    39: "TRANSPOSE",
    40: "MEAN",
    41: "SUB",
    42: "DIV",
    43: "SQUEEZE",
    45: "STRIDED_SLICE",
    47: "EXP",
    49: "SPLIT",
    53: "CAST",
    55: "MAXIMUM",
    57: "MINIMUM",
    58: "LESS",
    59: "NEG",
    61: "GREATER",
    65: "SLICE",
    70: "EXPAND_DIMS",
    73: "LOG",
    74: "SUM",
    75: "SQRT",
    76: "RSQRT",
    77: "SHAPE",
    78: "POW",
    83: "PACK",
    88: "UNPACK",
    92: "SQUARE",
    93: "ZEROS_LIKE",
    94: "FILL",
    99: "SQUARED_DIFFERENCE",
    101: "ABS",
    118: "IF",
    119: "WHILE",
    123: "SELECT_V2",
    126: "BATCH_MATMUL",
    129: "CALL_ONCE",
    130: "BROADCAST_TO",
    142: "VAR_HANDLE",
    143: "READ_VARIABLE",
    144: "ASSIGN_VARIABLE",
}


@dataclass(frozen=True)
class OperatorCode:
    """One entry of a model's ``operator_codes``: a builtin op or a custom one."""

    builtin_code: int
    custom_code: str | None
    version: int

    @property
    def is_custom(self) -> bool:
        return self.builtin_code == _BUILTIN_CUSTOM or self.custom_code is not None

    @property
    def name(self) -> str:
        if self.is_custom:
            return self.custom_code or "CUSTOM"
        return _builtin_names().get(self.builtin_code, f"BUILTIN_{self.builtin_code}")


@cache
def _builtin_names() -> dict[int, str]:
    names = dict(_FALLBACK_BUILTIN_NAMES)
    try:
        schema = importlib.import_module("ai_edge_litert.schema_py_generated")
    except ImportError:
        return names
    for name, value in vars(schema.BuiltinOperator).items():
        if not name.startswith("_") and isinstance(value, int):
            names[value] = name
    return names


class _FlatBuffer:
    """Just enough of the flatbuffers wire format to walk tables, vectors and strings."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.what = what

    def _u(self, fmt: str, pos: int) -> int:
        size = struct.calcsize(fmt)
        if pos < 0 or pos + size > len(self.data):
            raise RankerError(f"{self.what}: truncated or corrupt flatbuffer (offset {pos})")
        value: int = struct.unpack_from(fmt, self.data, pos)[0]
        return value

    def root(self) -> int:
        return self._u("<I", 0)

    def field(self, table: int, index: int) -> int | None:
        """Absolute position of field ``index`` of the table at ``table``, if present."""
        vtable = table - self._u("<i", table)
        vtable_size = self._u("<H", vtable)
        slot = 4 + 2 * index
        if slot + 2 > vtable_size:
            return None
        offset = self._u("<H", vtable + slot)
        return table + offset if offset else None

    def scalar(self, table: int, index: int, fmt: str, default: int) -> int:
        pos = self.field(table, index)
        return default if pos is None else self._u(fmt, pos)

    def indirect(self, pos: int) -> int:
        return pos + self._u("<I", pos)

    def vector(self, table: int, index: int) -> tuple[int, int]:
        """(position of the first element, length) of a vector field; (0, 0) if absent."""
        pos = self.field(table, index)
        if pos is None:
            return 0, 0
        start = self.indirect(pos)
        return start + 4, self._u("<I", start)

    def string(self, table: int, index: int) -> str | None:
        pos = self.field(table, index)
        if pos is None:
            return None
        start = self.indirect(pos)
        length = self._u("<I", start)
        if start + 4 + length > len(self.data):
            raise RankerError(f"{self.what}: truncated or corrupt flatbuffer (string at {start})")
        return self.data[start + 4 : start + 4 + length].decode("utf-8", errors="replace")


def operator_codes(model: bytes | Path, *, what: str | None = None) -> list[OperatorCode]:
    """Every entry of the model's ``operator_codes`` (shared by all its subgraphs), in order."""
    if isinstance(model, Path):
        path, what = model, what or str(model)
        try:
            model = path.read_bytes()
        except OSError as error:
            raise RankerError(f"cannot read model file {path}: {error.strerror}") from None
    what = what or "model"
    if len(model) < 8 or model[4:8] != b"TFL3":
        raise RankerError(f"{what}: not a TFLite flatbuffer (no TFL3 identifier)")
    fb = _FlatBuffer(model, what)
    root = fb.root()
    # Model table: 0 version, 1 operator_codes, 2 subgraphs, ...
    start, count = fb.vector(root, 1)
    codes = []
    for i in range(count):
        entry = fb.indirect(start + 4 * i)
        # OperatorCode: 0 deprecated_builtin_code (int8), 1 custom_code, 2 version,
        # 3 builtin_code (int32). Writers fill the old byte with min(code, 127) and readers
        # take the larger of the two, as the TFLite runtime does.
        deprecated = fb.scalar(entry, 0, "<b", 0)
        builtin = fb.scalar(entry, 3, "<i", 0)
        codes.append(
            OperatorCode(
                builtin_code=max(deprecated, builtin),
                custom_code=fb.string(entry, 1),
                version=fb.scalar(entry, 2, "<i", 1),
            )
        )
    return codes


def model_ops(path: Path) -> list[str]:
    """The name of every operator code in the file: builtin op names, or the custom code."""
    return [code.name for code in operator_codes(path)]


def check_builtin_only(path: Path) -> None:
    """Raise :class:`RankerError` naming every Flex or custom op the file needs."""
    _refuse_custom_ops(operator_codes(path), what=str(path))


def check_builtin_only_bytes(model: bytes, *, what: str = "model") -> None:
    """Like :func:`check_builtin_only`, for a model already in memory."""
    _refuse_custom_ops(operator_codes(model, what=what), what=what)


def _refuse_custom_ops(codes: list[OperatorCode], *, what: str) -> None:
    custom = [code.name for code in codes if code.is_custom]
    if not custom:
        return
    flex = [name for name in custom if name.startswith("Flex")]
    other = [name for name in custom if not name.startswith("Flex")]
    parts = []
    if flex:
        parts.append(f"Flex (TensorFlow) ops {', '.join(flex)}")
    if other:
        parts.append(f"custom ops {', '.join(other)}")
    raise RankerError(
        f"{what}: needs {' and '.join(parts)}, which the pip TFLite runtimes cannot run; "
        "the ranker must use builtin ops only"
    )


# --- The runtime wrapper -----------------------------------------------------------------------


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
        rows = self._rows(x)
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
        rows, labels, weights = self._labelled(x, y, w)
        if rows.shape[0] == 0:
            raise RankerError("x: a training batch needs at least one row")
        if not weights.any():
            raise RankerError("w: row weights must be >= 0 and not all zero")
        if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
            raise RankerError(f"lr: the learning rate must be a finite number > 0, not {lr!r}")
        out = self._call("train", x=rows, y=labels, w=weights, lr=np.float32(lr))
        return float(out["loss"])

    def _labelled(
        self, x: npt.ArrayLike, y: npt.ArrayLike, w: npt.ArrayLike | None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """A labelled batch checked for training: finite rows, labels in [0, 1], weights >= 0
        (default 1)."""
        rows = self._rows(x)
        n = rows.shape[0]
        if not np.isfinite(rows).all():
            raise RankerError("x: feature rows must be finite (no NaN or infinity)")
        labels = self._vector(y, n, "y (one label per row)")
        if ((labels < 0) | (labels > 1)).any():
            raise RankerError("y: labels must lie in [0, 1]")
        weights = np.ones(n, dtype=np.float32) if w is None else self._vector(w, n, "w (per row)")
        if (weights < 0).any():
            raise RankerError("w: row weights must be >= 0 and not all zero")
        return rows, labels, weights

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
        rows, labels, weights = self._labelled(x, y, w)
        n = rows.shape[0]
        picks = np.asarray(batches)
        if picks.ndim != 2 or picks.shape[1] == 0 or not np.issubdtype(picks.dtype, np.integer):
            raise RankerError(f"batches: expected [steps, batch] row indices, got {picks.shape}")
        if picks.size and (picks.min() < 0 or picks.max() >= n):
            raise RankerError(f"batches: row indices must lie in [0, {n})")
        if not weights[picks].any(axis=1).all():
            raise RankerError("w: row weights must be >= 0 and not all zero in every batch")
        if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
            raise RankerError(f"lr: the learning rate must be a finite number > 0, not {lr!r}")
        rate = np.float32(lr)
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
        self._call("set_weights", weights=self._vector(weights, PARAMETER_COUNT, "weights"))

    def get_state(self) -> FloatArray:
        """Weights, Adam first and second moments, then the step count: ``STATE_SIZE`` floats."""
        state: FloatArray = self._call("get_state")["state"]
        return state

    def set_state(self, state: npt.ArrayLike) -> None:
        """Restore what :meth:`get_state` returned."""
        vector = self._vector(state, STATE_SIZE, "state")
        p = PARAMETER_COUNT
        step = float(vector[3 * p])
        if step < 0 or step != int(step):
            raise RankerError(f"state: the step count must be a whole number >= 0, not {step}")
        if (vector[2 * p : 3 * p] < 0).any():
            raise RankerError("state: Adam second moments must be >= 0")
        if step == 0 and vector[p : 3 * p].any():
            # The model reads the moments as zero before its first step.
            raise RankerError("state: Adam moments must be zero while the step count is 0")
        self._call("set_state", state=vector)

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

    # Input checks: every refusal is a RankerError that names the input.

    @staticmethod
    def _rows(x: npt.ArrayLike) -> FloatArray:
        try:
            rows = np.ascontiguousarray(x, dtype=np.float32)
        except (TypeError, ValueError) as error:
            raise RankerError(f"x: not an array of feature rows: {error}") from None
        if rows.ndim != 2 or rows.shape[1] != FEATURES:
            raise RankerError(
                f"x: expected feature rows of shape [N, {FEATURES}], got {list(rows.shape)}"
            )
        return rows

    @staticmethod
    def _vector(values: npt.ArrayLike, size: int, name: str) -> FloatArray:
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
