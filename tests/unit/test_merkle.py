"""core.merkle: domain-separated sha256 Merkle tree, proofs, and the round-anchor leaf order."""

from __future__ import annotations

import hashlib

import pytest

from medtwin.core.merkle import (
    MerkleError,
    hash_leaf,
    hash_node,
    merkle_proof,
    merkle_root,
    update_leaves,
    verify_proof,
)


def leaves(count: int) -> list[bytes]:
    return [hashlib.sha256(f"update-{index}".encode()).digest() for index in range(count)]


def test_root_of_one_leaf_is_its_prefixed_hash() -> None:
    (leaf,) = leaves(1)
    assert merkle_root([leaf]) == hashlib.sha256(b"\x00" + leaf).digest()


def test_root_of_three_leaves_promotes_the_odd_node() -> None:
    a, b, c = leaves(3)
    expected = hash_node(hash_node(hash_leaf(a), hash_leaf(b)), hash_leaf(c))
    assert merkle_root([a, b, c]) == expected


def test_leaf_and_node_hashes_are_domain_separated() -> None:
    a, b = leaves(2)
    # A two-leaf root must not equal a "leaf" made of the concatenated children.
    assert merkle_root([a, b]) != hashlib.sha256(hash_leaf(a) + hash_leaf(b)).digest()
    assert hash_leaf(a + b[:0]) != hash_node(a, b)


def test_root_depends_on_order_and_content() -> None:
    items = leaves(4)
    assert merkle_root(items) != merkle_root(list(reversed(items)))
    changed = [*items[:3], hashlib.sha256(b"other").digest()]
    assert merkle_root(items) != merkle_root(changed)


def test_duplicating_the_last_leaf_changes_the_root() -> None:
    items = leaves(3)
    assert merkle_root(items) != merkle_root([*items, items[-1]])


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17])
def test_every_proof_verifies(count: int) -> None:
    items = leaves(count)
    root = merkle_root(items)
    for index, leaf in enumerate(items):
        proof = merkle_proof(items, index)
        assert verify_proof(root=root, leaf=leaf, proof=proof)


def test_proof_fails_for_wrong_leaf_index_or_root() -> None:
    items = leaves(6)
    root = merkle_root(items)
    proof = merkle_proof(items, 2)
    assert not verify_proof(root=root, leaf=items[3], proof=proof)
    assert not verify_proof(root=hashlib.sha256(b"x").digest(), leaf=items[2], proof=proof)
    moved = type(proof)(leaf_index=3, leaf_count=6, siblings=proof.siblings)
    assert not verify_proof(root=root, leaf=items[2], proof=moved)
    truncated = type(proof)(leaf_index=2, leaf_count=6, siblings=proof.siblings[:-1])
    assert not verify_proof(root=root, leaf=items[2], proof=truncated)


def test_bad_inputs_raise_with_the_problem_named() -> None:
    with pytest.raises(MerkleError, match="zero leaves"):
        merkle_root([])
    with pytest.raises(MerkleError, match="leaf 1 must be 32 bytes"):
        merkle_root([leaves(1)[0], b"short"])
    with pytest.raises(MerkleError, match="out of range"):
        merkle_proof(leaves(2), 2)


def test_update_leaves_are_ordered_by_site_id() -> None:
    digests = {"site-b": "bb" * 32, "site-a": "0x" + "aa" * 32, "site-c": bytes([0xCC]) * 32}
    assert update_leaves(digests) == [bytes([0xAA]) * 32, bytes([0xBB]) * 32, bytes([0xCC]) * 32]
    with pytest.raises(MerkleError, match="site-x"):
        update_leaves({"site-x": "zz"})
