"""The key-steward flow: one site makes the federation's CKKS keys, wraps them for every other site,
and publishes only a key-less public context for the coordinator (ARCHITECTURE.md section 4).

    steward kit   he/<key_id>/secret_context.bin (0600)
    outbox        public_context.bin                  -> coordinator
                  envelopes/<site>.json               -> each other site
                  (default outbox: <steward kit>/he-outbox/<key_id>/)
    other kits    he/<key_id>/secret_context.bin (0600) after `install_he_secret`

A kit may hold several key sets (one per run or rotation), each under its key id; installing or
generating a key never replaces a stored one.
"""

from __future__ import annotations

import json
import re
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
HE_DIR = "he"
SECRET_CONTEXT_NAME = "secret_context.bin"
OUTBOX_DIR = "he-outbox"
PUBLIC_CONTEXT_FILE = "public_context.bin"
KEY_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")  # 16 bytes, hex (core.he.context.KEY_ID_BYTES)


@dataclass(frozen=True)
class HeKeyDistribution:
    key_id: str
    secret_context_path: Path
    public_context_path: Path
    envelope_paths: dict[str, Path]


def secret_context_path(kit_dir: Path | str, key_id: str) -> Path:
    """Where a kit keeps the secret context of key set `key_id`: he/<key_id>/secret_context.bin."""
    if not isinstance(key_id, str) or not KEY_ID_PATTERN.fullmatch(key_id):
        raise KitError(f"HE key id {key_id!r:.80} is not 32 lower-case hex characters (a key id from the key steward)")
    return Path(kit_dir) / HE_DIR / key_id / SECRET_CONTEXT_NAME


def installed_he_key_ids(site_kit: SiteKit | Path | str) -> list[str]:
    """Key ids of the secret HE contexts stored in a kit, sorted."""
    kit_path = site_kit.path if isinstance(site_kit, SiteKit) else Path(site_kit)
    folder = kit_path / HE_DIR
    if not folder.is_dir():
        return []
    return sorted(
        child.name for child in folder.iterdir() if KEY_ID_PATTERN.fullmatch(child.name) and (child / SECRET_CONTEXT_NAME).is_file()
    )


def steward_generate_he_keys(
    steward_kit: SiteKit | Path | str,
    params: CkksParameters,
    manifest: FederationManifest | None = None,
    *,
    outbox_dir: Path | str | None = None,
) -> HeKeyDistribution:
    """Generate a CKKS key set, keep its secret context, write envelopes and the public context."""
    kit = steward_kit if isinstance(steward_kit, SiteKit) else load_site_kit(steward_kit)
    manifest = manifest or kit.manifest
    if manifest.federation_name != kit.federation_name:
        raise KitError(
            f"steward kit is for federation {kit.federation_name!r}, the manifest for {manifest.federation_name!r}"
        )
    manifest.site(kit.site_id)  # the steward must be a member of the federation it keys
    context = create_secret_context(params)
    key_id = context.key_id.hex()
    secret_path = secret_context_path(kit.path, key_id)
    if secret_path.exists():
        raise KitError(
            f"{secret_path} already exists; HE key set {key_id} is stored in this kit and is never replaced"
        )
    secret_bytes = serialize_secret_context(context)
    outbox = Path(outbox_dir) if outbox_dir is not None else kit.path / OUTBOX_DIR / key_id
    write_private_file(secret_path, secret_bytes)
    public_path = outbox / PUBLIC_CONTEXT_FILE
    write_public_file(public_path, serialize_public_context(context))
    envelopes = {}
    for recipient in manifest.sites:
        if recipient.site_id == kit.site_id:
            continue
        envelope = seal_envelope(
            sender_key=kit.key_agreement_key,
            recipient_public_key=x25519_public_key(recipient.key_agreement_public_key),
            plaintext=secret_bytes,
            binding=_binding(manifest, sender_site=kit.site_id, recipient_site=recipient.site_id, key_id=key_id),
        )
        path = outbox / "envelopes" / f"{recipient.site_id}.json"
        # sealed, so not secret — but only its recipient needs it
        write_private_file(path, (json.dumps(envelope, indent=2, sort_keys=True) + "\n").encode("utf-8"))
        envelopes[recipient.site_id] = path
    return HeKeyDistribution(
        key_id=key_id, secret_context_path=secret_path, public_context_path=public_path, envelope_paths=envelopes
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
    """Unwrap, check (a secret context with the envelope's key id) and store it under he/<key_id>/ (0600).

    Installing the same key set again is a no-op; a different secret under a stored key id is refused.
    """
    kit = site_kit if isinstance(site_kit, SiteKit) else load_site_kit(site_kit)
    document = _read_envelope(envelope)
    secret_bytes = unwrap_he_secret(kit, document)
    try:
        context = load_context(secret_bytes, expected_kind="secret")
    except HeContextError as error:
        raise EnvelopeError(f"envelope from {document.get('sender_site')!r} holds no valid secret context: {error}") from error
    key_id = context.key_id.hex()
    if key_id != document["key_id"]:
        raise EnvelopeError(f"envelope key id {document['key_id']} != key id {key_id} of its content")
    path = secret_context_path(kit.path, key_id)
    if path.exists():
        if read_private_file(path) == secret_bytes:
            return path  # already installed
        raise KitError(
            f"{path} already holds a different secret for HE key set {key_id}; installing an HE key never silently "
            "replaces one — move the stored file away deliberately if you really mean to replace it"
        )
    write_private_file(path, secret_bytes)
    return path


def load_site_he_context(site_kit: SiteKit | Path | str, key_id: str | None = None) -> HeContext:
    """The secret HE context of key set `key_id` stored in a site kit (by the steward or `install_he_secret`).

    `key_id` may be left out only when the kit holds exactly one key set.
    """
    kit_path = site_kit.path if isinstance(site_kit, SiteKit) else Path(site_kit)
    installed = installed_he_key_ids(kit_path)
    if key_id is None:
        if len(installed) != 1:
            raise KitError(
                f"{kit_path} holds {len(installed)} HE key sets {installed}; say which one (key_id)"
                if installed
                else f"{kit_path} holds no HE key set; run `medtwin site keygen` (steward) or `medtwin site install-key`"
            )
        key_id = installed[0]
    key_id = key_id.lower() if isinstance(key_id, str) else key_id
    path = secret_context_path(kit_path, key_id)
    if not path.exists():
        raise KitError(
            f"{kit_path} holds no HE key set {key_id} (installed: {installed or 'none'}); "
            "install its envelope with `medtwin site install-key`"
        )
    try:
        context = load_context(read_private_file(path), expected_kind="secret")
    except HeContextError as error:
        raise KitError(f"{path}: {error}") from error
    if context.key_id.hex() != key_id:
        raise KitError(f"{path} holds key set {context.key_id.hex()}, not {key_id}; the kit was altered")
    return context


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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise EnvelopeError(f"cannot read envelope ({str(error)[:200]})") from None
    if not isinstance(document, dict):
        raise EnvelopeError("an envelope is a JSON object")
    return document
