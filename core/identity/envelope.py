"""Key envelopes: a secret sealed from one site to another (X25519 ECDH + HKDF-SHA256 + AES-256-GCM).

Both parties' static X25519 keys (from federation.json) enter the key agreement, so opening an
envelope also proves it came from the claimed sender. A fresh random salt makes every envelope's
key unique; the associated data binds the federation, both sites, both key fingerprints, the
purpose and the key id, so an envelope cannot be replayed to another site or for another use.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import EnvelopeError

ENVELOPE_FORMAT = "medtwin-envelope/1"
HKDF_INFO = b"medtwin/envelope/v1/aes-256-gcm"
BOUND_FIELDS = (
    "format",
    "federation_name",
    "purpose",
    "key_id",
    "sender_site",
    "sender_key_fingerprint",
    "recipient_site",
    "recipient_key_fingerprint",
)


def seal_envelope(
    *, sender_key: X25519PrivateKey, recipient_public_key: X25519PublicKey, plaintext: bytes, binding: Mapping[str, str]
) -> dict[str, Any]:
    """Encrypt `plaintext` for the recipient; `binding` holds every BOUND_FIELDS value but `format`."""
    fields = {"format": ENVELOPE_FORMAT, **binding}
    associated_data = _associated_data(fields)
    salt, nonce = os.urandom(32), os.urandom(12)
    key = _derive_key(sender_key.exchange(recipient_public_key), salt, associated_data)
    ciphertext = AESGCM(key).encrypt(nonce, plaintext, associated_data)
    return {**fields, "salt": _b64(salt), "nonce": _b64(nonce), "ciphertext": _b64(ciphertext)}


def open_envelope(
    *,
    recipient_key: X25519PrivateKey,
    sender_public_key: X25519PublicKey,
    envelope: Mapping[str, Any],
    expected: Mapping[str, str],
) -> bytes:
    """Decrypt an envelope; `expected` are the binding values the recipient believes in (not the envelope's)."""
    fields = {"format": ENVELOPE_FORMAT, **expected}
    mismatched = [name for name in BOUND_FIELDS if name in envelope and envelope[name] != fields.get(name)]
    if mismatched:
        details = ", ".join(f"{name}={envelope[name]!r} (expected {fields.get(name)!r})" for name in mismatched)
        raise EnvelopeError(f"envelope is not for this kit/purpose: {details}")
    associated_data = _associated_data(fields)
    try:
        salt, nonce, ciphertext = (
            base64.b64decode(envelope[name], validate=True) for name in ("salt", "nonce", "ciphertext")
        )
        key = _derive_key(recipient_key.exchange(sender_public_key), salt, associated_data)
        return AESGCM(key).decrypt(nonce, ciphertext, associated_data)
    except InvalidTag as error:
        raise EnvelopeError(
            f"envelope for {fields.get('recipient_site')!r} from {fields.get('sender_site')!r} failed authentication "
            "(AES-GCM InvalidTag): wrong recipient key, wrong sender key, or the envelope was altered"
        ) from error
    except (KeyError, ValueError) as error:
        raise EnvelopeError(f"malformed envelope ({error!r})") from error


def _associated_data(fields: Mapping[str, str]) -> bytes:
    missing = [name for name in BOUND_FIELDS if not fields.get(name)]
    if missing:
        raise EnvelopeError(f"envelope binding lacks {missing}")
    return json.dumps({name: fields[name] for name in BOUND_FIELDS}, sort_keys=True, separators=(",", ":")).encode()


def _derive_key(shared_secret: bytes, salt: bytes, associated_data: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=HKDF_INFO + b"\x00" + associated_data).derive(
        shared_secret
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
