"""Whether 32 bytes are an Ed25519 public key a device could have made (pure arithmetic).

Enrollment stores a device's key for a period; a delta then counts only if its signature
verifies under that key. A key a device could have made is ``[a]B`` for a secret scalar ``a``:
the canonical encoding (RFC 8032, 5.1.3) of a point of the curve in the prime-order subgroup,
other than the identity. Anything else is refused at enrollment: an encoding that decodes to
no point; a non-canonical one (y at or above p, or the sign bit set for x = 0), which would be a
second spelling of a key; the identity and the other small-order points, under which one
signature can verify for many messages (the all-zero key is one of them); and mixed-order
points (a subgroup point plus a torsion point), which verifiers disagree about.

How. The verdict depends on y alone: ``(x, y)`` and ``(-x, y)`` are in the subgroup together, and
x = 0 only at y = 1 and y = -1 (the identity and the point of order 2), both refused whatever
the sign bit says. y maps to u = (1 + y) / (1 - y) on Curve25519, the Montgomery form of the
same group (RFC 7748, 4.1), kept as a fraction U / W. Its u-only formulas serve a y that is on
no point of the curve just as well: such a u belongs to the curve's quadratic twist, a group of
order 4q with q a prime above 2^252, so no square root is taken to decode x. With the subgroup
order L = 2^252 + c (c odd, below 2^125), P is in the subgroup exactly when [2^252]P = -[c]P.
The check compares the u of both sides, equal exactly when [2^252]P = ±[c]P, that is when
[2^252 + c]P = O or [2^252 - c]P = O. On the curve the second holds only for P = O, as
2^252 - c shares no factor with the curve's order 8L; on the twist neither holds for P other
than O, as neither scalar shares a factor with 4q. [2^252]P is 252 doublings of P; [c]P is
summed from the same doublings, right to left, keeping A = [c mod 2^i]P and B = A - [2^i]P so
that each differential addition knows its difference (the right-to-left Montgomery ladder of
Oliveira et al., "How to (pre-)compute a ladder", SAC 2017). Points of small order (order
dividing 8, or 4 on the twist) are exactly those with [2^252]P = O and are refused; they are
also the only points for which the additions could meet an input their formula does not
cover (a difference of order 1 or 2, an operand of order 4). The tests check these numbers.

:func:`is_device_key` takes about half a millisecond (0.48 to 0.50 ms measured; the
double-and-add over extended Edwards coordinates it replaced took 1.4 ms). Why not a library:
``cryptography`` loads any encoding that decodes (the all-zero key included) and has no
subgroup check; libsodium's ``crypto_core_ed25519_is_valid_point`` has one, but would be a
second native crypto dependency of the service for one check. It serves as the independent
reference instead: ``tests/aggregator/test_device_key_check.py`` holds the two equal on honest,
small-order, mixed-order, non-canonical and random encodings.
"""

from __future__ import annotations

from typing import Final

__all__ = ["is_device_key"]

_P: Final = 2**255 - 19
_L: Final = 2**252 + 27742317777372353535851937790883648493  # the prime subgroup's order
_C: Final = _L - 2**252
_MASK: Final = (1 << 255) - 1
_A24: Final = 121666  # (A + 2) / 4 for Curve25519's A = 486662

# For i = 1 .. 252, what [2^i]P does after it is made: bit i of c (1: added to A, 0: taken off
# B), or None once c has no more bits. Bit 0 is 1: A starts as P, and B as -P, of the same u.
_STEPS: Final[tuple[int | None, ...]] = tuple(
    (_C >> i) & 1 if i < _C.bit_length() else None for i in range(1, 253)
)


def is_device_key(raw: bytes) -> bool:
    """Whether ``raw`` is the canonical encoding of a prime-order-subgroup point other than
    the identity (see the module docstring)."""
    if len(raw) != 32:
        return False
    y = int.from_bytes(raw, "little") & _MASK  # the sign bit of x cannot change the verdict
    if y >= _P:
        return False
    return _in_prime_subgroup(1 + y, 1 - y)


def _in_prime_subgroup(u: int, w: int) -> bool:
    """Whether the point of u-coordinate u / w (on Curve25519 or its twist) is in the
    prime-order subgroup and not of small order.

    Reductions fold 2^255 = 19 (mod p): ``(z & _MASK) + (z >> 255) * 19`` is z up to a few
    bits, at half the cost of ``% _P``. A product is folded once where it feeds a sum and twice
    where it is kept for the next step, so every kept coordinate stays below 2^256 in absolute
    value and every product below 2^550; only the final comparisons reduce fully.
    """
    m = _MASK
    au, aw = bu, bw = u, w
    s, d = u + w, u - w
    for step in _STEPS:
        # (u : w) <- [2](u : w) from s = u + w, d = u - w: RFC 7748's doubling, (A + 2) / 4 form
        s *= s
        s = (s & m) + (s >> 255) * 19
        d *= d
        d = (d & m) + (d >> 255) * 19
        u = s * d
        u = (u & m) + (u >> 255) * 19
        u = (u & m) + (u >> 255) * 19
        s -= d
        w = s * (d + _A24 * s)
        w = (w & m) + (w >> 255) * 19
        w = (w & m) + (w >> 255) * 19
        s, d = u + w, u - w
        if step is None:
            continue
        # RFC 7748's differential addition, its difference projective:
        # A <- A + [2^i]P (difference B), or B <- B - [2^i]P (difference A)
        qu, qw, du, dw = (au, aw, bu, bw) if step else (bu, bw, au, aw)
        e = (qu - qw) * s
        e = (e & m) + (e >> 255) * 19
        f = (qu + qw) * d
        f = (f & m) + (f >> 255) * 19
        qu = e + f
        qu *= qu
        qu = ((qu & m) + (qu >> 255) * 19) * dw
        qu = (qu & m) + (qu >> 255) * 19
        qu = (qu & m) + (qu >> 255) * 19
        qw = e - f
        qw *= qw
        qw = ((qw & m) + (qw >> 255) * 19) * du
        qw = (qw & m) + (qw >> 255) * 19
        qw = (qw & m) + (qw >> 255) * 19
        if step:
            au, aw = qu, qw
        else:
            bu, bw = qu, qw
    if w % _P == 0:
        return False  # [2^252]P = O: P has small order
    return (u * aw - w * au) % _P == 0  # u([2^252]P) = u([c]P)
