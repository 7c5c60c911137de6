"""Identities and keys of a federation: site identities, provisioning, kits, key envelopes, signed replies.

Keys are born where they live (ARCHITECTURE.md section 4). A site creates its own Ed25519 (signing)
and X25519 (key agreement) keys (`init_site_identity`) plus its Flower SuperNode authentication key (EC P-384, OpenSSH format;
`supernode_auth_key_path`) and hands over `site-public.json`. The admin
builds the manifest, a federation CA and the coordinator's TLS certificate from those public files
(`provision_federation`); each site checks and installs the manifest (`join_federation`). A
key-steward site generates the CKKS keys (`steward_generate_he_keys`), wraps them for every other
site and publishes only a key-less public context for the coordinator; kits keep one secret context
per key id. Sites sign every reply as a `ReplyClaim` (`sign_claim`); the coordinator checks it
(`verify_claim`).
"""

from .chain_record import CHAINS_FILE, load_chain_record, sign_chain_record
from .envelope import open_envelope, seal_envelope
from .errors import EnvelopeError, IdentityError, KitError, ProvisionError, SignatureError
from .keys import fingerprint
from .kits import CoordinatorKit, SiteKit, load_coordinator_kit, load_site_kit
from .manifest import FederationManifest, SiteEntry, load_manifest
from .provision import ProvisionedFederation, provision_federation
from .signing import ReplyClaim, check_claim_fields, sign_claim, verify_claim
from .site_init import (
    chain_address_of,
    init_site_identity,
    load_chain_account_key,
    join_federation,
    load_supernode_auth_public_key,
    read_site_public,
    supernode_auth_key_path,
)
from .steward import (
    HeKeyDistribution,
    install_he_secret,
    installed_he_key_ids,
    load_site_he_context,
    steward_generate_he_keys,
    unwrap_he_secret,
)

__all__ = [
    "chain_address_of",
    "load_chain_account_key",
    "CHAINS_FILE",
    "load_chain_record",
    "sign_chain_record",
    "CoordinatorKit",
    "EnvelopeError",
    "FederationManifest",
    "HeKeyDistribution",
    "IdentityError",
    "KitError",
    "ProvisionError",
    "ProvisionedFederation",
    "ReplyClaim",
    "SignatureError",
    "SiteEntry",
    "SiteKit",
    "check_claim_fields",
    "fingerprint",
    "init_site_identity",
    "install_he_secret",
    "installed_he_key_ids",
    "join_federation",
    "load_coordinator_kit",
    "load_manifest",
    "load_site_he_context",
    "load_site_kit",
    "load_supernode_auth_public_key",
    "open_envelope",
    "provision_federation",
    "read_site_public",
    "seal_envelope",
    "sign_claim",
    "steward_generate_he_keys",
    "supernode_auth_key_path",
    "unwrap_he_secret",
    "verify_claim",
]
