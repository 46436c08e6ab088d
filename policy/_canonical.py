"""RFC 8785 (JSON Canonicalization Scheme) encoding, fast for the values sottovoce logs.

``rfc8785.dumps`` is exact but pure Python (~50 µs for a decision). For values without floats
and with keys in the Basic Multilingual Plane, JCS output is exactly what ``json.dumps`` gives
with sorted keys, no whitespace and ``ensure_ascii=False`` (same string escapes, same key order,
integers alike), so those take the fast path; anything else goes to ``rfc8785``. A property test
holds the two equal.
"""

from __future__ import annotations

import json
from typing import Any

import rfc8785


def canonical_json(value: Any) -> bytes:
    """The RFC 8785 canonical encoding of a JSON value."""
    if _plain(value):
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return text.encode("utf-8")
    return bytes(rfc8785.dumps(value))


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, str | bool):
        return True
    if isinstance(value, int):
        return abs(value) < 2**53  # JCS refuses larger integers; let the exact encoder say so
    if isinstance(value, dict):
        return all(
            isinstance(k, str) and max(map(ord, k), default=0) <= 0xFFFF and _plain(v)
            for k, v in value.items()
        )
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return False  # floats and anything else: the exact encoder decides
