"""What the plain event reader (:mod:`._plain_events`) checks of each field, read from the
event models' own core schemas: fields in the models' order, lengths, bounds, literals,
defaults, which may be null. Each rule checks a whole column of values at once and accepts
only what the model's schema accepts (often less); a model with a field of a kind not known
here is not read by the plain reader at all.

A rule's :meth:`read` gives the ``%``-fragment that writes the field into an event's body as
pydantic's serializer writes it, or ``None`` when any value is not one it is sure of.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import time
from typing import Any, ClassVar, NamedTuple

from sottovoce.device._events import (
    EVENT_MODELS,
    ID_PATTERN,
    INSTANCE,
    TEXT_PATTERN,
    USER_PATTERN,
)
from sottovoce.device._iso_times import instants, shaped
from sottovoce.device._rows import _NOT_STORED, to_ms

__all__ = ["MODELS", "TIMES", "Model", "Read", "Rule"]

_REQUIRED: Any = object()  # the default of a field without one


def _plain_id(text: str) -> bool:
    return text.isprintable() and " " not in text and '"' not in text and "\\" not in text


def _plain_text(text: str) -> bool:
    return text.isprintable() and '"' not in text and "\\" not in text


# Characters narrower than each pattern's: printable ones (no C0 or C1 control, no Unicode
# separator and so no whitespace but the space), none that JSON would escape in a body.
_CHARACTERS: dict[str, Callable[[str], bool]] = {
    ID_PATTERN: _plain_id, USER_PATTERN: str.isprintable, TEXT_PATTERN: _plain_text,
}  # fmt: skip


class Read(NamedTuple):
    """What a rule made of a column: the ``%``-fragment that writes the field into a body
    (it takes the field's value) and, for times, what the rows take of the values (epoch
    milliseconds; for local times, the text pydantic writes, by the text given)."""

    fragment: str
    values: Any = None


@dataclass(frozen=True)
class _Text:
    low: int
    high: int
    characters: Callable[[str], bool]
    value_type: ClassVar[type] = str

    def read(self, values: Sequence[Any]) -> Read | None:
        if max(map(len, values)) > self.high:
            return None
        if ("" in values) if self.low == 1 else min(map(len, values)) < self.low:
            return None
        return Read('"%s"') if self.characters("".join(values)) else None


@dataclass(frozen=True)
class _Int:
    low: int
    high: int
    value_type: ClassVar[type] = int

    def read(self, values: Sequence[Any]) -> Read | None:
        return Read("%d") if self.low <= min(values) and max(values) <= self.high else None


@dataclass(frozen=True)
class _Literal:
    expected: frozenset[Any]
    value_type: type

    def read(self, values: Sequence[Any]) -> Read | None:
        if not self.expected.issuperset(values):
            return None
        if len(self.expected) == 1:  # "%.0s" takes the value and writes nothing
            return Read("%.0s" + json.dumps(next(iter(self.expected))).replace("%", "%%"))
        return Read('"%s"' if self.value_type is str else "%d")


# The shapes (each digit written 0) of times taken: those pydantic writes back, with Z or an
# offset, with microseconds or none, and an offset of zero, which it writes Z (a fragment
# keeps the text before the offset: its length here).
_SHAPES = {
    b"0000-00-00T00:00:00Z": None,
    b"0000-00-00T00:00:00.000000Z": None,
    b"0000-00-00T00:00:00+00:00": 19,
    b"0000-00-00T00:00:00-00:00": 19,
    b"0000-00-00T00:00:00.000000+00:00": 26,
    b"0000-00-00T00:00:00.000000-00:00": 26,
}


@dataclass(frozen=True)
class _Timestamp:
    """A time as ISO text, all of a column in one shape; read as epoch milliseconds."""

    low: int  # epoch ms, inclusive
    high: int  # epoch ms, exclusive
    value_type: ClassVar[type] = str

    def read(self, values: Sequence[Any]) -> Read | None:
        found = shaped(values, _SHAPES)
        if found is None:
            return None
        shape, text = found
        if b"." in shape and ".000000" in text:  # pydantic writes no zero microseconds
            return None
        read = instants(text, shape, low=self.low, high=self.high)
        if read is None:
            return None
        ms, zero = read
        kept = _SHAPES[shape]
        return Read(f'"%.{kept}sZ"' if kept is not None and zero else '"%s"', ms)


@dataclass(frozen=True)
class _TimeOfDay:
    """A local time as text, HH:MM or HH:MM:SS, all of a column in one shape."""

    value_type: ClassVar[type] = str

    def read(self, values: Sequence[Any]) -> Read | None:
        found = shaped(values, (b"00:00", b"00:00:00"))
        if found is None:
            return None
        try:
            written = {v: time.fromisoformat(v).isoformat() for v in set(values)}
        except ValueError:  # an hour, minute or second out of range
            return None
        return Read('"%s"' if len(found[0]) == 8 else '"%s:00"', written)


Rule = _Text | _Int | _Literal | _Timestamp | _TimeOfDay


class Field(NamedTuple):
    rule: Rule
    nullable: bool
    default: Any  # _REQUIRED for a field that has none


class Model(NamedTuple):
    kind: str  # its ``type``
    fields: dict[str, Field]  # in the model's order: the body's
    required: frozenset[str]
    order: tuple[str, ...]  # how the reader takes the fields: those not stored first


def _rule(schema: dict[str, Any]) -> Rule | None:
    """The rule for a field's core schema (inside any default and nullable), if there is one
    that checks exactly what it checks, or more."""
    kind, keys = schema["type"], set(schema) - {"type", "metadata", "strict"}
    if kind == "str" and keys == {"min_length", "max_length", "pattern"}:
        characters = _CHARACTERS.get(schema["pattern"])
        if characters is not None:
            return _Text(schema["min_length"], schema["max_length"], characters)
    if kind == "int" and keys <= {"ge", "gt", "le", "lt"}:
        low = schema.get("ge", schema.get("gt", -(2**63) - 1) + 1)
        high = schema.get("le", schema.get("lt", 2**63) - 1)
        return _Int(low, high)
    if kind == "literal" and keys == {"expected"}:
        types = set(map(type, schema["expected"]))
        if types == {int} or (types == {str} and all(map(_plain_text, schema["expected"]))):
            return _Literal(frozenset(schema["expected"]), types.pop())
    if kind == "union" and [label for _, label in schema["choices"]][1:] == [INSTANCE]:
        # A time given as text or as an instance (see _events._instance_or_text).
        label, instance = schema["choices"][0][1], schema["choices"][1][0]
        bounds = set(instance) - {"type", "strict", "metadata", "microseconds_precision"}
        aware = instance.get("tz_constraint") == "aware"
        if label == "iso_datetime" and bounds == {"tz_constraint", "ge", "lt"} and aware:
            return _Timestamp(to_ms(instance["ge"]), to_ms(instance["lt"]))
        if label == "iso_time" and not bounds:
            return _TimeOfDay()
    return None


def _field(schema: dict[str, Any]) -> Field | None:
    default = _REQUIRED
    if schema["type"] == "default":
        default, schema = schema["default"], schema["schema"]
    nullable = schema["type"] == "nullable"
    rule = _rule(schema["schema"] if nullable else schema)
    return None if rule is None else Field(rule, nullable, default)


def _models() -> Iterator[Model]:
    """The event models whose every field has a rule (and that refuse extra fields)."""
    for model in EVENT_MODELS:
        schema = model.__pydantic_core_schema__
        config = schema.get("config", {})
        if config.get("extra_fields_behavior") != "forbid" or not config.get("strict"):
            continue
        read = {n: _field(f["schema"]) for n, f in schema["schema"]["fields"].items()}
        fields = {n: f for n, f in read.items() if f is not None}
        if len(fields) < len(read) or "type" not in fields:
            continue
        if any(isinstance(f.rule, _Timestamp) for n, f in fields.items() if n != "ts"):
            continue  # the reader reads times as ts, for a whole batch
        required = frozenset(n for n, f in fields.items() if f.default is _REQUIRED)
        order = (*(n for n in fields if n in _NOT_STORED),
                 *(n for n in fields if n not in _NOT_STORED and n != "type"))  # fmt: skip
        yield Model(fields["type"].default, fields, required, order)


def _readable() -> tuple[_Timestamp, dict[str, Model]]:
    """The time rule every model shares (the reader reads ``ts`` for a whole batch at once)
    and the models, by ``type``; no model if they do not share one."""
    models = list(_models())
    stamps = {model.fields.get("ts") for model in models}
    stamp = stamps.pop() if len(stamps) == 1 else None
    if stamp is None or stamp.nullable or stamp.default is not _REQUIRED:
        return _Timestamp(0, 0), {}
    if not isinstance(stamp.rule, _Timestamp):
        return _Timestamp(0, 0), {}
    return stamp.rule, {model.kind: model for model in models}


TIMES, MODELS = _readable()
"""The rule of every event's ``ts``, and the models the plain reader reads, by ``type``."""
