"""The enrollment key check (pure arithmetic in ``aggregator._ed25519``) agrees with libsodium's
``crypto_core_ed25519_is_valid_point`` (canonical, on the curve, in the prime-order subgroup,
not of small order), an independent implementation, on honest, small-order, mixed-order,
non-canonical and random encodings."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl.bindings import crypto_core_ed25519_add, crypto_core_ed25519_is_valid_point

from sottovoce.aggregator._ed25519 import is_device_key

# Order-8 torsion point (RFC 8032 encoding), and the order-4 and order-2 ones.
TORSION = [bytes.fromhex(h) for h in (
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
)]  # fmt: skip


def _honest() -> bytes:
    return Ed25519PrivateKey.generate().public_key().public_bytes_raw()


def test_honest_keys_pass_both() -> None:
    for _ in range(50):
        key = _honest()
        assert is_device_key(key) and crypto_core_ed25519_is_valid_point(key)


@pytest.mark.parametrize("torsion", TORSION)
def test_small_and_mixed_order_points_fail_both(torsion: bytes) -> None:
    assert not is_device_key(torsion) and not crypto_core_ed25519_is_valid_point(torsion)
    mixed = crypto_core_ed25519_add(_honest(), torsion)
    assert not is_device_key(mixed) and not crypto_core_ed25519_is_valid_point(mixed)


def test_random_and_non_canonical_encodings_agree() -> None:
    samples = [os.urandom(32) for _ in range(400)]
    # y at or above p: the same y spelled a second way
    samples += [(2**255 - 19 + k).to_bytes(32, "little") for k in range(19)]
    samples += [bytes([b]) + b"\x00" * 30 + b"\x80" for b in range(4)]  # x = 0 with the sign bit
    verdicts = [(is_device_key(s), crypto_core_ed25519_is_valid_point(s)) for s in samples]
    assert [s.hex() for s, (ours, theirs) in zip(samples, verdicts, strict=True)
            if ours != theirs] == []  # fmt: skip
    assert any(ours for ours, _ in verdicts)  # some random encodings are valid keys
