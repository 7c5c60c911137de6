"""The federation's chains, as the admin vouches for them: chain ids, contract addresses, RPC URLs.

An auditor must not take contract addresses from the coordinator's files (`deployment.json`): a
coordinator could point it at a chain of its own making. The admin signs the record with the
federation CA's key (`ca/ca_key.pem`, ECDSA P-256 / SHA-256); anyone holding the federation
manifest (which carries the CA certificate) can check it.

    chains.json  {"format": "medtwin-chains/1", "federation_name": ..., "chains": {"auth": {...}, "data": {...}},
                  "signed_utc": ..., "signature": "<hex DER ECDSA over the canonical JSON of the rest>"}
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .errors import KitError, SignatureError
from .keys import read_private_file, write_public_file
from .manifest import FederationManifest

__all__ = ["CHAINS_FILE", "CHAINS_FORMAT", "load_chain_record", "sign_chain_record"]

CHAINS_FORMAT = "medtwin-chains/1"
CHAINS_FILE = "chains.json"
CHAIN_FIELDS = ("chain_id", "address", "rpc_url", "contract", "deploy_block", "source_sha256")


def _canonical(document: dict[str, Any]) -> bytes:
    body = {key: value for key, value in document.items() if key != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def sign_chain_record(
    *, ca_key_path: Path | str, manifest: FederationManifest, chains: dict[str, dict[str, Any]], out_path: Path | str
) -> Path:
    """The admin signs which chains (ids, contract addresses, URLs) belong to the federation."""
    key = serialization.load_pem_private_key(read_private_file(Path(ca_key_path)), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KitError(f"{ca_key_path} is not the federation CA's EC key")
    ca_public = x509.load_pem_x509_certificate(manifest.ca_certificate_pem.encode("ascii")).public_key()
    if ca_public.public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
        raise KitError(f"{ca_key_path} is not the key of federation {manifest.federation_name!r}'s CA certificate")
    missing = [f"{role}.{name}" for role in ("auth", "data") for name in CHAIN_FIELDS if name not in chains.get(role, {})]
    if missing:
        raise KitError(f"chain record lacks {missing}")
    document: dict[str, Any] = {
        "format": CHAINS_FORMAT,
        "federation_name": manifest.federation_name,
        "chains": {role: {name: chains[role][name] for name in CHAIN_FIELDS} for role in ("auth", "data")},
        "signed_utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    document["signature"] = key.sign(_canonical(document), ec.ECDSA(hashes.SHA256())).hex()
    path = Path(out_path)
    write_public_file(path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())
    return path


def load_chain_record(path: Path | str, manifest: FederationManifest) -> dict[str, dict[str, Any]]:
    """The chains the admin signed for `manifest`'s federation; raises `SignatureError` if not genuine."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        signature = bytes.fromhex(document["signature"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
        raise SignatureError(f"{path} is not a signed chain record ({str(error)[:200]})") from None
    if document.get("format") != CHAINS_FORMAT or document.get("federation_name") != manifest.federation_name:
        raise SignatureError(f"{path} is not a chain record of federation {manifest.federation_name!r}")
    ca_public = x509.load_pem_x509_certificate(manifest.ca_certificate_pem.encode("ascii")).public_key()
    try:
        ca_public.verify(signature, _canonical(document), ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg, union-attr]
    except InvalidSignature:
        raise SignatureError(
            f"{path} is not signed by federation {manifest.federation_name!r}'s CA: an auditor does not use it"
        ) from None
    return document["chains"]
