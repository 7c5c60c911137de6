"""`medtwin provision`: identities, a federation CA and the coordinator's TLS certificate, as kits.

Layout written under `out_dir` (private files 0600, their folders 0700, every file atomic):

    federation.json                  public manifest (site keys + fingerprints, CA, coordinator)
    ca/ca_cert.pem, ca/ca_key.pem    the federation CA (the admin keeps the key offline)
    coordinator/                     tls_cert.pem, tls_key.pem, ca_cert.pem, federation.json
    sites/<site>/                    signing_key.pem (Ed25519), key_agreement_key.pem (X25519),
                                     ca_cert.pem, federation.json, site.json
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import ProvisionError
from .keys import PRIVATE_DIR_MODE, private_key_pem, raw_public_bytes, write_private_file, write_public_file
from .manifest import MANIFEST_FILE, FederationManifest, SiteEntry, check_name

CA_DIR, COORDINATOR_DIR, SITES_DIR = "ca", "coordinator", "sites"
CA_CERT_FILE, CA_KEY_FILE = "ca_cert.pem", "ca_key.pem"
TLS_CERT_FILE, TLS_KEY_FILE = "tls_cert.pem", "tls_key.pem"
SIGNING_KEY_FILE, KEY_AGREEMENT_KEY_FILE, SITE_FILE = "signing_key.pem", "key_agreement_key.pem", "site.json"
SITE_KIT_FORMAT = "medtwin-site-kit/1"


@dataclass(frozen=True)
class ProvisionedFederation:
    root: Path
    manifest: FederationManifest
    coordinator_kit: Path
    site_kits: dict[str, Path]
    ca_dir: Path


def provision_federation(
    out_dir: Path | str,
    *,
    federation_name: str,
    site_ids: list[str] | tuple[str, ...],
    coordinator_host: str = "127.0.0.1",
    ca_validity_days: int = 1825,
    tls_validity_days: int = 365,
) -> ProvisionedFederation:
    """Create every identity of a new federation under `out_dir` (which must be empty or absent)."""
    root = Path(out_dir)
    _check_request(root, federation_name, list(site_ids), coordinator_host)
    root.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _ca_certificate(ca_key, federation_name, now, ca_validity_days)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    write_private_file(root / CA_DIR / CA_KEY_FILE, private_key_pem(ca_key))
    write_public_file(root / CA_DIR / CA_CERT_FILE, ca_pem)

    tls_key = ec.generate_private_key(ec.SECP256R1())
    tls_cert = _server_certificate(tls_key, ca_key, ca_cert, federation_name, coordinator_host, now, tls_validity_days)
    coordinator = root / COORDINATOR_DIR
    write_private_file(coordinator / TLS_KEY_FILE, private_key_pem(tls_key))
    write_public_file(coordinator / TLS_CERT_FILE, tls_cert.public_bytes(serialization.Encoding.PEM))
    write_public_file(coordinator / CA_CERT_FILE, ca_pem)

    entries, site_kits = [], {}
    for site_id in site_ids:
        signing_key, agreement_key = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
        kit = root / SITES_DIR / site_id
        write_private_file(kit / SIGNING_KEY_FILE, private_key_pem(signing_key))
        write_private_file(kit / KEY_AGREEMENT_KEY_FILE, private_key_pem(agreement_key))
        write_public_file(kit / CA_CERT_FILE, ca_pem)
        site_document = {"format": SITE_KIT_FORMAT, "federation_name": federation_name, "site_id": site_id}
        write_public_file(kit / SITE_FILE, (json.dumps(site_document, indent=2, sort_keys=True) + "\n").encode())
        entries.append(
            SiteEntry(
                site_id=site_id,
                signing_public_key=raw_public_bytes(signing_key.public_key()).hex(),
                key_agreement_public_key=raw_public_bytes(agreement_key.public_key()).hex(),
            )
        )
        site_kits[site_id] = kit

    manifest = FederationManifest(
        federation_name=federation_name,
        created_utc=now.isoformat(),
        ca_certificate_pem=ca_pem.decode("ascii"),
        coordinator_host=coordinator_host,
        coordinator_tls_fingerprint=hashlib.sha256(tls_cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        sites=tuple(sorted(entries, key=lambda entry: entry.site_id)),
    )
    for folder in (root, coordinator, *site_kits.values()):
        manifest.save(folder / MANIFEST_FILE)
    for folder in (root / CA_DIR, coordinator, *site_kits.values()):
        folder.chmod(PRIVATE_DIR_MODE)  # kits hold secrets: only their owner may list or enter them
    return ProvisionedFederation(
        root=root, manifest=manifest, coordinator_kit=coordinator, site_kits=site_kits, ca_dir=root / CA_DIR
    )


def _check_request(root: Path, federation_name: str, site_ids: list[str], coordinator_host: str) -> None:
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ProvisionError(
            f"{root} exists and is not an empty directory; provisioning never overwrites keys — choose a new folder"
        )
    check_name("federation name", federation_name)
    if not site_ids:
        raise ProvisionError("site_ids is empty: a federation needs at least one site")
    for site_id in site_ids:
        check_name("site id", site_id)
    duplicates = sorted({site_id for site_id in site_ids if site_ids.count(site_id) > 1})
    if duplicates:
        raise ProvisionError(f"duplicate site ids {duplicates}")
    if not coordinator_host or any(character.isspace() for character in coordinator_host):
        raise ProvisionError(f"coordinator_host {coordinator_host!r} must be a host name or IP address")


def _name(common_name: str, federation_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"medtwin federation {federation_name}"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_certificate(key: ec.EllipticCurvePrivateKey, federation_name: str, now: dt.datetime, days: int) -> x509.Certificate:
    name = _name(f"{federation_name} federation CA", federation_name)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    federation_name: str,
    host: str,
    now: dt.datetime,
    days: int,
) -> x509.Certificate:
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    try:
        host_name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        host_name = x509.DNSName(host)
    if host_name not in names:
        names.append(host_name)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(host, federation_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
