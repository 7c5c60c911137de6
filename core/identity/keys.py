"""Key material on disk: generation, PEM round trips, fingerprints, private-file writes (mode 0600)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from ..rundir import atomic_write_bytes
from .errors import KitError

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
PUBLIC_FILE_MODE = 0o644

PrivateKey = Ed25519PrivateKey | X25519PrivateKey | ec.EllipticCurvePrivateKey


def raw_public_bytes(public_key: Ed25519PublicKey | X25519PublicKey) -> bytes:
    return public_key.public_bytes(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)


def fingerprint(raw_public_key: bytes) -> str:
    """SHA-256 of a raw public key, hex: what the authorization chain stores as a site's identity."""
    return hashlib.sha256(raw_public_key).hexdigest()


def private_key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def write_private_file(path: Path, data: bytes) -> None:
    """Atomically write a secret: the temporary file is 0600 from creation, the directory 0700."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    atomic_write_bytes(path, data, mode=PRIVATE_FILE_MODE)


def write_public_file(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data, mode=PUBLIC_FILE_MODE)


def read_private_file(path: Path) -> bytes:
    """Read a secret, refusing files that other users could read (like ssh does)."""
    if not path.is_file():
        raise KitError(
            f"missing private file {path}; private keys are made on the machine that uses them "
            "(`medtwin site init`, `medtwin site keygen`, `medtwin site install-key`, `medtwin provision` for the coordinator)"
        )
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise KitError(f"private file {path} has mode {mode:o}, readable by others; fix with `chmod 600 {path}`")
    return path.read_bytes()


def load_ed25519_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(read_private_file(path), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise KitError(f"{path} holds a {type(key).__name__}, expected an Ed25519 signing key")
    return key


def load_x25519_private_key(path: Path) -> X25519PrivateKey:
    key = serialization.load_pem_private_key(read_private_file(path), password=None)
    if not isinstance(key, X25519PrivateKey):
        raise KitError(f"{path} holds a {type(key).__name__}, expected an X25519 key-agreement key")
    return key


def ed25519_public_key(key: Ed25519PublicKey | bytes | str) -> Ed25519PublicKey:
    """Accept a key object, 32 raw bytes, or their hex (as stored in federation.json)."""
    if isinstance(key, Ed25519PublicKey):
        return key
    raw = bytes.fromhex(key) if isinstance(key, str) else key
    return Ed25519PublicKey.from_public_bytes(raw)


def x25519_public_key(key: X25519PublicKey | bytes | str) -> X25519PublicKey:
    if isinstance(key, X25519PublicKey):
        return key
    raw = bytes.fromhex(key) if isinstance(key, str) else key
    return X25519PublicKey.from_public_bytes(raw)
