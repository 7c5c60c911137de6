"""Binary Merkle tree over 32-byte leaves (sha256, domain-separated), with inclusion proofs.

Pure hashlib, no third-party imports. Used for the per-round anchor on the data chain:

- leaf hash  = sha256(0x00 || leaf)
- node hash  = sha256(0x01 || left || right)
- an odd node at the end of a level is promoted unchanged to the next level (never duplicated,
  so two different leaf lists can never share a root by padding).

The leaves of a round anchor are the sha256 digests of the accepted update artifacts (the update
bytes exactly as stored in the artifact store), ordered by site id (Python string order);
`update_leaves` builds that list so server, chain and auditor share one definition.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import MedtwinError

__all__ = [
    "LEAF_PREFIX",
    "NODE_PREFIX",
    "MerkleError",
    "MerkleProof",
    "hash_leaf",
    "hash_node",
    "merkle_proof",
    "merkle_root",
    "update_leaves",
    "verify_proof",
]

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
DIGEST_BYTES = 32


class MerkleError(MedtwinError):
    """A Merkle input was malformed (wrong leaf size, empty tree, index out of range)."""


@dataclass(frozen=True)
class MerkleProof:
    """Sibling hashes from the leaf up to the root; sides follow from `leaf_index` and `leaf_count`."""

    leaf_index: int
    leaf_count: int
    siblings: tuple[bytes, ...]


def hash_leaf(leaf: bytes) -> bytes:
    return hashlib.sha256(LEAF_PREFIX + leaf).digest()


def hash_node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def _check_leaves(leaves: Sequence[bytes]) -> None:
    if not leaves:
        raise MerkleError("cannot build a Merkle tree over zero leaves — a round needs at least one accepted update")
    for index, leaf in enumerate(leaves):
        if not isinstance(leaf, bytes | bytearray) or len(leaf) != DIGEST_BYTES:
            size = len(leaf) if isinstance(leaf, bytes | bytearray) else type(leaf).__name__
            raise MerkleError(f"leaf {index} must be {DIGEST_BYTES} bytes (a sha256 digest), got {size}")


def _next_level(level: list[bytes]) -> list[bytes]:
    paired = [hash_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
    if len(level) % 2:
        paired.append(level[-1])
    return paired


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """Root over `leaves` in the given order (order matters: sort before calling if needed)."""
    _check_leaves(leaves)
    level = [hash_leaf(bytes(leaf)) for leaf in leaves]
    while len(level) > 1:
        level = _next_level(level)
    return level[0]


def merkle_proof(leaves: Sequence[bytes], index: int) -> MerkleProof:
    """Inclusion proof for `leaves[index]`."""
    _check_leaves(leaves)
    if not 0 <= index < len(leaves):
        raise MerkleError(f"leaf index {index} is out of range for {len(leaves)} leaves")
    level = [hash_leaf(bytes(leaf)) for leaf in leaves]
    position = index
    siblings: list[bytes] = []
    while len(level) > 1:
        sibling = position ^ 1
        if sibling < len(level):
            siblings.append(level[sibling])
        level = _next_level(level)
        position //= 2
    return MerkleProof(leaf_index=index, leaf_count=len(leaves), siblings=tuple(siblings))


def verify_proof(*, root: bytes, leaf: bytes, proof: MerkleProof) -> bool:
    """True if `leaf` sits at `proof.leaf_index` of a tree with `proof.leaf_count` leaves and this root."""
    if len(leaf) != DIGEST_BYTES or not 0 <= proof.leaf_index < proof.leaf_count:
        return False
    node = hash_leaf(bytes(leaf))
    position, width = proof.leaf_index, proof.leaf_count
    remaining = list(proof.siblings)
    while width > 1:
        sibling = position ^ 1
        if sibling < width:
            if not remaining:
                return False
            other = remaining.pop(0)
            node = hash_node(node, other) if position % 2 == 0 else hash_node(other, node)
        position //= 2
        width = (width + 1) // 2
    return not remaining and node == root


def update_leaves(digests_by_site: Mapping[str, str | bytes]) -> list[bytes]:
    """Round-anchor leaves: each accepted update's sha256 digest (hex or bytes), ordered by site id."""
    leaves = []
    for site_id in sorted(digests_by_site):
        digest = digests_by_site[site_id]
        try:
            leaf = bytes.fromhex(digest.removeprefix("0x")) if isinstance(digest, str) else bytes(digest)
        except ValueError as error:
            raise MerkleError(f"update digest of site {site_id!r} is not hex: {digest!r}") from error
        if len(leaf) != DIGEST_BYTES:
            raise MerkleError(f"update digest of site {site_id!r} must be a 32-byte sha256, got {len(leaf)} bytes")
        leaves.append(leaf)
    return leaves
