"""Seeded, complex-packed CKKS ciphertexts (SEAL via tenseal.sealapi): sums decrypt within the recorded
bound for every layout, the coordinator adds without any key, and updates cost ~1x float32 on the wire.

Bytes are counted, never timed.
"""

from __future__ import annotations

import numpy as np
import pytest

from medtwin.core.he import (
    CiphertextMismatchError,
    HeContextError,
    average_error_bound,
    choose_ckks_parameters,
    create_secret_context,
    decrypt_average,
    decrypt_sum,
    decryption_error_bound,
    encrypt_update,
    estimated_update_bytes,
    load_context,
    serialize_public_context,
    serialize_secret_context,
    sum_encrypted,
)
from medtwin.core.he.codec import CHUNK_HEADER, LEGACY_CHUNK_MAGIC
from medtwin.core.he.context import CONTEXT_MAGIC, LEGACY_CONTEXT_MAGIC

BOUND = 2.0  # max_abs_weight_bound
COUNTS = (310, 95, 27)


def _round_trip(params, *, seed: int = 0):
    """Encrypt one update per count, sum with the coordinator's key-less context, decrypt at a site."""
    secret = create_secret_context(params)
    coordinator = load_context(serialize_public_context(secret), expected_kind="public")
    site = load_context(serialize_secret_context(secret), expected_kind="secret")
    rng = np.random.default_rng(seed)
    weights = [rng.uniform(-BOUND, BOUND, params.num_parameters) for _ in COUNTS]
    updates = [encrypt_update(site, w, n) for w, n in zip(weights, COUNTS)]
    summed = sum_encrypted(coordinator, updates)
    exact = np.append(sum(w * n for w, n in zip(weights, COUNTS)), BOUND * sum(COUNTS))
    return site, updates, summed, exact


@pytest.mark.parametrize(
    ("num_parameters", "max_relative_error", "layout"),
    [
        (14, 1e-3, (1024, (24,), 1)),  # a tiny model: one ciphertext of the smallest secure ring
        (14, 1e-5, (2048, (32,), 1)),
        (2047, 1e-5, (2048, (32,), 1)),  # 2047 weights + the count fill 1024 complex slots exactly
        (2048, 1e-5, (4096, (32,), 1)),  # one value more: one N = 4096 ciphertext, as small as two of 2048
        (5000, 1e-5, (2048, (32,), 3)),  # several ciphertexts
    ],
)
def test_decrypted_sum_equals_the_plaintext_sum_within_the_recorded_bound(
    num_parameters: int, max_relative_error: float, layout: tuple
) -> None:
    params = choose_ckks_parameters(
        num_parameters=num_parameters, num_sites=len(COUNTS), max_relative_error=max_relative_error,
        max_abs_weight_bound=BOUND, max_total_examples=1000,
    )  # fmt: skip
    assert (params.poly_modulus_degree, params.coeff_mod_bit_sizes, params.num_ciphertexts) == layout
    site, _, summed, exact = _round_trip(params)
    packed = decrypt_sum(site, summed)
    assert packed.shape == exact.shape
    sum_error = float(np.max(np.abs(packed - exact)))
    assert 0.0 < sum_error <= decryption_error_bound(params, len(COUNTS))  # approximate, and within the bound
    average, total = decrypt_average(site, summed, num_parameters)
    assert total == sum(COUNTS)
    error = float(np.max(np.abs(average - exact[:-1] / total)))
    assert error <= average_error_bound(params, num_sites=len(COUNTS), total_examples=total)


def test_the_coordinator_adds_with_no_key_and_sends_a_full_ciphertext_back() -> None:
    params = choose_ckks_parameters(num_parameters=3000, num_sites=len(COUNTS), max_abs_weight_bound=BOUND, max_total_examples=1000)
    site, updates, summed, _ = _round_trip(params)
    coordinator = load_context(serialize_public_context(site), expected_kind="public")
    assert coordinator.secret_key is None and not coordinator.is_private
    assert sum_encrypted(coordinator, updates) != []  # loads the seeded ciphertexts and adds them
    with pytest.raises(HeContextError, match="cannot decrypt"):
        decrypt_sum(coordinator, summed)
    # a site sends one polynomial and a seed, the sum holds two polynomials
    for update_chunk, summed_chunk in zip(updates[0], summed):
        assert len(update_chunk) < 0.55 * len(summed_chunk)


def test_a_100k_parameter_update_costs_at_most_1_1x_float32_and_its_sum_2_1x() -> None:
    num_parameters = 100_000
    params = choose_ckks_parameters(num_parameters=num_parameters, num_sites=2, max_total_examples=10_000)  # today's targets
    assert params.predicted_error_bound <= 1e-5
    secret = create_secret_context(params)
    rng = np.random.default_rng(1)
    updates = [encrypt_update(secret, rng.uniform(-1, 1, num_parameters), 100) for _ in range(2)]
    summed = sum_encrypted(load_context(serialize_public_context(secret)), updates)
    uplink = sum(len(chunk) for chunk in updates[0]) / (4 * num_parameters)
    downlink = sum(len(chunk) for chunk in summed) / (4 * num_parameters)
    assert uplink <= 1.1 and downlink <= 2.1
    assert estimated_update_bytes(params) / (4 * num_parameters) == pytest.approx(uplink, rel=0.05)


def test_format_1_chunks_and_contexts_are_refused_with_a_hint() -> None:
    params = choose_ckks_parameters(num_parameters=100, num_sites=2, max_total_examples=100)
    secret = create_secret_context(params)
    chunks = encrypt_update(secret, np.zeros(100), 3)
    old = [LEGACY_CHUNK_MAGIC + chunk[len(LEGACY_CHUNK_MAGIC) :] for chunk in chunks]
    with pytest.raises(CiphertextMismatchError, match="chunk format 1"):
        sum_encrypted(secret, [chunks, old])
    public = serialize_public_context(secret)
    with pytest.raises(HeContextError, match="format 1"):
        load_context(LEGACY_CONTEXT_MAGIC + public[len(CONTEXT_MAGIC) :])
    with pytest.raises(CiphertextMismatchError, match=r"bytes, a ciphertext of these parameters has"):
        sum_encrypted(secret, [chunks, [chunks[0] + bytes(40_000)]])
    truncated = [chunks[0][: CHUNK_HEADER.size + 100]]
    with pytest.raises(CiphertextMismatchError, match="SEAL refused the ciphertext"):
        sum_encrypted(secret, [chunks, truncated])


def test_a_public_context_carrying_a_key_is_refused() -> None:
    params = choose_ckks_parameters(num_parameters=100, num_sites=2, max_total_examples=100)
    secret_bytes = serialize_secret_context(create_secret_context(params))
    relabelled = secret_bytes.replace(b'"kind": "secret"', b'"kind": "public"', 1)
    with pytest.raises(HeContextError, match="labelled public holds a secret key"):
        load_context(relabelled)
