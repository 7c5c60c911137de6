"""CKKS parameter choice and checks: pure maths, no TenSEAL, milliseconds."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest

from medtwin.core.config import CryptoConfig
from medtwin.core.errors import ConfigError
from medtwin.core.he.errors import CkksParameterError, ImpreciseParametersError, InsecureParametersError
from medtwin.core.he.params import (
    SECURITY_TABLE_BITS,
    average_error_bound,
    build_parameters,
    check_ckks_parameters,
    choose_ckks_parameters,
    ckks_parameters_from_config,
    decryption_error_bound,
    estimated_update_bytes,
    tail_multiplier,
)

PARAMS_SOURCE = Path(__file__).resolve().parents[2] / "core" / "he" / "params.py"


def test_params_module_is_pure() -> None:
    tree = ast.parse(PARAMS_SOURCE.read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {name for name in imported if name.split(".")[0] in {"tenseal", "torch", "flwr", "web3"}}


def test_security_table_is_the_he_standard() -> None:
    assert SECURITY_TABLE_BITS[128] == {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


@pytest.mark.parametrize("num_parameters", [1, 1_000, 5_000, 100_000, 3_000_000])
@pytest.mark.parametrize("num_sites", [1, 4, 8, 64])
@pytest.mark.parametrize("max_relative_error", [1e-3, 1e-5, 1e-7])
def test_chosen_parameters_are_secure_precise_and_cover_the_model(
    num_parameters: int, num_sites: int, max_relative_error: float
) -> None:
    params = choose_ckks_parameters(
        num_parameters=num_parameters, num_sites=num_sites, max_relative_error=max_relative_error
    )
    assert sum(params.coeff_mod_bit_sizes) <= SECURITY_TABLE_BITS[128][params.poly_modulus_degree]
    assert all(bits <= 60 for bits in params.coeff_mod_bit_sizes)
    assert params.predicted_error_bound <= max_relative_error
    assert params.values_per_ciphertext == params.poly_modulus_degree  # one real per plaintext coefficient
    assert params.coeff_mod_bit_sizes == params.data_prime_bit_sizes  # one prime: no key switching, no special prime
    capacity = params.values_per_ciphertext
    assert params.num_ciphertexts * capacity >= num_parameters + 1  # weights + the count slot
    assert (params.num_ciphertexts - 1) * capacity < num_parameters + 1  # no wasted ciphertext
    # the largest packed sum times the scale stays below q0 / 4 (one bit of headroom)
    assert params.full_scale * 2.0**params.scale_bits <= 2.0 ** (params.data_bits - 2)
    check_ckks_parameters(params, max_relative_error=max_relative_error)


def test_choice_takes_the_smallest_precise_prime_because_bits_cost_bytes() -> None:
    loose = choose_ckks_parameters(num_parameters=100_000, num_sites=2, max_relative_error=2e-4)
    default = choose_ckks_parameters(num_parameters=100_000, num_sites=8, max_relative_error=1e-5)
    tight = choose_ckks_parameters(num_parameters=100_000, num_sites=8, max_relative_error=1e-7)
    assert loose.data_bits < default.data_bits < tight.data_bits
    assert estimated_update_bytes(loose) < estimated_update_bytes(default) < estimated_update_bytes(tight)
    for chosen, target in ((loose, 2e-4), (default, 1e-5), (tight, 1e-7)):
        one_bit_less = build_parameters(
            poly_modulus_degree=chosen.poly_modulus_degree, coeff_mod_bit_sizes=(chosen.data_bits - 1,), scale_bits=0,
            num_parameters=100_000, num_sites=chosen.num_sites, max_abs_weight_bound=chosen.max_abs_weight_bound,
            max_total_examples=chosen.max_total_examples,
        )  # fmt: skip
        assert one_bit_less.predicted_error_bound > target  # the chosen prime is the smallest that meets it
    # bytes: N coefficients of data_bits each per ciphertext, bit-packed, plus the seed and the chunk header
    per_ciphertext = default.poly_modulus_degree * default.data_bits / 8
    assert estimated_update_bytes(default) == pytest.approx(default.num_ciphertexts * per_ciphertext, rel=0.05)


def test_small_models_get_the_smallest_secure_ring_until_precision_needs_a_larger_prime() -> None:
    """One ciphertext either way, so the smaller ring halves the bytes when its largest secure prime (27 bits
    for N = 1024 at 128-bit security) meets the target; with many sites it does not, and N = 2048 takes over."""
    loose = choose_ckks_parameters(num_parameters=14, num_sites=4, max_relative_error=1e-3, max_total_examples=1000)
    default = choose_ckks_parameters(num_parameters=14, num_sites=4, max_relative_error=1e-5, max_total_examples=1000)
    many_sites = choose_ckks_parameters(num_parameters=14, num_sites=64, max_relative_error=1e-5, max_total_examples=1000)
    for params in (loose, default):
        assert (params.poly_modulus_degree, params.num_ciphertexts) == (1024, 1)
        assert sum(params.coeff_mod_bit_sizes) <= SECURITY_TABLE_BITS[128][1024]
    assert loose.data_bits < default.data_bits
    assert (many_sites.poly_modulus_degree, many_sites.num_ciphertexts) == (2048, 1)
    assert many_sites.data_bits > SECURITY_TABLE_BITS[128][1024]
    at_the_limit = build_parameters(
        poly_modulus_degree=1024, coeff_mod_bit_sizes=(27,), scale_bits=0, num_parameters=14, num_sites=64,
        max_abs_weight_bound=many_sites.max_abs_weight_bound, max_total_examples=1000,
    )  # fmt: skip
    assert at_the_limit.predicted_error_bound > 1e-5


def test_large_models_meet_the_wire_target_at_the_default_precision() -> None:
    """Estimated upload / float32 (the HE benchmark measures the real one): <= 1.1 once ciphertexts are full."""
    for num_parameters in (10_000, 100_000, 1_000_000):
        params = choose_ckks_parameters(num_parameters=num_parameters, num_sites=4)
        assert estimated_update_bytes(params) / (4 * num_parameters) <= 1.1


def test_more_sites_mean_a_larger_error_bound() -> None:
    common = {"num_parameters": 1000, "max_relative_error": 1e-4, "poly_modulus_degree": 2048, "coeff_mod_bit_sizes": (32, 22)}
    few = choose_ckks_parameters(num_sites=2, **common)
    many = choose_ckks_parameters(num_sites=32, **common)
    # per coefficient, in units of the scale: k rounding halves + min(21 k, tail x sqrt(10.5 k)) of SEAL's error
    tail = tail_multiplier(2048)
    expected = (32 * 0.5 + min(32 * 21, tail * (10.5 * 32) ** 0.5)) / (2 * 0.5 + min(2 * 21, tail * (10.5 * 2) ** 0.5))
    assert many.predicted_error_bound == pytest.approx(few.predicted_error_bound * expected, rel=1e-3)
    assert decryption_error_bound(many, 32) == pytest.approx(decryption_error_bound(many, 2) * expected)
    # one site: the worst case is smaller (float64 adds 3 x 2^-53 of full scale, ~1e-7 units under a 32-bit prime)
    assert decryption_error_bound(many, 1) * 2.0**many.scale_bits == pytest.approx(0.5 + 21, abs=1e-6)


def test_insecure_parameters_are_rejected_naming_key_value_and_limit() -> None:
    with pytest.raises(InsecureParametersError) as caught:
        choose_ckks_parameters(
            num_parameters=100, num_sites=2, poly_modulus_degree=4096, coeff_mod_bit_sizes=(60, 60)
        )
    message = str(caught.value)
    assert "crypto.coeff_mod_bit_sizes" in message and "120" in message and "109" in message
    assert isinstance(caught.value, ConfigError)


def test_unknown_ring_and_security_level_are_insecure() -> None:
    with pytest.raises(InsecureParametersError, match="crypto.poly_modulus_degree"):
        choose_ckks_parameters(num_parameters=100, num_sites=2, poly_modulus_degree=512)
    with pytest.raises(InsecureParametersError, match="crypto.security_level"):
        choose_ckks_parameters(num_parameters=100, num_sites=2, security_level=80)


def test_explicit_primes_with_automatic_ring_pick_a_ring_that_makes_them_secure() -> None:
    params = choose_ckks_parameters(num_parameters=100, num_sites=2, coeff_mod_bit_sizes=(40, 40))
    assert params.poly_modulus_degree == 4096  # 80 bits do not fit N = 2048 (54)


def test_too_imprecise_parameters_are_rejected() -> None:
    with pytest.raises(ImpreciseParametersError) as caught:
        choose_ckks_parameters(
            num_parameters=100, num_sites=4, max_relative_error=1e-6, poly_modulus_degree=2048, coeff_mod_bit_sizes=(24, 24)
        )
    assert "crypto.max_relative_error" in str(caught.value) and "1e-06" in str(caught.value)


def test_overflowing_scale_is_rejected_with_the_fix() -> None:
    with pytest.raises(ImpreciseParametersError) as caught:
        choose_ckks_parameters(
            num_parameters=100, num_sites=2, poly_modulus_degree=2048, coeff_mod_bit_sizes=(32, 22), scale_bits=20
        )
    assert "crypto.scale_bits" in str(caught.value) and "lower crypto.scale_bits" in str(caught.value)


def test_unreachable_precision_is_rejected() -> None:
    with pytest.raises(ImpreciseParametersError, match="crypto.max_relative_error"):
        choose_ckks_parameters(num_parameters=100, num_sites=2, max_relative_error=1e-17)


def test_malformed_targets_and_primes_are_config_errors() -> None:
    with pytest.raises(CkksParameterError, match="crypto.max_abs_weight_bound"):
        choose_ckks_parameters(num_parameters=10, num_sites=2, max_abs_weight_bound=0)
    params = build_parameters(
        poly_modulus_degree=4096, coeff_mod_bit_sizes=(40, 8), scale_bits=10, num_parameters=10, num_sites=2,
        max_abs_weight_bound=1.0, max_total_examples=100,
    )
    with pytest.raises(CkksParameterError, match=r"prime size 8 in \[40, 8\] is outside \[15, 60\]"):
        check_ckks_parameters(params, max_relative_error=1e-3)
    with pytest.raises(CkksParameterError, match="names no prime"):
        check_ckks_parameters(replace(params, coeff_mod_bit_sizes=()), max_relative_error=1e-3)
    with pytest.raises(CkksParameterError, match=r"crypto.coeff_mod_bit_sizes.*under 2 primes.*give one prime size"):
        check_ckks_parameters(replace(params, coeff_mod_bit_sizes=(30, 30, 30)), max_relative_error=1e-3)


def test_average_error_bound_shrinks_with_more_examples() -> None:
    params = choose_ckks_parameters(num_parameters=1000, num_sites=4, max_total_examples=10_000)
    small = average_error_bound(params, num_sites=4, total_examples=100)
    full = average_error_bound(params, num_sites=4, total_examples=10_000)
    assert small == pytest.approx(full * 100, rel=1e-3)
    assert full / params.max_abs_weight_bound == pytest.approx(params.predicted_error_bound)


def test_parameters_round_trip_through_a_dict() -> None:
    params = choose_ckks_parameters(num_parameters=1234, num_sites=3)
    assert type(params).from_dict(params.to_dict()) == params


def test_parameters_from_the_crypto_config() -> None:
    config = CryptoConfig(name="ckks", max_relative_error=1e-3, max_total_examples=500)
    params = ckks_parameters_from_config(config, num_parameters=300, num_sites=3)
    assert params.max_total_examples == 500 and params.predicted_error_bound <= 1e-3
    with pytest.raises(CkksParameterError, match="crypto.name"):
        ckks_parameters_from_config(CryptoConfig(name="plain"), num_parameters=300, num_sites=3)
