"""The numpy paths that replaced SEAL round trips (issue 12): each equals, bit for bit, what it replaced.

- core/he/ntt.py's negacyclic NTT and its inverse == SEAL's `transform_to/from_ntt` (through ciphertext
  shells, seal_objects.py) on random polynomials, for every ring size and on both sides of the 32-bit
  boundary where the modular product changes method;
- a site's decryption of the certified updates (SEAL loads and adds them, decrypts, the numpy inverse NTT
  reads the plaintexts) == the former path: the sum serialized, loaded again, decrypted, SEAL's inverse NTT;
- the bit packing == the former unpackbits/packbits version for every width.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import tenseal.sealapi as sealapi

from medtwin.client.codec import CkksSiteCodec
from medtwin.core.he import (
    CiphertextMismatchError,
    HeContextError,
    choose_ckks_parameters,
    create_secret_context,
    decrypt_average,
    decrypt_average_of_updates,
    decrypt_sum,
    decrypt_sum_of_updates,
    encrypt_update,
    sum_encrypted,
)
from medtwin.core.he.codec import FULL, _load_update, _shape, pack_bits, unpack_bits
from medtwin.core.he.ntt import NttTables, forward_ntt, inverse_ntt, minimal_primitive_root
from medtwin.core.he.seal_io import seal_bytes
from medtwin.core.he.seal_objects import SealShape, from_ntt, read_plaintext, to_ntt
from medtwin.core.protocol import chunks_to_record

DEGREES = (1024, 2048, 4096, 8192, 16384, 32768)  # every ring the chooser can return (SECURITY_TABLE_BITS)
PRIME_BITS = (20, 32, 33, 60)  # the chooser's smallest; the last below 2^32 and the first above; SEAL's largest


def _seal_ring(degree: int, bits: int) -> tuple[sealapi.SEALContext, SealShape]:
    parameters = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
    parameters.set_poly_modulus_degree(degree)
    parameters.set_coeff_modulus(sealapi.CoeffModulus.Create(degree, [bits]))
    context = sealapi.SEALContext(parameters, True, sealapi.SEC_LEVEL_TYPE.NONE)  # any prime size, to test them all
    return context, SealShape.of(context, seal_bytes(parameters))


@pytest.mark.parametrize("degree", DEGREES)
def test_the_numpy_ntt_equals_seals_both_ways(degree: int) -> None:
    rng = np.random.default_rng(degree)
    for bits in PRIME_BITS + ((27, 31) if degree <= 2048 else ()):
        context, shape = _seal_ring(degree, bits)
        tables = NttTables.of(degree, shape.modulus)
        polynomials = rng.integers(0, shape.modulus, (2, degree), dtype=np.uint64)
        polynomials[1, :4] = [0, 1, shape.modulus - 1, shape.modulus - 2]  # the edges of the range
        assert np.array_equal(forward_ntt(tables, polynomials), to_ntt(shape, context, polynomials)), (degree, bits)
        assert np.array_equal(inverse_ntt(tables, polynomials), from_ntt(shape, context, polynomials)), (degree, bits)
        assert np.array_equal(inverse_ntt(tables, forward_ntt(tables, polynomials)), polynomials)


def test_psi_is_the_smallest_primitive_root_and_bad_rings_are_refused() -> None:
    modulus, order = 12289, 2048  # 12289 = 6 * 2048 + 1
    smallest = minimal_primitive_root(order, modulus)
    primitive = [x for x in range(2, modulus) if pow(x, order // 2, modulus) == modulus - 1]
    assert smallest == min(primitive)
    with pytest.raises(ValueError, match="not a multiple"):
        minimal_primitive_root(8192, modulus)
    with pytest.raises(ValueError, match="power of two"):
        NttTables.of(1000, modulus)


@pytest.fixture(scope="module")
def federation():
    params = choose_ckks_parameters(num_parameters=5000, num_sites=3, max_abs_weight_bound=2.0, max_total_examples=1000)
    context = create_secret_context(params)
    rng = np.random.default_rng(3)
    updates = [encrypt_update(context, np.clip(rng.normal(0, 0.7, 5000), -2, 2), count) for count in (120, 300, 45)]
    return context, updates


def test_a_sites_decryption_of_the_updates_equals_the_former_path_bit_for_bit(federation, tmp_path) -> None:
    context, updates = federation
    summed = sum_encrypted(context, updates)
    shape = _shape(context)
    decryptor = sealapi.Decryptor(context.seal_context, context.secret_key)
    plaintexts = []
    for ciphertext in _load_update(context, summed, update_index=None, stored=FULL):  # the former path, SEAL's INTT
        plaintext = sealapi.Plaintext()
        decryptor.decrypt(ciphertext, plaintext)
        plaintexts.append(read_plaintext(shape, plaintext))
    residues = from_ntt(shape, context.seal_context, np.array(plaintexts)).reshape(-1).astype(np.int64)
    centred = np.where(residues > shape.modulus // 2, residues - shape.modulus, residues)
    former = centred[:5001].astype(np.float64) / 2.0**context.parameters.scale_bits
    assert np.array_equal(decrypt_sum(context, summed), former)
    assert np.array_equal(decrypt_sum_of_updates(context, updates), former)
    average, total = decrypt_average_of_updates(context, updates, 5000)
    former_average, former_total = decrypt_average(context, summed, 5000)
    assert total == former_total == 465 and np.array_equal(average, former_average)
    codec = CkksSiteCodec(context, kit_dir=tmp_path)
    records = [chunks_to_record(chunks) for chunks in updates]
    site_average, site_total = codec.average_of(records)
    assert site_total == 465 and np.array_equal(site_average, codec.average(codec.sum(records))[0])


def test_a_site_refuses_updates_it_cannot_add_as_before(federation) -> None:
    context, updates = federation
    with pytest.raises(HeContextError):
        decrypt_sum_of_updates(replace(context, secret_key=None), updates)  # the coordinator's context
    seeded_as_sum = [updates[0], sum_encrypted(context, updates[1:])]  # a sum is not an update
    with pytest.raises(CiphertextMismatchError, match="stores 2 polynomial"):
        decrypt_sum_of_updates(context, seeded_as_sum)


def _former_pack(values: np.ndarray, bits: int) -> bytes:
    as_bytes = np.ascontiguousarray(values, dtype="<u8").view(np.uint8).reshape(-1, 8)
    return np.packbits(np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :bits], bitorder="little").tobytes()


def _former_unpack(data: bytes, count: int, bits: int) -> np.ndarray:
    table = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count * bits, bitorder="little").reshape(count, bits)
    padded = np.zeros((count, 64), dtype=np.uint8)
    padded[:, :bits] = table
    return np.packbits(padded, axis=1, bitorder="little").view("<u8").reshape(count).astype(np.uint64)


def test_bit_packing_equals_the_former_version_at_every_width() -> None:
    rng = np.random.default_rng(11)
    for bits in range(1, 65):
        for count in (0, 1, 7, 8, 9, 64, 65, 301):
            values = rng.integers(0, 2**63, count, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, count, dtype=np.uint64)
            packed = pack_bits(values, bits)
            assert packed == _former_pack(values, bits), (bits, count)
            assert np.array_equal(unpack_bits(packed, count, bits), _former_unpack(packed, count, bits)), (bits, count)
