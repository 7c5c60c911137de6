"""Seeded, coefficient-encoded CKKS ciphertexts (SEAL via tenseal.sealapi), bit-packed on the wire: sums
decrypt within the recorded bound for every layout, the bound holds at full scale over many trials, the
coordinator adds without any key, and updates cost < 1x float32 on the wire.

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
from medtwin.core.he.codec import CHUNK_HEADER, pack_bits, unpack_bits
from medtwin.core.he.context import CONTEXT_MAGIC
from medtwin.core.he.params import ERROR_MAX, ERROR_VARIANCE_PROXY

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
        (14, 1e-3, (1024, 1)),  # a tiny model: one ciphertext of the smallest secure ring
        (14, 1e-5, (1024, 1)),  # ... at the default target too (27 bits are enough for 3 sites)
        (1023, 1e-5, (1024, 1)),  # 1023 weights + the count fill the 1024 coefficients exactly
        (1024, 1e-5, (2048, 1)),  # one value more: one N = 2048 ciphertext, as small as two of 1024
        (5000, 1e-5, (1024, 5)),  # several ciphertexts, the ring that wastes least of the last one
    ],
)
def test_decrypted_sum_equals_the_plaintext_sum_within_the_recorded_bound(
    num_parameters: int, max_relative_error: float, layout: tuple
) -> None:
    params = choose_ckks_parameters(
        num_parameters=num_parameters, num_sites=len(COUNTS), max_relative_error=max_relative_error,
        max_abs_weight_bound=BOUND, max_total_examples=1000,
    )  # fmt: skip
    assert (params.poly_modulus_degree, params.num_ciphertexts) == layout
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


def test_the_bound_holds_for_sums_at_full_scale_over_many_trials() -> None:
    """Many sites at +-max_abs_weight_bound with counts summing to max_total_examples: the packed sum is at full
    scale, where the chosen parameters are tightest. The error bound must hold for every coefficient of
    every trial, and the decrypted total must be exact."""
    num_sites, total, bound = 12, 1200, 4.0
    params = choose_ckks_parameters(num_parameters=1000, num_sites=num_sites, max_abs_weight_bound=bound, max_total_examples=total)
    assert params.predicted_error_bound <= 1e-5
    secret = create_secret_context(params)
    rng = np.random.default_rng(7)
    worst = 0.0
    for _ in range(12):
        counts = rng.multinomial(total - num_sites, np.ones(num_sites) / num_sites) + 1
        weights = [bound * rng.choice([-1.0, 1.0]) * np.ones(1000) for _ in counts]  # every site the same sign per trial
        weights = [w * rng.choice([-1.0, 1.0], size=1000) if rng.random() < 0.3 else w for w in weights]
        summed = sum_encrypted(secret, [encrypt_update(secret, w, int(n)) for w, n in zip(weights, counts)])
        exact = np.append(sum(w * n for w, n in zip(weights, counts)), bound * total)
        worst = max(worst, float(np.max(np.abs(decrypt_sum(secret, summed) - exact))))
        _, decrypted_total = decrypt_average(secret, summed, 1000)
        assert decrypted_total == total
    assert 0.0 < worst <= decryption_error_bound(params, num_sites)


def test_the_fresh_error_is_seals_centred_binomial_whatever_the_ring() -> None:
    """The bound rests on SEAL's error: |e| <= 21 and variance 10.5 per coefficient. Values that are exact
    integers at the scale leave the error alone in the decryption of one update."""
    params = choose_ckks_parameters(num_parameters=40_000, num_sites=1, max_abs_weight_bound=1.0, max_total_examples=1)
    secret = create_secret_context(params)
    scale = 2.0**params.scale_bits
    rng = np.random.default_rng(3)
    weights = rng.integers(-int(scale) // 2, int(scale) // 2, 40_000) / scale
    errors = (decrypt_sum(secret, sum_encrypted(secret, [encrypt_update(secret, weights, 1)]))[:-1] - weights) * scale
    assert np.array_equal(errors, np.round(errors))  # integers: no rounding anywhere but SEAL's error
    assert np.max(np.abs(errors)) <= ERROR_MAX
    assert np.var(errors) == pytest.approx(ERROR_VARIANCE_PROXY, rel=0.05)


def test_a_100k_parameter_update_costs_under_1x_float32_and_its_sum_under_2x() -> None:
    num_parameters = 100_000
    params = choose_ckks_parameters(num_parameters=num_parameters, num_sites=2, max_total_examples=10_000)  # today's targets
    assert params.predicted_error_bound <= 1e-5
    secret = create_secret_context(params)
    rng = np.random.default_rng(1)
    updates = [encrypt_update(secret, rng.uniform(-1, 1, num_parameters), 100) for _ in range(2)]
    summed = sum_encrypted(load_context(serialize_public_context(secret)), updates)
    uplink = sum(len(chunk) for chunk in updates[0])
    downlink = sum(len(chunk) for chunk in summed)
    assert uplink / (4 * num_parameters) <= 1.0 and downlink / (4 * num_parameters) <= 2.0
    assert estimated_update_bytes(params) == uplink  # bit-packed: the estimate is the wire size
    bits = params.data_bits
    assert downlink == params.num_ciphertexts * (CHUNK_HEADER.size + 2 * params.poly_modulus_degree * bits // 8)


def test_bit_packing_round_trips() -> None:
    rng = np.random.default_rng(5)
    for bits in (20, 27, 33, 60):
        values = rng.integers(0, 2**bits, 1000, dtype=np.uint64)
        packed = pack_bits(values, bits)
        assert len(packed) == (1000 * bits + 7) // 8
        assert np.array_equal(unpack_bits(packed, 1000, bits), values)


def test_old_formats_malformed_and_tampered_chunks_are_refused_with_a_hint() -> None:
    params = choose_ckks_parameters(num_parameters=100, num_sites=2, max_total_examples=100)
    secret = create_secret_context(params)
    chunks = encrypt_update(secret, np.zeros(100), 3)
    for magic, name in ((b"MTCT", "chunk format 1"), (b"MTC2", "chunk format 2")):
        old = [magic + chunk[len(magic) :] for chunk in chunks]
        with pytest.raises(CiphertextMismatchError, match=f"{name}.*older medtwin"):
            sum_encrypted(secret, [chunks, old])
    public = serialize_public_context(secret)
    for magic, name in ((b"MTHECTX1", "format 1"), (b"MTHECTX2", "format 2")):
        with pytest.raises(HeContextError, match=f"{name}.*new key set"):
            load_context(magic + public[len(CONTEXT_MAGIC) :])
    with pytest.raises(CiphertextMismatchError, match=r"bytes for 1 stored polynomial\(s\); a seeded chunk"):
        sum_encrypted(secret, [chunks, [chunks[0] + bytes(40_000)]])
    with pytest.raises(CiphertextMismatchError, match="bytes for 1 stored polynomial"):
        sum_encrypted(secret, [chunks, [chunks[0][: CHUNK_HEADER.size + 100]]])
    with pytest.raises(CiphertextMismatchError, match="shorter than the chunk header"):
        sum_encrypted(secret, [chunks, [chunks[0][:10]]])
    with pytest.raises(CiphertextMismatchError, match="not below the prime"):
        sum_encrypted(secret, [chunks, [chunks[0][:-8] + b"\xff" * 8]])  # all-ones bits: a coefficient >= q
    bad_prng = chunks[0][: CHUNK_HEADER.size] + b"\x7f" + chunks[0][CHUNK_HEADER.size + 1 :]
    with pytest.raises(CiphertextMismatchError, match="SEAL refused the ciphertext"):
        sum_encrypted(secret, [chunks, [bad_prng]])
    as_sum = chunks[0][: CHUNK_HEADER.size - 1] + b"\x02" + chunks[0][CHUNK_HEADER.size :]  # claims two polynomials
    with pytest.raises(CiphertextMismatchError, match=r"stores 2 polynomial\(s\), expected 1"):
        sum_encrypted(secret, [chunks, [as_sum]])
    foreign = encrypt_update(create_secret_context(params), np.zeros(100), 3)
    with pytest.raises(CiphertextMismatchError, match="encrypted under key set"):
        sum_encrypted(secret, [chunks, foreign])


def test_a_public_context_carrying_a_key_is_refused() -> None:
    params = choose_ckks_parameters(num_parameters=100, num_sites=2, max_total_examples=100)
    secret_bytes = serialize_secret_context(create_secret_context(params))
    relabelled = secret_bytes.replace(b'"kind": "secret"', b'"kind": "public"', 1)
    with pytest.raises(HeContextError, match="labelled public holds a secret key"):
        load_context(relabelled)
