"""The decision log's Merkle core against outside evidence and its own invariants.

Outside evidence: the golden proof vectors of transparency-dev/merkle (read in place from
``shared/vectors/rfc6962``, never copied here) and the roots of the RFC 6962 test tree that
every CT implementation pins. Invariants: Hypothesis builds random trees and checks that proofs
verify, and that any changed bit, index, size or root makes verification raise.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sottovoce.policy._errors import ConsistencyProofError, InclusionProofError, ProofError
from sottovoce.policy._merkle import (
    EMPTY_ROOT,
    CompactRange,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)

REPO = Path(__file__).resolve().parents[2]


def _shared() -> Path:
    """The team's shared folder: $SOTTOVOCE_SHARED, else ../shared beside the repository,
    else /work/shared (where a fresh clone elsewhere, as CI makes, still finds it)."""
    candidates = [os.environ.get("SOTTOVOCE_SHARED"), REPO.parent / "shared", "/work/shared"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "vectors").is_dir():
            return Path(candidate)
    return REPO.parent / "shared"  # missing: the tests below fail and say so


VECTORS = _shared() / "vectors" / "rfc6962"

# The RFC 6962 test tree (certificate-transparency's merkle_test.py, transparency-dev/merkle's
# testonly package) and its roots for sizes 1..8.
RFC6962_LEAVES = [
    bytes.fromhex(h)
    for h in (
        *("", "00", "10", "2021", "3031", "40414243"),
        *("5051525354555657", "606162636465666768696a6b6c6d6e6f"),
    )
]
RFC6962_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
RFC6962_HASHES = [leaf_hash(leaf) for leaf in RFC6962_LEAVES]


def _vector_files() -> list[Any]:
    files = sorted(VECTORS.rglob("*.json")) if VECTORS.is_dir() else []
    if not files:  # an empty parameter list would only skip; this must fail instead
        return [pytest.param(None, id="vectors-missing")]
    return [pytest.param(f, id=f.relative_to(VECTORS).as_posix()) for f in files]


def _load(path: Path) -> dict[str, Any]:
    case: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return case


def _b64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _proof(case: dict[str, Any]) -> list[bytes]:
    return [_b64(p) for p in case["proof"] or []]


def _flip(value: bytes, bit: int) -> bytes:
    out = bytearray(value)
    out[bit // 8 % len(out)] ^= 1 << (bit % 8)
    return bytes(out)


def _reference_mth(hashes: Sequence[bytes]) -> bytes:
    """RFC 9162 §2.1.1 transcribed literally, recursion and all, as an independent oracle."""
    if not hashes:
        return hashlib.sha256(b"").digest()
    if len(hashes) == 1:
        return hashes[0]
    k = 1
    while k * 2 < len(hashes):
        k *= 2
    return node_hash(_reference_mth(hashes[:k]), _reference_mth(hashes[k:]))


# --- golden vectors -------------------------------------------------------------------------


@pytest.mark.parametrize("path", _vector_files())
def test_golden_vector(path: Path | None) -> None:
    if path is None:
        pytest.fail(f"the golden vectors are missing: expected JSON files under {VECTORS}")
    case = _load(path)
    kind = path.relative_to(VECTORS).parts[0]
    verify: Callable[[], None]
    error: type[ProofError]
    if kind == "inclusion":
        error = InclusionProofError

        def verify() -> None:
            verify_inclusion(
                _b64(case["leafHash"]),
                case["leafIdx"],
                case["treeSize"],
                _proof(case),
                _b64(case["root"]),
            )
    else:
        assert kind == "consistency", path
        error = ConsistencyProofError

        def verify() -> None:
            verify_consistency(
                case["size1"], case["size2"], _b64(case["root1"]), _b64(case["root2"]), _proof(case)
            )

    if case["wantErr"]:
        with pytest.raises(error):
            verify()
    else:
        verify()


def _happy_paths() -> list[Any]:
    # Every happy path outside single-entry/ is drawn from the RFC 6962 test tree.
    return [
        p
        for p in _vector_files()
        if p.values[0] is not None
        and p.values[0].parent.name != "single-entry"
        and not _load(p.values[0])["wantErr"]
    ]


@pytest.mark.parametrize("path", _happy_paths())
def test_generated_proofs_equal_the_vectors_happy_paths(path: Path) -> None:
    case = _load(path)
    if "leafIdx" in case:
        size, root = case["treeSize"], _b64(case["root"])
        got = inclusion_proof(RFC6962_HASHES[:size], case["leafIdx"])
    else:
        size, root = case["size2"], _b64(case["root2"])
        got = consistency_proof(RFC6962_HASHES[:size], case["size1"])
        assert _b64(case["root1"]).hex() == RFC6962_ROOTS[case["size1"] - 1]
    assert root.hex() == RFC6962_ROOTS[size - 1]
    assert got == _proof(case)


def test_vectors_stay_where_they_are_with_their_license() -> None:
    license_file = VECTORS / "LICENSE"
    assert license_file.is_file(), f"{license_file} is missing: the vectors must keep it"
    assert "Apache License" in license_file.read_text(encoding="utf-8")
    copies = [
        p
        for folder in (REPO / "tests", REPO / "policy")
        for p in folder.rglob("*.json")
        if '"wantErr"' in p.read_text(encoding="utf-8", errors="replace")
    ]
    assert not copies, f"golden vectors were copied into the repository: {copies}"


# --- hashing and the RFC 6962 test tree -----------------------------------------------------


def test_hashes_are_domain_separated_sha256() -> None:
    assert hashlib.sha256(b"").digest() == EMPTY_ROOT
    assert leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()
    left, right = leaf_hash(b"l"), leaf_hash(b"r")
    assert node_hash(left, right) == hashlib.sha256(b"\x01" + left + right).digest()
    assert node_hash(left, right) != node_hash(right, left)


def test_rfc6962_test_tree_roots() -> None:
    assert root_from_leaf_hashes([]) == EMPTY_ROOT
    rng = CompactRange()
    for size, want in enumerate(RFC6962_ROOTS, start=1):
        rng.append(RFC6962_HASHES[size - 1])
        assert root_from_leaf_hashes(RFC6962_HASHES[:size]).hex() == want
        assert rng.root().hex() == want


def test_every_proof_of_small_trees_verifies() -> None:
    hashes = [leaf_hash(i.to_bytes(2, "big")) for i in range(40)]
    for n in range(1, len(hashes) + 1):
        tree = hashes[:n]
        root = root_from_leaf_hashes(tree)
        for index in range(n):
            verify_inclusion(tree[index], index, n, inclusion_proof(tree, index), root)
        for size1 in range(n + 1):
            root1 = root_from_leaf_hashes(tree[:size1])
            verify_consistency(size1, n, root1, root, consistency_proof(tree, size1))


def test_proofs_do_not_commit_to_the_size_only_the_root_does() -> None:
    # As in RFC 9162 and transparency-dev/merkle: leaf 0's path in a 7-leaf tree has the same
    # shape as in an 8-leaf one, so the claimed size is bound by the signed root, not the proof.
    tree = RFC6962_HASHES[:7]
    root = root_from_leaf_hashes(tree)
    verify_inclusion(tree[0], 0, 8, inclusion_proof(tree, 0), root)
    with pytest.raises(InclusionProofError, match="differs"):
        verify_inclusion(
            tree[0], 0, 8, inclusion_proof(tree, 0), root_from_leaf_hashes([*tree, tree[0]])
        )


# --- argument checks and their sentences ----------------------------------------------------

TREE = RFC6962_HASHES
ROOT8 = root_from_leaf_hashes(TREE)
ROOT3 = root_from_leaf_hashes(TREE[:3])
PATH5 = inclusion_proof(TREE, 5)
CONS3 = consistency_proof(TREE, 3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((TREE[5], 8, 8, PATH5, ROOT8), "beyond a tree of size 8"),
        ((TREE[5], -1, 8, PATH5, ROOT8), "must not be negative"),
        ((TREE[5][:31], 5, 8, PATH5, ROOT8), "leaf hash is 31 bytes"),
        ((TREE[5], 5, 8, PATH5, ROOT8 + b"\x00"), "root is 33 bytes"),
        ((TREE[5], 5, 8, PATH5[:2], ROOT8), "has 2 hashes, .* has 3"),
        ((TREE[5], 5, 8, [*PATH5, ROOT8], ROOT8), "has 4 hashes"),
        ((TREE[5], 5, 8, [PATH5[0][:16], *PATH5[1:]], ROOT8), "proof hash 0 is 16 bytes"),
        ((TREE[5], 5, 8, PATH5, ROOT3), "differs from the given root"),
    ],
)
def test_inclusion_errors_say_what_is_wrong(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(InclusionProofError, match=message):
        verify_inclusion(*args)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((8, 3, ROOT8, ROOT3, CONS3), "old size 8 is larger than the new size 3"),
        ((-1, 8, ROOT3, ROOT8, CONS3), "must not be negative"),
        ((3, 3, ROOT3, ROOT3, CONS3), "has 4 hashes, .* has 0"),
        ((3, 3, ROOT3, ROOT8, []), "two different roots"),
        ((0, 8, EMPTY_ROOT, ROOT8, CONS3), "has 4 hashes"),
        ((3, 8, ROOT3, ROOT8, []), "empty proof"),
        ((3, 8, ROOT3[:4], ROOT8, CONS3), "old root is 4 bytes"),
        ((3, 8, ROOT3, b"", CONS3), "new root is 0 bytes"),
        ((3, 8, ROOT3, ROOT8, CONS3[:3]), "has 3 hashes"),
        ((3, 8, ROOT8, ROOT8, CONS3), "old root"),
        ((3, 8, ROOT3, ROOT3, CONS3), "new root"),
    ],
)
def test_consistency_errors_say_what_is_wrong(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ConsistencyProofError, match=message):
        verify_consistency(*args)


def test_verifiers_take_keyword_arguments() -> None:
    verify_inclusion(leaf_hash=TREE[5], index=5, tree_size=8, proof=PATH5, root=ROOT8)
    verify_consistency(size1=3, size2=8, root1=ROOT3, root2=ROOT8, proof=CONS3)


def test_generators_refuse_impossible_requests() -> None:
    with pytest.raises(ValueError, match="outside"):
        inclusion_proof(TREE, 8)
    with pytest.raises(ValueError, match="outside"):
        consistency_proof(TREE, 9)
    with pytest.raises(ValueError, match="31 bytes"):
        root_from_leaf_hashes([TREE[0][:31]])
    with pytest.raises(ValueError, match="31 bytes"):
        CompactRange().append(TREE[0][:31])
    with pytest.raises(ValueError, match="frontier"):
        CompactRange.restore(3, [TREE[0]])


# --- properties over random trees -----------------------------------------------------------


@st.composite
def trees(draw: st.DrawFn, min_size: int = 1) -> list[bytes]:
    """Leaf hashes of up to 300 distinct random entries (distinct: a moved leaf is detectable)."""
    size = draw(st.integers(min_value=min_size, max_value=300))
    salt = draw(st.binary(max_size=16))
    return [leaf_hash(salt + i.to_bytes(2, "big")) for i in range(size)]


@given(trees())
def test_compact_range_matches_the_full_root_for_every_prefix(tree: list[bytes]) -> None:
    rng = CompactRange()
    assert rng.root() == EMPTY_ROOT
    for size, h in enumerate(tree, start=1):
        rng.append(h)
        assert rng.size == size
        assert rng.root() == root_from_leaf_hashes(tree[:size])
    half = CompactRange()
    for h in tree[: len(tree) // 2]:
        half.append(h)
    resumed = CompactRange.restore(half.size, half.frontier)
    for h in tree[len(tree) // 2 :]:
        resumed.append(h)
    assert resumed.root() == rng.root()


@given(trees())
def test_root_matches_the_literal_rfc_definition(tree: list[bytes]) -> None:
    assert root_from_leaf_hashes(tree) == _reference_mth(tree)


@given(trees(), st.data())
def test_inclusion_proofs_verify_and_detect_any_change(
    tree: list[bytes], data: st.DataObject
) -> None:
    n = len(tree)
    index = data.draw(st.integers(0, n - 1), label="index")
    proof = inclusion_proof(tree, index)
    root = root_from_leaf_hashes(tree)
    verify_inclusion(tree[index], index, n, proof, root)

    bit = data.draw(st.integers(0, 255), label="bit")
    with pytest.raises(InclusionProofError):
        verify_inclusion(_flip(tree[index], bit), index, n, proof, root)
    with pytest.raises(InclusionProofError):
        verify_inclusion(tree[index], index, n, proof, _flip(root, bit))
    if proof:
        at = data.draw(st.integers(0, len(proof) - 1), label="proof hash")
        changed = [*proof[:at], _flip(proof[at], bit), *proof[at + 1 :]]
        with pytest.raises(InclusionProofError):
            verify_inclusion(tree[index], index, n, changed, root)

    other = data.draw(st.integers(0, n + 8).filter(lambda i: i != index), label="wrong index")
    with pytest.raises(InclusionProofError):
        verify_inclusion(tree[index], other, n, proof, root)


@given(trees(), st.data())
def test_inclusion_proof_fails_against_the_root_of_another_size(
    tree: list[bytes], data: st.DataObject
) -> None:
    n = data.draw(st.integers(1, len(tree)), label="size")
    index = data.draw(st.integers(0, n - 1), label="index")
    other = data.draw(st.integers(index + 1, len(tree)).filter(lambda m: m != n), label="other")
    proof = inclusion_proof(tree[:n], index)
    with pytest.raises(InclusionProofError):
        verify_inclusion(tree[index], index, other, proof, root_from_leaf_hashes(tree[:other]))


@given(trees(), st.data())
def test_consistency_proofs_verify_and_detect_any_change(
    tree: list[bytes], data: st.DataObject
) -> None:
    n = len(tree)
    size1 = data.draw(st.integers(0, n), label="size1")
    root1, root2 = root_from_leaf_hashes(tree[:size1]), root_from_leaf_hashes(tree)
    proof = consistency_proof(tree, size1)
    verify_consistency(size1, n, root1, root2, proof)
    if size1 == 0:
        return  # the empty tree is consistent with every tree; nothing is left to tamper with

    bit = data.draw(st.integers(0, 255), label="bit")
    with pytest.raises(ConsistencyProofError):
        verify_consistency(size1, n, _flip(root1, bit), root2, proof)
    with pytest.raises(ConsistencyProofError):
        verify_consistency(size1, n, root1, _flip(root2, bit), proof)
    if proof:
        at = data.draw(st.integers(0, len(proof) - 1), label="proof hash")
        changed = [*proof[:at], _flip(proof[at], bit), *proof[at + 1 :]]
        with pytest.raises(ConsistencyProofError):
            verify_consistency(size1, n, root1, root2, changed)


@given(trees(min_size=2), st.data())
def test_consistency_proof_fails_for_other_sizes(tree: list[bytes], data: st.DataObject) -> None:
    n = data.draw(st.integers(2, len(tree)), label="size2")
    size1 = data.draw(st.integers(1, n - 1), label="size1")
    proof = consistency_proof(tree[:n], size1)
    roots = [root_from_leaf_hashes(tree[:m]) for m in range(len(tree) + 1)]

    wrong1 = data.draw(st.integers(1, n).filter(lambda m: m != size1), label="wrong size1")
    with pytest.raises(ConsistencyProofError):
        verify_consistency(wrong1, n, roots[wrong1], roots[n], proof)
    wrong2 = data.draw(st.integers(1, len(tree)).filter(lambda m: m != n), label="wrong size2")
    with pytest.raises(ConsistencyProofError):
        verify_consistency(size1, wrong2, roots[size1], roots[wrong2], proof)
