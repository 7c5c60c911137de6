"""`provision_federation`: kits on disk, permissions, manifest, CA and a TLS certificate that really works."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from medtwin.core.identity import (
    KitError,
    ProvisionedFederation,
    ProvisionError,
    load_coordinator_kit,
    load_manifest,
    load_site_kit,
    provision_federation,
)
from medtwin.core.identity.keys import raw_public_bytes

SITES = ["hosp0", "hosp1", "hosp2"]
HOST = "coordinator.example.org"


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> ProvisionedFederation:
    return provision_federation(
        tmp_path_factory.mktemp("provision") / "fed", federation_name="demo-fed", site_ids=SITES, coordinator_host=HOST
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_files_are_0600_and_kits_0700(federation: ProvisionedFederation) -> None:
    root = federation.root
    private = [root / "ca" / "ca_key.pem", root / "coordinator" / "tls_key.pem"]
    for site in SITES:
        private += [root / "sites" / site / "signing_key.pem", root / "sites" / site / "key_agreement_key.pem"]
    assert {path: mode(path) for path in private} == {path: 0o600 for path in private}
    for kit in (federation.coordinator_kit, federation.ca_dir, *federation.site_kits.values()):
        assert mode(kit) == 0o700
    public_files = [path for path in root.rglob("*") if path.is_file() and path not in private]
    assert public_files and all(b"PRIVATE KEY" not in path.read_bytes() for path in public_files)
    assert not list(root.rglob("*.tmp"))  # atomic writes leave no temporaries


def test_manifest_lists_every_site_with_fingerprints_of_its_kit_keys(federation: ProvisionedFederation) -> None:
    manifest = load_manifest(federation.root)
    assert manifest == federation.manifest == load_manifest(federation.site_kits["hosp1"])
    assert manifest.site_ids == SITES and manifest.federation_name == "demo-fed"
    document = json.loads((federation.root / "federation.json").read_text())
    for site in SITES:
        kit = load_site_kit(federation.site_kits[site])
        signing_raw = raw_public_bytes(kit.signing_key.public_key())
        assert document["sites"][site]["signing_key_fingerprint"] == hashlib.sha256(signing_raw).hexdigest()
        assert document["sites"][site]["key_agreement_public_key"] == raw_public_bytes(
            kit.key_agreement_key.public_key()
        ).hex()
    signing_keys = {entry.signing_public_key for entry in manifest.sites}
    assert len(signing_keys) == len(SITES)  # every site has its own identity


def test_tls_certificate_is_signed_by_the_ca_for_the_coordinator_names(federation: ProvisionedFederation) -> None:
    kit = load_coordinator_kit(federation.coordinator_kit)
    ca = x509.load_pem_x509_certificate(kit.ca_cert_path.read_bytes())
    server = x509.load_pem_x509_certificate(kit.tls_cert_path.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"localhost", HOST}
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert ExtendedKeyUsageOID.SERVER_AUTH in server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    der = server.public_bytes(serialization.Encoding.DER)
    assert federation.manifest.coordinator_tls_fingerprint == hashlib.sha256(der).hexdigest()


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1", HOST])
def test_a_tls_handshake_with_the_kit_succeeds(federation: ProvisionedFederation, server_hostname: str) -> None:
    kit = load_coordinator_kit(federation.coordinator_kit)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(kit.tls_cert_path, kit.tls_key_path)
    client_context = ssl.create_default_context(cafile=str(load_site_kit(federation.site_kits["hosp0"]).ca_cert_path))
    server_in, server_out, client_in, client_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    client = client_context.wrap_bio(client_in, client_out, server_hostname=server_hostname)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, endpoint in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    endpoint.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
    assert done == {"client": True, "server": True}
    assert client.getpeercert()["subject"][-1][0][1] == HOST


def test_a_wrong_server_name_fails_the_handshake(federation: ProvisionedFederation) -> None:
    kit = load_coordinator_kit(federation.coordinator_kit)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(kit.tls_cert_path, kit.tls_key_path)
    client_context = ssl.create_default_context(cafile=str(kit.ca_cert_path))
    server_in, server_out, client_in, client_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    client = client_context.wrap_bio(client_in, client_out, server_hostname="evil.example.org")
    with pytest.raises(ssl.SSLCertVerificationError):
        for _ in range(10):
            for endpoint in (client, server):
                try:
                    endpoint.do_handshake()
                except ssl.SSLWantReadError:
                    pass
            server_in.write(client_out.read())
            client_in.write(server_out.read())


def test_provisioning_never_overwrites_and_validates_names(tmp_path: Path) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("x")
    with pytest.raises(ProvisionError, match="not an empty directory"):
        provision_federation(tmp_path / "used", federation_name="f", site_ids=["a"])
    with pytest.raises(ProvisionError, match="duplicate site ids"):
        provision_federation(tmp_path / "dup", federation_name="f", site_ids=["a", "b", "a"])
    with pytest.raises(ProvisionError, match="site id"):
        provision_federation(tmp_path / "bad", federation_name="f", site_ids=["../etc"])
    with pytest.raises(ProvisionError, match="at least one site"):
        provision_federation(tmp_path / "none", federation_name="f", site_ids=[])
    assert not (tmp_path / "dup").exists()  # nothing half-written


def test_kits_with_unsafe_permissions_or_foreign_keys_are_refused(tmp_path: Path) -> None:
    federation = provision_federation(tmp_path / "fed", federation_name="f", site_ids=["a", "b"])
    kit_a, kit_b = federation.site_kits["a"], federation.site_kits["b"]
    (kit_a / "signing_key.pem").chmod(0o644)
    with pytest.raises(KitError, match="chmod 600"):
        load_site_kit(kit_a)
    (kit_a / "signing_key.pem").chmod(0o600)
    (kit_a / "key_agreement_key.pem").write_bytes((kit_b / "key_agreement_key.pem").read_bytes())
    with pytest.raises(KitError, match="does not match site 'a'"):
        load_site_kit(kit_a)
    with pytest.raises(KitError, match="not a site kit"):
        load_site_kit(federation.coordinator_kit)
