"""Keys are born where they live: `init_site_identity` at each site, `provision_federation` from public
files only, `join_federation` back at the site; permissions, manifest, CA and a TLS certificate that works."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import shutil
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID

from medtwin.core.identity import (
    KitError,
    ProvisionedFederation,
    ProvisionError,
    init_site_identity,
    join_federation,
    load_coordinator_kit,
    load_manifest,
    load_site_kit,
    load_supernode_auth_public_key,
    provision_federation,
    read_site_public,
    supernode_auth_key_path,
)
from medtwin.core.identity.keys import raw_public_bytes

SITES = ["hosp0", "hosp1", "hosp2"]
PEM_PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----.+?-----END [A-Z ]*PRIVATE KEY-----\n?", re.DOTALL)
HOST = "coordinator.example.org"


@dataclass(frozen=True)
class Federation:
    admin: ProvisionedFederation
    kits: dict[str, Path]
    public_files: dict[str, Path]


def make_sites(base: Path, site_ids: list[str]) -> tuple[dict[str, Path], dict[str, Path]]:
    kits = {site: base / "sites" / site / "kit" for site in site_ids}
    public_files = {site: init_site_identity(kits[site], site_id=site) for site in site_ids}
    return kits, public_files


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    base = tmp_path_factory.mktemp("provision")
    kits, public_files = make_sites(base, SITES)
    admin = provision_federation(
        base / "admin", federation_name="demo-fed", site_public_files=list(public_files.values()), coordinator_host=HOST
    )
    for site in SITES:
        join_federation(kits[site], admin.manifest_path)
    return Federation(admin=admin, kits=kits, public_files=public_files)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_files_are_0600_and_their_folders_0700(federation: Federation) -> None:
    root = federation.admin.root
    private = [root / "ca" / "ca_key.pem", root / "coordinator" / "tls_key.pem"]
    for kit in federation.kits.values():
        private += [kit / "signing_key.pem", kit / "key_agreement_key.pem", kit / "supernode_auth_key"]
    assert {path: mode(path) for path in private} == {path: 0o600 for path in private}
    for folder in (federation.admin.coordinator_kit, federation.admin.ca_dir, *federation.kits.values()):
        assert mode(folder) == 0o700
    everything = [path for folder in (root, *federation.kits.values()) for path in folder.rglob("*") if path.is_file()]
    public_files = [path for path in everything if path not in private]
    assert public_files and all(b"PRIVATE KEY" not in path.read_bytes() for path in public_files)
    assert not [path for path in everything if path.name.endswith(".tmp")]  # atomic writes leave no temporaries


def test_the_admin_folder_holds_no_site_private_key(federation: Federation) -> None:
    site_public_keys, site_private_pems = set(), []
    for kit in federation.kits.values():
        for name in ("signing_key.pem", "key_agreement_key.pem"):
            pem = (kit / name).read_bytes()
            site_private_pems.append(pem)
            site_public_keys.add(raw_public_bytes(serialization.load_pem_private_key(pem, password=None).public_key()))
    assert len(site_public_keys) == 2 * len(SITES)
    files = [path for path in federation.admin.root.rglob("*") if path.is_file()]
    assert {path.name for path in files} >= {"federation.json", "ca_key.pem", "tls_key.pem"}
    assert not (federation.admin.root / "sites").exists()
    private_keys_found = 0
    for path in files:
        data = path.read_bytes()
        assert not any(pem in data for pem in site_private_pems), f"{path} contains a site's private key"
        for block in PEM_PRIVATE_KEY.findall(data):
            key = serialization.load_pem_private_key(block, password=None)
            private_keys_found += 1
            if isinstance(key, Ed25519PrivateKey | X25519PrivateKey):
                assert raw_public_bytes(key.public_key()) not in site_public_keys, f"{path} holds a site's private key"
            else:  # the CA / TLS keys are P-256: they cannot be a site's Ed25519 or X25519 key
                point = key.public_key().public_bytes(
                    serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
                )
                assert not any(site_key in point for site_key in site_public_keys)
    assert private_keys_found == 2  # the CA key and the coordinator's TLS key, nothing else


def test_manifest_lists_every_site_with_the_fingerprints_of_its_own_keys(federation: Federation) -> None:
    manifest = load_manifest(federation.admin.root)
    assert manifest == federation.admin.manifest == load_manifest(federation.kits["hosp1"])
    assert manifest == load_manifest(federation.admin.coordinator_kit)
    assert manifest.site_ids == SITES and manifest.federation_name == "demo-fed"
    document = json.loads((federation.admin.root / "federation.json").read_text())
    for site in SITES:
        kit = load_site_kit(federation.kits[site])
        assert kit.site_id == site and kit.federation_name == "demo-fed"
        assert kit.ca_cert_path.read_text() == manifest.ca_certificate_pem
        signing_raw = raw_public_bytes(kit.signing_key.public_key())
        assert document["sites"][site]["signing_key_fingerprint"] == hashlib.sha256(signing_raw).hexdigest()
        assert document["sites"][site]["key_agreement_public_key"] == raw_public_bytes(
            kit.key_agreement_key.public_key()
        ).hex()
        assert read_site_public(federation.public_files[site]) == manifest.site(site)
    assert len({entry.signing_public_key for entry in manifest.sites}) == len(SITES)


def test_the_site_public_file_is_public_and_complete(federation: Federation) -> None:
    document = json.loads(federation.public_files["hosp0"].read_text())
    assert set(document) == {
        "format",
        "site_id",
        "signing_public_key",
        "signing_key_fingerprint",
        "key_agreement_public_key",
        "key_agreement_key_fingerprint",
        "supernode_auth_public_key",
        "supernode_auth_key_fingerprint",
        "chain_address",
    }
    assert document["site_id"] == "hosp0" and mode(federation.public_files["hosp0"]) == 0o644
    assert document["supernode_auth_public_key"].startswith("ecdsa-sha2-nistp384 ")


def test_the_manifest_carries_each_sites_supernode_key_in_the_formats_flower_reads(federation: Federation) -> None:
    """The SuperNode auth key is born in the kit (OpenSSH EC private key, 0600, what `flower-supernode
    --auth-supernode-private-key` loads); the manifest's public key (what `flwr supernode register` loads) is its half."""
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    manifest = load_manifest(federation.admin.root)
    for site in SITES:
        key_path = supernode_auth_key_path(federation.kits[site])
        assert mode(key_path) == 0o600 and key_path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        private = serialization.load_ssh_private_key(key_path.read_bytes(), password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        listed = manifest.site(site).supernode_auth_public_key
        assert listed == load_supernode_auth_public_key(federation.kits[site])
        assert serialization.load_ssh_public_key(listed.encode()).public_numbers() == private.public_key().public_numbers()
        public_file = key_path.parent.parent / "registered.pub"
        public_file.write_text(listed + "\n")
        assert try_load_public_key(public_file) == public_key_to_bytes(private.public_key())  # Flower's own loader
    assert len({entry.supernode_auth_public_key for entry in manifest.sites}) == len(SITES)


def test_manifests_without_supernode_keys_still_load_and_a_foreign_supernode_key_is_refused(tmp_path: Path) -> None:
    kits, public_files = make_sites(tmp_path, ["a", "b"])
    admin = provision_federation(tmp_path / "admin", federation_name="f", site_public_files=list(public_files.values()))
    document = json.loads(admin.manifest_path.read_text())
    for entry in document["sites"].values():  # a manifest from before SuperNode keys
        del entry["supernode_auth_public_key"], entry["supernode_auth_key_fingerprint"]
    (tmp_path / "old.json").write_text(json.dumps(document))
    old = load_manifest(tmp_path / "old.json")
    assert old.site("a").supernode_auth_public_key is None and "supernode_auth_public_key" not in old.to_json()
    assert join_federation(kits["a"], tmp_path / "old.json").site_id == "a"
    document = json.loads(admin.manifest_path.read_text())
    document["sites"]["a"]["supernode_auth_public_key"] = document["sites"]["b"]["supernode_auth_public_key"]
    (tmp_path / "tampered.json").write_text(json.dumps(document))
    with pytest.raises(KitError, match="supernode-auth-key fingerprint"):
        load_manifest(tmp_path / "tampered.json")
    document["sites"]["a"]["supernode_auth_key_fingerprint"] = document["sites"]["b"]["supernode_auth_key_fingerprint"]
    (tmp_path / "swapped.json").write_text(json.dumps(document))
    with pytest.raises(KitError, match="different SuperNode authentication key"):
        join_federation(kits["a"], tmp_path / "swapped.json")


def test_tls_certificate_is_signed_by_the_ca_for_the_coordinator_names(federation: Federation) -> None:
    kit = load_coordinator_kit(federation.admin.coordinator_kit)
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
    assert federation.admin.manifest.coordinator_tls_fingerprint == hashlib.sha256(der).hexdigest()


def handshake(server_context: ssl.SSLContext, client_context: ssl.SSLContext, server_hostname: str) -> ssl.SSLObject:
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
    return client


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1", HOST])
def test_a_tls_handshake_with_the_joined_site_kit_succeeds(federation: Federation, server_hostname: str) -> None:
    kit = load_coordinator_kit(federation.admin.coordinator_kit)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(kit.tls_cert_path, kit.tls_key_path)
    client_context = ssl.create_default_context(cafile=str(load_site_kit(federation.kits["hosp0"]).ca_cert_path))
    client = handshake(server_context, client_context, server_hostname)
    assert client.getpeercert()["subject"][-1][0][1] == HOST


def test_a_wrong_server_name_fails_the_handshake(federation: Federation) -> None:
    kit = load_coordinator_kit(federation.admin.coordinator_kit)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(kit.tls_cert_path, kit.tls_key_path)
    client_context = ssl.create_default_context(cafile=str(kit.ca_cert_path))
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server_context, client_context, "evil.example.org")


def test_site_init_never_replaces_an_identity_and_validates_the_site_id(tmp_path: Path) -> None:
    kit = tmp_path / "kit"
    public_path = init_site_identity(kit, site_id="a")
    before = {path.name: path.read_bytes() for path in kit.iterdir()}
    with pytest.raises(KitError, match="already holds a site identity"):
        init_site_identity(kit, site_id="a")
    with pytest.raises(KitError, match="already holds a site identity"):
        init_site_identity(kit, site_id="b")
    assert {path.name: path.read_bytes() for path in kit.iterdir()} == before
    (kit / "site-public.json").unlink()  # even a half identity (one key left) is never overwritten
    with pytest.raises(KitError, match="signing_key.pem"):
        init_site_identity(kit, site_id="a")
    assert public_path.name == "site-public.json"
    with pytest.raises(ProvisionError, match="site id"):
        init_site_identity(tmp_path / "bad", site_id="../etc")
    assert not (tmp_path / "bad").exists()


def test_provisioning_never_overwrites_and_validates_its_request(tmp_path: Path) -> None:
    kits, public_files = make_sites(tmp_path, ["a", "b"])
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("x")
    with pytest.raises(ProvisionError, match="not an empty directory"):
        provision_federation(tmp_path / "used", federation_name="f", site_public_files=[public_files["a"]])
    with pytest.raises(ProvisionError, match="duplicate site ids: 'a'"):
        provision_federation(
            tmp_path / "dup", federation_name="f", site_public_files=[public_files["a"], public_files["b"], public_files["a"]]
        )
    with pytest.raises(ProvisionError, match="at least one site"):
        provision_federation(tmp_path / "none", federation_name="f", site_public_files=[])
    with pytest.raises(ProvisionError, match="federation name") as caught:  # every problem reported at once
        provision_federation(tmp_path / "many", federation_name="bad name", site_public_files=[], coordinator_host="a b")
    assert "coordinator_host" in str(caught.value) and "at least one site" in str(caught.value)
    for folder in ("dup", "none", "many"):
        assert not (tmp_path / folder).exists()  # nothing half-written


def write_public(path: Path, document: dict) -> Path:
    path.write_text(json.dumps(document))
    return path


@pytest.mark.parametrize(
    "change, field",
    [
        ({"format": "medtwin-site-public/0"}, "format"),
        ({"site_id": "../etc"}, "site_id"),
        ({"signing_public_key": "zz" * 32}, "signing_public_key"),
        ({"signing_public_key": "00" * 31}, "signing_public_key"),
        ({"key_agreement_public_key": None}, "key_agreement_public_key"),
        ({"signing_key_fingerprint": "00" * 32}, "signing_key_fingerprint"),
        ({"key_agreement_key_fingerprint": "00" * 32}, "key_agreement_key_fingerprint"),
        ({"supernode_auth_public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOx"}, "supernode_auth_public_key"),
        ({"supernode_auth_key_fingerprint": "00" * 32}, "supernode_auth_key_fingerprint"),
    ],
)
def test_bad_public_files_are_refused_naming_the_file_and_field(tmp_path: Path, change: dict, field: str) -> None:
    _, public_files = make_sites(tmp_path, ["a"])
    document = {**json.loads(public_files["a"].read_text()), **change}
    bad = write_public(tmp_path / "bad-public.json", document)
    with pytest.raises(ProvisionError, match=field) as caught:
        provision_federation(tmp_path / "admin", federation_name="f", site_public_files=[bad])
    assert str(bad) in str(caught.value)
    assert not (tmp_path / "admin").exists()


def test_unreadable_public_files_and_shared_keys_are_refused(tmp_path: Path) -> None:
    _, public_files = make_sites(tmp_path, ["a"])
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(ProvisionError, match="garbage.json"):
        provision_federation(tmp_path / "admin", federation_name="f", site_public_files=[tmp_path / "garbage.json"])
    with pytest.raises(ProvisionError, match="missing.json"):
        provision_federation(tmp_path / "admin", federation_name="f", site_public_files=[tmp_path / "missing.json"])
    clone = write_public(tmp_path / "clone.json", {**json.loads(public_files["a"].read_text()), "site_id": "b"})
    with pytest.raises(ProvisionError, match="shares a public key with site 'a'"):
        provision_federation(tmp_path / "admin", federation_name="f", site_public_files=[public_files["a"], clone])


def test_parsed_site_entries_are_accepted(tmp_path: Path) -> None:
    kits, public_files = make_sites(tmp_path, ["a", "b"])
    entries = [read_site_public(public_files["a"]), json.loads(public_files["b"].read_text())]
    admin = provision_federation(tmp_path / "admin", federation_name="f", site_public_files=entries)
    assert admin.manifest.site_ids == ["a", "b"]
    assert join_federation(kits["b"], admin.manifest_path).site_id == "b"


def test_joining_checks_the_manifest_carries_exactly_this_sites_keys(tmp_path: Path) -> None:
    kits, public_files = make_sites(tmp_path, ["a", "b"])
    impostor_kit, impostor_public = make_sites(tmp_path / "impostor", ["a"])  # another identity claiming "a"
    forged = provision_federation(tmp_path / "forged", federation_name="f", site_public_files=[impostor_public["a"], public_files["b"]])
    with pytest.raises(KitError, match="lists site 'a' with a different signing key and key-agreement key"):
        join_federation(kits["a"], forged.manifest_path)
    assert not (kits["a"] / "federation.json").exists() and not (kits["a"] / "site.json").exists()
    only_b = provision_federation(tmp_path / "only-b", federation_name="f", site_public_files=[public_files["b"]])
    with pytest.raises(KitError, match="not in federation 'f'"):
        join_federation(kits["a"], only_b.manifest_path)
    with pytest.raises(KitError, match="site init"):
        join_federation(tmp_path / "empty", only_b.manifest_path)
    # a half-swapped manifest: only the key-agreement key is someone else's
    document = json.loads(forged.manifest_path.read_text())
    entry = document["sites"]["a"]
    entry["signing_public_key"] = read_site_public(public_files["a"]).signing_public_key
    entry["signing_key_fingerprint"] = read_site_public(public_files["a"]).signing_key_fingerprint
    (tmp_path / "half.json").write_text(json.dumps(document))
    with pytest.raises(KitError, match="different key-agreement key than"):
        join_federation(kits["a"], tmp_path / "half.json")


def test_rejoining_is_a_no_op_and_a_grown_manifest_replaces_the_old_one(tmp_path: Path) -> None:
    kits, public_files = make_sites(tmp_path, ["a", "b", "c"])
    first = provision_federation(tmp_path / "admin1", federation_name="f", site_public_files=[public_files["a"], public_files["b"]])
    join_federation(kits["a"], first.manifest_path)
    files = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in kits["a"].iterdir()}
    kit = join_federation(kits["a"], first.manifest_path)
    assert {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in kits["a"].iterdir()} == files
    assert kit.manifest.site_ids == ["a", "b"]
    grown = provision_federation(tmp_path / "admin2", federation_name="f", site_public_files=list(public_files.values()))
    kit = join_federation(kits["a"], grown.manifest_path)
    assert kit.manifest == grown.manifest and kit.manifest.site_ids == ["a", "b", "c"]
    assert kit.ca_cert_path.read_text() == grown.manifest.ca_certificate_pem
    other = provision_federation(tmp_path / "admin3", federation_name="g", site_public_files=[public_files["a"]])
    with pytest.raises(KitError, match="already belongs to federation 'f'"):
        join_federation(kits["a"], other.manifest_path)
    assert load_site_kit(kits["a"]).manifest == grown.manifest


def test_kits_with_unsafe_permissions_or_foreign_keys_are_refused(tmp_path: Path) -> None:
    kits, public_files = make_sites(tmp_path, ["a", "b"])
    admin = provision_federation(tmp_path / "admin", federation_name="f", site_public_files=list(public_files.values()))
    for kit in kits.values():
        join_federation(kit, admin.manifest_path)
    kit_a, kit_b = kits["a"], kits["b"]
    (kit_a / "signing_key.pem").chmod(0o644)
    with pytest.raises(KitError, match="chmod 600"):
        load_site_kit(kit_a)
    (kit_a / "signing_key.pem").chmod(0o600)
    saved = (kit_a / "key_agreement_key.pem").read_bytes()
    shutil.copyfile(kit_b / "key_agreement_key.pem", kit_a / "key_agreement_key.pem")
    with pytest.raises(KitError, match="does not match site 'a'"):
        load_site_kit(kit_a)
    with pytest.raises(KitError, match="does not describe the private keys"):
        join_federation(kit_a, admin.manifest_path)
    (kit_a / "key_agreement_key.pem").write_bytes(saved)
    (kit_a / "ca_cert.pem").write_bytes((admin.root / "coordinator" / "tls_cert.pem").read_bytes())  # not the CA
    with pytest.raises(KitError, match="not the CA certificate"):
        load_site_kit(kit_a)
    (kit_a / "ca_cert.pem").unlink()
    assert join_federation(kit_a, admin.manifest_path).ca_cert_path.read_text() == admin.manifest.ca_certificate_pem
    with pytest.raises(KitError, match="not a site kit"):
        load_site_kit(admin.coordinator_kit)
    with pytest.raises(KitError, match="has not joined a federation"):
        load_site_kit(make_sites(tmp_path / "new", ["c"])[0]["c"])


def test_a_site_is_born_with_its_own_chain_account_and_the_manifest_carries_only_its_address(tmp_path: Path) -> None:
    """A site signs its run approvals with its own chain key; the admin registers the public address only."""
    import dataclasses
    import json as json_module

    from medtwin.core.identity import (
        KitError,
        chain_address_of,
        init_site_identity,
        join_federation,
        load_chain_account_key,
        provision_federation,
        read_site_public,
    )

    public = init_site_identity(tmp_path / "a" / "kit", site_id="hosp-a")
    key = load_chain_account_key(tmp_path / "a" / "kit")
    assert key is not None and len(key) == 32
    entry = read_site_public(public)
    assert entry.chain_address == chain_address_of(key)
    admin = provision_federation(tmp_path / "admin", federation_name="f", site_public_files=[entry])
    assert admin.manifest.site("hosp-a").chain_address == entry.chain_address
    assert key.hex() not in "".join(path.read_text(errors="ignore") for path in (tmp_path / "admin").rglob("*") if path.is_file())
    join_federation(tmp_path / "a" / "kit", admin.manifest_path)
    other = init_site_identity(tmp_path / "b" / "kit", site_id="hosp-b")
    forged = dataclasses.replace(entry, chain_address=read_site_public(other).chain_address)
    forged_admin = provision_federation(tmp_path / "admin2", federation_name="f", site_public_files=[forged])
    with pytest.raises(KitError, match="chain account"):
        join_federation(tmp_path / "a" / "kit", forged_admin.manifest_path)
    assert json_module.loads(public.read_text())["chain_address"].startswith("0x")
