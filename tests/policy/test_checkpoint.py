"""Signed checkpoints: round trips, refusals, and notes signed by other implementations.

Notes are also assembled here by hand with ``cryptography`` (not through ``CheckpointSigner``),
so the format is checked against the C2SP text rather than against itself. Two external notes
pin interoperability: a real sum.golang.org checkpoint with the Go checksum database's published
verifier key, and sigsum-go's checkpoint test vector, whose signing key is a fixed seed.
"""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given
from hypothesis import strategies as st

from sottovoce.policy._checkpoint import (
    Checkpoint,
    CheckpointSigner,
    key_id,
    open_checkpoint,
    parse_verifier_key,
)
from sottovoce.policy._errors import CheckpointError

NAME = "log.sottovoce.example/decisions"
SEED = bytes(range(32))
ROOT = hashlib.sha256(b"some root").digest()
SIGNER = CheckpointSigner.from_private_bytes(NAME, SEED)
CHECKPOINT = Checkpoint(origin=NAME, size=42, root=ROOT)


def _public(seed: bytes) -> bytes:
    key = Ed25519PrivateKey.from_private_bytes(seed).public_key()
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _sig_line(seed: bytes, name: str, text: bytes, *, key_hash: bytes | None = None) -> bytes:
    """One signature line made straight from the signed-note spec."""
    pub = _public(seed)
    if key_hash is None:
        key_hash = hashlib.sha256(name.encode() + b"\n\x01" + pub).digest()[:4]
    sig = Ed25519PrivateKey.from_private_bytes(seed).sign(text)
    return f"— {name} {base64.b64encode(key_hash + sig).decode()}\n".encode()


def _note(text: bytes, seed: bytes = SEED, name: str = NAME) -> bytes:
    return text + b"\n" + _sig_line(seed, name, text)


def _body(origin: str, size: str, root: str) -> bytes:
    return f"{origin}\n{size}\n{root}\n".encode()


ROOT_B64 = base64.b64encode(ROOT).decode()
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
# 32 bytes leave two unused low bits in the last base64 digit: setting one is non-canonical.
ROOT_B64_STRAY = ROOT_B64[:-2] + _ALPHABET[_ALPHABET.index(ROOT_B64[-2]) ^ 1] + "="


# --- format and round trip --------------------------------------------------------------------


def test_signed_note_has_the_c2sp_layout() -> None:
    note = SIGNER.sign(CHECKPOINT)
    assert CHECKPOINT.body() == f"{NAME}\n42\n{ROOT_B64}\n".encode()
    # Ed25519 is deterministic, so the hand-made note must be byte-identical.
    assert note == _note(CHECKPOINT.body())
    body, signature_line = note.decode().split("\n\n")
    assert body + "\n" == CHECKPOINT.body().decode()
    match = re.fullmatch(r"— (\S+) ([A-Za-z0-9+/=]+)\n", signature_line)
    assert match is not None and match[1] == NAME
    assert base64.b64decode(match[2])[:4] == SIGNER.key_id


def test_verifier_key_names_the_key_and_its_id() -> None:
    pub = _public(SEED)
    want_id = hashlib.sha256(NAME.encode() + b"\n\x01" + pub).digest()[:4]
    assert SIGNER.key_id == want_id == key_id(NAME, pub)
    encoded_key = base64.b64encode(b"\x01" + pub).decode()
    assert SIGNER.verifier_key == f"{NAME}+{want_id.hex()}+{encoded_key}"
    name, got_id, public_key = parse_verifier_key(SIGNER.verifier_key)
    assert (name, got_id) == (NAME, want_id)
    assert public_key.public_bytes(Encoding.Raw, PublicFormat.Raw) == pub


def test_signer_keys_can_be_stored_and_reloaded() -> None:
    signer = CheckpointSigner.generate(NAME)
    again = CheckpointSigner.from_private_bytes(NAME, signer.private_bytes())
    assert again.verifier_key == signer.verifier_key != SIGNER.verifier_key
    assert again.sign(CHECKPOINT) == signer.sign(CHECKPOINT)


def test_round_trip_with_origin_check() -> None:
    note = SIGNER.sign(CHECKPOINT)
    assert open_checkpoint(note, SIGNER.verifier_key) == CHECKPOINT
    assert open_checkpoint(note, SIGNER.verifier_key, origin=NAME) == CHECKPOINT
    with pytest.raises(CheckpointError, match=r"expected 'elsewhere\.example'"):
        open_checkpoint(note, SIGNER.verifier_key, origin="elsewhere.example")


_origins = st.text(
    alphabet=st.characters(min_codepoint=0x20, exclude_categories=("Cs",)), min_size=1
)


@given(_origins, st.integers(0, 2**64 - 1), st.binary(min_size=32, max_size=32))
def test_any_checkpoint_round_trips(origin: str, size: int, root: bytes) -> None:
    checkpoint = Checkpoint(origin=origin, size=size, root=root)
    assert open_checkpoint(SIGNER.sign(checkpoint), SIGNER.verifier_key) == checkpoint


@given(st.data())
def test_any_flipped_bit_is_refused(data: st.DataObject) -> None:
    note = SIGNER.sign(CHECKPOINT)
    bit = data.draw(st.integers(0, len(note) * 8 - 1), label="bit")
    changed = bytearray(note)
    changed[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(CheckpointError):
        open_checkpoint(bytes(changed), SIGNER.verifier_key)


# --- tampering and other keys -----------------------------------------------------------------


def _resigned_body(note: bytes, body: bytes) -> bytes:
    """Put another body above the original signature lines."""
    return body + note[note.rindex(b"\n\n") + 1 :]


@pytest.mark.parametrize(
    "body",
    [
        _body(NAME, "43", ROOT_B64),
        _body(NAME, "41", ROOT_B64),
        _body(NAME, "42", base64.b64encode(hashlib.sha256(b"other").digest()).decode()),
        _body("log.sottovoce.example/other", "42", ROOT_B64),
    ],
    ids=["size-up", "size-down", "root", "origin"],
)
def test_tampered_checkpoint_is_refused(body: bytes) -> None:
    forged = _resigned_body(SIGNER.sign(CHECKPOINT), body)
    with pytest.raises(CheckpointError, match="does not verify"):
        open_checkpoint(forged, SIGNER.verifier_key)


def test_signature_by_another_key_is_refused() -> None:
    other = CheckpointSigner.from_private_bytes(NAME, bytes(32))  # same name, other key
    stranger = CheckpointSigner.from_private_bytes("stranger.example", bytes(32))
    for signer in (other, stranger):
        with pytest.raises(CheckpointError, match="no signature by key"):
            open_checkpoint(signer.sign(CHECKPOINT), SIGNER.verifier_key)


def test_other_signers_are_ignored_but_a_bad_signature_by_ours_is_not() -> None:
    body = CHECKPOINT.body()
    ours = _sig_line(SEED, NAME, body)
    witness = _sig_line(bytes(32), "witness.example", body)
    assert open_checkpoint(body + b"\n" + witness + ours, SIGNER.verifier_key) == CHECKPOINT
    # A line with our name and key ID must verify, even if another good one follows.
    forged = _sig_line(bytes(32), NAME, body, key_hash=SIGNER.key_id)
    with pytest.raises(CheckpointError, match="does not verify"):
        open_checkpoint(body + b"\n" + forged + ours, SIGNER.verifier_key)
    with pytest.raises(CheckpointError, match="signed twice"):
        open_checkpoint(body + b"\n" + ours + ours, SIGNER.verifier_key)


# --- malformed notes --------------------------------------------------------------------------

GOOD = CHECKPOINT.body()
SIZE_ERROR = "tree size .* is not a decimal number"
ROOT_ERROR = "root hash .* is not base64 of a 32-byte hash"
MALFORMED_BODIES = {  # each body is signed properly, so only the parser can refuse it
    "two-lines": (f"{NAME}\n42\n".encode(), "three lines"),
    "extension-line": (GOOD + b"extension\n", "extension lines"),
    "empty-origin": (_body("", "42", ROOT_B64), "origin line is empty"),
    "leading-zero": (_body(NAME, "042", ROOT_B64), SIZE_ERROR),
    "negative-size": (_body(NAME, "-1", ROOT_B64), SIZE_ERROR),
    "plus-size": (_body(NAME, "+42", ROOT_B64), SIZE_ERROR),
    "underscore-size": (_body(NAME, "4_2", ROOT_B64), SIZE_ERROR),
    "unicode-digits": (_body(NAME, "٤٢", ROOT_B64), SIZE_ERROR),
    "size-too-big": (_body(NAME, str(2**64), ROOT_B64), SIZE_ERROR),
    "root-not-base64": (_body(NAME, "42", "not base64!"), ROOT_ERROR),
    "root-31-bytes": (_body(NAME, "42", base64.b64encode(ROOT[:31]).decode()), ROOT_ERROR),
    "root-unpadded": (_body(NAME, "42", ROOT_B64.rstrip("=")), ROOT_ERROR),
    "root-stray-bits": (_body(NAME, "42", ROOT_B64_STRAY), ROOT_ERROR),
}


@pytest.mark.parametrize(
    ("body", "message"), MALFORMED_BODIES.values(), ids=MALFORMED_BODIES.keys()
)
def test_malformed_body_is_refused_even_when_signed(body: bytes, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(_note(body), SIGNER.verifier_key)


SIGNED = SIGNER.sign(CHECKPOINT)
SIGNATURE_ERROR = "is not valid base64 of a signature"
MALFORMED_NOTES = {
    "body-only": (GOOD, "no blank line"),
    "no-signatures": (GOOD + b"\n", "no signature lines"),
    "no-final-newline": (SIGNED[:-1], "do not end with a newline"),
    "not-utf8": (SIGNED.replace(b"42", b"4\xff"), "not valid UTF-8"),
    "control-char": (SIGNED.replace(b"42", b"4\t2"), "control characters"),
    "carriage-returns": (SIGNED.replace(b"\n", b"\r\n"), "control characters"),
    "hyphen-not-em-dash": (SIGNED.replace("—".encode(), b"-"), "does not start with"),
    "no-space": (SIGNED.replace(f"{NAME} ".encode(), NAME.encode()), "no space before"),
    "bad-key-name": (GOOD + b"\n\xe2\x80\x94 a+b AAAAAAAAAA==\n", "no valid key name"),
    "signature-not-base64": (GOOD + f"\n— {NAME} @@@@\n".encode(), SIGNATURE_ERROR),
    "signature-too-short": (GOOD + f"\n— {NAME} AAAAAA==\n".encode(), SIGNATURE_ERROR),
    "signature-wrong-length": (
        GOOD + f"\n— {NAME} {base64.b64encode(SIGNER.key_id + bytes(63)).decode()}\n".encode(),
        "not a 64-byte Ed25519 signature",
    ),
    "too-many-signatures": (
        GOOD
        + b"\n"
        + b"".join(_sig_line(bytes(32), f"w{i}.example", GOOD) for i in range(100))
        + _sig_line(SEED, NAME, GOOD),
        "more than 100 signatures",
    ),
}


@pytest.mark.parametrize(("note", "message"), MALFORMED_NOTES.values(), ids=MALFORMED_NOTES.keys())
def test_malformed_note_is_refused(note: bytes, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(note, SIGNER.verifier_key)


def test_sixteen_cosignatures_are_accepted() -> None:
    witnesses = b"".join(_sig_line(bytes([i]) * 32, f"w{i}.example", GOOD) for i in range(15))
    note = GOOD + b"\n" + witnesses + _sig_line(SEED, NAME, GOOD)
    assert open_checkpoint(note, SIGNER.verifier_key) == CHECKPOINT


_VKEY_NAME, _VKEY_ID, _VKEY_KEY = SIGNER.verifier_key.split("+", 2)
_ECDSA_TYPED = base64.b64encode(b"\x02" + _public(SEED)).decode()
_SHORT_KEY = base64.b64encode(b"\x01" + bytes(31)).decode()
BAD_VERIFIER_KEYS = {
    "two-fields": f"{_VKEY_NAME}+{_VKEY_ID}",
    "short-id": f"{_VKEY_NAME}+{_VKEY_ID[:7]}+{_VKEY_KEY}",
    "wrong-id": f"{_VKEY_NAME}+{bytes(4).hex()}+{_VKEY_KEY}",
    "other-name": f"other.example+{_VKEY_ID}+{_VKEY_KEY}",
    "name-with-space": f"a b+{_VKEY_ID}+{_VKEY_KEY}",
    "empty-name": f"+{_VKEY_ID}+{_VKEY_KEY}",
    "ecdsa-type": f"{_VKEY_NAME}+{_VKEY_ID}+{_ECDSA_TYPED}",
    "short-key": f"{_VKEY_NAME}+{_VKEY_ID}+{_SHORT_KEY}",
    "key-not-base64": f"{_VKEY_NAME}+{_VKEY_ID}+%%%",
}


@pytest.mark.parametrize("vkey", BAD_VERIFIER_KEYS.values(), ids=BAD_VERIFIER_KEYS.keys())
def test_malformed_verifier_key_is_refused(vkey: str) -> None:
    with pytest.raises(CheckpointError, match="verifier key"):
        parse_verifier_key(vkey)
    with pytest.raises(CheckpointError):
        open_checkpoint(SIGNED, vkey)


def test_unsignable_checkpoints_cannot_be_built() -> None:
    with pytest.raises(ValueError, match="origin"):
        Checkpoint(origin="two\nlines", size=1, root=ROOT)
    with pytest.raises(ValueError, match="size"):
        Checkpoint(origin=NAME, size=-1, root=ROOT)
    with pytest.raises(ValueError, match="root"):
        Checkpoint(origin=NAME, size=1, root=ROOT[:16])
    with pytest.raises(ValueError, match="key name"):
        CheckpointSigner.from_private_bytes("has space", SEED)


# --- notes signed elsewhere -------------------------------------------------------------------

# From sigsum-go pkg/checkpoint/checkpoint_test.go (TestGoSumDBCheckpoint): retrieved from
# https://sum.golang.org/latest on 2024-09-23; the key is Go's, from cmd/go/internal/modfetch.
GO_SUMDB_KEY = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8"
GO_SUMDB_NOTE = (
    "go.sum database tree\n30055305\nmXfgRcJ0bG0j3CPdKwgGWtUzBUbX67saZGRmFuJGGsM=\n\n"
    "— sum.golang.org Az3grpgEild5qw7+5dtV13Kf1C2Xurm8q4fhdxvcsDHnqNTaxL2AFjBY+2TyGKevucFcAAlWF"
    "JJYle3EJlDCrQ+y3A8=\n"
).encode()

# From the same file (TestCheckpointSigned): sigsum signs with the Ed25519 seed 17, 0, 0, ...
SIGSUM_ORIGIN = (
    "sigsum.org/v1/tree/e796172b92befd62d9dc67e41c2f5bc9d3100a3023b20b1ca40288dd1c679e69"
)
SIGSUM_NOTE = (
    f"{SIGSUM_ORIGIN}\n10\nHA5HAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n\n"
    f"— {SIGSUM_ORIGIN} gJ2ho0n8F8olcerUF1FFdv235A/5as/coWrpLrtE7ovMeP5whgwouYExowG/lTznxu6OU"
    "Gjjt5yJQ6bXtTcf718MqAQ=\n"
).encode()


def test_opens_a_real_go_checksum_database_checkpoint() -> None:
    checkpoint = open_checkpoint(GO_SUMDB_NOTE, GO_SUMDB_KEY, origin="go.sum database tree")
    assert checkpoint.size == 30055305
    assert checkpoint.root == base64.b64decode("mXfgRcJ0bG0j3CPdKwgGWtUzBUbX67saZGRmFuJGGsM=")
    with pytest.raises(CheckpointError, match="does not verify"):
        open_checkpoint(GO_SUMDB_NOTE.replace(b"30055305", b"30055306"), GO_SUMDB_KEY)


def test_signs_exactly_as_sigsum_does() -> None:
    signer = CheckpointSigner.from_private_bytes(SIGSUM_ORIGIN, bytes([17]) + bytes(31))
    assert SIGSUM_ORIGIN.endswith(hashlib.sha256(_public(bytes([17]) + bytes(31))).hexdigest())
    checkpoint = open_checkpoint(SIGSUM_NOTE, signer.verifier_key, origin=SIGSUM_ORIGIN)
    assert checkpoint == Checkpoint(SIGSUM_ORIGIN, 10, bytes([28, 14, 71]) + bytes(29))
    assert signer.sign(checkpoint) == SIGSUM_NOTE
