"""Hostile bytes against chunk format 3 (`MTC3`) and the coefficient-encoded error bound.

1. A site's update must be seeded: SEAL expands its second polynomial from the seed, so no site picks
   it. A site that sends a sum-shaped chunk (two polynomials) chooses it freely; two such sites sending
   zero second polynomials made the coordinator's (and every site's own) `add_inplace` throw SEAL's
   "result ciphertext is transparent" as a bare RuntimeError, after `check` had accepted both updates.
2. A sum must be full: `decrypt_sum` refuses a seeded chunk offered as the aggregate.
3. PRNG types SEAL does not expand (0 = unknown, 3, 255) are refused with an ordinary error, in process.
4. Float64 is part of the error: under a 60-bit prime the sites' products n_i * w_i and the decoded
   integers lose up to 2^-53 of full scale each — tens of units of the scale, more than SEAL's error
   bound alone for one site (21.5 units).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import tenseal.sealapi as sealapi

from medtwin.core.he import (
    CiphertextMismatchError,
    choose_ckks_parameters,
    create_secret_context,
    decrypt_average,
    decrypt_sum,
    decryption_error_bound,
    encrypt_update,
    load_context,
    load_update_chunks,
    serialize_public_context,
    sum_encrypted,
    sum_loaded,
)
from medtwin.core.he.codec import CHUNK_HEADER, FULL, pack_bits
from medtwin.core.he.seal_objects import PRNG_INFO_BYTES


@pytest.fixture(scope="module")
def federation():
    params = choose_ckks_parameters(num_parameters=100, num_sites=2, max_total_examples=100)
    secret = create_secret_context(params)
    public = load_context(serialize_public_context(secret), expected_kind="public")
    return secret, public


def _modulus(context) -> int:
    return context.seal_context.first_context_data().parms().coeff_modulus()[0].value()


def _sum_shaped(chunk: bytes, polynomials: np.ndarray, bits: int) -> bytes:
    """`chunk`'s header relabelled as a sum (two polynomials), followed by `polynomials` bit-packed."""
    header = chunk[: CHUNK_HEADER.size - 1] + bytes([FULL])
    return header + pack_bits(polynomials.reshape(-1), bits)


def test_a_sum_shaped_update_is_refused_before_it_reaches_an_addition(federation) -> None:
    secret, public = federation
    honest = encrypt_update(secret, np.zeros(100), 3)
    degree, bits = secret.parameters.poly_modulus_degree, _modulus(secret).bit_length()
    transparent = [_sum_shaped(honest[0], np.zeros((2, degree), dtype=np.uint64), bits)]
    with pytest.raises(CiphertextMismatchError, match=r"stores 2 polynomial\(s\), expected 1"):
        load_update_chunks(public, transparent, label="hostile site's update")  # the coordinator's check
    for context in (public, secret):  # the coordinator's sum, a site's own sum of the certified updates
        with pytest.raises(CiphertextMismatchError, match="a site's update is seeded"):
            sum_encrypted(context, [transparent, transparent])


def test_an_addition_seal_refuses_is_a_ciphertext_mismatch_not_a_bare_runtime_error(federation) -> None:
    secret, _ = federation
    first = load_update_chunks(secret, encrypt_update(secret, np.zeros(100), 3))
    with pytest.raises(CiphertextMismatchError, match=r"update #1, chunk 0: SEAL cannot add"):
        sum_loaded(secret, [first, [sealapi.Ciphertext()]])  # a ciphertext SEAL's add refuses


def test_a_seeded_chunk_is_refused_as_an_aggregate(federation) -> None:
    secret, _ = federation
    update = encrypt_update(secret, np.zeros(100), 3)
    with pytest.raises(CiphertextMismatchError, match=r"stores 1 polynomial\(s\), expected 2"):
        decrypt_average(secret, update, 100)


@pytest.mark.parametrize("prng_type", [0, 3, 255])
def test_prng_types_seal_cannot_expand_are_refused_in_process(federation, prng_type: int) -> None:
    secret, public = federation
    honest = encrypt_update(secret, np.zeros(100), 3)
    body = honest[0][CHUNK_HEADER.size :]
    hostile = honest[0][: CHUNK_HEADER.size] + bytes([prng_type]) + body[1:]
    assert len(hostile) == len(honest[0]) and PRNG_INFO_BYTES == 65
    with pytest.raises(CiphertextMismatchError, match="SEAL refused the ciphertext"):
        sum_encrypted(public, [honest, [hostile]])


def test_the_bound_covers_float64_under_a_60_bit_prime() -> None:
    """One site near full scale under a 60-bit prime: packed values near 2^58 units of the scale, where float64
    steps by 32. The site's float64 product n * w alone is then 16 units from the exact n * w — 32 times the
    half unit of rounding the bound allowed per site — and decoding rounds to that step again."""
    num_examples = 1000
    params = choose_ckks_parameters(
        num_parameters=2000, num_sites=1, max_abs_weight_bound=4.0, max_total_examples=num_examples,
        poly_modulus_degree=4096, coeff_mod_bit_sizes=(60,),
    )  # fmt: skip
    scale = 2**params.scale_bits
    rng = np.random.default_rng(11)
    weights = 4.0 * rng.choice([-1.0, 1.0], 2000) * (1 - rng.uniform(0, 1e-3, 2000))
    encoded = np.rint(weights * num_examples * float(scale))  # what a site encodes (codec.encrypt_update)
    encoding_loss = max(abs(Fraction(float(value)) - Fraction(float(weight)) * num_examples * scale) for value, weight in zip(encoded, weights))
    assert encoding_loss > 15  # the float64 product, not the half unit of rounding
    seal_worst_case = 0.5 + 21  # one site: rounding and SEAL's largest centred binomial error
    assert decryption_error_bound(params, 1) * scale >= seal_worst_case + float(encoding_loss) + 16  # + decoding's step / 2

    secret = create_secret_context(params)
    decrypted = decrypt_sum(secret, sum_encrypted(secret, [encrypt_update(secret, weights, num_examples)]))[:-1]
    worst = max(abs(Fraction(float(value)) - Fraction(float(weight)) * num_examples) for value, weight in zip(decrypted, weights))
    assert float(worst) <= decryption_error_bound(params, 1)
