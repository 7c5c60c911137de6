"""Signed replies: every update (plain or encrypted) and every evaluation a site sends is an Ed25519
signature over a `ReplyClaim` — (kind, run, round, site, payload digest, and every number the
coordinator will record: examples, ε, δ, dataset manifest, status). The coordinator verifies the
claim against the site's key from the federation manifest; the site id is the key's, never a string
the reply merely states. Sites verify the same claims of their peers in a round certificate.

    claim = ReplyClaim(kind="update", run_id=..., server_round=3, site_id="cleveland",
                       payload_sha256=sha256(record_bytes(update)).hexdigest(), num_examples=199,
                       epsilon=0.41, delta=1e-5, dataset_manifest="…", status="trained")
    signature = sign_claim(site_signing_key, claim)          # 64 bytes
    verify_claim(manifest_public_key_hex, signature, claim)  # raises SignatureError
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from functools import lru_cache

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import SignatureError
from .keys import ed25519_public_key

CLAIM_DOMAIN = b"medtwin/reply-claim/v2\x00"
CLAIM_KINDS = ("update", "evaluate")


@dataclass(frozen=True)
class ReplyClaim:
    """What a site vouches for in one reply. Numbers are exactly what the coordinator records."""

    kind: str  # "update" | "evaluate"
    run_id: str
    server_round: int
    site_id: str
    payload_sha256: str  # hex sha256 of record_bytes(update record) / of the canonical metrics
    num_examples: int = 0
    epsilon: float = 0.0
    delta: float = 0.0
    dataset_manifest: str = ""
    status: str = ""
    aggregate_sha256: str = ""  # evaluate: the aggregate the metrics are about

    def message(self) -> bytes:
        """The 32-byte hash that is signed: domain-separated canonical JSON of every field."""
        check_claim_fields(self)
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
        return hashlib.sha256(CLAIM_DOMAIN + canonical.encode("ascii")).digest()

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> ReplyClaim:
        """Build a claim from untrusted data; raises `SignatureError` on a missing or mistyped field."""
        if not isinstance(values, dict):
            raise SignatureError(f"a claim is a mapping, got {type(values).__name__}")
        known = {item.name: item.type for item in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise SignatureError(f"claim carries unknown field(s) {unknown}")
        try:
            claim = cls(**values)  # type: ignore[arg-type]
        except TypeError as error:
            raise SignatureError(f"claim is incomplete: {error}") from None
        check_claim_fields(claim)
        return claim


def check_claim_fields(claim: ReplyClaim) -> None:
    """Types and ranges of every field; raises `SignatureError` naming the first bad one."""
    for name in ("kind", "run_id", "site_id", "payload_sha256", "dataset_manifest", "status", "aggregate_sha256"):
        value = getattr(claim, name)
        if not isinstance(value, str) or not value.isascii() or len(value) > 256:
            raise SignatureError(f"claim field {name} must be an ASCII string of at most 256 characters, got {value!r:.80}")
    if claim.kind not in CLAIM_KINDS:
        raise SignatureError(f"claim kind {claim.kind!r} is not one of {CLAIM_KINDS}")
    for name in ("server_round", "num_examples"):
        value = getattr(claim, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SignatureError(f"claim field {name} must be an integer >= 0, got {value!r}")
    for name in ("epsilon", "delta"):
        value = getattr(claim, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise SignatureError(f"claim field {name} must be a finite number >= 0, got {value!r}")
    if claim.delta >= 1:
        raise SignatureError(f"claim field delta must be < 1, got {claim.delta!r}")


def sign_claim(signing_key: Ed25519PrivateKey, claim: ReplyClaim) -> bytes:
    """The site's 64-byte signature over `claim`."""
    return signing_key.sign(claim.message())


def verify_claim(public_key: Ed25519PublicKey | bytes | str, signature: object, claim: ReplyClaim) -> None:
    """Raise `SignatureError` unless `signature` is the key holder's signature over exactly `claim`."""
    if not isinstance(signature, bytes | bytearray) or len(signature) != 64:
        raise SignatureError(
            f"signature of {claim.site_id!r} for run {claim.run_id!r} round {claim.server_round} must be 64 bytes, "
            f"got {type(signature).__name__} of length {len(signature) if hasattr(signature, '__len__') else '?'}"
        )
    key = public_key.public_bytes_raw() if isinstance(public_key, Ed25519PublicKey) else public_key
    if not _signature_holds(bytes(key) if isinstance(key, bytearray) else key, bytes(signature), claim.message()):
        raise SignatureError(
            f"signature rejected for site {claim.site_id!r}, run {claim.run_id!r}, round {claim.server_round}: it was "
            "not made by this site's key over exactly this claim — tampered, replayed or misattributed"
        )


# Verifications kept per process. Whether a signature holds is a pure function of (key, signature, signed
# hash), so remembering the answer changes no outcome; it spares a simulation's Ray actor from checking
# the same round certificate (one claim per participant) again for every virtual site it serves.
VERIFICATIONS_KEPT = 8192


@lru_cache(maxsize=VERIFICATIONS_KEPT)
def _signature_holds(public_key: bytes | str, signature: bytes, message: bytes) -> bool:
    try:
        ed25519_public_key(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True
