"""Encrypt a site's update, add updates at the coordinator, decrypt the average at a site.

An update is the packed vector [n_i * w_i ..., n_i * B] (length num_parameters + 1, B =
max_abs_weight_bound so the count uses the same full scale as the weights; unpacking divides it
out), cut into chunks of N/2 slots, each encrypted into one CKKS ciphertext. On the wire a chunk is a 32-byte header —
magic, key id, chunk index, chunk count, packed length — followed by TenSEAL's serialization.
`update_digest` hashes all chunks; sites sign that digest (see medtwin.core.identity).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import numpy as np
import tenseal as ts

from .context import KEY_ID_BYTES, HeContext, load_context
from .errors import CiphertextMismatchError, HeContextError, ValueRangeError
from .params import decryption_error_bound

CHUNK_MAGIC = b"MTCT"
CHUNK_HEADER = struct.Struct(f">4s{KEY_ID_BYTES}sIII")  # magic, key id, index, count, packed length


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
    packed = np.append(vector * num_examples, float(num_examples) * params.max_abs_weight_bound)
    count = params.num_ciphertexts
    chunks = []
    for index in range(count):
        piece = packed[index * params.slots : (index + 1) * params.slots]
        body = ts.ckks_vector(context.tenseal_context, piece.tolist()).serialize()
        header = CHUNK_HEADER.pack(CHUNK_MAGIC, context.key_id, index, count, packed.size)
        chunks.append(header + body)
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
    totals: list[ts.CKKSVector] = []
    for update_index, chunks in enumerate(updates):
        vectors = _load_update(context, chunks, update_index=update_index)
        if not totals:
            totals = vectors
            continue
        for total, vector in zip(totals, vectors, strict=True):
            total.add_(vector)
    packed_length = context.parameters.num_parameters + 1
    count = len(totals)
    return [
        CHUNK_HEADER.pack(CHUNK_MAGIC, context.key_id, index, count, packed_length) + total.serialize()
        for index, total in enumerate(totals)
    ]


def decrypt_sum(secret_context: HeContext, summed: Sequence[bytes]) -> np.ndarray:
    """Site side: the decrypted packed sum [sum n_i w_i ..., B * sum n_i] (B = max_abs_weight_bound)."""
    if not secret_context.is_private:
        raise HeContextError("this context holds no secret key and cannot decrypt (the coordinator's never can)")
    vectors = _load_update(secret_context, summed, update_index=None)
    return np.concatenate([np.asarray(vector.decrypt(), dtype=np.float64) for vector in vectors])


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
) -> list[ts.CKKSVector]:
    params = context.parameters
    where = label or ("the aggregate" if update_index is None else f"update #{update_index}")
    if len(chunks) != params.num_ciphertexts:
        raise CiphertextMismatchError(
            f"{where} has {len(chunks)} ciphertext chunks, the federation's parameters need {params.num_ciphertexts} "
            f"({params.num_parameters} parameters + 1 count in {params.slots}-slot ciphertexts)"
        )
    packed_length = params.num_parameters + 1
    vectors = []
    for index, chunk in enumerate(chunks):
        if len(chunk) < CHUNK_HEADER.size:
            raise CiphertextMismatchError(f"{where}, chunk {index}: {len(chunk)} bytes is too short for a ciphertext")
        magic, key_id, chunk_index, count, length = CHUNK_HEADER.unpack_from(chunk)
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
        try:
            vector = ts.ckks_vector_from(context.tenseal_context, chunk[CHUNK_HEADER.size :])
        except (RuntimeError, ValueError) as error:
            raise CiphertextMismatchError(
                f"{where}, chunk {index}: TenSEAL refused the ciphertext ({error}) — made with other CKKS "
                "parameters, or corrupted in transit"
            ) from error
        expected_size = min(params.slots, packed_length - index * params.slots)
        if vector.size() != expected_size:
            raise CiphertextMismatchError(f"{where}, chunk {index}: holds {vector.size()} values, expected {expected_size}")
        (ciphertext,) = vector.ciphertext()  # one chunk never exceeds one ciphertext's slots
        shape = (ciphertext.poly_modulus_degree(), ciphertext.coeff_modulus_size(), ciphertext.size(), ciphertext.scale)
        expected = (params.poly_modulus_degree, len(params.coeff_mod_bit_sizes) - 1, 2, 2.0**params.scale_bits)
        if shape != expected:
            raise CiphertextMismatchError(
                f"{where}, chunk {index}: (N, data primes, polynomials, scale) = {shape}, expected {expected}"
            )
        vectors.append(vector)
    return vectors


def load_update_chunks(context: HeContext, chunks: Sequence[bytes], *, label: str = "the update") -> list[ts.CKKSVector]:
    """The update's ciphertexts, or `CiphertextMismatchError` naming `label` if they do not fit `context`."""
    return _load_update(context, chunks, update_index=None, label=label)


def check_update_chunks(context: HeContext, chunks: Sequence[bytes], *, label: str = "the update") -> None:
    """Raise `CiphertextMismatchError` unless `chunks` load as an update under `context`'s parameters."""
    load_update_chunks(context, chunks, label=label)


def sum_loaded(context: HeContext, updates: Sequence[Sequence[ts.CKKSVector]]) -> list[bytes]:
    """Coordinator side, from already-checked ciphertexts: the encrypted sum, serialized in chunks."""
    if not updates:
        raise CiphertextMismatchError("no updates to add")
    totals = list(updates[0])  # freshly loaded for this sum: adding in place is safe
    for vectors in updates[1:]:
        for total, vector in zip(totals, vectors, strict=True):
            total.add_(vector)
    packed_length = context.parameters.num_parameters + 1
    return [
        CHUNK_HEADER.pack(CHUNK_MAGIC, context.key_id, index, len(totals), packed_length) + total.serialize()
        for index, total in enumerate(totals)
    ]
