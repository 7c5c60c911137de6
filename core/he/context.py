"""CKKS contexts (TenSEAL) for a federation: a secret one for sites, a public one for the coordinator.

Serialized contexts are self-describing: a small header carries the kind (secret/public), the key
id and the `CkksParameters`, so every party agrees on scale, slots and value bounds. The key id
(a hash of the secret key) labels the key set; ciphertext chunks carry it, and the coordinator
refuses to add chunks from another key set.

Sites hold the secret key, so the context is SYMMETRIC: sites encrypt with the secret key (about 3
bits less noise than public-key encryption, and no public key exists that the coordinator could
encrypt with). The coordinator's context has no secret, public, Galois or relinearization key —
only the parameters needed to add ciphertexts.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

import tenseal as ts

from .errors import HeContextError
from .params import CkksParameters

CONTEXT_MAGIC = b"MTHECTX1"
SECRET = "secret"
PUBLIC = "public"
KEY_ID_BYTES = 16


@dataclass(frozen=True)
class HeContext:
    """A TenSEAL CKKS context with the parameters it was made for and the id of its key set."""

    tenseal_context: ts.Context
    parameters: CkksParameters
    key_id: bytes

    @property
    def is_private(self) -> bool:
        return bool(self.tenseal_context.is_private())


def create_secret_context(params: CkksParameters) -> HeContext:
    """A fresh key set (key steward only): the secret context every site will hold."""
    context = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
    )
    context.global_scale = 2.0**params.scale_bits
    return HeContext(tenseal_context=context, parameters=params, key_id=_key_id(context))


def serialize_secret_context(context: HeContext) -> bytes:
    if not context.is_private:
        raise HeContextError("this context holds no secret key; only the key steward's context can be serialized as secret")
    body = context.tenseal_context.serialize(
        save_public_key=False, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )
    return _pack(SECRET, context, body)


def serialize_public_context(context: HeContext) -> bytes:
    """The coordinator's context: parameters only — no secret, public, Galois or relinearization key."""
    body = context.tenseal_context.serialize(
        save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    if ts.context_from(body).is_private():  # belt and braces: this must never leak the key
        raise HeContextError("the public context still holds the secret key; refusing to serialize it")
    return _pack(PUBLIC, context, body)


def load_context(data: bytes, *, expected_kind: str | None = None) -> HeContext:
    """Parse a serialized context; checks its kind, its key id (secret) and its scale."""
    if not data.startswith(CONTEXT_MAGIC):
        raise HeContextError(f"not a medtwin HE context (missing {CONTEXT_MAGIC!r} header, got {data[:8]!r})")
    offset = len(CONTEXT_MAGIC) + 4
    try:
        (header_length,) = struct.unpack_from(">I", data, len(CONTEXT_MAGIC))
        header = json.loads(data[offset : offset + header_length].decode("utf-8"))
        params = CkksParameters.from_dict(header["parameters"])
        key_id = bytes.fromhex(header["key_id"])
        kind = header["kind"]
        context = ts.context_from(data[offset + header_length :])
    except (ValueError, KeyError, TypeError, RuntimeError, struct.error) as error:
        raise HeContextError(f"corrupt HE context ({error})") from error
    if expected_kind is not None and kind != expected_kind:
        raise HeContextError(f"expected a {expected_kind} HE context, got a {kind} one")
    if kind == PUBLIC and context.is_private():
        raise HeContextError("a context labelled public holds a secret key; do not give it to the coordinator")
    if kind == SECRET:
        if not context.is_private():
            raise HeContextError("a context labelled secret holds no secret key")
        if _key_id(context) != key_id:
            raise HeContextError("the secret key does not match the key id in the context header")
    if context.global_scale != 2.0**params.scale_bits:
        raise HeContextError(f"context scale {context.global_scale} != 2^{params.scale_bits} from its parameters")
    return HeContext(tenseal_context=context, parameters=params, key_id=key_id)


def _key_id(context: ts.Context) -> bytes:
    key_material = context.serialize(
        save_public_key=False, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )
    return hashlib.sha256(b"medtwin/he-key-id/v1\x00" + key_material).digest()[:KEY_ID_BYTES]


def _pack(kind: str, context: HeContext, body: bytes) -> bytes:
    header = json.dumps(
        {"kind": kind, "key_id": context.key_id.hex(), "parameters": context.parameters.to_dict()}, sort_keys=True
    ).encode("utf-8")
    return CONTEXT_MAGIC + struct.pack(">I", len(header)) + header + body
