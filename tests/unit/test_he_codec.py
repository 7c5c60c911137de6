"""Encrypted aggregation with real SEAL ciphertexts: correctness, the coordinator's blindness, mismatches."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import tenseal.sealapi as sealapi
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medtwin.core.he import (
    CiphertextMismatchError,
    HeContext,
    HeContextError,
    ValueRangeError,
    average_error_bound,
    choose_ckks_parameters,
    create_secret_context,
    decrypt_average,
    encrypt_update,
    load_context,
    serialize_public_context,
    serialize_secret_context,
    sum_encrypted,
    update_digest,
)
from medtwin.core.he.context import CONTEXT_MAGIC
from medtwin.core.identity import ReplyClaim, SignatureError, sign_claim, verify_claim
from medtwin.core.protocol import chunks_to_record, payload_sha256

NUM_PARAMETERS = 9000  # > 2 x 4096 reals: three ciphertexts at N = 4096
COUNTS = (120, 300, 45)


@pytest.fixture(scope="module")
def secret() -> HeContext:
    params = choose_ckks_parameters(
        num_parameters=NUM_PARAMETERS,
        num_sites=len(COUNTS),
        max_relative_error=1e-5,
        max_abs_weight_bound=2.0,
        max_total_examples=1000,
        poly_modulus_degree=4096,
    )
    return create_secret_context(params)


@pytest.fixture(scope="module")
def public_bytes(secret: HeContext) -> bytes:
    return serialize_public_context(secret)


@pytest.fixture(scope="module")
def site_weights() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [np.clip(rng.normal(0.0, 0.5, NUM_PARAMETERS), -2.0, 2.0) for _ in COUNTS]


@pytest.fixture(scope="module")
def updates(secret: HeContext, site_weights: list[np.ndarray]) -> list[list[bytes]]:
    return [encrypt_update(secret, weights, count) for weights, count in zip(site_weights, COUNTS)]


def test_encrypted_sum_equals_the_plaintext_weighted_average(
    secret: HeContext, public_bytes: bytes, site_weights: list[np.ndarray], updates: list[list[bytes]]
) -> None:
    assert secret.parameters.num_ciphertexts == 3 and all(len(update) == 3 for update in updates)
    summed = sum_encrypted(public_bytes, updates)
    site_view = load_context(serialize_secret_context(secret), expected_kind="secret")  # what a site holds
    average, total = decrypt_average(site_view, summed, NUM_PARAMETERS)
    expected = sum(weights * count for weights, count in zip(site_weights, COUNTS)) / sum(COUNTS)
    assert total == sum(COUNTS)
    error = float(np.max(np.abs(average - expected)))
    bound = average_error_bound(secret.parameters, num_sites=len(COUNTS), total_examples=total)
    assert 0 < error <= bound  # CKKS is approximate, and the recorded bound holds
    assert error / np.max(np.abs(expected)) < 1e-4


def test_coordinator_context_is_not_private_and_cannot_decrypt(
    public_bytes: bytes, updates: list[list[bytes]]
) -> None:
    coordinator = load_context(public_bytes, expected_kind="public")
    assert not coordinator.is_private and coordinator.secret_key is None
    (header_length,) = struct.unpack_from(">I", public_bytes, len(CONTEXT_MAGIC))
    (body_length,) = struct.unpack_from(">I", public_bytes, len(CONTEXT_MAGIC) + 4 + header_length)
    assert len(CONTEXT_MAGIC) + 8 + header_length + body_length == len(public_bytes)  # SEAL's parameters, nothing after
    assert len(public_bytes) < 2000  # parameters only: no secret, public, Galois or relinearization key
    summed = sum_encrypted(coordinator, updates)
    with pytest.raises(ValueError, match="secret key is not valid"):
        sealapi.Decryptor(coordinator.seal_context, sealapi.SecretKey())
    with pytest.raises(HeContextError, match="cannot decrypt"):
        decrypt_average(coordinator, summed, NUM_PARAMETERS)
    with pytest.raises(HeContextError, match="cannot encrypt"):
        encrypt_update(coordinator, np.zeros(NUM_PARAMETERS), 1)  # nor encrypt: no key at all


def test_tampered_ciphertext_is_detected_by_digest_and_signature(updates: list[list[bytes]]) -> None:
    signing_key = Ed25519PrivateKey.generate()
    binding = {"kind": "update", "run_id": "run-1", "server_round": 3, "site_id": "hosp0", "status": "trained"}
    digest = payload_sha256(chunks_to_record(updates[0]))
    claim = ReplyClaim(payload_sha256=digest, **binding)
    signature = sign_claim(signing_key, claim)
    tampered = list(updates[0])
    flipped = bytearray(tampered[1])
    flipped[len(flipped) // 2] ^= 0x01
    tampered[1] = bytes(flipped)
    assert update_digest(tampered) != update_digest(updates[0])
    tampered_digest = payload_sha256(chunks_to_record(tampered))
    assert tampered_digest != digest
    verify_claim(signing_key.public_key(), signature, claim)
    with pytest.raises(SignatureError):
        verify_claim(signing_key.public_key(), signature, ReplyClaim(payload_sha256=tampered_digest, **binding))


def test_chunks_from_another_key_set_are_rejected(secret: HeContext, public_bytes: bytes, site_weights, updates) -> None:
    other = create_secret_context(secret.parameters)  # same parameters, different key
    foreign = encrypt_update(other, site_weights[0], COUNTS[0])
    with pytest.raises(CiphertextMismatchError, match="update #1, chunk 0: encrypted under key set"):
        sum_encrypted(public_bytes, [updates[0], foreign])
    with pytest.raises(CiphertextMismatchError, match="key set"):  # a site with the wrong key cannot decrypt either
        decrypt_average(other, sum_encrypted(public_bytes, updates), NUM_PARAMETERS)


def test_chunks_made_with_other_parameters_are_rejected(secret: HeContext, public_bytes: bytes, updates) -> None:
    other_params = choose_ckks_parameters(
        num_parameters=NUM_PARAMETERS, num_sites=3, max_relative_error=1e-2, poly_modulus_degree=4096,
        coeff_mod_bit_sizes=(24, 24), max_abs_weight_bound=2.0, max_total_examples=1000,
    )
    other = create_secret_context(other_params)
    foreign = encrypt_update(other, np.zeros(NUM_PARAMETERS), 10)
    with pytest.raises(CiphertextMismatchError, match="key set"):
        sum_encrypted(public_bytes, [updates[0], foreign])
    # even relabelled with our key id, a ciphertext with other primes does not pass
    relabelled = [chunk[:4] + secret.key_id + chunk[4 + len(secret.key_id) :] for chunk in foreign]
    with pytest.raises(CiphertextMismatchError, match="chunk 0"):
        sum_encrypted(public_bytes, [updates[0], relabelled])


def test_shape_mismatches_are_rejected(secret: HeContext, public_bytes: bytes, updates) -> None:
    with pytest.raises(CiphertextMismatchError, match="2 ciphertext chunks"):
        sum_encrypted(public_bytes, [updates[0], updates[1][:2]])
    with pytest.raises(CiphertextMismatchError, match="header says chunk 1"):
        sum_encrypted(public_bytes, [updates[0], [updates[1][1], updates[1][0], updates[1][2]]])
    with pytest.raises(CiphertextMismatchError, match="no updates"):
        sum_encrypted(public_bytes, [])
    with pytest.raises(ValueRangeError, match="shape"):
        encrypt_update(secret, np.zeros(NUM_PARAMETERS + 1), 10)


def test_values_outside_the_chosen_range_are_refused(secret: HeContext, public_bytes: bytes) -> None:
    weights = np.zeros(NUM_PARAMETERS)
    weights[17] = 2.5
    with pytest.raises(ValueRangeError, match=r"index 17.*crypto.max_abs_weight_bound=2"):
        encrypt_update(secret, weights, 10)
    with pytest.raises(ValueRangeError, match="num_examples"):
        encrypt_update(secret, np.zeros(NUM_PARAMETERS), 0)
    with pytest.raises(ValueRangeError, match="NaN"):
        encrypt_update(secret, np.full(NUM_PARAMETERS, np.nan), 10)
    # two sites each within bounds whose total exceeds max_total_examples: detected at decryption
    big = [encrypt_update(secret, np.zeros(NUM_PARAMETERS), 800) for _ in range(2)]
    with pytest.raises(ValueRangeError, match="total examples"):
        decrypt_average(secret, sum_encrypted(public_bytes, big), NUM_PARAMETERS)


def test_context_files_are_checked_on_load(secret: HeContext, public_bytes: bytes) -> None:
    secret_bytes = serialize_secret_context(secret)
    assert secret_bytes.startswith(CONTEXT_MAGIC)
    assert load_context(secret_bytes).key_id == secret.key_id
    with pytest.raises(HeContextError, match="expected a secret"):
        load_context(public_bytes, expected_kind="secret")
    with pytest.raises(HeContextError, match="not a medtwin HE context"):
        load_context(b"garbage")
    forged = secret_bytes.replace(secret.key_id.hex().encode(), b"0" * 32, 1)
    with pytest.raises(HeContextError, match="does not match the key id"):
        load_context(forged)
    with pytest.raises(HeContextError, match="no secret key"):
        serialize_secret_context(load_context(public_bytes))
