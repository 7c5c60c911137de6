"""Encrypt a site's update, add updates at the coordinator, decrypt the average at a site.

An update is the packed vector [n_i * w_i ..., n_i * B] (length num_parameters + 1, B =
max_abs_weight_bound so the count uses the same full scale as the weights; unpacking divides it
out), cut into chunks of N reals. A chunk is one CKKS ciphertext whose plaintext holds the chunk's
reals in its N polynomial coefficients (coefficient encoding: round(v * 2^scale_bits) mod q, no
canonical embedding, so decryption adds only the fresh error of each site — see params.py), made
with SEAL directly (`tenseal.sealapi`: SEAL's encryption, seed expansion, addition and decryption;
seal_objects.py) and SEAL's NTT computed in numpy (ntt.py, checked against SEAL's once per ring):

    site         coefficients -> NTT -> Encryptor(secret key).encrypt_symmetric: seeded, the
                 uniform polynomial is SEAL's seed -> one polynomial, bit-packed, + the seed
    coordinator  rebuild SEAL's seeded serialization -> Ciphertext.load (SEAL expands the seed; needs
                 only the encryption parameters; the check's loads are the ones summed) ->
                 Evaluator.add -> both polynomials, bit-packed
    site         the certified updates loaded and added as at the coordinator (the sum is not written out)
                 -> Decryptor(secret key).decrypt -> inverse NTT -> centre-lift mod q -> / 2^scale_bits

On the wire a chunk is a 33-byte header — magic (format version), key id, chunk index, chunk count,
packed length, polynomials stored (1: seeded, 2: full) — then, seeded, SEAL's PRNG type and 512-bit
seed, then the polynomials' coefficients at ceil(log2 q) bits each (little-endian bit order). SEAL's
zstd would spend ~4.2 bytes on a 27-bit coefficient; this spends 3.4. Received bytes are checked
(a site's update seeded, a sum full; exact length; every coefficient < q) and rebuilt into SEAL's
uncompressed form, so no peer's bytes reach SEAL's zstd (seal_io.py) and no site chooses the second
polynomial of its update (two sites sending zero second polynomials made SEAL's addition throw).
Formats 1 (`MTCT`, TenSEAL vectors) and 2 (`MTC2`, complex slots) are refused with a hint. `update_digest` hashes all chunks; sites sign that digest (see medtwin.core.identity).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import numpy as np
import tenseal.sealapi as sealapi

from .context import KEY_ID_BYTES, HeContext, load_context
from .errors import CiphertextMismatchError, HeContextError, ValueRangeError
from .ntt import NttTables, forward_ntt, inverse_ntt
from .params import decryption_error_bound
from .seal_io import seal_load, seal_loader
from .seal_objects import (
    PRNG_INFO_BYTES,
    SealShape,
    ciphertext_bytes,
    from_ntt,
    plaintext_bytes,
    read_ciphertext,
    read_plaintext,
    read_seeded,
    to_ntt,
)

CHUNK_MAGIC = b"MTC3"  # format 3: a SEAL ciphertext of coefficient-encoded reals, bit-packed
LEGACY_CHUNK_MAGICS = {
    b"MTCT": "format 1 (TenSEAL vectors)",
    b"MTC2": "format 2 (SEAL ciphertexts of complex slots, zstd)",
}
CHUNK_HEADER = struct.Struct(f">4s{KEY_ID_BYTES}sIIIB")  # magic, key id, index, count, packed length, polynomials
SEEDED, FULL = 1, 2  # polynomials a chunk stores: an encryption (seeded) or a sum
_CHECKED_RINGS: set[tuple[int, int]] = set()  # (N, q) whose numpy NTT matched SEAL's in this process


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
    shape = _shape(context)
    packed = np.append(vector * num_examples, float(num_examples) * params.max_abs_weight_bound)
    count = params.num_ciphertexts
    scale = 2.0**params.scale_bits
    integers = np.zeros(count * shape.degree, dtype=np.int64)
    integers[: packed.size] = np.rint(packed * scale).astype(np.int64)
    residues = np.where(integers < 0, integers + shape.modulus, integers).astype(np.uint64).reshape(count, shape.degree)
    encryptor = sealapi.Encryptor(context.seal_context, context.secret_key)
    chunks = []
    for index, ntt_values in enumerate(forward_ntt(_ntt_tables(context, shape), residues)):
        plaintext = sealapi.Plaintext()
        seal_load(lambda path: plaintext.load(context.seal_context, path), plaintext_bytes(shape, ntt_values, scale=scale))
        seeded = read_seeded(shape, encryptor.encrypt_symmetric(plaintext))  # the uniform half is a seed
        header = CHUNK_HEADER.pack(CHUNK_MAGIC, context.key_id, index, count, packed.size, SEEDED)
        chunks.append(header + seeded.prng_info + pack_bits(seeded.first, shape.modulus.bit_length()))
    return chunks


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """`values` (uint64 < 2^bits) at `bits` bits each, least significant bit first: value i holds bits
    [i * bits, (i + 1) * bits) of the little-endian stream. Bits above `bits` are dropped."""
    flat = np.asarray(values, dtype=np.uint64).reshape(-1) & _mask(bits)
    offsets = np.arange(flat.size, dtype=np.uint64) * np.uint64(bits)
    words, shifts = offsets >> np.uint64(6), offsets & np.uint64(63)
    low = flat << shifts  # the part in word `words`; the rest spills into the next word
    high = (flat >> np.uint64(1)) >> (np.uint64(63) - shifts)  # two shifts: a shift by 64 is undefined
    out = np.zeros(flat.size * bits // 64 + 2, dtype="<u8")
    if flat.size:
        starts = np.flatnonzero(np.concatenate(([True], words[1:] != words[:-1])))  # words never decrease
        first = words[starts].astype(np.intp)
        out[first] |= np.bitwise_or.reduceat(low, starts)  # bits of different values never overlap
        out[first + 1] |= np.bitwise_or.reduceat(high, starts)
    return out.tobytes()[: (flat.size * bits + 7) // 8]


def unpack_bits(data: bytes, count: int, bits: int) -> np.ndarray:
    """The `count` values `pack_bits` wrote (the caller checks the length first)."""
    padded = np.zeros(len(data) + 16, dtype=np.uint8)
    padded[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    windows = np.ndarray((len(padded) - 7,), dtype="<u8", buffer=padded, strides=(1,))  # 8 bytes from every byte
    offsets = np.arange(count, dtype=np.uint64) * np.uint64(bits)
    starts, shifts = (offsets >> np.uint64(3)).astype(np.intp), offsets & np.uint64(7)
    values = windows[starts] >> shifts  # 57 bits or more of the value
    if bits > 57:
        values |= (windows[starts + 8] << np.uint64(1)) << (np.uint64(63) - shifts)
    return (values & _mask(bits)).astype(np.uint64)


def _mask(bits: int) -> np.uint64:
    if not 1 <= bits <= 64:
        raise ValueError(f"{bits} bits per value: must be in [1, 64]")
    return np.uint64((1 << bits) - 1)


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
    loaded = [_load_update(context, chunks, update_index=update_index, stored=SEEDED) for update_index, chunks in enumerate(updates)]
    return sum_loaded(context, loaded)


def decrypt_sum(secret_context: HeContext, summed: Sequence[bytes]) -> np.ndarray:
    """Site side: the decrypted packed sum [sum n_i w_i ..., B * sum n_i] (B = max_abs_weight_bound)."""
    if secret_context.secret_key is None:
        raise HeContextError("this context holds no secret key and cannot decrypt (the coordinator's never can)")
    return _decrypt_loaded(secret_context, _load_update(secret_context, summed, update_index=None, stored=FULL))


def decrypt_sum_of_updates(secret_context: HeContext, updates: Sequence[Sequence[bytes]]) -> np.ndarray:
    """Site side: `decrypt_sum(sum_encrypted(updates))` — the same values — from the updates SEAL loaded and
    added, without writing the sum out and loading it again."""
    if secret_context.secret_key is None:
        raise HeContextError("this context holds no secret key and cannot decrypt (the coordinator's never can)")
    if not updates:
        raise CiphertextMismatchError("no updates to add")
    loaded = [_load_update(secret_context, chunks, update_index=update_index, stored=SEEDED) for update_index, chunks in enumerate(updates)]
    return _decrypt_loaded(secret_context, add_loaded(secret_context, loaded))


def _decrypt_loaded(secret_context: HeContext, ciphertexts: Sequence[sealapi.Ciphertext]) -> np.ndarray:
    """SEAL decrypts (NTT form); its plaintexts' values go through the numpy inverse NTT, centred mod q."""
    shape = _shape(secret_context)
    decryptor = sealapi.Decryptor(secret_context.seal_context, secret_context.secret_key)
    ntt_values = np.empty((len(ciphertexts), shape.degree), dtype=np.uint64)
    plaintext = sealapi.Plaintext()
    for index, ciphertext in enumerate(ciphertexts):
        decryptor.decrypt(ciphertext, plaintext)
        ntt_values[index] = read_plaintext(shape, plaintext)
    residues = inverse_ntt(_ntt_tables(secret_context, shape), ntt_values).reshape(-1)
    centred = np.where(residues > shape.modulus // 2, residues.astype(np.int64) - shape.modulus, residues.astype(np.int64))
    scale = 2.0**secret_context.parameters.scale_bits
    return centred[: secret_context.parameters.num_parameters + 1].astype(np.float64) / scale


def decrypt_average(secret_context: HeContext, summed: Sequence[bytes], num_parameters: int) -> tuple[np.ndarray, float]:
    """Site side: (average weights, total examples) from the encrypted sum.

    The total is an integer sum of counts, so it is rounded; a total outside [1, max_total_examples]
    means the sum overflowed or was made under another key, and raises `ValueRangeError`.
    """
    _check_parameter_count(secret_context, num_parameters)
    return _average(secret_context, decrypt_sum(secret_context, summed), num_parameters)


def decrypt_average_of_updates(
    secret_context: HeContext, updates: Sequence[Sequence[bytes]], num_parameters: int
) -> tuple[np.ndarray, float]:
    """Site side: `decrypt_average(sum_encrypted(updates))` — the same values and checks — without
    serializing the sum in between (`decrypt_sum_of_updates`)."""
    _check_parameter_count(secret_context, num_parameters)
    return _average(secret_context, decrypt_sum_of_updates(secret_context, updates), num_parameters)


def _check_parameter_count(secret_context: HeContext, num_parameters: int) -> None:
    if num_parameters != secret_context.parameters.num_parameters:
        raise ValueRangeError(
            f"asked for {num_parameters} parameters, the HE parameters are for {secret_context.parameters.num_parameters}"
        )


def _average(secret_context: HeContext, packed: np.ndarray, num_parameters: int) -> tuple[np.ndarray, float]:
    params = secret_context.parameters
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
    context: HeContext, chunks: Sequence[bytes], *, update_index: int | None, stored: int, label: str = ""
) -> list[sealapi.Ciphertext]:
    """`stored`: SEEDED for a site's update (SEAL expands the second polynomial from the seed, so a site
    cannot choose it: no transparent or otherwise hand-made second polynomial), FULL for a sum."""
    params = context.parameters
    where = label or ("the aggregate" if update_index is None else f"update #{update_index}")
    if len(chunks) != params.num_ciphertexts:
        raise CiphertextMismatchError(
            f"{where} has {len(chunks)} ciphertext chunks, the federation's parameters need {params.num_ciphertexts} "
            f"({params.num_parameters} parameters + 1 count, {params.values_per_ciphertext} per ciphertext)"
        )
    shape = _shape(context)
    bits = shape.modulus.bit_length()
    polynomial_bytes = (shape.degree * bits + 7) // 8
    sizes = {
        SEEDED: CHUNK_HEADER.size + PRNG_INFO_BYTES + polynomial_bytes,
        FULL: CHUNK_HEADER.size + (2 * shape.degree * bits + 7) // 8,
    }
    packed_length = params.num_parameters + 1
    prng_infos, packed_polynomials = [], []
    for index, chunk in enumerate(chunks):
        if len(chunk) < CHUNK_HEADER.size:
            raise CiphertextMismatchError(f"{where}, chunk {index}: {len(chunk)} bytes, shorter than the chunk header")
        magic, key_id, chunk_index, count, length, polynomials = CHUNK_HEADER.unpack_from(chunk)
        if magic in LEGACY_CHUNK_MAGICS:
            raise CiphertextMismatchError(
                f"{where}, chunk {index}: chunk {LEGACY_CHUNK_MAGICS[magic]}, this federation uses format 3 "
                f"({CHUNK_MAGIC!r}, coefficient-encoded, bit-packed SEAL ciphertexts) — the site runs an older "
                "medtwin: update it, and have the key steward generate a new key set"
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
        if polynomials != stored:
            raise CiphertextMismatchError(
                f"{where}, chunk {index}: stores {polynomials} polynomial(s), expected {stored} "
                f"({'a seeded encryption: one polynomial and its seed' if stored == SEEDED else 'a sum: two polynomials'})"
                " — a site's update is seeded, only a sum stores both polynomials"
            )
        if len(chunk) != sizes[stored]:
            raise CiphertextMismatchError(
                f"{where}, chunk {index}: {len(chunk)} bytes for {polynomials} stored polynomial(s); a seeded chunk of "
                f"these parameters has {sizes[SEEDED]} bytes, a sum {sizes[FULL]}"
            )
        body = chunk[CHUNK_HEADER.size :]
        prng_infos.append(body[:PRNG_INFO_BYTES] if stored == SEEDED else b"")
        packed_polynomials.append(body[len(prng_infos[-1]) :])
    per_chunk = stored * shape.degree
    if per_chunk * bits % 8 == 0:  # every chunk ends on a byte boundary (any N >= 8): one stream, unpacked at once
        values = unpack_bits(b"".join(packed_polynomials), len(chunks) * per_chunk, bits)
    else:
        values = np.concatenate([unpack_bits(packed, per_chunk, bits) for packed in packed_polynomials])
    values = values.reshape(len(chunks), stored, shape.degree)
    out_of_range = np.flatnonzero((values >= shape.modulus).any(axis=(1, 2)))
    if out_of_range.size:
        raise CiphertextMismatchError(
            f"{where}, chunk {int(out_of_range[0])}: a coefficient is not below the prime q = {shape.modulus} — corrupted in "
            "transit or made with other CKKS parameters"
        )
    ciphertexts = []
    with seal_loader() as load:  # one scratch file for every chunk
        for index, (polynomial_values, prng_info) in enumerate(zip(values, prng_infos, strict=True)):
            data = ciphertext_bytes(shape, polynomial_values, scale=2.0**params.scale_bits, prng_info=prng_info)
            ciphertext = sealapi.Ciphertext()
            try:
                load(lambda path: ciphertext.load(context.seal_context, path), data)
            except (RuntimeError, ValueError, OverflowError, IndexError, MemoryError) as error:
                raise CiphertextMismatchError(
                    f"{where}, chunk {index}: SEAL refused the ciphertext ({error}) — made with other CKKS "
                    "parameters, or corrupted in transit"
                ) from error
            ciphertexts.append(ciphertext)
    return ciphertexts


def load_update_chunks(context: HeContext, chunks: Sequence[bytes], *, label: str = "the update") -> list[sealapi.Ciphertext]:
    """The update's ciphertexts, or `CiphertextMismatchError` naming `label` if they do not fit `context`."""
    return _load_update(context, chunks, update_index=None, stored=SEEDED, label=label)


def check_update_chunks(context: HeContext, chunks: Sequence[bytes], *, label: str = "the update") -> None:
    """Raise `CiphertextMismatchError` unless `chunks` load as an update under `context`'s parameters."""
    load_update_chunks(context, chunks, label=label)


def sum_loaded(context: HeContext, updates: Sequence[Sequence[sealapi.Ciphertext]]) -> list[bytes]:
    """Coordinator side, from already-checked ciphertexts: the encrypted sum, serialized in chunks.

    Leaves `updates` as they were (the sum goes into new ciphertexts). Needs no key.
    """
    totals = add_loaded(context, updates)
    shape = _shape(context)
    bits = shape.modulus.bit_length()
    packed_length = context.parameters.num_parameters + 1
    return [
        CHUNK_HEADER.pack(CHUNK_MAGIC, context.key_id, index, len(totals), packed_length, FULL)
        + pack_bits(read_ciphertext(shape, total), bits)
        for index, total in enumerate(totals)
    ]


def add_loaded(context: HeContext, updates: Sequence[Sequence[sealapi.Ciphertext]]) -> list[sealapi.Ciphertext]:
    """SEAL's chunk-by-chunk sum of loaded updates, in new ciphertexts: the inputs are not changed (one
    update is its own sum)."""
    if not updates:
        raise CiphertextMismatchError("no updates to add")
    if len(updates) == 1:
        return list(updates[0])
    evaluator = sealapi.Evaluator(context.seal_context)
    totals = []
    for index, first in enumerate(updates[0]):
        total = sealapi.Ciphertext()
        for update_index, ciphertexts in enumerate(updates[1:], start=1):
            try:
                if update_index == 1:
                    evaluator.add(first, ciphertexts[index], total)
                else:
                    evaluator.add_inplace(total, ciphertexts[index])
            except (RuntimeError, ValueError, IndexError) as error:  # e.g. SEAL's "result ciphertext is transparent"
                raise CiphertextMismatchError(f"update #{update_index}, chunk {index}: SEAL cannot add it ({error})") from error
        totals.append(total)
    return totals


def _ntt_tables(context: HeContext, shape: SealShape) -> NttTables:
    """The numpy NTT's tables for this ring, checked once per process and ring against SEAL's own transform
    of a random polynomial both ways (a SEAL that transformed differently is refused, not silently misread)."""
    tables = NttTables.of(shape.degree, shape.modulus)
    if (shape.degree, shape.modulus) not in _CHECKED_RINGS:
        probe = np.random.default_rng().integers(0, shape.modulus, (1, shape.degree), dtype=np.uint64)
        if not (
            np.array_equal(forward_ntt(tables, probe), to_ntt(shape, context.seal_context, probe))
            and np.array_equal(inverse_ntt(tables, probe), from_ntt(shape, context.seal_context, probe))
        ):
            raise HeContextError(
                f"this SEAL's NTT modulo {shape.modulus} at N = {shape.degree} differs from the one medtwin computes "
                "(core/he/ntt.py, written for SEAL 4.1): install the tenseal version pinned in pyproject.toml"
            )
        _CHECKED_RINGS.add((shape.degree, shape.modulus))
    return tables


def _shape(context: HeContext) -> SealShape:
    try:
        return SealShape.of(context.seal_context, context.encryption_parameters)
    except ValueError as error:
        raise HeContextError(f"{error}: generate a key set with one data prime (crypto.coeff_mod_bit_sizes)") from None
