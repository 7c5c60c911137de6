"""Update signatures: Ed25519 over H(run id, round, site id, ciphertext digest), domain-separated."""

from __future__ import annotations

import hashlib
import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import SignatureError
from .keys import ed25519_public_key

SIGNATURE_DOMAIN = b"medtwin/update-signature/v1\x00"


def update_signing_message(*, run_id: str, server_round: int, site_id: str, ciphertext_digest: bytes) -> bytes:
    """The 32-byte hash a site signs; length prefixes keep field boundaries unambiguous."""
    if server_round < 0:
        raise ValueError(f"server_round must be >= 0, got {server_round}")
    if not ciphertext_digest:
        raise ValueError("ciphertext_digest is empty")
    digest = hashlib.sha256(SIGNATURE_DOMAIN)
    for field in (run_id.encode("utf-8"), struct.pack(">Q", server_round), site_id.encode("utf-8"), ciphertext_digest):
        digest.update(struct.pack(">I", len(field)))
        digest.update(field)
    return digest.digest()


def sign_update(
    signing_key: Ed25519PrivateKey, *, run_id: str, server_round: int, site_id: str, ciphertext_digest: bytes
) -> bytes:
    """A site's 64-byte signature binding its update to this run, round and site."""
    message = update_signing_message(
        run_id=run_id, server_round=server_round, site_id=site_id, ciphertext_digest=ciphertext_digest
    )
    return signing_key.sign(message)


def verify_update(
    public_key: Ed25519PublicKey | bytes | str,
    signature: bytes,
    *,
    run_id: str,
    server_round: int,
    site_id: str,
    ciphertext_digest: bytes,
) -> None:
    """Raise `SignatureError` unless `signature` is the site's signature of exactly this binding.

    `public_key` may be the key object, its 32 raw bytes, or their hex as in federation.json.
    """
    message = update_signing_message(
        run_id=run_id, server_round=server_round, site_id=site_id, ciphertext_digest=ciphertext_digest
    )
    try:
        ed25519_public_key(public_key).verify(signature, message)
    except (InvalidSignature, ValueError) as error:
        raise SignatureError(
            f"update signature rejected for site {site_id!r}, run {run_id!r}, round {server_round}: it was not made "
            "by this site's key over this (run, round, site, ciphertext digest) — tampered, replayed or misattributed"
        ) from error
