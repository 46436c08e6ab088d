"""Signed checkpoints of the decision log, in the C2SP ``tlog-checkpoint`` format.

A checkpoint states "the log named *origin* had *size* entries and this Merkle root" and is
signed as a C2SP ``signed-note`` with Ed25519, so that any tooling of the transparency-log
ecosystem (Go's ``sumdb/note``, transparency-dev witnesses) can read and verify it::

    <origin>\\n<size>\\n<base64 root>\\n
    \\n
    — <key name> <base64(4-byte key ID || 64-byte Ed25519 signature)>\\n

The log signs with ``CheckpointSigner``; an auditor opens a note with ``open_checkpoint`` and the
log's verifier key (``<name>+<hex key ID>+<base64(0x01 || public key)>``), then checks proofs
from ``_merkle`` against the root it got back. Nothing here does I/O. Every refusal raises
``CheckpointError`` with a sentence saying what was wrong; the note's text is never trusted
before a signature by the expected key has verified.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)

from sottovoce.policy._errors import CheckpointError
from sottovoce.policy._merkle import HASH_SIZE

__all__ = [
    "Checkpoint",
    "CheckpointSigner",
    "key_id",
    "open_checkpoint",
    "parse_verifier_key",
    "verifier_key",
]

_ED25519 = b"\x01"  # signed-note signature type of plain Ed25519
_SIG_PREFIX = "— "  # em dash U+2014 and a space open every signature line
_KEY_ID_SIZE = 4
_SIGNATURE_SIZE = 64
_MAX_SIGNATURES = 100  # signed-note: verifiers must accept 16 and should cap the count
_MAX_SIZE = 2**64 - 1  # sizes are uint64 in every other implementation
_SIZE_LINE = re.compile(r"0|[1-9][0-9]*")
_HEX_KEY_ID = re.compile(r"[0-9a-fA-F]{8}")
_HEX_PRIVATE_KEY = re.compile(r"[0-9a-fA-F]{64}")


def _b64decode(text: str) -> bytes | None:
    """Standard base64 in its one canonical spelling, or None.

    Re-encoding rules out padding tricks and stray bits, so one value has exactly one text.
    """
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        return None
    return raw if base64.b64encode(raw).decode("ascii") == text else None


def _is_key_name(name: str) -> bool:
    """signed-note key names: non-empty, no Unicode spaces, no '+' (it separates key fields)."""
    return bool(name) and "+" not in name and not any(c.isspace() or ord(c) < 0x20 for c in name)


def key_id(name: str, public_key: bytes) -> bytes:
    """The 4-byte key ID of an Ed25519 key: SHA-256(name || 0x0A || 0x01 || key)[:4]."""
    return hashlib.sha256(name.encode() + b"\n" + _ED25519 + public_key).digest()[:_KEY_ID_SIZE]


def verifier_key(name: str, public_key: bytes) -> str:
    """The verifier key (``name+hexid+base64key``) of the 32-byte Ed25519 ``public_key``.

    An aggregator signs its log's checkpoints with its region's signing key under the name
    ``sottovoce.aggregator/<region>``, so an auditor derives its verifier key from the policy.
    """
    if not _is_key_name(name):
        raise CheckpointError(f"the key name {name!r} must be non-empty, without spaces or '+'")
    if len(public_key) != 32:
        raise CheckpointError(f"an Ed25519 public key is 32 bytes, got {len(public_key)}")
    encoded = base64.b64encode(_ED25519 + public_key).decode("ascii")
    return f"{name}+{key_id(name, public_key).hex()}+{encoded}"


@dataclass(frozen=True)
class Checkpoint:
    """The log's state at one moment: who (``origin``), how many entries, which root."""

    origin: str
    size: int
    root: bytes

    def __post_init__(self) -> None:
        # A checkpoint that could not be parsed back must not be signable either.
        if not self.origin or any(ord(c) < 0x20 for c in self.origin):
            raise ValueError("the origin must be one non-empty line without control characters")
        if not 0 <= self.size <= _MAX_SIZE:
            raise ValueError(f"the size {self.size} is outside 0..2**64-1")
        if len(self.root) != HASH_SIZE:
            raise ValueError(f"the root is {len(self.root)} bytes long, expected {HASH_SIZE}")

    def body(self) -> bytes:
        """The note text that is signed: three lines, each ending in a newline."""
        root = base64.b64encode(self.root).decode("ascii")
        return f"{self.origin}\n{self.size}\n{root}\n".encode()


class CheckpointSigner:
    """Signs checkpoints as C2SP signed notes with one named Ed25519 key."""

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        if not _is_key_name(name):
            raise ValueError(f"key name {name!r} must be non-empty, without spaces or '+'")
        self._name = name
        self._key = private_key
        self._public = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self._key_id = key_id(name, self._public)

    @classmethod
    def from_private_bytes(cls, name: str, raw: bytes) -> CheckpointSigner:
        """A signer from a 32-byte Ed25519 private key (the RFC 8032 seed)."""
        if len(raw) != 32:
            raise ValueError(f"an Ed25519 private key is 32 bytes, got {len(raw)}")
        return cls(name, Ed25519PrivateKey.from_private_bytes(raw))

    @classmethod
    def from_key_file(cls, name: str, data: bytes, *, source: str) -> CheckpointSigner:
        """A signer from the bytes of a key file: an unencrypted PEM Ed25519 private key (what
        ``sottovoce aggregator keygen`` writes as ``signing.pem``), or the 32-byte key as 64
        hexadecimal digits. Raises ``CheckpointError`` naming ``source`` and what it holds."""
        text = data.strip()
        if _HEX_PRIVATE_KEY.fullmatch(text.decode("ascii", "replace")):
            return cls.from_private_bytes(name, bytes.fromhex(text.decode("ascii")))
        if not text.startswith(b"-----BEGIN "):
            raise CheckpointError(
                f"{source} holds neither a PEM private key (as `sottovoce aggregator keygen` "
                "writes: the region's signing.pem) nor an Ed25519 private key in 64 hex digits"
            )
        try:
            key = load_pem_private_key(text, password=None)
        except TypeError:
            raise CheckpointError(f"{source} is an encrypted PEM key; decrypt it first") from None
        except (ValueError, UnsupportedAlgorithm):
            raise CheckpointError(f"{source} is not a readable PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            kind = type(key).__name__.removeprefix("_").removesuffix("PrivateKey") or "another"
            raise CheckpointError(
                f"{source} holds an {kind} private key, not an Ed25519 one: checkpoints are "
                "signed with the region's signing key (signing.pem), not its HPKE key"
            )
        return cls(name, key)

    @classmethod
    def generate(cls, name: str) -> CheckpointSigner:
        """A signer with a fresh random key; keep ``private_bytes()`` to sign again later."""
        return cls(name, Ed25519PrivateKey.generate())

    @property
    def name(self) -> str:
        return self._name

    @property
    def key_id(self) -> bytes:
        return self._key_id

    @property
    def verifier_key(self) -> str:
        """What auditors need to open this signer's notes: ``name+hexid+base64key``."""
        return verifier_key(self._name, self._public)

    def private_bytes(self) -> bytes:
        """The raw 32-byte private key, for the log to store and reload."""
        return self._key.private_bytes_raw()

    def sign(self, checkpoint: Checkpoint) -> bytes:
        """The complete signed note for ``checkpoint``."""
        body = checkpoint.body()
        signature = base64.b64encode(self._key_id + self._key.sign(body)).decode("ascii")
        return body + f"\n{_SIG_PREFIX}{self._name} {signature}\n".encode()


def parse_verifier_key(vkey: str) -> tuple[str, bytes, Ed25519PublicKey]:
    """Split a verifier key into its name, 4-byte key ID and Ed25519 public key.

    Raises ``CheckpointError`` unless the key is well formed, is Ed25519, and its key ID is the
    one its name and key imply. Spaces around it (a key pasted with its newline) are ignored.
    """
    vkey = vkey.strip()
    if not vkey:
        raise CheckpointError("the verifier key is empty")
    parts = vkey.split("+", 2)  # names hold no '+', base64 may
    if len(parts) != 3:
        raise CheckpointError("a verifier key has the form <name>+<hex key ID>+<base64 key>")
    name, hex_id, encoded = parts
    if not _is_key_name(name):
        raise CheckpointError(f"the verifier key name {name!r} has spaces or is empty")
    if not _HEX_KEY_ID.fullmatch(hex_id):
        raise CheckpointError(f"the verifier key ID {hex_id!r} is not 8 hexadecimal digits")
    raw = _b64decode(encoded)
    if raw is None or len(raw) != 1 + 32 or raw[:1] != _ED25519:
        raise CheckpointError("the verifier key is not base64 of 0x01 and a 32-byte Ed25519 key")
    claimed = bytes.fromhex(hex_id)
    if claimed != key_id(name, raw[1:]):
        raise CheckpointError(f"the verifier key ID {hex_id} does not match its name and key")
    return name, claimed, Ed25519PublicKey.from_public_bytes(raw[1:])


def _split_note(note: bytes) -> tuple[bytes, list[str]]:
    """The signed text and the signature lines of a signed note."""
    try:
        decoded = note.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError("the note is not valid UTF-8") from None
    if any(ord(c) < 0x20 and c != "\n" for c in decoded):
        raise CheckpointError("the note contains control characters other than newline")
    split = note.rfind(b"\n\n")
    if split < 0:
        raise CheckpointError("the note has no blank line before its signatures")
    signatures = note[split + 2 :].decode("utf-8")
    if not signatures:
        raise CheckpointError("the note has no signature lines after its blank line")
    if not signatures.endswith("\n"):
        raise CheckpointError("the note's signatures do not end with a newline")
    lines = signatures[:-1].split("\n")
    if len(lines) > _MAX_SIGNATURES:
        raise CheckpointError(f"the note has more than {_MAX_SIGNATURES} signatures")
    return note[: split + 1], lines


def _verify_signatures(text: bytes, lines: list[str], vkey: str) -> None:
    """Require a good signature by ``vkey``; other signers are skipped, as the spec demands."""
    name, wanted_id, public_key = parse_verifier_key(vkey)
    seen: set[tuple[str, bytes]] = set()
    verified = False
    for line in lines:
        if not line.startswith(_SIG_PREFIX):
            raise CheckpointError(f"the signature line {line!r} does not start with '— '")
        signer, sep, encoded = line[len(_SIG_PREFIX) :].partition(" ")
        if not sep:
            raise CheckpointError(f"the signature line {line!r} has no space before the signature")
        if not _is_key_name(signer):
            raise CheckpointError(f"the signature line {line!r} has no valid key name")
        raw = _b64decode(encoded)
        if raw is None or len(raw) <= _KEY_ID_SIZE:
            raise CheckpointError(f"the signature by {signer!r} is not valid base64 of a signature")
        line_id, signature = raw[:_KEY_ID_SIZE], raw[_KEY_ID_SIZE:]
        if (signer, line_id) in seen:
            raise CheckpointError(f"the note is signed twice by key {signer!r}")
        seen.add((signer, line_id))
        if signer != name or line_id != wanted_id:
            continue
        if len(signature) != _SIGNATURE_SIZE:
            raise CheckpointError(f"the signature by {name!r} is not a 64-byte Ed25519 signature")
        try:
            public_key.verify(signature, text)
        except InvalidSignature:
            raise CheckpointError(f"the signature by {name!r} does not verify") from None
        verified = True
    if not verified:
        raise CheckpointError(f"the note carries no signature by key {name!r}")


def _parse_body(text: bytes) -> Checkpoint:
    lines = text.decode("utf-8").split("\n")[:-1]  # the text ends with its last newline
    if len(lines) < 3:
        raise CheckpointError("a checkpoint has three lines: origin, size and root hash")
    if len(lines) > 3:
        raise CheckpointError("the checkpoint has extension lines, which this log does not use")
    origin, size_line, root_line = lines
    if not origin:
        raise CheckpointError("the checkpoint's origin line is empty")
    if not _SIZE_LINE.fullmatch(size_line) or int(size_line) > _MAX_SIZE:
        raise CheckpointError(f"the tree size {size_line!r} is not a decimal number below 2**64")
    root = _b64decode(root_line)
    if root is None or len(root) != HASH_SIZE:
        raise CheckpointError(f"the root hash {root_line!r} is not base64 of a 32-byte hash")
    return Checkpoint(origin=origin, size=int(size_line), root=root)


def open_checkpoint(note: bytes, verifier_key: str, *, origin: str | None = None) -> Checkpoint:
    """The checkpoint in ``note`` once a signature by ``verifier_key`` has verified.

    With ``origin``, the checkpoint must also come from that log. Raises ``CheckpointError``.
    """
    text, lines = _split_note(note)
    _verify_signatures(text, lines, verifier_key)
    checkpoint = _parse_body(text)
    if origin is not None and checkpoint.origin != origin:
        raise CheckpointError(
            f"the checkpoint is from log {checkpoint.origin!r}, expected {origin!r}"
        )
    return checkpoint
