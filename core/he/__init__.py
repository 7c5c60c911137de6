"""CKKS encrypted aggregation (SEAL via `tenseal.sealapi`): parameter choice and checks, contexts, the codec.

Sites pack [n_i * w_i ..., n_i], encrypt it with the federation's secret key (seeded ciphertexts,
one real per plaintext coefficient, bit-packed on the wire) and sign its digest; the coordinator adds ciphertexts with a public
context (encryption parameters only, no key at all); sites decrypt the sum and divide by its last
entry. `params` is pure maths (no TenSEAL import).
"""

from .codec import (
    add_loaded,
    check_update_chunks,
    decrypt_average,
    decrypt_average_of_updates,
    decrypt_sum,
    decrypt_sum_of_updates,
    encrypt_update,
    load_update_chunks,
    sum_encrypted,
    sum_loaded,
    update_digest,
)
from .context import (
    HeContext,
    create_secret_context,
    load_context,
    serialize_public_context,
    serialize_secret_context,
)
from .errors import (
    CiphertextMismatchError,
    CkksParameterError,
    HeContextError,
    HeError,
    ImpreciseParametersError,
    InsecureParametersError,
    ValueRangeError,
)
from .params import (
    SECURITY_TABLE_BITS,
    CkksParameters,
    average_error_bound,
    check_ckks_parameters,
    choose_ckks_parameters,
    ckks_parameters_from_config,
    decryption_error_bound,
    estimated_update_bytes,
    max_coeff_modulus_bits,
)
from .precision import (
    HE_ERROR_TO_NOISE,
    DpNoiseFloor,
    HePrecision,
    averaged_update_noise_std,
    he_precision_for,
    he_precision_of_run,
    run_ckks_parameters,
    site_precision_problem,
)

__all__ = [
    "HE_ERROR_TO_NOISE",
    "DpNoiseFloor",
    "HePrecision",
    "averaged_update_noise_std",
    "he_precision_for",
    "he_precision_of_run",
    "run_ckks_parameters",
    "site_precision_problem",
    "SECURITY_TABLE_BITS",
    "CiphertextMismatchError",
    "CkksParameterError",
    "CkksParameters",
    "HeContext",
    "HeContextError",
    "HeError",
    "ImpreciseParametersError",
    "InsecureParametersError",
    "ValueRangeError",
    "add_loaded",
    "average_error_bound",
    "check_ckks_parameters",
    "check_update_chunks",
    "load_update_chunks",
    "sum_loaded",
    "choose_ckks_parameters",
    "ckks_parameters_from_config",
    "create_secret_context",
    "decrypt_average",
    "decrypt_average_of_updates",
    "decrypt_sum",
    "decrypt_sum_of_updates",
    "decryption_error_bound",
    "encrypt_update",
    "estimated_update_bytes",
    "load_context",
    "max_coeff_modulus_bits",
    "serialize_public_context",
    "serialize_secret_context",
    "sum_encrypted",
    "update_digest",
]
