"""CKKS parameter choice and checks for addition-only aggregation — pure maths, no TenSEAL.

What sites encrypt is the packed vector [n_i * w_i ..., n_i * B]; the coordinator only adds, so no
multiplicative depth and no key switching are needed: one prime q holds the values (SEAL accepts a
single prime when no keys other than the secret key exist). Measured with SEAL 4.1 through
`tenseal.sealapi` (codec.py, seal_objects.py):

* Encoding. Coefficient encoding: packed value j is plaintext coefficient j, round(v_j * 2^scale_bits)
  mod q — N reals per ciphertext, no canonical embedding. Sites encrypt with the secret key in SEAL's
  seeded form (one polynomial + the seed of the other) and medtwin writes the coefficients bit-packed,
  ceil(log2 q) bits each: an update costs bits/32 of float32 per full ciphertext, the sum (two
  polynomials) twice that. Bits cost bytes, so each ring gets the smallest prime that meets the target;
  among the secure (N, prime) that do, the one with the fewest bytes wins (ties: fewer ciphertexts,
  then the smaller ring): small models get one ciphertext of the smallest ring, large ones the
  granularity that wastes least of the last ciphertext.
* Error. Decrypting a sum of k fresh symmetric encryptions gives the sum of the plaintexts plus the
  sum of the k error polynomials, coefficient by coefficient — nothing amplifies it. SEAL 4.1 samples
  each error coefficient from a centred binomial distribution on 42 bits (|e| <= 21, variance 10.5;
  its optional clipped Gaussian, sigma 3.2 and |e| <= 19.2, is covered by the same numbers), and each
  site rounds its values to integers (|r| <= 1/2, not random). So |error| <= k/2 + min(21 k,
  t sqrt(10.5 k)) in units of the scale, where t is the sub-Gaussian tail that no coefficient of the
  model exceeds except with probability 2^-40 (both SEAL distributions are sub-Gaussian with variance
  proxy <= 10.5). Float64 adds 3 x 2^-53 of full scale (the sites' products n_i w_i and the decoding):
  nothing under a 30-bit prime, tens of units of the scale under a 60-bit one.
* Fixed point. The largest packed sum (full scale: max_total_examples * max_abs_weight_bound) times
  2^scale_bits must stay below q / 2; one more bit of headroom lets sites detect a total count over
  its bound instead of decrypting garbage. The count slot carries n_i * max_abs_weight_bound so that it
  uses the same full scale as the weights (the codec divides it out). The relative error at full
  scale is then about 2 * error / 2^(bits - 3) at worst, whatever the bounds; data far below full
  scale (fewer examples, smaller weights) lose precision proportionally, so set the bounds close to reality.

Explicit `coeff_mod_bit_sizes` may name one prime, or two: SEAL then keeps the second as its special
prime, and the ciphertexts live under the first.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from .errors import CkksParameterError, ImpreciseParametersError, InsecureParametersError

if TYPE_CHECKING:
    from ..config.crypto import CryptoConfig

# HomomorphicEncryption.org standard (ternary secret): max total coefficient-modulus bits per N.
# These are SEAL's CoeffModulus::MaxBitCount values.
SECURITY_TABLE_BITS: dict[int, dict[int, int]] = {
    128: {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881},
    192: {1024: 19, 2048: 37, 4096: 75, 8192: 152, 16384: 305, 32768: 611},
    256: {1024: 14, 2048: 29, 4096: 58, 8192: 118, 16384: 237, 32768: 476},
}
MAX_PRIME_BITS = 60  # SEAL's limit per prime
SEEDED_CHUNK_OVERHEAD_BYTES = 33 + 65  # medtwin's chunk header, SEAL's PRNG type and 512-bit seed
MIN_CHOSEN_PRIME_BITS = 20  # SEAL has no NTT prime of some sizes below (13 bits for N = 1024, 19 for 8192)
ERROR_MAX = 21  # SEAL 4.1's centred binomial error: 21 bits minus 21 bits (its Gaussian option clips at 19.2)
ERROR_VARIANCE_PROXY = 10.5  # sub-Gaussian variance proxy of either distribution (42 / 4 >= 3.2^2)
ROUNDING_MAX = 0.5  # each site rounds value * scale to an integer
FLOAT64_UNIT_ROUNDOFF = 2.0**-53  # sites form n_i * w_i in float64, sites decode the integer sum into float64
FLOAT64_ROUNDINGS = 3  # relative to full scale: the encodings' products (summed over sites), the decoding, a margin
FAILURE_PROBABILITY_LOG2 = -40  # chance that any coefficient of a sum exceeds the bound
HEADROOM_BITS = 1  # packed sums use at most half of the signed range of q0
DEFAULT_MAX_RELATIVE_ERROR = 1e-5  # `crypto.max_relative_error: 0` without DP (or where no DP bound is sound)


@dataclass(frozen=True)
class CkksParameters:
    """One CKKS parameter set for one federation and model size; travels inside the HE contexts."""

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    num_ciphertexts: int
    predicted_error_bound: float  # max error of an averaged weight / max_abs_weight_bound, at full scale
    num_parameters: int
    num_sites: int
    max_abs_weight_bound: float
    max_total_examples: int
    security_level: int = 128

    @property
    def data_prime_bit_sizes(self) -> tuple[int, ...]:
        """The primes the ciphertexts live under: the only one, or every prime but SEAL's special one."""
        return data_primes(self.coeff_mod_bit_sizes)

    @property
    def data_bits(self) -> int:
        return sum(self.data_prime_bit_sizes)

    @property
    def values_per_ciphertext(self) -> int:
        """Reals one ciphertext carries: one per plaintext coefficient."""
        return self.poly_modulus_degree

    @property
    def full_scale(self) -> float:
        """The largest magnitude a slot of the summed update may take."""
        return self.max_total_examples * self.max_abs_weight_bound

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["coeff_mod_bit_sizes"] = list(self.coeff_mod_bit_sizes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CkksParameters:
        fields = dict(data)
        fields["coeff_mod_bit_sizes"] = tuple(int(bits) for bits in fields["coeff_mod_bit_sizes"])
        return cls(**fields)


def data_primes(coeff_mod_bit_sizes: tuple[int, ...]) -> tuple[int, ...]:
    """A single prime is both key and data modulus; with several, SEAL keeps the last for key switching."""
    return tuple(coeff_mod_bit_sizes[:1] if len(coeff_mod_bit_sizes) == 1 else coeff_mod_bit_sizes[:-1])


def estimated_update_bytes(params: CkksParameters) -> float:
    """Wire size of one site's seeded update: per ciphertext, N coefficients of the prime's size, bit-packed,
    and the seed (the prime SEAL picks has exactly the requested size). The returned sum is two polynomials."""
    coefficient_bytes = math.ceil(params.poly_modulus_degree * params.data_bits / 8)
    return params.num_ciphertexts * (coefficient_bytes + SEEDED_CHUNK_OVERHEAD_BYTES)


def max_coeff_modulus_bits(poly_modulus_degree: int, *, security_level: int = 128) -> int:
    """Largest secure total coefficient-modulus size for N at the given security level."""
    if security_level not in SECURITY_TABLE_BITS:
        raise InsecureParametersError(
            "crypto.security_level", f"{security_level} is not in the table", f"use one of {sorted(SECURITY_TABLE_BITS)}"
        )
    table = SECURITY_TABLE_BITS[security_level]
    if poly_modulus_degree not in table:
        raise InsecureParametersError(
            "crypto.poly_modulus_degree",
            f"{poly_modulus_degree} has no {security_level}-bit security entry",
            f"use one of {sorted(table)}, or 0 to choose automatically",
        )
    return table[poly_modulus_degree]


def tail_multiplier(total_values: int) -> float:
    """t such that P(any of `total_values` unit sub-Gaussians exceeds t) <= 2^FAILURE_PROBABILITY_LOG2."""
    log_failures = math.log(2 * max(total_values, 1)) - FAILURE_PROBABILITY_LOG2 * math.log(2)
    return math.sqrt(2 * log_failures)


def sum_error_integer_bound(num_sites: int, total_coefficients: int) -> float:
    """Bound on |decrypted - exact| of any coefficient of a sum of `num_sites` fresh updates, in units of the
    scale: the rounding of every site plus the smaller of the errors' worst case and their sub-Gaussian tail."""
    noise = min(num_sites * ERROR_MAX, tail_multiplier(total_coefficients) * math.sqrt(ERROR_VARIANCE_PROXY * num_sites))
    return num_sites * ROUNDING_MAX + noise


def decryption_error_bound(params: CkksParameters, num_sites: int) -> float:
    """Bound on |decrypted sum - exact sum| of any packed value, in value units, for `num_sites` updates.

    Besides SEAL's error and the sites' rounding to integers: float64 carries 53 bits, so forming
    n_i * w_i before rounding (at most u |n_i w_i| per site, u * full scale over all sites) and turning
    the decrypted integer back into a float64 (u * full scale) each lose up to u = 2^-53 of full scale —
    invisible under a 30-bit prime, tens of units of the scale under a 60-bit one."""
    total_coefficients = params.num_ciphertexts * params.poly_modulus_degree
    float64_error = FLOAT64_ROUNDINGS * FLOAT64_UNIT_ROUNDOFF * params.full_scale
    return sum_error_integer_bound(num_sites, total_coefficients) / 2.0**params.scale_bits + float64_error


def average_error_bound(params: CkksParameters, *, num_sites: int, total_examples: float) -> float:
    """Bound on |decrypted average - exact average| of any weight, once T = sum n_i is known.

    avg' = (S + e1) / (T + e2) with |e1| <= e and, the count slot holding T * B, |e2| <= e / B;
    since |avg| <= B, |avg' - avg| <= (e + B e / B) / (T - e / B) = 2 e / (T - e / B).
    Sites round the decrypted T to an integer when e / B < 1/2, which only helps.
    """
    error = decryption_error_bound(params, num_sites)
    count_error = error / params.max_abs_weight_bound
    if total_examples <= count_error:
        return math.inf
    return 2 * error / (total_examples - count_error)


def auto_scale_bits(*, data_bits: int, full_scale: float) -> int:
    """The largest scale whose full-scale sums keep HEADROOM_BITS below q0 / 2."""
    return math.floor(data_bits - 1 - HEADROOM_BITS - math.log2(full_scale))


def choose_ckks_parameters(
    *,
    num_parameters: int,
    num_sites: int,
    max_relative_error: float = 1e-5,
    max_abs_weight_bound: float = 4.0,
    max_total_examples: int = 10_000,
    security_level: int = 128,
    poly_modulus_degree: int = 0,
    coeff_mod_bit_sizes: tuple[int, ...] | list[int] = (),
    scale_bits: int = 0,
) -> CkksParameters:
    """The secure parameter set with the smallest updates that meets the precision target for a sum of
    `num_sites` updates (ties: fewer ciphertexts, then the smaller ring).

    Zero / empty arguments are chosen; given ones are kept and checked. Raises
    `InsecureParametersError` or `ImpreciseParametersError` (naming the crypto.* key) if no set fits.
    """
    if num_parameters < 1:
        raise ValueError(f"num_parameters must be >= 1, got {num_parameters}")
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    _check_targets(max_relative_error, max_abs_weight_bound, max_total_examples)
    if security_level not in SECURITY_TABLE_BITS:
        max_coeff_modulus_bits(2048, security_level=security_level)  # raises the explanatory error
    degrees = [poly_modulus_degree] if poly_modulus_degree else sorted(SECURITY_TABLE_BITS[security_level])
    common = {
        "num_parameters": num_parameters,
        "num_sites": num_sites,
        "max_abs_weight_bound": float(max_abs_weight_bound),
        "max_total_examples": int(max_total_examples),
        "security_level": security_level,
    }
    candidates = [
        build_parameters(poly_modulus_degree=degree, coeff_mod_bit_sizes=bit_sizes, scale_bits=scale_bits, **common)
        for degree in degrees
        for bit_sizes in _candidate_bit_sizes(
            degree,
            max_coeff_modulus_bits(degree, security_level=security_level),
            tuple(coeff_mod_bit_sizes),
            skip_insecure=not poly_modulus_degree,
        )
    ]
    if not candidates:
        if coeff_mod_bit_sizes:
            raise InsecureParametersError(
                "crypto.coeff_mod_bit_sizes",
                f"{list(coeff_mod_bit_sizes)} totals {sum(coeff_mod_bit_sizes)} bits, more than any "
                f"poly_modulus_degree allows at {security_level}-bit security",
                "use fewer/smaller primes, or [] to choose automatically",
            )
        raise InsecureParametersError(
            "crypto.poly_modulus_degree",
            f"{poly_modulus_degree} leaves no room for a prime of {min_prime_bits(poly_modulus_degree)} bits or more "
            f"at {security_level}-bit security",
            "use a larger crypto.poly_modulus_degree, or 0 to choose automatically",
        )
    usable = [params for params in candidates if params.scale_bits >= 1 and _overflow_bits(params) <= 0]
    precise = [params for params in usable if params.predicted_error_bound <= max_relative_error]
    if precise:
        best = min(precise, key=lambda params: (estimated_update_bytes(params), params.num_ciphertexts, params.poly_modulus_degree))
        check_ckks_parameters(best, max_relative_error=max_relative_error)
        return best
    closest = min(usable, key=lambda params: params.predicted_error_bound) if usable else candidates[0]
    check_ckks_parameters(closest, max_relative_error=max_relative_error)  # raises, naming the key
    raise ImpreciseParametersError("crypto.max_relative_error", f"no parameter set meets {max_relative_error:g}")


def build_parameters(
    *,
    poly_modulus_degree: int,
    coeff_mod_bit_sizes: tuple[int, ...],
    scale_bits: int,
    num_parameters: int,
    num_sites: int,
    max_abs_weight_bound: float,
    max_total_examples: int,
    security_level: int = 128,
) -> CkksParameters:
    """Assemble a parameter set (scale_bits 0 = automatic) with its predicted error; no checks."""
    bit_sizes = tuple(int(bits) for bits in coeff_mod_bit_sizes)
    full_scale = max_total_examples * max_abs_weight_bound
    scale = scale_bits or auto_scale_bits(data_bits=sum(data_primes(bit_sizes)), full_scale=full_scale)
    draft = CkksParameters(
        poly_modulus_degree=poly_modulus_degree,
        coeff_mod_bit_sizes=bit_sizes,
        scale_bits=scale,
        num_ciphertexts=math.ceil((num_parameters + 1) / poly_modulus_degree),
        predicted_error_bound=math.inf,
        num_parameters=num_parameters,
        num_sites=num_sites,
        max_abs_weight_bound=max_abs_weight_bound,
        max_total_examples=max_total_examples,
        security_level=security_level,
    )
    relative = average_error_bound(draft, num_sites=num_sites, total_examples=max_total_examples) / max_abs_weight_bound
    return replace(draft, predicted_error_bound=relative)


def check_ckks_parameters(params: CkksParameters, *, max_relative_error: float) -> None:
    """Reject insecure, malformed or too imprecise parameters; each error lists every problem found."""
    _check_targets(max_relative_error, params.max_abs_weight_bound, params.max_total_examples)
    budget = max_coeff_modulus_bits(params.poly_modulus_degree, security_level=params.security_level)
    total_bits = sum(params.coeff_mod_bit_sizes)
    if total_bits > budget:
        raise InsecureParametersError(
            "crypto.coeff_mod_bit_sizes",
            f"{list(params.coeff_mod_bit_sizes)} total {total_bits} bits, over the {params.security_level}-bit "
            f"security limit of {budget} bits for poly_modulus_degree {params.poly_modulus_degree}",
            "use fewer/smaller primes or a larger crypto.poly_modulus_degree (or [] to choose automatically)",
        )
    _raise_all(CkksParameterError, _shape_problems(params))
    _raise_all(ImpreciseParametersError, _precision_problems(params, max_relative_error))


def _candidate_bit_sizes(
    degree: int, budget: int, fixed: tuple[int, ...], *, skip_insecure: bool
) -> list[tuple[int, ...]]:
    """Given primes, or one prime of every size that is secure for N (bits cost bytes: the chooser keeps the
    smallest precise one)."""
    if fixed:
        return [] if skip_insecure and sum(fixed) > budget else [fixed]
    lowest = max(min_prime_bits(degree), MIN_CHOSEN_PRIME_BITS)
    return [(bits,) for bits in range(lowest, min(budget, MAX_PRIME_BITS) + 1)]


def min_prime_bits(poly_modulus_degree: int) -> int:
    """Smallest prime size accepted for ring N (NTT primes are 1 mod 2N, with room for several)."""
    return int(math.log2(2 * poly_modulus_degree)) + 2


def _overflow_bits(params: CkksParameters) -> float:
    """> 0 when full-scale sums times the scale come closer than HEADROOM_BITS to q0 / 2."""
    return math.log2(params.full_scale) + params.scale_bits - (params.data_bits - 1 - HEADROOM_BITS)


def _check_targets(max_relative_error: float, max_abs_weight_bound: float, max_total_examples: int) -> None:
    problems = []
    if not 0 < max_relative_error < 1:
        problems.append(("crypto.max_relative_error", f"must be in (0, 1), got {max_relative_error}", "e.g. 1e-5"))
    if not max_abs_weight_bound > 0:
        problems.append(("crypto.max_abs_weight_bound", f"must be > 0, got {max_abs_weight_bound}", "e.g. 4.0"))
    if max_total_examples < 1:
        problems.append(("crypto.max_total_examples", f"must be >= 1, got {max_total_examples}", "sum of n_i bound"))
    _raise_all(CkksParameterError, problems)


def _shape_problems(params: CkksParameters) -> list[tuple[str, str, str]]:
    key = "crypto.coeff_mod_bit_sizes"
    bit_sizes = list(params.coeff_mod_bit_sizes)
    problems = []
    if not bit_sizes:
        problems.append((key, "[] names no prime (the automatic choice fills it in)", "e.g. [27], or [] for automatic"))
    if len(data_primes(params.coeff_mod_bit_sizes)) > 1:
        problems.append(
            (
                key,
                f"{bit_sizes} puts the ciphertexts under {len(bit_sizes) - 1} primes; coefficient-encoded sums live "
                "under one (more buys no precision for addition)",
                "give one prime size, e.g. [27], or two (the second is SEAL's unused special prime), or [] for automatic",
            )
        )
    min_bits = min_prime_bits(params.poly_modulus_degree)
    for bits in bit_sizes:
        if not min_bits <= bits <= MAX_PRIME_BITS:
            problems.append(
                (
                    key,
                    f"prime size {bits} in {bit_sizes} is outside [{min_bits}, {MAX_PRIME_BITS}] "
                    f"for N={params.poly_modulus_degree}",
                    "",
                )
            )
    return problems


def _precision_problems(params: CkksParameters, max_relative_error: float) -> list[tuple[str, str, str]]:
    problems = []
    if params.scale_bits < 1:
        problems.append(("crypto.scale_bits", f"must be >= 1, got {params.scale_bits}", "use 0 to choose automatically"))
    overflow = _overflow_bits(params)
    if overflow > 0:
        problems.append(
            (
                "crypto.scale_bits",
                f"sums up to {params.full_scale:g} (max_total_examples x max_abs_weight_bound) at scale "
                f"2^{params.scale_bits} need {math.log2(params.full_scale) + params.scale_bits + 1 + HEADROOM_BITS:.1f} "
                f"bits, over the data modulus of {params.data_bits} bits",
                f"lower crypto.scale_bits by {math.ceil(overflow)}, "
                "or use a larger first prime in crypto.coeff_mod_bit_sizes",
            )
        )
    if params.predicted_error_bound > max_relative_error:
        problems.append(
            (
                "crypto.max_relative_error",
                f"target {max_relative_error:g} not met: N={params.poly_modulus_degree}, "
                f"coeff_mod_bit_sizes={list(params.coeff_mod_bit_sizes)}, scale 2^{params.scale_bits} give "
                f"{params.predicted_error_bound:.3g} for {params.num_sites} sites",
                "raise crypto.scale_bits or the first prime, tighten crypto.max_total_examples / "
                "crypto.max_abs_weight_bound, relax the target, or leave the parameters at 0/[] to choose them",
            )
        )
    return problems


def _raise_all(error_type: type[CkksParameterError], problems: list[tuple[str, str, str]]) -> None:
    if not problems:
        return
    key, problem, fix = problems[0]
    if len(problems) > 1:
        problem += "".join(f"; also `{other_key}`: {other_problem}" for other_key, other_problem, _ in problems[1:])
    raise error_type(key, problem, fix)


def ckks_parameters_from_config(
    config: CryptoConfig, *, num_parameters: int, num_sites: int, max_relative_error: float = 0.0
) -> CkksParameters:
    """`choose_ckks_parameters` driven by the `crypto/` config group (0 / [] = automatic).

    `max_relative_error` is the run's resolved target (`HePrecision.max_relative_error`, which under
    DP comes from the noise); 0 = `crypto.max_relative_error`, itself 0 = the default 1e-5.
    """
    if config.name != "ckks":
        raise CkksParameterError("crypto.name", f"is {config.name!r}, HE parameters exist only for 'ckks'", "crypto=ckks")
    return choose_ckks_parameters(
        num_parameters=num_parameters,
        num_sites=num_sites,
        max_relative_error=max_relative_error or config.max_relative_error or DEFAULT_MAX_RELATIVE_ERROR,
        max_abs_weight_bound=config.max_abs_weight_bound,
        max_total_examples=config.max_total_examples,
        security_level=config.security_level,
        poly_modulus_degree=config.poly_modulus_degree,
        coeff_mod_bit_sizes=tuple(config.coeff_mod_bit_sizes),
        scale_bits=config.scale_bits,
    )
