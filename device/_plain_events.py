"""A hand-written reader for the common batch of events: plain dicts, well formed, read into
the very rows (:class:`._rows.EventRows`) that pydantic's validation and the body serializers
give, or ``None`` when it is not sure of any of them, and the batch goes through pydantic.

Why it exists: in ``bench/ingest.py`` validating a batch with pydantic, serializing each body
and reading the parsed models back took about 4 µs an event, a third of an append. This
reader makes the same rows in under half that, with passes in C over each column (``map``,
``set``, ``str.join``, numpy for the times) and each body ``%``-formatted from a row of the
app's own values. Below ``SMALL_BATCH`` events its fixed cost outweighs what it saves.

What keeps it equal to pydantic:

- It accepts a strict subset of what the event models accept: exact ``dict`` events of a
  ``type`` it reads; exact ``str`` and ``int`` values (no bools, no subclasses); ids and text
  of printable characters without quotes or backslashes (so a body needs no escaping); times
  as ISO text in a shape pydantic itself writes, one shape for the whole batch. Anything else
  sends the whole batch to pydantic, so every refusal, and its message, still comes from
  pydantic's path.
- What it checks is read from the models' own core schemas (:mod:`._plain_rules`); a model
  with a field of a kind it does not know is left to pydantic.
- ``tests/device/test_plain_events.py`` holds it to pydantic with Hypothesis, on generated
  valid and broken batches: it declines, or it gives exactly the rows pydantic's path gives;
  and a store fed either way holds the same rows and derived state.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from itertools import repeat
from operator import itemgetter
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from sottovoce.device._plain_rules import MODELS, TIMES, Model, Read, Rule
from sottovoce.device._rows import (
    _NOT_STORED,
    CONTEXT_FIELDS,
    FACT_FIELDS,
    EventRows,
    fact_values,
)

__all__ = ["SMALL_BATCH", "plain_rows"]

SMALL_BATCH = 100
"""Below this many events pydantic's path is as fast (numpy's fixed cost per call)."""

Events = list[dict[str, Any]]
Places = Sequence[int] | npt.NDArray[np.intp]  # where a group's events are in the batch


class _Group(NamedTuple):
    rows: list[tuple[Any, ...]]  # each event's id, user, facts, context and body


class _OtherFields(Exception):
    """The events of a group do not all give the same fields."""


def plain_rows(items: list[Any], *, smallest: int = SMALL_BATCH) -> EventRows | None:
    """The rows of ``items`` as pydantic's path would make them, or ``None`` if the batch has
    fewer than ``smallest`` events or any is not a plain event this reader is sure of (then
    pydantic reads, or refuses, the batch)."""
    if len(items) < max(smallest, 1) or list(map(type, items)) != [dict] * len(items):
        return None
    try:
        return _rows(items)
    except Exception:
        # Only an app's own objects run code here (a key's __eq__ or __hash__, before any
        # value's type is known): whatever they raise, pydantic's path meets it as before.
        return None


def _rows(items: Events) -> EventRows | None:
    kinds: list[Any] = list(map(dict.get, items, repeat("type")))
    strs = [str] * len(items)
    if list(map(type, kinds)) != strs or not MODELS.keys() >= set(kinds):
        return None
    # Every type has the same required ts: read for the whole batch at once.
    stamps = list(map(dict.get, items, repeat("ts")))
    times = TIMES.read(stamps) if list(map(type, stamps)) == strs else None
    if times is None:
        return None
    rows: list[tuple[Any, ...]] = []
    places: list[Places] = []
    for kind, where, group in _by_type(items, kinds):
        model = MODELS[kind]
        try:
            parts = [(where, _read(model, group, times.fragment))]
        except _OtherFields:  # rare: events of one type giving different fields
            parts = [(w, _read(model, g, times.fragment)) for w, g in _by_fields(where, group)]
        for part, read in parts:
            if read is None:
                return None
            rows += read.rows
            places.append(part)
    if len(places) > 1:  # back into batch order
        back = np.empty(len(items), dtype=np.intp)
        back[np.concatenate(places)] = np.arange(len(items))
        rows = list(map(rows.__getitem__, back.tolist()))
    event_id, user_id, *facts, context, bodies = zip(*rows, strict=True)
    return EventRows._make([event_id, user_id, kinds, times.values, *facts, context, bodies])


def _by_type(items: Events, kinds: list[str]) -> list[tuple[str, Places, Events]]:
    """The events by type: each type's places in the batch and events."""
    distinct = sorted(set(kinds))
    if len(distinct) == 1:
        return [(distinct[0], range(len(items)), items)]
    numbers = {kind: i for i, kind in enumerate(distinct)}
    code = np.fromiter(map(numbers.__getitem__, kinds), np.intp, len(kinds))
    order = np.argsort(code, kind="stable")
    ordered = list(map(items.__getitem__, order.tolist()))
    ends: list[int] = np.cumsum(np.bincount(code)).tolist()
    return [(kind, order[start:end], ordered[start:end])
            for kind, start, end in zip(distinct, [0, *ends], ends, strict=False)]  # fmt: skip


def _by_fields(places: Places, events: Events) -> Iterator[tuple[list[int], Events]]:
    """Events of one type by the fields they give: each set's places and events."""
    parts: dict[frozenset[Any], tuple[list[int], Events]] = {}
    for place, event in zip(places, events, strict=True):
        where, same = parts.setdefault(frozenset(event), ([], []))
        where.append(place)
        same.append(event)
    yield from parts.values()


def _read(model: Model, group: Events, stamp: str) -> _Group | None:
    """The rows of events of one type (``_OtherFields`` if they give different fields), or
    ``None``; ``stamp`` writes their times, read already."""
    given = group[0].keys()
    if not model.required <= given or not given <= model.fields.keys():
        return None
    names = tuple(f for f in model.order if f in given)
    try:
        rows: list[Any] = list(map(itemgetter(*names), group))
    except KeyError:
        raise _OtherFields from None
    if len(set(map(len, group))) != 1:  # all have the first's fields, and so many: no other
        raise _OtherFields
    values = list(zip(*rows, strict=True))
    fragments: list[str] = []
    times_of_day: dict[str, str] = {}
    written: dict[int, list[str]] = {}  # nullable columns as the body writes each value
    for k, (name, column) in enumerate(zip(names, values, strict=True)):
        if name == "ts":
            fragments.append(stamp)
            continue
        rule, nullable = model.fields[name][:2]
        if list(map(type, column)) == [rule.value_type] * len(column):  # exact types, no None
            found = rule.read(column)
            if found is not None and found.values is not None:  # a local time's text
                times_of_day |= found.values
        elif nullable and set(map(type, column)) <= {rule.value_type, type(None)}:
            found = _nullable(rule, column)
            if found is not None:
                written[k] = found.values
        else:
            return None
        if found is None:
            return None
        fragments.append(found.fragment)
    template = _template(model.kind, names, tuple(fragments))
    if written:
        rows = list(zip(*(written.get(k, v) for k, v in enumerate(values)), strict=True))
    bodies = map(template.__mod__, rows)
    by_name = dict(zip(names, values, strict=True))
    facts = [_fact(by_name.get(name), default) for name, default in FACT_FIELDS]
    context: Iterable[Any] = repeat(None)
    if model.kind == "context":
        device, network, local = map(by_name.__getitem__, CONTEXT_FIELDS)
        context = zip(device, network, map(times_of_day.__getitem__, local), strict=True)
    return _Group(list(zip(by_name["event_id"], by_name["user_id"], *facts, context, bodies,
                           strict=False)))  # fmt: skip


def _fact(values: Sequence[Any] | None, default: int | None) -> Iterable[Any]:
    """A fact's values for a group: its field's (:func:`._rows.fact_values`); ``default`` for
    each event when the group lacks the field."""
    return repeat(default) if values is None else fact_values(values, default)


def _nullable(rule: Rule, column: Sequence[Any]) -> Read | None:
    """A column of a nullable field that holds a null: each value as the body writes it
    (``null``, or by the rule's fragment), with a fragment that writes that text."""
    given = [v for v in column if v is not None]
    found = rule.read(given) if given else Read("%s")
    if found is None or found.values is not None:  # a time: never nullable
        return None
    fragment = found.fragment
    return Read("%s", ["null" if v is None else fragment % v for v in column])


@lru_cache(maxsize=256)
def _template(kind: str, names: tuple[str, ...], fragments: tuple[str, ...]) -> str:
    """The ``%``-format of the body of an event of ``kind`` from a row of the fields
    ``names``, each written by its fragment; a field not given is written as its default, a
    field not stored is taken and not written."""
    fragment = dict(zip(names, fragments, strict=True))
    parts = []
    for name, field in MODELS[kind].fields.items():
        if name in _NOT_STORED:
            continue
        if name == "type":
            value = json.dumps(kind).replace("%", "%%")
        elif name in fragment:
            value = fragment[name]
        else:
            value = json.dumps(field.default).replace("%", "%%")
        parts.append(f"{json.dumps(name)}:{value}")
    skipped = "%.0s" * sum(name in _NOT_STORED for name in names)  # first in a row
    return skipped + "{" + ",".join(parts) + "}"
