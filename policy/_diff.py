"""What changed between two policy documents, and whether each change protects users more or less.

A reviewer approving a new policy version needs the differences that matter, not a text diff of
YAML: two documents can list regions, keys or countries in another order, or spell ``30d`` as
``720h``, and still say the same thing. :func:`diff_policies` therefore compares the canonical
JSON forms (``model_dump(mode="json")``) structurally, matching regions by ``id``, aggregator keys
by ``kid`` and jurisdictions as sets, and marks each change ``stricter``, ``looser`` or ``neutral``
for privacy. :func:`format_diff` renders the result for people. Both are pure; callers load the
documents and print.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from pydantic import TypeAdapter

from sottovoce.policy._model import Duration, Policy

Kind = Literal["added", "removed", "changed"]
Severity = Literal["stricter", "looser", "neutral"]

# A position in the document as field names, with "[]" for an item of a keyed collection:
# the shape a severity rule is written against, whichever region or key it is about.
Shape = tuple[str, ...]

# Lists whose items have an identity of their own: compared item by item, not by position.
_IDENTITY = {"regions": "id", "public_keys": "kid"}
# Lists that are sets: only membership matters (``Policy.region_for`` tests membership).
_SETS = frozenset({"jurisdictions"})

_DURATION: TypeAdapter[timedelta] = TypeAdapter(Duration)


def _seconds(value: object) -> float:
    # Durations arrive in their JSON spelling; compare what they mean, not how they are written.
    return _DURATION.validate_python(value).total_seconds()


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _ordered(*levels: str) -> Callable[[object], float]:
    """A strictness rank over named levels, least strict first."""
    return lambda value: float(levels.index(str(value)))


# How strict a value is (higher = more protective of users). Only these fields have a
# direction; any other change is neutral for privacy, however much it matters otherwise.
_STRICTNESS: dict[Shape, Callable[[object], float]] = {
    ("regions", "[]", "retention", "*"): lambda v: -_seconds(v),
    ("regions", "[]", "privacy", "epsilon"): lambda v: -_number(v),
    ("regions", "[]", "privacy", "delta"): lambda v: -_number(v),
    ("regions", "[]", "privacy", "clipping_norm"): lambda v: -_number(v),
    ("regions", "[]", "privacy", "min_cohort"): _number,
    ("regions", "[]", "privacy", "noise_multiplier"): _number,
    # A cap where there was none is stricter; a smaller cap or a longer window too.
    ("regions", "[]", "privacy", "device_cap"): lambda v: 0.0 if v is None else 1.0,
    ("regions", "[]", "privacy", "device_cap", "epsilon"): lambda v: -_number(v),
    ("regions", "[]", "privacy", "device_cap", "window"): _seconds,
    ("regions", "[]", "age", "minimum_age"): _number,
    ("regions", "[]", "age", "unknown_age"): _ordered("allow", "deny"),
    ("regions", "[]", "consent", "*"): _ordered("opt_out", "opt_in"),
}


def _show(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return json.dumps(value)


@dataclass(frozen=True)
class Change:
    """One difference between two policies, at ``path`` (e.g. ``regions[eu].privacy.epsilon``).

    ``before`` and ``after`` are JSON values; ``before`` is ``None`` when ``kind`` is ``added``
    and ``after`` is ``None`` when it is ``removed``.
    """

    path: str
    before: object
    after: object
    kind: Kind
    severity: Severity

    def __str__(self) -> str:
        if self.kind == "changed":
            text = f"{_show(self.before)} -> {_show(self.after)}"
        else:
            value = self.after if self.kind == "added" else self.before
            # A whole region or key is named by its path already; its contents would flood
            # the line.
            text = self.kind if isinstance(value, dict) else f"{self.kind} {_show(value)}"
        return f"{self.path}: {text} ({self.severity})"


def _severity(shape: Shape, before: object, after: object) -> Severity:
    rank = _STRICTNESS.get(shape) or _STRICTNESS.get((*shape[:-1], "*"))
    if rank is None:
        return "neutral"
    old, new = rank(before), rank(after)
    if new > old:
        return "stricter"
    if new < old:
        return "looser"
    return "neutral"


def _keyed(items: list[object], key: str) -> dict[str, object]:
    return {str(item[key]): item for item in items if isinstance(item, dict)}


def _walk(path: str, shape: Shape, old: object, new: object) -> Iterator[Change]:
    """Changes from ``old`` to ``new`` in document order: ``old``'s order, then additions."""
    if isinstance(old, dict) and isinstance(new, dict):
        yield from _walk_mapping(path, shape, old, new)
    elif isinstance(old, list) and isinstance(new, list) and shape and shape[-1] in _IDENTITY:
        yield from _walk_keyed(path, shape, old, new, _IDENTITY[shape[-1]])
    elif isinstance(old, list) and isinstance(new, list) and shape and shape[-1] in _SETS:
        yield from (Change(path, v, None, "removed", "neutral") for v in old if v not in new)
        yield from (Change(path, None, v, "added", "neutral") for v in new if v not in old)
    elif old != new:
        yield Change(path, old, new, "changed", _severity(shape, old, new))


def _walk_mapping(
    path: str, shape: Shape, old: Mapping[str, object], new: Mapping[str, object]
) -> Iterator[Change]:
    for name in [*old, *(k for k in new if k not in old)]:
        inner = f"{path}.{name}" if path else name
        if name not in new:
            yield Change(inner, old[name], None, "removed", "neutral")
        elif name not in old:
            yield Change(inner, None, new[name], "added", "neutral")
        else:
            yield from _walk(inner, (*shape, name), old[name], new[name])


def _walk_keyed(
    path: str, shape: Shape, old: list[object], new: list[object], key: str
) -> Iterator[Change]:
    before, after = _keyed(old, key), _keyed(new, key)
    for ident in [*before, *(k for k in after if k not in before)]:
        inner = f"{path}[{ident}]"
        if ident not in after:
            yield Change(inner, before[ident], None, "removed", "neutral")
        elif ident not in before:
            yield Change(inner, None, after[ident], "added", "neutral")
        else:
            yield from _walk(inner, (*shape, "[]"), before[ident], after[ident])
    # The order of regions means nothing, but the first key of each use is the one devices
    # seal to (``Region.key``), so reordering keys that both documents list is a real change.
    if key == "kid":
        kept_before = [k for k in before if k in after]
        kept_after = [k for k in after if k in before]
        if kept_before != kept_after:
            yield Change(path, kept_before, kept_after, "changed", "neutral")


def diff_policies(old: Policy, new: Policy) -> list[Change]:
    """Every difference from ``old`` to ``new``, in document order, each with its severity.

    Empty when the two say the same thing, even if they list regions or countries in another
    order (their hashes then differ) or spell durations differently (their hashes do not).
    """
    return list(_walk("", (), old.model_dump(mode="json"), new.model_dump(mode="json")))


def _label(policy: Policy) -> str:
    return f"{policy.name} {policy.version} (sha256 {policy.hash})"


def format_diff(changes: list[Change], old: Policy, new: Policy) -> str:
    """The changes as text for a reviewer: which documents, one line per change, a tally."""
    lines = [f"--- {_label(old)}", f"+++ {_label(new)}"]
    if old.hash == new.hash:
        lines.append("no differences")
    elif not changes:
        lines.append("no differences in content (only the order of regions or countries)")
    else:
        lines.extend(f"  {change}" for change in changes)
        counts = {s: sum(c.severity == s for c in changes) for s in ("stricter", "looser")}
        neutral = len(changes) - sum(counts.values())
        noun = "change" if len(changes) == 1 else "changes"
        lines.append(
            f"{len(changes)} {noun}: {counts['stricter']} stricter, {counts['looser']} looser, "
            f"{neutral} neutral"
        )
    return "\n".join(lines)
