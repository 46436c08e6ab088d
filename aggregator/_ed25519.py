"""Whether 32 bytes are an Ed25519 public key a device could have made (pure arithmetic).

Enrollment stores a device's key for a period; a delta then counts only if its signature
verifies under that key. A key a device could have made is ``[a]B`` for a secret scalar ``a``:
the canonical encoding (RFC 8032, 5.1.3) of a point of the curve in the prime-order subgroup,
other than the identity. Anything else is refused at enrollment: an encoding that decodes to
no point; a non-canonical one (y at or above p, or the sign bit set for x = 0), which would be a
second spelling of a key; the identity and the other small-order points, under which one
signature can verify for many messages (the all-zero key is one of them); and mixed-order
points (a subgroup point plus a torsion point), which verifiers disagree about.

The arithmetic is RFC 8032's (section 5.1 and its reference code), in extended coordinates.
:func:`is_device_key` takes about a millisecond: enrollment is rare and needs a token. Why not a
library: ``cryptography`` loads any encoding that decodes (the all-zero key included) and has no
subgroup check; libsodium's ``crypto_core_ed25519_is_valid_point`` has one, but would be a
second native crypto dependency of the service for one check. It serves as the independent
reference instead: ``tests/aggregator/test_device_key_check.py`` holds the two equal on honest,
small-order, mixed-order, non-canonical and random encodings.
"""

from __future__ import annotations

from typing import Final

__all__ = ["is_device_key"]

_P: Final = 2**255 - 19
_D: Final = -121665 * pow(121666, _P - 2, _P) % _P
_L: Final = 2**252 + 27742317777372353535851937790883648493  # the prime subgroup's order
_SQRT_M1: Final = pow(2, (_P - 1) // 4, _P)

_Point = tuple[int, int, int, int]  # extended coordinates (X, Y, Z, T), x = X/Z, y = Y/Z
_IDENTITY: Final[_Point] = (0, 1, 1, 0)


def is_device_key(raw: bytes) -> bool:
    """Whether ``raw`` is the canonical encoding of a prime-order-subgroup point other than
    the identity (see the module docstring)."""
    point = _decode(raw)
    if point is None or _equal(point, _IDENTITY):
        return False
    return _equal(_multiply(_L, point), _IDENTITY)


def _decode(raw: bytes) -> _Point | None:
    if len(raw) != 32:
        return None
    value = int.from_bytes(raw, "little")
    sign, y = value >> 255, value & ((1 << 255) - 1)
    if y >= _P:
        return None
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x2 = u * pow(v, _P - 2, _P) % _P
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P:
        return None  # x^2 has no root: not on the curve
    if x == 0 and sign:
        return None  # -0: a second spelling of x = 0
    if x & 1 != sign:
        x = _P - x
    return (x, y, 1, x * y % _P)


def _add(a: _Point, b: _Point) -> _Point:
    e = (a[1] - a[0]) * (b[1] - b[0]) % _P
    f = (a[1] + a[0]) * (b[1] + b[0]) % _P
    g = 2 * a[3] * b[3] * _D % _P
    h = 2 * a[2] * b[2] % _P
    e, f, g, h = f - e, h - g, h + g, f + e
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _multiply(scalar: int, point: _Point) -> _Point:
    result = _IDENTITY
    while scalar:
        if scalar & 1:
            result = _add(result, point)
        point = _add(point, point)
        scalar >>= 1
    return result


def _equal(a: _Point, b: _Point) -> bool:
    return (a[0] * b[2] - b[0] * a[2]) % _P == 0 and (a[1] * b[2] - b[1] * a[2]) % _P == 0
