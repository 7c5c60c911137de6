"""Update signatures: bound to (run, round, site, ciphertext digest); anything else is rejected."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medtwin.core.identity import SignatureError, sign_update, update_signing_message, verify_update
from medtwin.core.identity.keys import raw_public_bytes

DIGEST = hashlib.sha256(b"ciphertext chunks").digest()
BINDING = {"run_id": "run-2024-01", "server_round": 4, "site_id": "hosp1", "ciphertext_digest": DIGEST}


@pytest.fixture(scope="module")
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_a_genuine_signature_verifies_with_key_object_raw_bytes_or_hex(signing_key: Ed25519PrivateKey) -> None:
    signature = sign_update(signing_key, **BINDING)
    assert len(signature) == 64
    raw = raw_public_bytes(signing_key.public_key())
    for public_key in (signing_key.public_key(), raw, raw.hex()):
        verify_update(public_key, signature, **BINDING)


@pytest.mark.parametrize(
    "field, wrong",
    [
        ("run_id", "run-2024-02"),
        ("server_round", 5),
        ("site_id", "hosp2"),
        ("ciphertext_digest", hashlib.sha256(b"other chunks").digest()),
    ],
)
def test_a_signature_does_not_transfer_to_another_run_round_site_or_update(
    signing_key: Ed25519PrivateKey, field: str, wrong: object
) -> None:
    signature = sign_update(signing_key, **BINDING)
    with pytest.raises(SignatureError, match="rejected"):
        verify_update(signing_key.public_key(), signature, **{**BINDING, field: wrong})


def test_bad_signatures_and_other_keys_are_rejected(signing_key: Ed25519PrivateKey) -> None:
    signature = sign_update(signing_key, **BINDING)
    corrupted = bytes([signature[0] ^ 1]) + signature[1:]
    for bad in (corrupted, signature[:-1], b"", bytes(64)):
        with pytest.raises(SignatureError):
            verify_update(signing_key.public_key(), bad, **BINDING)
    with pytest.raises(SignatureError):
        verify_update(Ed25519PrivateKey.generate().public_key(), signature, **BINDING)


def test_field_boundaries_are_unambiguous() -> None:
    first = update_signing_message(run_id="ab", server_round=1, site_id="c", ciphertext_digest=DIGEST)
    second = update_signing_message(run_id="a", server_round=1, site_id="bc", ciphertext_digest=DIGEST)
    assert first != second and len(first) == 32
    with pytest.raises(ValueError, match="empty"):
        update_signing_message(run_id="a", server_round=1, site_id="b", ciphertext_digest=b"")
