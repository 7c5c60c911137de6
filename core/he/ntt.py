"""SEAL 4.1's negacyclic NTT modulo one prime, in numpy: the same values, bit for bit, without SEAL objects.

SEAL holds a CKKS plaintext or ciphertext polynomial a(x) mod (x^N + 1, q) in NTT form: entry k is
a(psi^(2 * bitrev(k) + 1)) mod q, where psi is the smallest primitive 2N-th root of unity mod q and
bitrev reverses log2(N) bits. SEAL computes it with Cooley-Tukey butterflies whose twiddle factors
are psi^bitrev(j) (Harvey's lazy form, fully reduced at the end); the inverse undoes each stage with
Gentleman-Sande butterflies and multiplies by N^-1. Both are done here a stage at a time over every
polynomial at once, fully reduced after each operation, so the results equal SEAL's.

Products modulo q use Shoup's method with a precomputed quotient per twiddle factor: for q < 2^32
(every ring the chooser picks from 20-bit primes up) floor(w * 2^32 / q) and one 64-bit product; for
larger primes (SEAL allows 60 bits) floor(w * 2^64 / q), the 128-bit high half assembled from 32-bit
pieces in uint64 arithmetic. Values stay fully reduced: min(r, r - q) in wrapping uint64 arithmetic.
`NttTables.of(N, q)` caches the tables per ring; codec.py checks them once per ring against SEAL's own
transform (`seal_objects.to_ntt` / `from_ntt`) before using them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

LOW_32 = np.uint64(0xFFFFFFFF)
SHIFT_32 = np.uint64(32)
SMALL_MODULUS = np.uint64(1 << 32)


@dataclass(frozen=True, eq=False)
class NttTables:
    """Twiddle factors of one ring (N, q) in SEAL's order, each with its Shoup quotient floor(w * 2^word / q)
    (word: 32 bits for q < 2^32, else 64)."""

    degree: int
    modulus: int
    forward_twiddles: tuple[np.ndarray, ...]  # per stage s: psi^bitrev(2^s + g) for each butterfly of group g
    forward_quotients: tuple[np.ndarray, ...]
    inverse_twiddles: tuple[np.ndarray, ...]  # the same with psi^-1
    inverse_quotients: tuple[np.ndarray, ...]
    inverse_degree: np.ndarray  # N^-1 mod q, shape (1,)
    inverse_degree_quotient: np.ndarray

    @classmethod
    def of(cls, degree: int, modulus: int) -> NttTables:
        return _tables(int(degree), int(modulus))


def forward_ntt(tables: NttTables, polynomials: np.ndarray) -> np.ndarray:
    """SEAL's `transform_to_ntt` of each row of `polynomials` ((count, N) uint64, every value < q)."""
    values = np.array(polynomials, dtype=np.uint64).reshape(-1, tables.degree)
    count, modulus = len(values), np.uint64(tables.modulus)
    for stage, (twiddles, quotients) in enumerate(zip(tables.forward_twiddles, tables.forward_quotients, strict=True)):
        blocks = values.reshape(count, 1 << stage, 2, -1)  # group g's butterflies pair its two halves
        top = blocks[:, :, 0, :].reshape(count, -1)  # contiguous rows (copied when strided): numpy's fast loops
        product = _multiply(blocks[:, :, 1, :].reshape(count, -1), twiddles, quotients, modulus)
        blocks[:, :, 1, :] = _subtract(top, product, modulus).reshape(blocks[:, :, 1, :].shape)
        blocks[:, :, 0, :] = _add(top, product, modulus).reshape(blocks[:, :, 0, :].shape)
    return values


def inverse_ntt(tables: NttTables, polynomials: np.ndarray) -> np.ndarray:
    """SEAL's `transform_from_ntt` of each row of `polynomials` ((count, N) uint64, every value < q)."""
    values = np.array(polynomials, dtype=np.uint64).reshape(-1, tables.degree)
    count, modulus = len(values), np.uint64(tables.modulus)
    stages = len(tables.inverse_twiddles)
    for stage in reversed(range(stages)):  # the forward stages undone in reverse order
        blocks = values.reshape(count, 1 << stage, 2, -1)
        top = blocks[:, :, 0, :].reshape(count, -1)
        bottom = blocks[:, :, 1, :].reshape(count, -1)
        difference = _subtract(top, bottom, modulus)
        blocks[:, :, 0, :] = _add(top, bottom, modulus).reshape(blocks[:, :, 0, :].shape)
        product = _multiply(difference, tables.inverse_twiddles[stage], tables.inverse_quotients[stage], modulus)
        blocks[:, :, 1, :] = product.reshape(blocks[:, :, 1, :].shape)
    return _multiply(values, tables.inverse_degree, tables.inverse_degree_quotient, modulus)


def minimal_primitive_root(order: int, modulus: int) -> int:
    """The smallest primitive `order`-th root of unity mod the prime `modulus` (SEAL's choice of psi)."""
    if (modulus - 1) % order:
        raise ValueError(f"{modulus} - 1 is not a multiple of {order}: no NTT of this size modulo it")
    cofactor = (modulus - 1) // order
    for candidate in range(2, modulus):
        root = pow(candidate, cofactor, modulus)
        if pow(root, order // 2, modulus) == modulus - 1:  # order is a power of two: primitive iff root^(order/2) = -1
            break
    else:
        raise ValueError(f"no primitive {order}-th root of unity modulo {modulus}")
    square, power, smallest = root * root % modulus, root, root
    for _ in range(order // 2):  # the primitive roots are the odd powers of one of them
        smallest = min(smallest, power)
        power = power * square % modulus
    return smallest


@lru_cache(maxsize=4)  # a process serves one or two rings; N = 32768 tables take ~8 MB
def _tables(degree: int, modulus: int) -> NttTables:
    if degree < 2 or degree & (degree - 1):
        raise ValueError(f"N = {degree} is not a power of two")
    if not 2 <= modulus < 1 << 62:
        raise ValueError(f"q = {modulus} is outside [2, 2^62)")
    psi = minimal_primitive_root(2 * degree, modulus)
    psi_inverse = pow(psi, -1, modulus)
    bits = degree.bit_length() - 1
    reversed_indices = [int(format(index, f"0{bits}b")[::-1], 2) if bits else 0 for index in range(degree)]
    powers = _powers(psi, degree, modulus)
    inverse_powers = _powers(psi_inverse, degree, modulus)
    word = 32 if modulus < 1 << 32 else 64
    forward = [powers[reversed_indices[index]] for index in range(degree)]
    inverse = [inverse_powers[reversed_indices[index]] for index in range(degree)]
    inverse_degree = pow(degree, -1, modulus)
    return NttTables(
        degree=degree,
        modulus=modulus,
        forward_twiddles=_per_butterfly(forward, degree),
        forward_quotients=_per_butterfly(_quotients(forward, modulus, word), degree),
        inverse_twiddles=_per_butterfly(inverse, degree),
        inverse_quotients=_per_butterfly(_quotients(inverse, modulus, word), degree),
        inverse_degree=np.array([inverse_degree], dtype=np.uint64),
        inverse_degree_quotient=np.array(_quotients([inverse_degree], modulus, word), dtype=np.uint64),
    )


def _quotients(factors: list[int], modulus: int, word: int) -> list[int]:
    return [(factor << word) // modulus for factor in factors]


def _per_butterfly(table: list[int], degree: int) -> tuple[np.ndarray, ...]:
    """Stage s has 2^s groups of N / 2^(s+1) butterflies, group g using table[2^s + g]: one row per stage."""
    stages = degree.bit_length() - 1
    return tuple(np.repeat(np.array(table[1 << stage : 2 << stage], dtype=np.uint64), degree >> (stage + 1)) for stage in range(stages))


def _powers(base: int, count: int, modulus: int) -> list[int]:
    powers, value = [], 1
    for _ in range(count):
        powers.append(value)
        value = value * base % modulus
    return powers


def _add(left: np.ndarray, right: np.ndarray, modulus: np.uint64) -> np.ndarray:
    total = left + right  # < 2q < 2^63
    return np.minimum(total, total - modulus, out=total)  # total - q wraps past 2^63 when total < q


def _subtract(left: np.ndarray, right: np.ndarray, modulus: np.uint64) -> np.ndarray:
    difference = left + (modulus - right)  # in (0, 2q)
    return np.minimum(difference, difference - modulus, out=difference)


def _multiply(values: np.ndarray, factors: np.ndarray, quotients: np.ndarray, modulus: np.uint64) -> np.ndarray:
    """values * factors mod q (values, factors < q), Shoup: r = v*w - floor(v * w' / 2^word) * q, in [0, 2q)."""
    # numpy's uint64 array arithmetic wraps modulo 2^64 without a warning, which is what is wanted here
    if modulus < SMALL_MODULUS:  # v, w' < 2^32: their product fits
        estimate = values * quotients
        estimate >>= SHIFT_32
    else:
        estimate = _high_64(values, quotients)
    remainder = values * factors
    remainder -= estimate * modulus  # exact modulo 2^64, and the true value is < 2q
    return np.minimum(remainder, remainder - modulus, out=remainder)


def _high_64(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """floor(left * right / 2^64) for uint64 arrays, from 32-bit halves."""
    left_low, left_high = left & LOW_32, left >> SHIFT_32
    right_low, right_high = right & LOW_32, right >> SHIFT_32
    low_high = left_low * right_high
    high_low = left_high * right_low
    middle = ((left_low * right_low) >> SHIFT_32) + (low_high & LOW_32) + (high_low & LOW_32)
    return left_high * right_high + (low_high >> SHIFT_32) + (high_low >> SHIFT_32) + (middle >> SHIFT_32)
