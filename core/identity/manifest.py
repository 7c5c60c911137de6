"""`federation.json`: the public manifest every party holds — site keys, fingerprints, CA, coordinator."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .errors import KitError, ProvisionError
from .keys import fingerprint, write_public_file

MANIFEST_FORMAT = "medtwin-federation/1"
MANIFEST_FILE = "federation.json"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ProvisionError(
            f"{kind} {name!r} is not a valid name: use 1-64 letters, digits, '_', '.', '-', starting with a letter or digit"
        )


def openssh_key_fingerprint(openssh_public_key: str) -> str:
    """SHA-256 (hex) of an OpenSSH public key's wire blob — what `ssh-keygen -l` hashes, in hex."""
    parts = openssh_public_key.split()
    try:
        blob = base64.b64decode(parts[1], validate=True) if len(parts) >= 2 else b""
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"not an OpenSSH public key ({error})") from error
    if not blob:
        raise ValueError("not an OpenSSH public key (expected '<type> <base64>')")
    return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class SiteEntry:
    """One site's public identity: Ed25519 signing key and X25519 key-agreement key (raw, hex), and
    optionally its Flower SuperNode authentication key (EC P-384, OpenSSH text, as `flwr supernode
    register` reads it). Manifests written before SuperNode keys existed simply lack the last one."""

    site_id: str
    signing_public_key: str
    key_agreement_public_key: str
    supernode_auth_public_key: str | None = None
    chain_address: str | None = None  # the site's own chain account (it signs its run approvals), 0x…

    @property
    def signing_key_fingerprint(self) -> str:
        return fingerprint(bytes.fromhex(self.signing_public_key))

    @property
    def key_agreement_key_fingerprint(self) -> str:
        return fingerprint(bytes.fromhex(self.key_agreement_public_key))

    @property
    def supernode_auth_key_fingerprint(self) -> str | None:
        if self.supernode_auth_public_key is None:
            return None
        return openssh_key_fingerprint(self.supernode_auth_public_key)

    def to_dict(self) -> dict[str, str]:
        document = {
            "signing_public_key": self.signing_public_key,
            "signing_key_fingerprint": self.signing_key_fingerprint,
            "key_agreement_public_key": self.key_agreement_public_key,
            "key_agreement_key_fingerprint": self.key_agreement_key_fingerprint,
        }
        if self.supernode_auth_public_key is not None:
            document["supernode_auth_public_key"] = self.supernode_auth_public_key
            document["supernode_auth_key_fingerprint"] = openssh_key_fingerprint(self.supernode_auth_public_key)
        if self.chain_address is not None:
            document["chain_address"] = self.chain_address
        return document


@dataclass(frozen=True)
class FederationManifest:
    federation_name: str
    created_utc: str
    ca_certificate_pem: str
    coordinator_host: str
    coordinator_tls_fingerprint: str  # SHA-256 of the coordinator's TLS certificate (DER), hex
    sites: tuple[SiteEntry, ...]

    @property
    def ca_fingerprint(self) -> str:
        certificate = x509.load_pem_x509_certificate(self.ca_certificate_pem.encode("ascii"))
        return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()

    @property
    def site_ids(self) -> list[str]:
        return [entry.site_id for entry in self.sites]

    def site(self, site_id: str) -> SiteEntry:
        for entry in self.sites:
            if entry.site_id == site_id:
                return entry
        raise KitError(f"site {site_id!r} is not in federation {self.federation_name!r} (sites: {self.site_ids})")

    def to_json(self) -> str:
        document = {
            "format": MANIFEST_FORMAT,
            "federation_name": self.federation_name,
            "created_utc": self.created_utc,
            "ca": {"certificate_pem": self.ca_certificate_pem, "fingerprint_sha256": self.ca_fingerprint},
            "coordinator": {
                "host": self.coordinator_host,
                "tls_certificate_fingerprint_sha256": self.coordinator_tls_fingerprint,
            },
            "sites": {entry.site_id: entry.to_dict() for entry in self.sites},
        }
        return json.dumps(document, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = "federation.json") -> FederationManifest:
        try:
            document = json.loads(text)
            if document.get("format") != MANIFEST_FORMAT:
                raise KitError(f"{source}: format {document.get('format')!r}, expected {MANIFEST_FORMAT!r}")
            sites = tuple(
                SiteEntry(
                    site_id=site_id,
                    signing_public_key=entry["signing_public_key"],
                    key_agreement_public_key=entry["key_agreement_public_key"],
                    supernode_auth_public_key=entry.get("supernode_auth_public_key"),
                    chain_address=entry.get("chain_address"),
                )
                for site_id, entry in sorted(document["sites"].items())
            )
            manifest = cls(
                federation_name=document["federation_name"],
                created_utc=document["created_utc"],
                ca_certificate_pem=document["ca"]["certificate_pem"],
                coordinator_host=document["coordinator"]["host"],
                coordinator_tls_fingerprint=document["coordinator"]["tls_certificate_fingerprint_sha256"],
                sites=sites,
            )
            stored = document["sites"]
            mismatched = [  # stored fingerprints must match the keys they describe
                f"site {entry.site_id!r} {kind}-key fingerprint"
                for entry in sites
                for kind, expected in (
                    ("signing", entry.signing_key_fingerprint),
                    ("key-agreement", entry.key_agreement_key_fingerprint),
                )
                if stored[entry.site_id].get(f"{kind.replace('-', '_')}_key_fingerprint") != expected
            ]
            mismatched += [
                f"site {entry.site_id!r} supernode-auth-key fingerprint"
                for entry in sites
                if entry.supernode_auth_public_key is not None
                and stored[entry.site_id].get("supernode_auth_key_fingerprint") != entry.supernode_auth_key_fingerprint
            ]
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as error:
            raise KitError(f"{source} is not a valid federation manifest ({str(repr(error))[:200]})") from None
        if mismatched:
            raise KitError(f"{source}: {', '.join(mismatched)} does not match its key; the manifest was altered")
        return manifest

    def save(self, path: Path) -> None:
        write_public_file(path, self.to_json().encode("utf-8"))


def load_manifest(path: Path | str) -> FederationManifest:
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_FILE
    if not path.is_file():
        raise KitError(f"no federation manifest at {path}; run `medtwin provision` or copy federation.json here")
    return FederationManifest.from_json(path.read_text(encoding="utf-8"), source=str(path))
