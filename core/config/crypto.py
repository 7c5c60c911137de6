"""Schema of the `crypto/` config group (how updates travel and are aggregated).

`plain` sends [n_i * w_i ..., n_i] in the clear; `ckks` encrypts it with CKKS (SEAL via tenseal.sealapi) so the
coordinator only ever adds ciphertexts. Zeros and empty lists mean "choose automatically"
(`medtwin.core.he.choose_ckks_parameters`, which also rejects insecure or imprecise choices).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CryptoConfig:
    name: str = "plain"  # plain | ckks
    # CKKS ring dimension N (N / 2 complex slots, N reals); 0 = the secure N with the smallest updates
    # that meets the precision target
    poly_modulus_degree: int = 0
    # bit sizes of the coefficient-modulus primes; [] = auto (one prime: addition needs no key switching);
    # with several primes the last one is SEAL's special prime
    coeff_mod_bit_sizes: list[int] = field(default_factory=list)
    scale_bits: int = 0  # CKKS scale 2^scale_bits; 0 = the largest that cannot overflow
    # precision target: max error of an averaged weight relative to `max_abs_weight_bound`,
    # when the sites' sample counts add up to `max_total_examples` (fixed point: smaller totals
    # give proportionally larger relative errors; the run records the actual bound).
    # 0 = automatic: under DP-SGD 1 % of the DP noise std on the average (medtwin.core.he.precision),
    # else 1e-5. An explicit value wins where it is finer than that.
    max_relative_error: float = 0.0
    max_abs_weight_bound: float = 4.0  # every packed weight must satisfy |w| <= this (sites check)
    max_total_examples: int = 10_000  # bound on sum n_i over all sites of one round: set it close to reality
    security_level: int = 128  # bits, HomomorphicEncryption.org standard (ternary secret)
    key_id: str = ""  # the CKKS key set of the run (set by the key steward; sites decrypt with that key only)
