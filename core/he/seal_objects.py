"""SEAL 4.1's Plaintext and Ciphertext members, read and written here, and SEAL's own NTT on them.

`tenseal.sealapi` gives no element access to a plaintext or ciphertext (only save/load through a
path, see seal_io.py), and SEAL refuses to load a CKKS plaintext in coefficient form (its data check
compares coefficients with a plain modulus CKKS does not have). So coefficients go in and out
through SEAL's serialization, whose members are, after SEAL's 16-byte header (little-endian):

    Plaintext   parms_id (4 x uint64; zero = coefficient form), coeff_count (uint64), scale (double),
                DynArray: a nested SEAL object holding count (uint64) then count uint64 values
    Ciphertext  parms_id (4 x uint64), is_ntt_form (uint8), size, poly_modulus_degree,
                coeff_modulus_size (uint64 each), scale (double), correction_factor (uint64),
                DynArray of size x N x k values — or, seeded, N x k values followed by a nested
                UniformRandomGeneratorInfo object: PRNG type (uint8) and its 512-bit seed

`to_ntt` / `from_ntt` are SEAL's own transforms (`Evaluator.transform_to_ntt_inplace` /
`transform_from_ntt_inplace`) applied to a ciphertext whose polynomials are the ones to transform:
up to SEAL's limit of 16 polynomials per call, the last one all ones (SEAL refuses transparent
ciphertexts, whose polynomials after the first are zero). They are the reference the numpy NTT
(ntt.py), which the codec uses, is checked against: once per ring in each process, and in tests.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import tenseal.sealapi as sealapi

from .seal_io import COMPRESSION_NONE, SEAL_HEADER, SEAL_MAGIC, inflate_untrusted, seal_bytes, seal_load

PLAINTEXT_MEMBERS = struct.Struct("<4QQd")
CIPHERTEXT_MEMBERS = struct.Struct("<4QBQQQdQ")
COUNT = struct.Struct("<Q")
PRNG_INFO_BYTES = 1 + 64  # UniformRandomGeneratorInfo: PRNG type, 8 x uint64 seed
MAX_POLYNOMIALS = 16  # SEAL_CIPHERTEXT_SIZE_MAX


@dataclass(frozen=True)
class SealShape:
    """What every object of one context shares: SEAL's serialization version, the data level, N, q."""

    version: tuple[int, int]
    parms_id: tuple[int, int, int, int]
    degree: int
    modulus: int

    @classmethod
    def of(cls, seal_context: sealapi.SEALContext, encryption_parameters: bytes) -> SealShape:
        _, _, major, minor, *_ = SEAL_HEADER.unpack_from(encryption_parameters)
        data = seal_context.first_context_data()
        moduli = data.parms().coeff_modulus()
        if len(moduli) != 1:
            raise ValueError(f"coefficient-encoded sums live under one data prime; this context has {len(moduli)}")
        return cls((major, minor), tuple(seal_context.first_parms_id()), data.parms().poly_modulus_degree(), moduli[0].value())


@dataclass(frozen=True)
class SeededPolynomial:
    """A seeded ciphertext's stored half: its first polynomial and the seed SEAL expands the second from."""

    first: np.ndarray  # N uint64, NTT form, < q
    prng_info: bytes  # PRNG_INFO_BYTES


def seal_object(shape: SealShape, body: bytes) -> bytes:
    major, minor = shape.version
    return SEAL_HEADER.pack(SEAL_MAGIC, SEAL_HEADER.size, major, minor, COMPRESSION_NONE, 0, SEAL_HEADER.size + len(body)) + body


def ciphertext_bytes(shape: SealShape, polynomials: np.ndarray, *, scale: float, ntt_form: bool = True, prng_info: bytes = b"") -> bytes:
    """SEAL's uncompressed serialization of a ciphertext of `polynomials` ((size, N) uint64, one prime);
    with `prng_info`, the seeded form: `polynomials` is the first one only, SEAL expands the second."""
    size = 2 if prng_info else len(polynomials)
    members = CIPHERTEXT_MEMBERS.pack(*shape.parms_id, int(ntt_form), size, shape.degree, 1, scale, 1)
    body = members + _dynarray(shape, polynomials)
    if prng_info:
        body += seal_object(shape, prng_info)
    return seal_object(shape, body)


def plaintext_bytes(shape: SealShape, ntt_values: np.ndarray, *, scale: float) -> bytes:
    """SEAL's serialization of an NTT-form plaintext at the data level."""
    return seal_object(shape, PLAINTEXT_MEMBERS.pack(*shape.parms_id, shape.degree, scale) + _dynarray(shape, ntt_values))


def read_plaintext(shape: SealShape, plaintext: sealapi.Plaintext) -> np.ndarray:
    """The N values of a plaintext SEAL made (NTT form at the data level)."""
    body = _body(shape, plaintext, expected=PLAINTEXT_MEMBERS.size + SEAL_HEADER.size + COUNT.size + 8 * shape.degree)
    *parms_id, count, _ = PLAINTEXT_MEMBERS.unpack_from(body)
    if (tuple(parms_id), count) != (shape.parms_id, shape.degree):
        raise ValueError(f"SEAL wrote a plaintext of {count} coefficients at {parms_id}, expected NTT form at the data level")
    return _read_dynarray(body, PLAINTEXT_MEMBERS.size, shape.degree)


def read_ciphertext(shape: SealShape, ciphertext: sealapi.Ciphertext) -> np.ndarray:
    """The (size, N) polynomials of a ciphertext SEAL holds (one prime)."""
    size = ciphertext.size()
    body = _body(shape, ciphertext, expected=CIPHERTEXT_MEMBERS.size + SEAL_HEADER.size + COUNT.size + 8 * size * shape.degree)
    return _read_dynarray(body, CIPHERTEXT_MEMBERS.size, size * shape.degree).reshape(size, shape.degree)


def read_seeded(shape: SealShape, serializable: object) -> SeededPolynomial:
    """The stored half of SEAL's seeded `encrypt_symmetric` result."""
    info_start = CIPHERTEXT_MEMBERS.size + SEAL_HEADER.size + COUNT.size + 8 * shape.degree
    body = _body(shape, serializable, expected=info_start + SEAL_HEADER.size + PRNG_INFO_BYTES)
    first = _read_dynarray(body, CIPHERTEXT_MEMBERS.size, shape.degree)
    return SeededPolynomial(first=first, prng_info=body[info_start + SEAL_HEADER.size :])


def to_ntt(shape: SealShape, seal_context: sealapi.SEALContext, polynomials: np.ndarray) -> np.ndarray:
    """SEAL's forward negacyclic NTT of each row of `polynomials` ((count, N) uint64 < q)."""
    return _transform(shape, seal_context, polynomials, to_ntt_form=True)


def from_ntt(shape: SealShape, seal_context: sealapi.SEALContext, polynomials: np.ndarray) -> np.ndarray:
    """SEAL's inverse NTT of each row of `polynomials` ((count, N) uint64 < q)."""
    return _transform(shape, seal_context, polynomials, to_ntt_form=False)


def _transform(shape: SealShape, seal_context: sealapi.SEALContext, polynomials: np.ndarray, *, to_ntt_form: bool) -> np.ndarray:
    rows = np.asarray(polynomials, dtype=np.uint64).reshape(-1, shape.degree)
    ones = np.ones((1, shape.degree), dtype=np.uint64)  # keeps the ciphertext from being transparent
    evaluator = sealapi.Evaluator(seal_context)
    batch = MAX_POLYNOMIALS - 1
    out = []
    for start in range(0, len(rows), batch):
        shell = sealapi.Ciphertext()
        data = ciphertext_bytes(shape, np.concatenate([rows[start : start + batch], ones]), scale=2.0, ntt_form=not to_ntt_form)
        seal_load(lambda path: shell.load(seal_context, path), data)
        if to_ntt_form:
            evaluator.transform_to_ntt_inplace(shell)
        else:
            evaluator.transform_from_ntt_inplace(shell)
        out.append(read_ciphertext(shape, shell)[:-1])
    return np.concatenate(out) if out else rows.copy()


def _dynarray(shape: SealShape, values: np.ndarray) -> bytes:
    flat = np.ascontiguousarray(values, dtype="<u8").reshape(-1)
    return seal_object(shape, COUNT.pack(flat.size) + flat.tobytes())


def _read_dynarray(body: bytes, offset: int, count: int) -> np.ndarray:
    (found,) = COUNT.unpack_from(body, offset + SEAL_HEADER.size)
    if found != count:
        raise ValueError(f"SEAL wrote {found} values, expected {count}")
    start = offset + SEAL_HEADER.size + COUNT.size
    return np.frombuffer(body, dtype="<u8", count=count, offset=start).astype(np.uint64)


def _body(shape: SealShape, item: object, *, expected: int) -> bytes:
    """The members of an object our own SEAL saved (inflated, header dropped), of the expected length."""
    raw = inflate_untrusted(seal_bytes(item), max_object_bytes=SEAL_HEADER.size + expected)
    body = raw[SEAL_HEADER.size :]
    if len(body) != expected:
        raise ValueError(f"SEAL wrote {len(body)} bytes of members, expected {expected}")
    return body
