"""A site's own identity, born on its machine (`medtwin site init`), and joining a federation (`medtwin site join`).

    init_site_identity(kit, site_id=...)   signing_key.pem + key_agreement_key.pem + supernode_auth_key
                                            (0600, folder 0700) and site-public.json: the public half,
                                            handed to the admin
    provision_federation(...)               (the admin) builds federation.json from public files only
    join_federation(kit, federation.json)   checks the site's entry carries exactly its own keys, then
                                            installs federation.json, ca_cert.pem and site.json

No private key ever leaves the kit; an existing identity is never replaced.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from .errors import IdentityError, KitError, ProvisionError
from .keys import (
    PRIVATE_DIR_MODE,
    fingerprint,
    load_ed25519_private_key,
    load_x25519_private_key,
    private_key_pem,
    raw_public_bytes,
    read_private_file,
    write_private_file,
    write_public_file,
)
from .kits import (
    CA_CERT_FILE,
    KEY_AGREEMENT_KEY_FILE,
    SIGNING_KEY_FILE,
    SITE_FILE,
    SITE_KIT_FORMAT,
    SITE_PUBLIC_FILE,
    SiteKit,
    load_site_kit,
)
from .manifest import MANIFEST_FILE, FederationManifest, SiteEntry, check_name, load_manifest, openssh_key_fingerprint

SITE_PUBLIC_FORMAT = "medtwin-site-public/1"
PUBLIC_KEY_BYTES = 32
# Flower SuperNode authentication: `flower-supernode --auth-supernode-private-key` reads an OpenSSH
# private key (cryptography's load_ssh_private_key) holding an EC key; `flwr supernode register`
# reads an OpenSSH public key on a NIST curve. P-384, as in Flower's docs (`ssh-keygen -t ecdsa -b 384`).
SUPERNODE_AUTH_KEY_FILE = "supernode_auth_key"
# the site's own chain account (secp256k1, hex): it signs the site's run approvals on the auth chain
CHAIN_ACCOUNT_KEY_FILE = "chain_account_key"
CHAIN_ADDRESS_PATTERN = re.compile(r"0x[0-9a-fA-F]{40}")
_SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def chain_address_of(private_key: bytes) -> str:
    """The checksummed EVM address of a secp256k1 private key."""
    from eth_account import Account  # web3's signer; imported here to keep core light

    return str(Account.from_key(private_key).address)


def load_chain_account_key(kit_dir: Path | str) -> bytes | None:
    """The site's chain-account private key (32 bytes), or None for a kit made before sites had one."""
    path = Path(kit_dir) / CHAIN_ACCOUNT_KEY_FILE
    if not path.exists():
        return None
    try:
        key = bytes.fromhex(read_private_file(path).decode("ascii").strip())
    except (ValueError, UnicodeDecodeError) as error:
        raise KitError(f"{path} is not a hex chain-account key ({error}); it was altered") from error
    if len(key) != 32:
        raise KitError(f"{path} holds {len(key)} bytes, expected a 32-byte secp256k1 key; it was altered")
    return key
SUPERNODE_AUTH_CURVES = ("secp256r1", "secp384r1", "secp521r1")


def supernode_auth_private_key_openssh(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.OpenSSH,
        encryption_algorithm=serialization.NoEncryption(),
    )


def supernode_auth_public_key_openssh(key: ec.EllipticCurvePublicKey) -> str:
    """`ecdsa-sha2-nistp384 AAAA…` (no comment): the text `flwr supernode register` reads."""
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode("ascii")


def parse_supernode_auth_public_key(text: object) -> str:
    """Check an OpenSSH EC public key on a NIST curve; returns it normalised (type and base64, no comment)."""
    if not isinstance(text, str):
        raise ValueError(f"expected OpenSSH public key text, got {type(text).__name__}")
    try:
        key = serialization.load_ssh_public_key(text.strip().encode("ascii"))
    except (ValueError, UnsupportedAlgorithm, UnicodeEncodeError) as error:
        raise ValueError(f"not an OpenSSH public key ({error})") from error
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in SUPERNODE_AUTH_CURVES:
        raise ValueError(f"Flower SuperNode keys are EC keys on {', '.join(SUPERNODE_AUTH_CURVES)}, got {type(key).__name__}")
    return supernode_auth_public_key_openssh(key)


def supernode_auth_key_path(kit_dir: Path | str) -> Path:
    """The kit's SuperNode authentication private key (for `flower-supernode --auth-supernode-private-key`)."""
    return Path(kit_dir) / SUPERNODE_AUTH_KEY_FILE


def load_supernode_auth_public_key(kit_dir: Path | str) -> str:
    """The OpenSSH public key of the kit's SuperNode key, derived from the private key (checks mode 0600)."""
    path = supernode_auth_key_path(kit_dir)
    try:
        key = serialization.load_ssh_private_key(read_private_file(path), password=None)
    except (ValueError, UnsupportedAlgorithm) as error:
        raise KitError(f"{path} is not an OpenSSH EC private key ({error}); it was altered — make a new kit with `medtwin site init`") from error
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KitError(f"{path} holds a {type(key).__name__}, expected an EC SuperNode authentication key")
    return supernode_auth_public_key_openssh(key.public_key())


def init_site_identity(kit_dir: Path | str, *, site_id: str) -> Path:
    """Create this site's Ed25519 + X25519 keys and its Flower SuperNode authentication key (EC P-384,
    OpenSSH) in `kit_dir`; returns the path of its public file.

    Refuses (`KitError`) when `kit_dir` already holds an identity: a site keeps its keys.
    """
    check_name("site id", site_id)
    kit = Path(kit_dir)
    existing = [
        name
        for name in (SIGNING_KEY_FILE, KEY_AGREEMENT_KEY_FILE, SUPERNODE_AUTH_KEY_FILE, CHAIN_ACCOUNT_KEY_FILE, SITE_PUBLIC_FILE)
        if (kit / name).exists()
    ]
    if existing:
        raise KitError(
            f"{kit} already holds a site identity ({', '.join(existing)}); `site init` never replaces one — "
            "use that identity, or choose a new, empty kit folder"
        )
    if kit.exists() and not kit.is_dir():
        raise KitError(f"{kit} exists and is not a folder; choose a kit folder")
    kit.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    kit.chmod(PRIVATE_DIR_MODE)  # mkdir's mode is subject to the umask; the kit holds secrets
    signing_key, agreement_key = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    write_private_file(kit / SIGNING_KEY_FILE, private_key_pem(signing_key))
    write_private_file(kit / KEY_AGREEMENT_KEY_FILE, private_key_pem(agreement_key))
    supernode_key = ec.generate_private_key(ec.SECP384R1())
    write_private_file(supernode_auth_key_path(kit), supernode_auth_private_key_openssh(supernode_key))
    chain_key = secrets.token_bytes(32)
    while not 0 < int.from_bytes(chain_key, "big") < _SECP256K1_ORDER:
        chain_key = secrets.token_bytes(32)
    write_private_file(kit / CHAIN_ACCOUNT_KEY_FILE, chain_key.hex().encode("ascii"))
    entry = SiteEntry(
        site_id=site_id,
        signing_public_key=raw_public_bytes(signing_key.public_key()).hex(),
        key_agreement_public_key=raw_public_bytes(agreement_key.public_key()).hex(),
        supernode_auth_public_key=supernode_auth_public_key_openssh(supernode_key.public_key()),
        chain_address=chain_address_of(chain_key),
    )
    public_path = kit / SITE_PUBLIC_FILE
    write_public_file(public_path, site_public_json(entry).encode("utf-8"))
    return public_path


def site_public_json(entry: SiteEntry) -> str:
    """The public file a site hands to the federation admin."""
    document = {"format": SITE_PUBLIC_FORMAT, "site_id": entry.site_id, **entry.to_dict()}
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def read_site_public(source: Path | str | Mapping[str, Any]) -> SiteEntry:
    """Parse and check a site's public file (or its parsed JSON); `ProvisionError` names the file and every bad field."""
    if isinstance(source, Mapping):
        where, document = "site public entry", dict(source)
    else:
        where = str(source)
        try:
            document = json.loads(Path(source).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ProvisionError(f"{where}: cannot read a site public file ({error}); ask the site for its {SITE_PUBLIC_FILE}") from error
    if not isinstance(document, dict):
        raise ProvisionError(f"{where}: a site public file is a JSON object, got {type(document).__name__}")
    problems = []
    if document.get("format") != SITE_PUBLIC_FORMAT:
        problems.append(f"format {document.get('format')!r} (expected {SITE_PUBLIC_FORMAT!r})")
    site_id = document.get("site_id")
    try:
        check_name("site id", site_id)  # type: ignore[arg-type]
    except ProvisionError as error:
        problems.append(f"site_id: {error}")
    keys = {}
    for field, key_type in (("signing_public_key", Ed25519PublicKey), ("key_agreement_public_key", X25519PublicKey)):
        value = document.get(field)
        try:
            raw = bytes.fromhex(value) if isinstance(value, str) else b""
            if len(raw) != PUBLIC_KEY_BYTES:
                raise ValueError(f"expected {PUBLIC_KEY_BYTES} bytes as hex")
            key_type.from_public_bytes(raw)
        except ValueError as error:
            problems.append(f"{field}: {value!r:.80} is not a raw {key_type.__name__[:-9]} public key ({error})")
            continue
        keys[field] = value.lower()
        stated = document.get(field.replace("_public_key", "_key_fingerprint"))
        if stated is not None and stated != fingerprint(raw):
            problems.append(f"{field.replace('_public_key', '_key_fingerprint')}: does not match {field}")
    supernode_key = document.get("supernode_auth_public_key")
    if supernode_key is not None:  # optional: site-public files from before SuperNode keys lack it
        try:
            supernode_key = parse_supernode_auth_public_key(supernode_key)
            stated = document.get("supernode_auth_key_fingerprint")
            if stated is not None and stated != openssh_key_fingerprint(supernode_key):
                problems.append("supernode_auth_key_fingerprint: does not match supernode_auth_public_key")
        except ValueError as error:
            problems.append(f"supernode_auth_public_key: {supernode_key!r:.80} is not valid ({error})")
    chain_address = document.get("chain_address")
    if chain_address is not None and (not isinstance(chain_address, str) or not CHAIN_ADDRESS_PATTERN.fullmatch(chain_address)):
        problems.append(f"chain_address: {chain_address!r:.60} is not a 0x-prefixed 20-byte address")
    if problems:
        raise ProvisionError(f"{where} is not a valid site public file: " + "; ".join(problems))
    if keys["signing_public_key"] == keys["key_agreement_public_key"]:
        raise ProvisionError(f"{where}: signing and key-agreement keys are identical; re-run `medtwin site init`")
    return SiteEntry(site_id=site_id, supernode_auth_public_key=supernode_key, chain_address=chain_address, **keys)  # type: ignore[arg-type]


def own_site_entry(kit_dir: Path | str) -> SiteEntry:
    """This kit's identity as the manifest should list it: public keys derived from the private ones."""
    kit = Path(kit_dir)
    public_path = kit / SITE_PUBLIC_FILE
    if not public_path.is_file():
        raise KitError(f"{kit} has no {SITE_PUBLIC_FILE}; create the site's identity with `medtwin site init` first")
    try:
        stated = read_site_public(public_path)
    except ProvisionError as error:
        raise KitError(str(error)) from error
    has_supernode_key = supernode_auth_key_path(kit).exists() or stated.supernode_auth_public_key is not None
    entry = SiteEntry(
        site_id=stated.site_id,
        signing_public_key=raw_public_bytes(load_ed25519_private_key(kit / SIGNING_KEY_FILE).public_key()).hex(),
        key_agreement_public_key=raw_public_bytes(load_x25519_private_key(kit / KEY_AGREEMENT_KEY_FILE).public_key()).hex(),
        supernode_auth_public_key=load_supernode_auth_public_key(kit) if has_supernode_key else None,
        chain_address=chain_address_of(chain_key) if (chain_key := load_chain_account_key(kit)) is not None else None,
    )
    if entry != stated:
        raise KitError(f"{public_path} does not describe the private keys in {kit}; the kit was altered")
    return entry


def join_federation(kit_dir: Path | str, manifest_path: Path | str) -> SiteKit:
    """Install the admin's federation.json and CA certificate into this site's kit, after checking them.

    The manifest must list this site with exactly its own public keys. Joining again with the same
    manifest changes nothing; a newer manifest of the same federation (e.g. with more sites) replaces
    the installed one. A kit belongs to one federation.
    """
    kit = Path(kit_dir)
    own = own_site_entry(kit)
    manifest = load_manifest(manifest_path)
    _check_entry(manifest, own, source=str(manifest_path))
    try:
        ca_pem = manifest.ca_certificate_pem.encode("ascii")
        manifest.ca_fingerprint  # noqa: B018 - parses the CA certificate
    except (ValueError, UnicodeEncodeError) as error:
        raise KitError(f"{manifest_path}: ca.certificate_pem is not a PEM certificate ({error})") from error
    installed_path = kit / MANIFEST_FILE
    if installed_path.is_file():
        installed = load_manifest(installed_path)
        if installed.federation_name != manifest.federation_name:
            raise KitError(
                f"{kit} already belongs to federation {installed.federation_name!r}, {manifest_path} is for "
                f"{manifest.federation_name!r}; a kit joins one federation — make a new kit with `medtwin site init`"
            )
        if installed == manifest and (kit / CA_CERT_FILE).is_file() and (kit / SITE_FILE).is_file():
            return load_site_kit(kit)  # already joined: nothing to do
    site_document = {"format": SITE_KIT_FORMAT, "federation_name": manifest.federation_name, "site_id": own.site_id}
    write_public_file(kit / CA_CERT_FILE, ca_pem)
    write_public_file(kit / SITE_FILE, (json.dumps(site_document, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    manifest.save(installed_path)
    return load_site_kit(kit)


def _check_entry(manifest: FederationManifest, own: SiteEntry, *, source: str) -> None:
    try:
        listed = manifest.site(own.site_id)
    except IdentityError as error:
        raise KitError(f"{source}: {error}; send {SITE_PUBLIC_FILE} to the admin and ask for a new manifest") from error
    mismatched = [
        name
        for name, theirs, ours in (
            ("signing key", listed.signing_public_key, own.signing_public_key),
            ("key-agreement key", listed.key_agreement_public_key, own.key_agreement_public_key),
        )
        if theirs.lower() != ours
    ]
    if not mismatched and listed.chain_address is not None and listed.chain_address.lower() != (own.chain_address or "").lower():
        raise KitError(
            f"{source} lists site {own.site_id!r} with chain account {listed.chain_address}, this kit's is "
            f"{own.chain_address}; refusing to join — the manifest was built from another identity"
        )
    if not mismatched and listed.supernode_auth_public_key not in (None, own.supernode_auth_public_key):
        raise KitError(
            f"{source} lists site {own.site_id!r} with a different SuperNode authentication key than this kit holds "
            f"(fingerprint in the manifest {listed.supernode_auth_key_fingerprint[:16]}… vs this kit "
            f"{own.supernode_auth_key_fingerprint[:16] if own.supernode_auth_key_fingerprint else 'none'}…); "
            "refusing to join — the manifest was built from another identity"
        )
    if mismatched:
        raise KitError(
            f"{source} lists site {own.site_id!r} with a different {' and '.join(mismatched)} than this kit holds "
            "(fingerprint in the manifest vs this kit: "
            + ", ".join(
                f"{name} {fingerprint(bytes.fromhex(theirs))[:16]}… vs {fingerprint(bytes.fromhex(ours))[:16]}…"
                for name, theirs, ours in (
                    ("signing", listed.signing_public_key, own.signing_public_key),
                    ("key-agreement", listed.key_agreement_public_key, own.key_agreement_public_key),
                )
            )
            + "); refusing to join — the manifest was built from another identity"
        )
