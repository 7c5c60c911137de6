"""Signed replies: a `ReplyClaim` signature binds every field; anything else is rejected."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medtwin.core.identity import ReplyClaim, SignatureError, check_claim_fields, sign_claim, verify_claim
from medtwin.core.identity.keys import raw_public_bytes

CLAIM = ReplyClaim(
    kind="update",
    run_id="run-2024-01",
    server_round=4,
    site_id="hosp1",
    payload_sha256=hashlib.sha256(b"update record").hexdigest(),
    num_examples=199,
    epsilon=0.41,
    delta=1e-5,
    dataset_manifest=hashlib.sha256(b"dataset").hexdigest(),
    status="trained",
    aggregate_sha256="",
)

# a different, valid value for every field of ReplyClaim
CHANGED = {
    "kind": "evaluate",
    "run_id": "run-2024-02",
    "server_round": 5,
    "site_id": "hosp2",
    "payload_sha256": hashlib.sha256(b"other record").hexdigest(),
    "num_examples": 200,
    "epsilon": 0.42,
    "delta": 2e-5,
    "dataset_manifest": hashlib.sha256(b"other dataset").hexdigest(),
    "status": "refused",
    "aggregate_sha256": hashlib.sha256(b"aggregate").hexdigest(),
}


@pytest.fixture(scope="module")
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_every_claim_field_has_a_changed_value() -> None:
    assert set(CHANGED) == {item.name for item in dataclasses.fields(ReplyClaim)}


def test_a_genuine_signature_verifies_with_key_object_raw_bytes_or_hex(signing_key: Ed25519PrivateKey) -> None:
    signature = sign_claim(signing_key, CLAIM)
    assert isinstance(signature, bytes) and len(signature) == 64
    raw = raw_public_bytes(signing_key.public_key())
    for public_key in (signing_key.public_key(), raw, raw.hex()):
        verify_claim(public_key, signature, CLAIM)
    verify_claim(raw, bytearray(signature), CLAIM)
    assert len(CLAIM.message()) == 32


def test_a_claim_survives_a_round_trip_through_its_dict(signing_key: Ed25519PrivateKey) -> None:
    signature = sign_claim(signing_key, CLAIM)
    rebuilt = ReplyClaim.from_dict(CLAIM.to_dict())
    assert rebuilt == CLAIM and rebuilt.message() == CLAIM.message()
    verify_claim(signing_key.public_key(), signature, rebuilt)


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_a_signature_does_not_transfer_when_any_field_changes(signing_key: Ed25519PrivateKey, field: str) -> None:
    signature = sign_claim(signing_key, CLAIM)
    changed = dataclasses.replace(CLAIM, **{field: CHANGED[field]})
    assert changed.message() != CLAIM.message()
    with pytest.raises(SignatureError, match="rejected"):
        verify_claim(signing_key.public_key(), signature, changed)


def test_tampered_signatures_and_other_keys_are_rejected(signing_key: Ed25519PrivateKey) -> None:
    signature = sign_claim(signing_key, CLAIM)
    corrupted = bytes([signature[0] ^ 1]) + signature[1:]
    for bad in (corrupted, bytes(64)):
        with pytest.raises(SignatureError, match="rejected"):
            verify_claim(signing_key.public_key(), bad, CLAIM)
    with pytest.raises(SignatureError, match="rejected"):
        verify_claim(Ed25519PrivateKey.generate().public_key(), signature, CLAIM)


@pytest.mark.parametrize(
    "bad",
    [b"", b"\x00" * 63, b"\x00" * 65, "00" * 64, None, 12, [0] * 64, memoryview(b"\x00" * 64)],
    ids=["empty", "63-bytes", "65-bytes", "hex-str", "none", "int", "list", "memoryview"],
)
def test_wrong_length_or_type_signatures_raise_signature_error(signing_key: Ed25519PrivateKey, bad: object) -> None:
    with pytest.raises(SignatureError, match="must be 64 bytes"):
        verify_claim(signing_key.public_key(), bad, CLAIM)


def test_the_signed_message_is_domain_separated(signing_key: Ed25519PrivateKey) -> None:
    # a signature over the same canonical JSON without the claim domain (another protocol's message) fails
    canonical = json.dumps(CLAIM.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    assert hashlib.sha256(canonical).digest() != CLAIM.message()
    with pytest.raises(SignatureError, match="rejected"):
        verify_claim(signing_key.public_key(), signing_key.sign(hashlib.sha256(canonical).digest()), CLAIM)


def test_from_dict_rejects_unknown_fields() -> None:
    with pytest.raises(SignatureError, match=r"unknown field\(s\) \['extra'\]"):
        ReplyClaim.from_dict({**CLAIM.to_dict(), "extra": 1})


def test_from_dict_rejects_missing_fields_and_non_mappings() -> None:
    values = CLAIM.to_dict()
    del values["run_id"]
    with pytest.raises(SignatureError, match="incomplete"):
        ReplyClaim.from_dict(values)
    with pytest.raises(SignatureError, match="mapping"):
        ReplyClaim.from_dict([("kind", "update")])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("status", "trainéd", "ASCII"),
        ("site_id", "hösp1", "ASCII"),
        ("run_id", "r" * 257, "at most 256"),
        ("payload_sha256", b"\x00" * 32, "ASCII string"),
        ("kind", "train", "kind"),
        ("epsilon", math.nan, "finite"),
        ("epsilon", math.inf, "finite"),
        ("epsilon", -0.1, ">= 0"),
        ("epsilon", True, "finite number"),
        ("epsilon", "0.4", "finite number"),
        ("delta", -1e-5, ">= 0"),
        ("delta", 1.0, "< 1"),
        ("server_round", True, "integer"),
        ("server_round", False, "integer"),
        ("server_round", 1.0, "integer"),
        ("server_round", -1, ">= 0"),
        ("num_examples", "199", "integer"),
    ],
)
def test_from_dict_rejects_bad_field_values(field: str, value: object, message: str) -> None:
    with pytest.raises(SignatureError, match=message) as caught:
        ReplyClaim.from_dict({**CLAIM.to_dict(), field: value})
    assert field in str(caught.value)


def test_a_bad_claim_can_neither_be_signed_nor_verified(signing_key: Ed25519PrivateKey) -> None:
    signature = sign_claim(signing_key, CLAIM)
    bad = dataclasses.replace(CLAIM, epsilon=math.nan)
    with pytest.raises(SignatureError, match="finite"):
        check_claim_fields(bad)
    with pytest.raises(SignatureError, match="finite"):
        sign_claim(signing_key, bad)
    with pytest.raises(SignatureError, match="finite"):
        verify_claim(signing_key.public_key(), signature, bad)
