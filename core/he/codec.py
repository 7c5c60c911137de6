"""Encrypt a site's update, add updates at the coordinator, decrypt the average at a site.

An update is the packed vector [n_i * w_i ..., n_i * B] (length num_parameters + 1, B =
max_abs_weight_bound so the count uses the same full scale as the weights; unpacking divides it
out), cut into chunks of N reals. A chunk is one CKKS ciphertext of N/2 complex slots, two reals
per slot (real part, imaginary part), written with SEAL directly (`tenseal.sealapi`; TenSEAL's
vectors use real slots only and cannot save seeded ciphertexts):

    site         CKKSEncoder.encode(complex values) -> Encryptor(secret key).encrypt_symmetric
                 -> SEAL's seeded save: one polynomial + the seed of the other (~1.04x float32)
    coordinator  Ciphertext.load (expands the seed; needs only the encryption parameters)
                 -> Evaluator.add_inplace -> save the sum (two polynomials, ~2.07x float32)
    site         Decryptor(secret key).decrypt -> CKKSEncoder.decode_complex

On the wire a chunk is a 32-byte header — magic (format version), key id, chunk index, chunk
count, packed length — followed by SEAL's serialization. Format 1 (`MTCT`, TenSEAL vectors) is
refused with a hint. `update_digest` hashes all chunks; sites sign that digest (see
medtwin.core.identity).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import numpy as np
import tenseal.sealapi as sealapi

from .context import KEY_ID_BYTES, HeContext, load_context
from .errors import CiphertextMismatchError, HeContextError, ValueRangeError
from .params import decryption_error_bound
from .seal_io import seal_bytes, seal_load

CHUNK_MAGIC = b"MTC2"  # format 2: a SEAL ciphertext, two reals per complex slot
LEGACY_CHUNK_MAGIC = b"MTCT"  # format 1: a TenSEAL CKKS vector, one real per slot
CHUNK_HEADER = struct.Struct(f">4s{KEY_ID_BYTES}sIII")  # magic, key id, index, count, packed length
SEAL_SLACK_BYTES = 4096  # SEAL's header and metadata, and zstd's worst-case expansion


def encrypt_update(context: HeContext, weights: np.ndarray, num_examples: int) -> list[bytes]:
    """Pack [num_examples * weights ..., num_examples] and encrypt it into `num_ciphertexts` chunks."""
    params = context.parameters
    vector = np.asarray(weights, dtype=np.float64)
    if vector.ndim != 1 or vector.size != params.num_parameters:
        raise ValueRangeError(
            f"weights have shape {vector.shape}, the HE parameters were chosen for ({params.num_parameters},); "
            "flatten the model, or regenerate the keys for this model size"
        )
    if not np.all(np.isfinite(vector)):
        raise ValueRangeError(f"weights contain {int(np.sum(~np.isfinite(vector)))} NaN/inf values; nothing was encrypted")
    largest = float(np.max(np.abs(vector))) if vector.size else 0.0
    if largest > params.max_abs_weight_bound:
        raise ValueRangeError(
            f"|weight| reaches {largest:g} at index {int(np.argmax(np.abs(vector)))}, over "
            f"crypto.max_abs_weight_bound={params.max_abs_weight_bound:g} (the sum could overflow the ciphertext); "
            "raise crypto.max_abs_weight_bound and regenerate the HE keys"
        )
    if int(num_examples) != num_examples or not 1 <= num_examples <= params.max_total_examples:
        raise ValueRangeError(
            f"num_examples={num_examples} must be an integer in [1, crypto.max_total_examples="
            f"{params.max_total_examples}]"
        )
    if context.secret_key is None:
        raise HeContextError("this context holds no secret key and cannot encrypt (the coordinator's never can)")
    packed = np.append(vector * num_examples, float(num_examples) * params.max_abs_weight_bound)
    count, width = params.num_ciphertexts, params.values_per_ciphertext
    slots = np.zeros(count * width)
    slots[: packed.size] = packed
    slots = slots.reshape(count, params.slots, 2)  # (ciphertext, slot, real/imaginary part)
    encoder = sealapi.CKKSEncoder(context.seal_context)
    encryptor = sealapi.Encryptor(context.seal_context, context.secret_key)
    scale = 2.0**params.scale_bits
    chunks = []
    for index in range(count):
        plaintext = sealapi.Plaintext()
        encoder.encode((slots[index, :, 0] + 1j * slots[index, :, 1]).tolist(), scale, plaintext)
        body = seal_bytes(encryptor.encrypt_symmetric(plaintext))  # seeded: the uniform half is a seed
        chunks.append(CHUNK_HEADER.pack(CHUNK_MAGIC, context.key_id, index, count, packed.size) + body)
    return chunks


def update_digest(chunks: Sequence[bytes]) -> bytes:
    """SHA-256 over every chunk (length-prefixed): what a site signs and the data chain anchors."""
    digest = hashlib.sha256(b"medtwin/he-update/v1\x00")
    digest.update(struct.pack(">Q", len(chunks)))
    for chunk in chunks:
        digest.update(struct.pack(">Q", len(chunk)))
        digest.update(chunk)
    return digest.digest()


def sum_encrypted(public_context: bytes | HeContext, updates: Sequence[Sequence[bytes]]) -> list[bytes]:
    """Coordinator side: add the sites' encrypted updates chunk by chunk; returns the encrypted sum.

    Needs only the public context. Raises `CiphertextMismatchError` naming the update and chunk when
    a chunk belongs to another key set, other parameters, or another model size.
    """
    context = public_context if isinstance(public_context, HeContext) else load_context(public_context)
    if not updates:
        raise CiphertextMismatchError("no updates to add")
    loaded = [_load_update(context, chunks, update_index=update_index) for update_index, chunks in enumerate(updates)]
    return sum_loaded(context, loaded)


def decrypt_sum(secret_context: HeContext, summed: Sequence[bytes]) -> np.ndarray:
    """Site side: the decrypted packed sum [sum n_i w_i ..., B * sum n_i] (B = max_abs_weight_bound)."""
    if secret_context.secret_key is None:
        raise HeContextError("this context holds no secret key and cannot decrypt (the coordinator's never can)")
    ciphertexts = _load_update(secret_context, summed, update_index=None)
    encoder = sealapi.CKKSEncoder(secret_context.seal_context)
    decryptor = sealapi.Decryptor(secret_context.seal_context, secret_context.secret_key)
    packed = []
    for ciphertext in ciphertexts:
        plaintext = sealapi.Plaintext()
        decryptor.decrypt(ciphertext, plaintext)
        values = np.asarray(encoder.decode_complex(plaintext), dtype=np.complex128)
        packed.append(np.stack([values.real, values.imag], axis=1).reshape(-1))
    return np.concatenate(packed)[: secret_context.parameters.num_parameters + 1]


def decrypt_average(secret_context: HeContext, summed: Sequence[bytes], num_parameters: int) -> tuple[np.ndarray, float]:
    """Site side: (average weights, total examples) from the encrypted sum.

    The total is an integer sum of counts, so it is rounded; a total outside [1, max_total_examples]
    means the sum overflowed or was made under another key, and raises `ValueRangeError`.
    """
    params = secret_context.parameters
    if num_parameters != params.num_parameters:
        raise ValueRangeError(f"asked for {num_parameters} parameters, the HE parameters are for {params.num_parameters}")
    packed = decrypt_sum(secret_context, summed)
    decrypted_total = float(packed[num_parameters]) / params.max_abs_weight_bound
    error_bound = decryption_error_bound(params, params.num_sites) / params.max_abs_weight_bound
    # sum n_i is an integer: rounding removes the count's error whenever the bound allows it
    total_examples = float(np.round(decrypted_total)) if error_bound < 0.5 else decrypted_total
    if not 1 - error_bound <= total_examples <= params.max_total_examples + error_bound:
        raise ValueRangeError(
            f"decrypted total examples {decrypted_total:.6g} is outside [1, crypto.max_total_examples="
            f"{params.max_total_examples}] (error bound {error_bound:.2g}): the sum overflowed or used another key"
        )
    return packed[:num_parameters] / total_examples, total_examples


def _load_update(
    context: HeContext, chunks: Sequence[bytes], *, update_index: int | None, label: str = ""
) -> list[sealapi.Ciphertext]:
    params = context.parameters
    where = label or ("the aggregate" if update_index is None else f"update #{update_index}")
    if len(chunks) != params.num_ciphertexts:
        raise CiphertextMismatchError(
            f"{where} has {len(chunks)} ciphertext chunks, the federation's parameters need {params.num_ciphertexts} "
            f"({params.num_parameters} parameters + 1 count, {params.values_per_ciphertext} per ciphertext)"
        )
    packed_length = params.num_parameters + 1
    # a sum is two polynomials of N uint64 coefficients per data prime; SEAL's zstd only shrinks them
    max_chunk_bytes = CHUNK_HEADER.size + 2 * 8 * params.poly_modulus_degree * len(params.data_prime_bit_sizes) + SEAL_SLACK_BYTES
    max_object_bytes = max_chunk_bytes - CHUNK_HEADER.size  # inflated, too: SEAL's zstd only shrinks
    ciphertexts = []
    for index, chunk in enumerate(chunks):
        if not CHUNK_HEADER.size <= len(chunk) <= max_chunk_bytes:
            raise CiphertextMismatchError(
                f"{where}, chunk {index}: {len(chunk)} bytes, a ciphertext of these parameters has "
                f"{CHUNK_HEADER.size}..{max_chunk_bytes}"
            )
        magic, key_id, chunk_index, count, length = CHUNK_HEADER.unpack_from(chunk)
        if magic == LEGACY_CHUNK_MAGIC:
            raise CiphertextMismatchError(
                f"{where}, chunk {index}: chunk format 1 (TenSEAL vectors), this federation uses format 2 "
                f"({CHUNK_MAGIC!r}, seeded complex-packed SEAL ciphertexts) — the site runs an older medtwin"
            )
        if magic != CHUNK_MAGIC:
            raise CiphertextMismatchError(f"{where}, chunk {index}: not a medtwin ciphertext chunk (magic {magic!r})")
        if key_id != context.key_id:
            raise CiphertextMismatchError(
                f"{where}, chunk {index}: encrypted under key set {key_id.hex()}, the federation's is "
                f"{context.key_id.hex()} — the site holds another HE key (re-run the key steward distribution)"
            )
        if (chunk_index, count, length) != (index, len(chunks), packed_length):
            raise CiphertextMismatchError(
                f"{where}, chunk {index}: header says chunk {chunk_index} of {count} for {length} packed values, "
                f"expected chunk {index} of {len(chunks)} for {packed_length}"
            )
        ciphertext = sealapi.Ciphertext()
        try:
            seal_load(lambda path: ciphertext.load(context.seal_context, path), chunk[CHUNK_HEADER.size :], max_object_bytes=max_object_bytes)
        except (RuntimeError, ValueError, OverflowError, IndexError, MemoryError) as error:
            raise CiphertextMismatchError(
                f"{where}, chunk {index}: SEAL refused the ciphertext ({error}) — made with other CKKS "
                "parameters, or corrupted in transit"
            ) from error
        shape = (
            ciphertext.parms_id() == context.seal_context.first_parms_id(),
            ciphertext.is_ntt_form(),
            ciphertext.size(),
            ciphertext.scale,
        )
        expected = (True, True, 2, 2.0**params.scale_bits)
        if shape != expected:
            raise CiphertextMismatchError(
                f"{where}, chunk {index}: (at the data level, NTT form, polynomials, scale) = {shape}, expected {expected}"
            )
        ciphertexts.append(ciphertext)
    return ciphertexts


def load_update_chunks(context: HeContext, chunks: Sequence[bytes], *, label: str = "the update") -> list[sealapi.Ciphertext]:
    """The update's ciphertexts, or `CiphertextMismatchError` naming `label` if they do not fit `context`."""
    return _load_update(context, chunks, update_index=None, label=label)


def check_update_chunks(context: HeContext, chunks: Sequence[bytes], *, label: str = "the update") -> None:
    """Raise `CiphertextMismatchError` unless `chunks` load as an update under `context`'s parameters."""
    load_update_chunks(context, chunks, label=label)


def sum_loaded(context: HeContext, updates: Sequence[Sequence[sealapi.Ciphertext]]) -> list[bytes]:
    """Coordinator side, from already-checked ciphertexts: the encrypted sum, serialized in chunks.

    Adds in place into the first update's ciphertexts (freshly loaded for this sum). Needs no key.
    """
    if not updates:
        raise CiphertextMismatchError("no updates to add")
    evaluator = sealapi.Evaluator(context.seal_context)
    totals = list(updates[0])
    for ciphertexts in updates[1:]:
        for total, ciphertext in zip(totals, ciphertexts, strict=True):
            evaluator.add_inplace(total, ciphertext)
    packed_length = context.parameters.num_parameters + 1
    return [
        CHUNK_HEADER.pack(CHUNK_MAGIC, context.key_id, index, len(totals), packed_length) + seal_bytes(total)
        for index, total in enumerate(totals)
    ]
