"""The enrollment key check (pure arithmetic in ``aggregator._ed25519``) agrees with libsodium's
``crypto_core_ed25519_is_valid_point`` (canonical, on the curve, in the prime-order subgroup,
not of small order), an independent implementation, on honest, small-order, mixed-order,
non-canonical, off-curve and random encodings; and the numbers its u-only method rests on
(the twist's order, the scalars it compares) are what its docstring says."""

from __future__ import annotations

import os
from math import gcd

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st
from nacl.bindings import (
    crypto_core_ed25519_add,
    crypto_core_ed25519_is_valid_point,
    crypto_scalarmult_ed25519_base_noclamp,
)

from sottovoce.aggregator._ed25519 import _L, _P, is_device_key

# Order-8 torsion point (RFC 8032 encoding), and the order-4 and order-2 ones.
TORSION = [bytes.fromhex(h) for h in (
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
)]  # fmt: skip
IDENTITY = bytes([1]) + bytes(31)


def _multiples(point: bytes, count: int) -> list[bytes]:
    out = [IDENTITY]
    for _ in range(count - 1):
        out.append(crypto_core_ed25519_add(out[-1], point))
    return out


TORSION_GROUP = _multiples(TORSION[0], 8)  # [j]T for the order-8 point T, j = 0 .. 7


def _honest() -> bytes:
    return Ed25519PrivateKey.generate().public_key().public_bytes_raw()


def _flip_sign(raw: bytes) -> bytes:
    return raw[:31] + bytes([raw[31] ^ 0x80])


def _probably_prime(n: int) -> bool:
    """Miller-Rabin with the first twenty primes as bases."""
    bases = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71]
    if n in bases:
        return True
    if n < 2 or any(n % b == 0 for b in bases):
        return False
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for b in bases:
        x = pow(b, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def test_honest_keys_pass_both() -> None:
    for _ in range(50):
        key = _honest()
        assert is_device_key(key) and crypto_core_ed25519_is_valid_point(key)
        negated = _flip_sign(key)  # -P: in the subgroup with P
        assert is_device_key(negated) and crypto_core_ed25519_is_valid_point(negated)


@pytest.mark.parametrize("torsion", TORSION)
def test_small_and_mixed_order_points_fail_both(torsion: bytes) -> None:
    assert not is_device_key(torsion) and not crypto_core_ed25519_is_valid_point(torsion)
    mixed = crypto_core_ed25519_add(_honest(), torsion)
    assert not is_device_key(mixed) and not crypto_core_ed25519_is_valid_point(mixed)


def test_the_torsion_group_is_eight_points_all_refused() -> None:
    assert len(set(TORSION_GROUP)) == 8
    assert crypto_core_ed25519_add(TORSION_GROUP[7], TORSION[0]) == IDENTITY
    assert set(TORSION) < set(TORSION_GROUP)
    for point in TORSION_GROUP + [_flip_sign(t) for t in TORSION_GROUP]:
        assert not is_device_key(point) and not crypto_core_ed25519_is_valid_point(point)


def test_random_and_non_canonical_encodings_agree() -> None:
    samples = [os.urandom(32) for _ in range(400)]
    # y at or above p: the same y spelled a second way
    samples += [(2**255 - 19 + k).to_bytes(32, "little") for k in range(19)]
    samples += [bytes([b]) + b"\x00" * 30 + b"\x80" for b in range(4)]  # x = 0 with the sign bit
    verdicts = [(is_device_key(s), crypto_core_ed25519_is_valid_point(s)) for s in samples]
    assert [s.hex() for s, (ours, theirs) in zip(samples, verdicts, strict=True)
            if ours != theirs] == []  # fmt: skip
    assert any(ours for ours, _ in verdicts)  # some random encodings are valid keys


def test_a_y_on_no_point_of_the_curve_is_refused() -> None:
    """No square root is taken: such a y is a point of the twist, and the subgroup test itself
    must refuse it. Which y are off the curve is decided here by Euler's criterion."""
    d = -121665 * pow(121666, -1, _P) % _P
    off_curve = on_curve = 0
    for _ in range(300):
        y = int.from_bytes(os.urandom(32), "little") % _P
        x2 = (y * y - 1) * pow(d * y * y + 1, -1, _P) % _P
        raw = y.to_bytes(32, "little")
        if x2 and pow(x2, (_P - 1) // 2, _P) != 1:
            off_curve += 1
            assert not is_device_key(raw) and not crypto_core_ed25519_is_valid_point(raw)
        else:
            on_curve += 1
            assert is_device_key(raw) == bool(crypto_core_ed25519_is_valid_point(raw))
    assert off_curve > 50 and on_curve > 50


def test_the_numbers_the_check_rests_on() -> None:
    c = _L - 2**252
    assert c % 2 == 1 and c < 2**125 and _probably_prime(_L)
    # The twist has p + 1 + t points where the curve has p + 1 - t = 8L.
    q, rest = divmod(2 * _P + 2 - 8 * _L, 4)
    assert rest == 0 and q > 2**252 and _probably_prime(q)
    # u([2^252]P) = u([c]P) means [2^252 + c]P = O or [2^252 - c]P = O: on the curve only the
    # first can hold for P other than O, on the twist neither.
    assert gcd(2**252 - c, 8 * _L) == 1
    assert gcd(2**252 + c, 4 * q) == gcd(2**252 - c, 4 * q) == 1


@given(st.binary(min_size=32, max_size=32))
def test_any_32_bytes_get_libsodiums_verdict(raw: bytes) -> None:
    assert is_device_key(raw) == bool(crypto_core_ed25519_is_valid_point(raw))


@given(scalar=st.integers(1, _L - 1), torsion=st.integers(0, 7), flip=st.booleans())
def test_a_subgroup_point_plus_torsion_is_a_key_only_without_torsion(
    scalar: int, torsion: int, flip: bool
) -> None:
    point = crypto_scalarmult_ed25519_base_noclamp(scalar.to_bytes(32, "little"))
    point = crypto_core_ed25519_add(point, TORSION_GROUP[torsion])
    if flip:
        point = _flip_sign(point)
    assert is_device_key(point) == (torsion == 0) == bool(crypto_core_ed25519_is_valid_point(point))
