"""Which operators a TFLite model file needs, read from its flatbuffer without any TFLite library.

A pip TFLite runtime runs builtin ops only: a model that needs a Flex (TensorFlow) or custom op
loads on a build machine and fails on a device. :func:`check_builtin_only` proves a file needs
none, before :class:`~sottovoce.device._ranker.Ranker` loads it and when
``sottovoce.device._build_ranker`` writes it. :func:`operator_codes` walks just enough of the
flatbuffers wire format to list a model's ``operator_codes``; a file that is not a TFLite
flatbuffer, or is cut short, is a :class:`RankerError` naming it.
"""

from __future__ import annotations

import importlib
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from sottovoce.device._ranker_layout import RankerError

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
