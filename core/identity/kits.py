"""Kit layouts and loading: a site's (signing + key-agreement keys) and the coordinator's (TLS), checked against the manifest.

    site kit (made by `init_site_identity`, completed by `join_federation`; on the site's machine)
        signing_key.pem, key_agreement_key.pem   private, 0600, born here
        site-public.json                         the public half, handed to the admin
        federation.json, ca_cert.pem, site.json  installed by `join_federation`
        he/<key_id>/secret_context.bin           CKKS secret contexts, one folder per key set
    coordinator kit (made by `provision_federation`)
        tls_cert.pem, tls_key.pem, ca_cert.pem, federation.json
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .errors import KitError
from .keys import load_ed25519_private_key, load_x25519_private_key, raw_public_bytes, read_private_file
from .manifest import FederationManifest, load_manifest

CA_CERT_FILE, CA_KEY_FILE = "ca_cert.pem", "ca_key.pem"
TLS_CERT_FILE, TLS_KEY_FILE = "tls_cert.pem", "tls_key.pem"
SIGNING_KEY_FILE, KEY_AGREEMENT_KEY_FILE = "signing_key.pem", "key_agreement_key.pem"
SITE_FILE, SITE_PUBLIC_FILE = "site.json", "site-public.json"
SITE_KIT_FORMAT = "medtwin-site-kit/1"


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
        hint = (
            "it has an identity but has not joined a federation: run `medtwin site join --kit DIR --manifest FILE`"
            if (path / SITE_PUBLIC_FILE).is_file()
            else "create one on the site's machine with `medtwin site init`, then `medtwin site join`"
        )
        raise KitError(f"{path} is not a site kit (no {SITE_FILE}); {hint}")
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
    ca_path = path / CA_CERT_FILE
    if not ca_path.is_file() or ca_path.read_text(encoding="ascii", errors="replace") != manifest.ca_certificate_pem:
        raise KitError(
            f"{ca_path} is missing or is not the CA certificate of {path / 'federation.json'}; "
            "re-run `medtwin site join --kit DIR --manifest federation.json`"
        )
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
