"""Loading kits: a site's (signing + key-agreement keys) and the coordinator's (TLS), checked against the manifest."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .errors import KitError
from .keys import load_ed25519_private_key, load_x25519_private_key, raw_public_bytes, read_private_file
from .manifest import FederationManifest, load_manifest
from .provision import (
    CA_CERT_FILE,
    KEY_AGREEMENT_KEY_FILE,
    SIGNING_KEY_FILE,
    SITE_FILE,
    SITE_KIT_FORMAT,
    TLS_CERT_FILE,
    TLS_KEY_FILE,
)


@dataclass(frozen=True)
class SiteKit:
    path: Path
    site_id: str
    federation_name: str
    signing_key: Ed25519PrivateKey
    key_agreement_key: X25519PrivateKey
    manifest: FederationManifest

    @property
    def ca_cert_path(self) -> Path:
        return self.path / CA_CERT_FILE


@dataclass(frozen=True)
class CoordinatorKit:
    path: Path
    manifest: FederationManifest
    tls_cert_path: Path
    tls_key_path: Path
    ca_cert_path: Path


def load_site_kit(path: Path | str) -> SiteKit:
    """Load and check a site kit: both private keys must match this site's entry in federation.json."""
    path = Path(path)
    site_file = path / SITE_FILE
    if not site_file.is_file():
        raise KitError(f"{path} is not a site kit (no {SITE_FILE}); point at out_dir/sites/<site> from `medtwin provision`")
    document = json.loads(site_file.read_text(encoding="utf-8"))
    if document.get("format") != SITE_KIT_FORMAT:
        raise KitError(f"{site_file}: format {document.get('format')!r}, expected {SITE_KIT_FORMAT!r}")
    manifest = load_manifest(path)
    site_id = document["site_id"]
    if document["federation_name"] != manifest.federation_name:
        raise KitError(
            f"{site_file} is for federation {document['federation_name']!r}, its manifest for {manifest.federation_name!r}"
        )
    entry = manifest.site(site_id)
    signing_key = load_ed25519_private_key(path / SIGNING_KEY_FILE)
    agreement_key = load_x25519_private_key(path / KEY_AGREEMENT_KEY_FILE)
    if raw_public_bytes(signing_key.public_key()).hex() != entry.signing_public_key:
        raise KitError(f"{path / SIGNING_KEY_FILE} does not match site {site_id!r}'s signing key in federation.json")
    if raw_public_bytes(agreement_key.public_key()).hex() != entry.key_agreement_public_key:
        raise KitError(
            f"{path / KEY_AGREEMENT_KEY_FILE} does not match site {site_id!r}'s key-agreement key in federation.json"
        )
    return SiteKit(
        path=path,
        site_id=site_id,
        federation_name=manifest.federation_name,
        signing_key=signing_key,
        key_agreement_key=agreement_key,
        manifest=manifest,
    )


def load_coordinator_kit(path: Path | str) -> CoordinatorKit:
    path = Path(path)
    manifest = load_manifest(path)
    read_private_file(path / TLS_KEY_FILE)  # exists and is 0600
    for name in (TLS_CERT_FILE, CA_CERT_FILE):
        if not (path / name).is_file():
            raise KitError(f"coordinator kit {path} is missing {name}")
    return CoordinatorKit(
        path=path,
        manifest=manifest,
        tls_cert_path=path / TLS_CERT_FILE,
        tls_key_path=path / TLS_KEY_FILE,
        ca_cert_path=path / CA_CERT_FILE,
    )
