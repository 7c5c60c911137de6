"""Identities and keys of a federation: provisioning, kits, key envelopes, update signatures.

`provision_federation` creates per-site Ed25519 (signing) and X25519 (key agreement) keys, a
federation CA and the coordinator's TLS certificate. A key-steward site generates the CKKS keys
(`steward_generate_he_keys`), wraps them for every other site and publishes only a key-less public
context for the coordinator. Sites sign each encrypted update (`sign_update`); the coordinator
checks it (`verify_update`).
"""

from .envelope import open_envelope, seal_envelope
from .errors import EnvelopeError, IdentityError, KitError, ProvisionError, SignatureError
from .keys import fingerprint
from .kits import CoordinatorKit, SiteKit, load_coordinator_kit, load_site_kit
from .manifest import FederationManifest, SiteEntry, load_manifest
from .provision import ProvisionedFederation, provision_federation
from .signing import sign_update, update_signing_message, verify_update
from .steward import (
    HeKeyDistribution,
    install_he_secret,
    load_site_he_context,
    steward_generate_he_keys,
    unwrap_he_secret,
)

__all__ = [
    "CoordinatorKit",
    "EnvelopeError",
    "FederationManifest",
    "HeKeyDistribution",
    "IdentityError",
    "KitError",
    "ProvisionError",
    "ProvisionedFederation",
    "SignatureError",
    "SiteEntry",
    "SiteKit",
    "fingerprint",
    "install_he_secret",
    "load_coordinator_kit",
    "load_manifest",
    "load_site_he_context",
    "load_site_kit",
    "open_envelope",
    "provision_federation",
    "seal_envelope",
    "sign_update",
    "steward_generate_he_keys",
    "unwrap_he_secret",
    "update_signing_message",
    "verify_update",
]
