"""Merkle tree hashing and proofs for the decision log, as RFC 9162 (CT v2) defines them.

The decision log appends one leaf per policy decision; an auditor holding a signed checkpoint
(see ``_checkpoint``) asks for an inclusion proof ("this decision is in the log") or a
consistency proof ("the log at size 2 extends the log at size 1, nothing was rewritten").
This module is the pure core of that exchange: bytes in, bytes out, no storage and no I/O.
The log decides where leaf hashes live; it hands them here to get roots and proofs.

Hashing is the RFC 6962/9162 tree: ``leaf = SHA-256(0x00 || data)``,
``node = SHA-256(0x01 || left || right)``, the empty tree hashes to ``SHA-256("")``, and a tree
of ``n`` leaves splits at the largest power of two smaller than ``n``. Verification follows the
RFC 9162 §2.1.3.2 and §2.1.4.2 algorithms, with the argument checks and edge cases of the
reference implementation (transparency-dev/merkle, ``proof/verify.go``), so a proof this log
hands out verifies everywhere else and vice versa. Verification failures raise
``InclusionProofError`` / ``ConsistencyProofError`` with a sentence saying what was wrong;
misuse of the generators (an index outside the tree) raises ``ValueError``, because that is a
bug in the caller, not a bad proof from a stranger.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from sottovoce.policy._errors import ConsistencyProofError, InclusionProofError, ProofError

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "CompactRange",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root_from_leaf_hashes",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"


def leaf_hash(data: bytes) -> bytes:
    """Hash one log entry; the 0x00 prefix keeps leaves from passing for interior nodes."""
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Hash two children into their parent (0x01 prefix: domain-separated from leaves)."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n >= 2``): RFC 9162's ``k``."""
    return 1 << ((n - 1).bit_length() - 1)


def _check_leaf_hashes(hashes: Sequence[bytes]) -> None:
    for i, h in enumerate(hashes):
        if len(h) != HASH_SIZE:
            raise ValueError(f"leaf hash {i} is {len(h)} bytes long, expected {HASH_SIZE}")


def _mth(hashes: Sequence[bytes], lo: int, hi: int) -> bytes:
    """MTH of ``hashes[lo:hi]`` built level by level.

    Pairing neighbours and carrying an odd last node up unchanged builds exactly the tree that
    RFC 9162's recursive split builds, without recursion and without slicing copies.
    """
    if lo == hi:
        return EMPTY_ROOT
    level = list(hashes[lo:hi])
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """The Merkle Tree Hash (RFC 9162 §2.1.1) of a tree whose leaves hash to ``hashes``."""
    _check_leaf_hashes(hashes)
    return _mth(hashes, 0, len(hashes))


def inclusion_proof(hashes: Sequence[bytes], index: int) -> list[bytes]:
    """The audit path PATH(index, D[n]) of RFC 9162 §2.1.3.1, for ``n = len(hashes)``.

    Nodes come leaf-side first, as the verifier consumes them.
    """
    n = len(hashes)
    if not 0 <= index < n:
        raise ValueError(f"leaf index {index} is outside a tree of size {n}")
    _check_leaf_hashes(hashes)
    path: list[bytes] = []  # root-side first while descending; reversed at the end
    lo, hi, m = 0, n, index
    while hi - lo > 1:
        k = _split(hi - lo)
        if m < k:
            path.append(_mth(hashes, lo + k, hi))
            hi = lo + k
        else:
            path.append(_mth(hashes, lo, lo + k))
            lo, m = lo + k, m - k
    path.reverse()
    return path


def consistency_proof(hashes: Sequence[bytes], size1: int) -> list[bytes]:
    """The proof PROOF(size1, D[n]) of RFC 9162 §2.1.4.1, for ``n = len(hashes)``.

    Sizes 0 and ``n`` get the empty proof, which is what the verifier expects for them.
    """
    n = len(hashes)
    if not 0 <= size1 <= n:
        raise ValueError(f"old size {size1} is outside 0..{n}")
    _check_leaf_hashes(hashes)
    if size1 in (0, n):
        return []
    proof: list[bytes] = []  # root-side first while descending; reversed at the end
    lo, hi, m, whole = 0, n, size1, True  # ``whole``: the old tree is this subtree's left edge
    while m != hi - lo:
        k = _split(hi - lo)
        if m <= k:
            proof.append(_mth(hashes, lo + k, hi))
            hi = lo + k
        else:
            proof.append(_mth(hashes, lo, lo + k))
            lo, m, whole = lo + k, m - k, False
    if not whole:
        proof.append(_mth(hashes, lo, hi))
    proof.reverse()
    return proof


class CompactRange:
    """The right frontier of a growing tree: its root in O(log n) after each append.

    It keeps one hash per set bit of ``size``: the roots of the perfect subtrees that tile
    leaves ``0..size`` from the left, largest first. Appending merges equal-sized subtrees like
    a binary counter carries, so the log never rehashes old entries to learn its new root.
    ``frontier`` and ``restore`` let the log persist this state instead of rereading history.
    """

    def __init__(self) -> None:
        self._size = 0
        self._nodes: list[bytes] = []

    @classmethod
    def restore(cls, size: int, frontier: Iterable[bytes]) -> CompactRange:
        """Rebuild a range from a saved ``size`` and ``frontier``."""
        nodes = list(frontier)
        if size < 0 or len(nodes) != size.bit_count():
            raise ValueError(f"a frontier for size {size} has {size.bit_count()} hashes")
        _check_leaf_hashes(nodes)
        rng = cls()
        rng._size, rng._nodes = size, nodes
        return rng

    @property
    def size(self) -> int:
        return self._size

    @property
    def frontier(self) -> tuple[bytes, ...]:
        return tuple(self._nodes)

    def append(self, leaf: bytes) -> None:
        """Add the next leaf, given as its leaf hash."""
        if len(leaf) != HASH_SIZE:
            raise ValueError(f"leaf hash is {len(leaf)} bytes long, expected {HASH_SIZE}")
        node, carry = leaf, self._size
        while carry & 1:
            node = node_hash(self._nodes.pop(), node)
            carry >>= 1
        self._nodes.append(node)
        self._size += 1

    def root(self) -> bytes:
        """The tree's root: the frontier folded right to left, as RFC 9162's split implies."""
        if not self._nodes:
            return EMPTY_ROOT
        root = self._nodes[-1]
        for node in reversed(self._nodes[:-1]):
            root = node_hash(node, root)
        return root


def _check_hash(what: str, value: bytes, error: type[ProofError]) -> None:
    if len(value) != HASH_SIZE:
        raise error(f"{what} is {len(value)} bytes long, expected a {HASH_SIZE}-byte SHA-256 hash")


def _check_proof(proof: Sequence[bytes], want: int, error: type[ProofError]) -> None:
    if len(proof) != want:
        raise error(f"the proof has {len(proof)} hashes, a proof for these sizes has {want}")
    for i, p in enumerate(proof):
        _check_hash(f"proof hash {i}", p, error)


def _proof_shape(index: int, size: int) -> tuple[int, int]:
    """How many proof hashes lie below the point where the path to ``index`` meets the right
    border of a tree of ``size`` (``inner``), and how many above it (``border``)."""
    inner = (index ^ (size - 1)).bit_length()
    return inner, (index >> inner).bit_count()


def verify_inclusion(
    leaf_hash: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that the leaf hashing to ``leaf_hash`` sits at ``index`` in the tree with ``root``.

    Returns on success and raises ``InclusionProofError`` otherwise (RFC 9162 §2.1.3.2).
    """
    if index < 0 or tree_size < 0:
        raise InclusionProofError(f"index {index} and size {tree_size} must not be negative")
    if index >= tree_size:
        raise InclusionProofError(f"leaf index {index} is beyond a tree of size {tree_size}")
    _check_hash("the leaf hash", leaf_hash, InclusionProofError)
    _check_hash("the root", root, InclusionProofError)
    _check_proof(proof, sum(_proof_shape(index, tree_size)), InclusionProofError)

    fn, sn, r = index, tree_size - 1, leaf_hash
    for p in proof:
        if sn == 0:
            raise InclusionProofError(f"the proof is too long for a tree of size {tree_size}")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:  # the length check above makes this and the check in the loop unreachable;
        # they stay because they are the RFC's own conditions
        raise InclusionProofError(f"the proof does not reach the root of a tree of {tree_size}")
    if r != root:
        raise InclusionProofError(
            f"the proof for leaf {index} leads to a root that differs from the given root"
        )


def verify_consistency(
    size1: int, size2: int, root1: bytes, root2: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree of ``size2`` with ``root2`` extends the one of ``size1``/``root1``.

    Returns on success and raises ``ConsistencyProofError`` otherwise (RFC 9162 §2.1.4.2).
    """
    if size1 < 0 or size2 < 0:
        raise ConsistencyProofError(f"sizes {size1} and {size2} must not be negative")
    if size1 > size2:
        raise ConsistencyProofError(f"the old size {size1} is larger than the new size {size2}")
    _check_hash("the old root", root1, ConsistencyProofError)
    _check_hash("the new root", root2, ConsistencyProofError)
    if size1 == size2:
        _check_proof(proof, 0, ConsistencyProofError)
        if root1 != root2:
            raise ConsistencyProofError(f"two different roots are given for size {size1}")
        return
    if size1 == 0:  # the empty tree is a prefix of every tree
        _check_proof(proof, 0, ConsistencyProofError)
        return
    if not proof:
        raise ConsistencyProofError(f"an empty proof cannot link size {size1} to size {size2}")

    inner, border = _proof_shape(size1 - 1, size2)
    shift = ((size1 & -size1).bit_length()) - 1  # trailing zero bits of size1
    seeded = size1 == 1 << shift  # a power-of-two old tree is a node of the new one
    _check_proof(proof, (0 if seeded else 1) + inner - shift + border, ConsistencyProofError)

    path = [root1, *proof] if seeded else list(proof)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ConsistencyProofError(f"the proof is too long for a tree of size {size2}")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:  # unreachable after the length check, like the one in the loop: RFC conditions
        raise ConsistencyProofError(f"the proof does not reach the root of a tree of {size2}")
    if fr != root1:
        raise ConsistencyProofError(f"the proof does not lead to the old root (size {size1})")
    if sr != root2:
        raise ConsistencyProofError(f"the proof does not lead to the new root (size {size2})")
