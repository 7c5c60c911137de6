"""How medtwin values become contract arguments: bytes32 keys, short labels, scaled integers.

- run and site ids are hashed into bytes32 keys (`run_key`, `site_key`); their readable names are
  stored once on chain (run registration, site registration) so auditors can map them back;
- actions, reasons and grant scopes are short ASCII labels right-padded to 32 bytes (`label32`);
- epsilon is written in micro-units (`to_micro`), the HE error bound in pico-units (`to_pico`).
"""

from __future__ import annotations

import hashlib

from .errors import ChainError

__all__ = [
    "EPSILON_SCALE",
    "HE_ERROR_SCALE",
    "ZERO32",
    "as_bytes32",
    "from_micro",
    "from_pico",
    "hex32",
    "label32",
    "label_text",
    "run_key",
    "site_key",
    "to_micro",
    "to_pico",
]

ZERO32 = b"\x00" * 32
EPSILON_SCALE = 10**6
HE_ERROR_SCALE = 10**12


def _key(domain: str, name: str) -> bytes:
    if not name:
        raise ChainError(f"empty {domain} id — every {domain} needs a non-empty id")
    return hashlib.sha256(f"medtwin.{domain}:{name}".encode()).digest()


def run_key(run_id: str) -> bytes:
    """bytes32 key of a run on both chains: sha256("medtwin.run:" + run_id)."""
    return _key("run", run_id)


def site_key(site_id: str) -> bytes:
    """bytes32 key of a site on both chains: sha256("medtwin.site:" + site_id)."""
    return _key("site", site_id)


def label32(text: str) -> bytes:
    """A short ASCII label (action, reason, scope) right-padded with zero bytes to 32 bytes."""
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError as error:
        raise ChainError(f"on-chain label {text!r} must be ASCII") from error
    if len(raw) > 32 or b"\x00" in raw:
        raise ChainError(f"on-chain label {text!r} is {len(raw)} bytes; labels hold at most 32 bytes — shorten it")
    return raw.ljust(32, b"\x00")


def label_text(value: bytes) -> str:
    return bytes(value).rstrip(b"\x00").decode("ascii", errors="replace")


def as_bytes32(value: str | bytes, *, what: str = "value") -> bytes:
    """Accept 32 raw bytes or 64 hex characters (with or without 0x)."""
    if isinstance(value, bytes | bytearray):
        raw = bytes(value)
    else:
        try:
            raw = bytes.fromhex(value.removeprefix("0x"))
        except ValueError as error:
            raise ChainError(f"{what} {value!r} is not hex") from error
    if len(raw) != 32:
        raise ChainError(f"{what} must be 32 bytes (a sha256 digest), got {len(raw)} bytes")
    return raw


def hex32(value: bytes) -> str:
    return "0x" + bytes(value).hex()


def to_micro(value: float) -> int:
    if value < 0:
        raise ChainError(f"epsilon must be >= 0, got {value}")
    return round(value * EPSILON_SCALE)


def from_micro(value: int) -> float:
    return value / EPSILON_SCALE


def to_pico(value: float) -> int:
    if value < 0:
        raise ChainError(f"HE error bound must be >= 0, got {value}")
    return round(value * HE_ERROR_SCALE)


def from_pico(value: int) -> float:
    return value / HE_ERROR_SCALE
