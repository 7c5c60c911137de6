"""The key-steward flow: one site makes the federation's CKKS keys, wraps them for every other site,
and publishes only a key-less public context for the coordinator (ARCHITECTURE.md section 4).

    steward kit   he/secret_context.bin (0600)
    outbox        he-outbox/public_context.bin        -> coordinator
                  he-outbox/envelopes/<site>.json      -> each other site
    other kits    he/secret_context.bin (0600) after `install_he_secret`
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..he import CkksParameters, HeContext, HeContextError, create_secret_context, load_context
from ..he import serialize_public_context, serialize_secret_context
from .envelope import open_envelope, seal_envelope
from .errors import EnvelopeError, KitError
from .keys import read_private_file, write_private_file, write_public_file, x25519_public_key
from .kits import SiteKit, load_site_kit
from .manifest import FederationManifest

HE_SECRET_PURPOSE = "he-secret-context"
SECRET_CONTEXT_FILE = Path("he") / "secret_context.bin"
OUTBOX_DIR = "he-outbox"
PUBLIC_CONTEXT_FILE = "public_context.bin"


@dataclass(frozen=True)
class HeKeyDistribution:
    key_id: str
    secret_context_path: Path
    public_context_path: Path
    envelope_paths: dict[str, Path]


def steward_generate_he_keys(
    steward_kit: SiteKit | Path | str,
    params: CkksParameters,
    manifest: FederationManifest | None = None,
    *,
    outbox_dir: Path | str | None = None,
) -> HeKeyDistribution:
    """Generate the CKKS key set, keep the secret context, write envelopes and the public context."""
    kit = steward_kit if isinstance(steward_kit, SiteKit) else load_site_kit(steward_kit)
    manifest = manifest or kit.manifest
    if manifest.federation_name != kit.federation_name:
        raise KitError(
            f"steward kit is for federation {kit.federation_name!r}, the manifest for {manifest.federation_name!r}"
        )
    secret_path = kit.path / SECRET_CONTEXT_FILE
    if secret_path.exists():
        raise KitError(
            f"{secret_path} already exists; generating new HE keys would orphan every encrypted model — "
            "move it away deliberately to rotate keys"
        )
    context = create_secret_context(params)
    secret_bytes = serialize_secret_context(context)
    outbox = Path(outbox_dir) if outbox_dir is not None else kit.path / OUTBOX_DIR
    write_private_file(secret_path, secret_bytes)
    public_path = outbox / PUBLIC_CONTEXT_FILE
    write_public_file(public_path, serialize_public_context(context))
    manifest.site(kit.site_id)  # the steward must be a member of the federation it keys
    envelopes = {}
    for recipient in manifest.sites:
        if recipient.site_id == kit.site_id:
            continue
        envelope = seal_envelope(
            sender_key=kit.key_agreement_key,
            recipient_public_key=x25519_public_key(recipient.key_agreement_public_key),
            plaintext=secret_bytes,
            binding=_binding(
                manifest, sender_site=kit.site_id, recipient_site=recipient.site_id, key_id=context.key_id.hex()
            ),
        )
        path = outbox / "envelopes" / f"{recipient.site_id}.json"
        # sealed, so not secret — but only its recipient needs it
        write_private_file(path, (json.dumps(envelope, indent=2, sort_keys=True) + "\n").encode("utf-8"))
        envelopes[recipient.site_id] = path
    return HeKeyDistribution(
        key_id=context.key_id.hex(),
        secret_context_path=secret_path,
        public_context_path=public_path,
        envelope_paths=envelopes,
    )


def unwrap_he_secret(site_kit: SiteKit | Path | str, envelope: Path | str | bytes | Mapping[str, Any]) -> bytes:
    """Open the steward's envelope with this site's key; returns the serialized secret HE context."""
    kit = site_kit if isinstance(site_kit, SiteKit) else load_site_kit(site_kit)
    document = _read_envelope(envelope)
    sender_site = document.get("sender_site")
    if not isinstance(sender_site, str):
        raise EnvelopeError("envelope names no sender_site")
    sender = kit.manifest.site(sender_site)  # the sender's key comes from our manifest, never the envelope
    return open_envelope(
        recipient_key=kit.key_agreement_key,
        sender_public_key=x25519_public_key(sender.key_agreement_public_key),
        envelope=document,
        expected=_binding(
            kit.manifest, sender_site=sender_site, recipient_site=kit.site_id, key_id=str(document.get("key_id"))
        ),
    )


def install_he_secret(site_kit: SiteKit | Path | str, envelope: Path | str | bytes | Mapping[str, Any]) -> Path:
    """Unwrap, check (a secret context with the envelope's key id) and store it in the kit (0600)."""
    kit = site_kit if isinstance(site_kit, SiteKit) else load_site_kit(site_kit)
    document = _read_envelope(envelope)
    secret_bytes = unwrap_he_secret(kit, document)
    context = load_context(secret_bytes, expected_kind="secret")
    if context.key_id.hex() != document["key_id"]:
        raise EnvelopeError(f"envelope key id {document['key_id']} != key id {context.key_id.hex()} of its content")
    path = kit.path / SECRET_CONTEXT_FILE
    write_private_file(path, secret_bytes)
    return path


def load_site_he_context(site_kit: SiteKit | Path | str) -> HeContext:
    """The secret HE context stored in a site kit (by the steward, or by `install_he_secret`)."""
    kit_path = site_kit.path if isinstance(site_kit, SiteKit) else Path(site_kit)
    try:
        return load_context(read_private_file(kit_path / SECRET_CONTEXT_FILE), expected_kind="secret")
    except HeContextError as error:
        raise KitError(f"{kit_path / SECRET_CONTEXT_FILE}: {error}") from error


def _binding(manifest: FederationManifest, *, sender_site: str, recipient_site: str, key_id: str) -> dict[str, str]:
    return {
        "federation_name": manifest.federation_name,
        "purpose": HE_SECRET_PURPOSE,
        "key_id": key_id,
        "sender_site": sender_site,
        "sender_key_fingerprint": manifest.site(sender_site).key_agreement_key_fingerprint,
        "recipient_site": recipient_site,
        "recipient_key_fingerprint": manifest.site(recipient_site).key_agreement_key_fingerprint,
    }


def _read_envelope(envelope: Path | str | bytes | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(envelope, Mapping):
        return dict(envelope)
    try:
        text = envelope.decode("utf-8") if isinstance(envelope, bytes) else Path(envelope).read_text(encoding="utf-8")
        document = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EnvelopeError(f"cannot read envelope ({error})") from error
    if not isinstance(document, dict):
        raise EnvelopeError("an envelope is a JSON object")
    return document
