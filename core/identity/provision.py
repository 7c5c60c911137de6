"""`medtwin provision`: the admin assembles a federation from the sites' PUBLIC files only.

Each site made its own keys (`medtwin site init`) and handed over `site-public.json`. The admin
creates the federation CA (and keeps its key), the coordinator's TLS certificate and the public
manifest. No site private key is ever generated, read or written here (ARCHITECTURE.md section 4).

Layout written under `out_dir` (private files 0600, their folders 0700, every file atomic):

    federation.json                  public manifest (site keys + fingerprints, CA, coordinator)
    ca/ca_cert.pem, ca/ca_key.pem    the federation CA (the admin keeps the key offline)
    coordinator/                     tls_cert.pem, tls_key.pem, ca_cert.pem, federation.json

Sites then install federation.json with `medtwin site join`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import ProvisionError
from .keys import PRIVATE_DIR_MODE, private_key_pem, write_private_file, write_public_file
from .kits import CA_CERT_FILE, CA_KEY_FILE, TLS_CERT_FILE, TLS_KEY_FILE
from .manifest import MANIFEST_FILE, FederationManifest, SiteEntry, check_name
from .site_init import SITE_PUBLIC_FORMAT, read_site_public

CA_DIR, COORDINATOR_DIR = "ca", "coordinator"

SitePublic = Path | str | SiteEntry | Mapping[str, Any]


@dataclass(frozen=True)
class ProvisionedFederation:
    """What the admin holds: the public manifest, the CA (with its key) and the coordinator's kit."""

    root: Path
    manifest: FederationManifest
    coordinator_kit: Path
    ca_dir: Path

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_FILE


def provision_federation(
    out_dir: Path | str,
    *,
    federation_name: str,
    site_public_files: Sequence[SitePublic],
    coordinator_host: str = "127.0.0.1",
    ca_validity_days: int = 1825,
    tls_validity_days: int = 365,
) -> ProvisionedFederation:
    """Create a federation's CA, coordinator TLS kit and manifest under `out_dir` (empty or absent).

    `site_public_files` are the sites' `site-public.json` files (or parsed `SiteEntry`s / their JSON).
    """
    root = Path(out_dir)
    entries = _check_request(root, federation_name, site_public_files, coordinator_host)
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

    manifest = FederationManifest(
        federation_name=federation_name,
        created_utc=now.isoformat(),
        ca_certificate_pem=ca_pem.decode("ascii"),
        coordinator_host=coordinator_host,
        coordinator_tls_fingerprint=hashlib.sha256(tls_cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        sites=tuple(sorted(entries, key=lambda entry: entry.site_id)),
    )
    for folder in (coordinator, root):  # the root manifest last: its presence marks a finished provisioning
        manifest.save(folder / MANIFEST_FILE)
    for folder in (root / CA_DIR, coordinator):
        folder.chmod(PRIVATE_DIR_MODE)  # they hold secrets: only their owner may list or enter them
    return ProvisionedFederation(root=root, manifest=manifest, coordinator_kit=coordinator, ca_dir=root / CA_DIR)


def _check_request(
    root: Path, federation_name: str, site_public_files: Sequence[SitePublic], coordinator_host: str
) -> list[SiteEntry]:
    """Every problem of the request at once, before anything is written."""
    problems: list[str] = []
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        problems.append(
            f"{root} exists and is not an empty directory; provisioning never overwrites keys — choose a new folder"
        )
    try:
        check_name("federation name", federation_name)
    except ProvisionError as error:
        problems.append(str(error))
    if not coordinator_host or any(character.isspace() for character in coordinator_host):
        problems.append(f"coordinator_host {coordinator_host!r} must be a host name or IP address")
    if isinstance(site_public_files, str | Path) or not site_public_files:
        problems.append("site_public_files is empty: a federation needs at least one site's site-public.json")
        site_public_files = ()
    entries: list[SiteEntry] = []
    sources: dict[str, str] = {}
    for source in site_public_files:
        try:
            entry = read_site_public(_as_public_document(source) if isinstance(source, SiteEntry) else source)
        except ProvisionError as error:
            problems.append(str(error))
            continue
        where = str(source) if isinstance(source, str | Path) else f"entry for {entry.site_id!r}"
        if entry.site_id in sources:
            problems.append(f"duplicate site ids: {entry.site_id!r} in both {sources[entry.site_id]} and {where}")
            continue
        for other in entries:
            shared = {entry.signing_public_key, entry.key_agreement_public_key} & {
                other.signing_public_key,
                other.key_agreement_public_key,
            }
            if shared:
                problems.append(
                    f"{where} (site {entry.site_id!r}) shares a public key with site {other.site_id!r}; "
                    "every site needs its own identity from `medtwin site init`"
                )
        sources[entry.site_id] = where
        entries.append(entry)
    if problems:
        raise ProvisionError("cannot provision the federation:\n  - " + "\n  - ".join(problems))
    return entries


def _as_public_document(entry: SiteEntry) -> dict[str, str]:
    document = {
        "format": SITE_PUBLIC_FORMAT,
        "site_id": entry.site_id,
        "signing_public_key": entry.signing_public_key,
        "key_agreement_public_key": entry.key_agreement_public_key,
    }
    if entry.supernode_auth_public_key:  # a site's SuperNode key travels with its other public keys
        document["supernode_auth_public_key"] = entry.supernode_auth_public_key
    if entry.chain_address:
        document["chain_address"] = entry.chain_address
    return document


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
