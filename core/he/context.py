"""CKKS contexts for a federation (SEAL through `tenseal.sealapi`): a secret one for sites, a public one
for the coordinator.

Serialized contexts are self-describing: a small header carries the kind (secret/public), the key
id and the `CkksParameters`, so every party agrees on scale, slots and value bounds; the body is
SEAL's own encryption parameters (the exact primes), then — secret contexts only — SEAL's secret
key. The key id (a hash of both) labels the key set; ciphertext chunks carry it, and the
coordinator refuses to add chunks from another key set.

Sites hold the secret key and encrypt with it (symmetric, seeded: see codec.py). No public,
Galois or relinearization key is ever made — addition needs none, which is also what lets a
single prime serve as the whole modulus. The coordinator's context is the encryption parameters
alone: it can load and add ciphertexts, and nothing else.

Format version 3 (`MTHECTX3`: parameters for coefficient-encoded chunks); version 1 held a TenSEAL
context, version 2 parameters for complex-slot chunks; both are refused with a hint.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

import tenseal.sealapi as sealapi

from .errors import HeContextError, InsecureParametersError
from .params import CkksParameters
from .seal_io import seal_bytes, seal_load

CONTEXT_MAGIC = b"MTHECTX3"
LEGACY_CONTEXT_MAGICS = {
    b"MTHECTX1": "format 1 (a TenSEAL context, before seeded ciphertexts)",
    b"MTHECTX2": "format 2 (parameters for complex-slot ciphertexts, before coefficient encoding)",
}
SECRET = "secret"
PUBLIC = "public"
KEY_ID_BYTES = 16
SEAL_SECURITY_LEVELS = {
    128: sealapi.SEC_LEVEL_TYPE.TC128,
    192: sealapi.SEC_LEVEL_TYPE.TC192,
    256: sealapi.SEC_LEVEL_TYPE.TC256,
}
_LENGTH = struct.Struct(">I")


@dataclass(frozen=True, eq=False)
class HeContext:
    """A SEAL CKKS context with the parameters it was made for, the id of its key set, and — at a
    site only — the secret key."""

    parameters: CkksParameters
    key_id: bytes
    seal_context: sealapi.SEALContext
    encryption_parameters: bytes  # SEAL's serialization: N and the exact primes
    secret_key: sealapi.SecretKey | None = None

    @property
    def is_private(self) -> bool:
        return self.secret_key is not None


def create_secret_context(params: CkksParameters) -> HeContext:
    """A fresh key set (key steward only): the secret context every site will hold."""
    encryption_parameters = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
    encryption_parameters.set_poly_modulus_degree(params.poly_modulus_degree)
    encryption_parameters.set_coeff_modulus(
        sealapi.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_mod_bit_sizes))
    )
    parameter_bytes = seal_bytes(encryption_parameters)
    context = _seal_context(encryption_parameters, params)
    secret_key = sealapi.KeyGenerator(context).secret_key()
    key_id = _key_id(parameter_bytes, seal_bytes(secret_key))
    return HeContext(
        parameters=params, key_id=key_id, seal_context=context, encryption_parameters=parameter_bytes, secret_key=secret_key
    )


def serialize_secret_context(context: HeContext) -> bytes:
    if context.secret_key is None:
        raise HeContextError("this context holds no secret key; only the key steward's context can be serialized as secret")
    return _pack(SECRET, context, seal_bytes(context.secret_key))


def serialize_public_context(context: HeContext) -> bytes:
    """The coordinator's context: SEAL's encryption parameters only — no key of any kind."""
    return _pack(PUBLIC, context, None)


def load_context(data: bytes, *, expected_kind: str | None = None) -> HeContext:
    """Parse a serialized context; checks its kind, its primes and security level, and its key id (secret)."""
    legacy = LEGACY_CONTEXT_MAGICS.get(data[: len(CONTEXT_MAGIC)])
    if legacy:
        raise HeContextError(
            f"this HE context is {legacy}; the key steward must generate a new key set (`medtwin site keygen`)"
        )
    if not data.startswith(CONTEXT_MAGIC):
        raise HeContextError(f"not a medtwin HE context (missing {CONTEXT_MAGIC!r} header, got {data[:8]!r})")
    try:
        header_bytes, offset = _read_field(data, len(CONTEXT_MAGIC))
        header = json.loads(header_bytes.decode("utf-8"))
        params = CkksParameters.from_dict(header["parameters"])
        key_id = bytes.fromhex(header["key_id"])
        kind = header["kind"]
        parameter_bytes, offset = _read_field(data, offset)
        secret_bytes, offset = _read_field(data, offset) if offset < len(data) else (None, offset)
    except (ValueError, KeyError, TypeError, struct.error) as error:
        raise HeContextError(f"corrupt HE context ({error})") from error
    if offset != len(data):
        raise HeContextError(f"corrupt HE context ({len(data) - offset} trailing bytes)")
    if expected_kind is not None and kind != expected_kind:
        raise HeContextError(f"expected a {expected_kind} HE context, got a {kind} one")
    if kind not in (SECRET, PUBLIC):
        raise HeContextError(f"corrupt HE context (kind {kind!r:.40})")
    if kind == PUBLIC and secret_bytes is not None:
        raise HeContextError("a context labelled public holds a secret key; do not give it to the coordinator")
    if kind == SECRET and secret_bytes is None:
        raise HeContextError("a context labelled secret holds no secret key")
    context = _load_seal_context(parameter_bytes, params)
    if secret_bytes is None:
        return HeContext(parameters=params, key_id=key_id, seal_context=context, encryption_parameters=parameter_bytes)
    if _key_id(parameter_bytes, secret_bytes) != key_id:
        raise HeContextError("the secret key does not match the key id in the context header")
    secret_key = sealapi.SecretKey()
    try:
        seal_load(lambda path: secret_key.load(context, path), secret_bytes)
    except (RuntimeError, ValueError) as error:
        raise HeContextError(f"SEAL refused the context's secret key ({error})") from error
    return HeContext(
        parameters=params, key_id=key_id, seal_context=context, encryption_parameters=parameter_bytes, secret_key=secret_key
    )


def _seal_context(encryption_parameters: sealapi.EncryptionParameters, params: CkksParameters) -> sealapi.SEALContext:
    """SEAL's context, with SEAL's own check of the HomomorphicEncryption.org security table."""
    if params.security_level not in SEAL_SECURITY_LEVELS:
        raise InsecureParametersError(
            "crypto.security_level", f"{params.security_level} is not a SEAL level", f"use one of {sorted(SEAL_SECURITY_LEVELS)}"
        )
    context = sealapi.SEALContext(encryption_parameters, True, SEAL_SECURITY_LEVELS[params.security_level])
    if not context.parameters_set():
        raise InsecureParametersError(
            "crypto.coeff_mod_bit_sizes",
            f"SEAL refuses N={params.poly_modulus_degree}, primes {list(params.coeff_mod_bit_sizes)} at "
            f"{params.security_level}-bit security: {context.parameters_error_message()}",
            "leave crypto.poly_modulus_degree / coeff_mod_bit_sizes at 0 / [] to choose secure ones",
        )
    return context


def _load_seal_context(parameter_bytes: bytes, params: CkksParameters) -> sealapi.SEALContext:
    encryption_parameters = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
    try:
        seal_load(encryption_parameters.load, parameter_bytes)
    except (RuntimeError, ValueError) as error:
        raise HeContextError(f"corrupt HE context: SEAL refused its encryption parameters ({error})") from error
    primes = [modulus.bit_count() for modulus in encryption_parameters.coeff_modulus()]
    found = (encryption_parameters.scheme(), encryption_parameters.poly_modulus_degree(), primes)
    expected = (sealapi.SCHEME_TYPE.CKKS, params.poly_modulus_degree, list(params.coeff_mod_bit_sizes))
    if found != expected:
        raise HeContextError(f"HE context's SEAL parameters (scheme, N, prime bits) {found} do not match its header {expected}")
    return _seal_context(encryption_parameters, params)


def _key_id(parameter_bytes: bytes, secret_key_bytes: bytes) -> bytes:
    digest = hashlib.sha256(b"medtwin/he-key-id/v2\x00")
    for part in (parameter_bytes, secret_key_bytes):
        digest.update(_LENGTH.pack(len(part)) + part)
    return digest.digest()[:KEY_ID_BYTES]


def _read_field(data: bytes, offset: int) -> tuple[bytes, int]:
    (length,) = _LENGTH.unpack_from(data, offset)
    start = offset + _LENGTH.size
    if start + length > len(data):
        raise ValueError(f"a field of {length} bytes runs past the end ({len(data)} bytes)")
    return data[start : start + length], start + length


def _pack(kind: str, context: HeContext, secret_key_bytes: bytes | None) -> bytes:
    header = json.dumps(
        {"kind": kind, "key_id": context.key_id.hex(), "parameters": context.parameters.to_dict()}, sort_keys=True
    ).encode("utf-8")
    fields = [header, context.encryption_parameters] + ([secret_key_bytes] if secret_key_bytes is not None else [])
    return CONTEXT_MAGIC + b"".join(_LENGTH.pack(len(field)) + field for field in fields)
