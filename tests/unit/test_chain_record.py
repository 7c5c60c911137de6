"""The admin-signed chain record: an auditor trusts chain ids and contract addresses only with the CA's signature."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medtwin.core.identity import (
    KitError,
    SignatureError,
    init_site_identity,
    load_chain_record,
    provision_federation,
    sign_chain_record,
)

CHAINS = {
    role: {"chain_id": chain_id, "address": "0x" + f"{chain_id:040x}", "rpc_url": f"http://127.0.0.1:{8540 + chain_id}",
           "contract": name, "deploy_block": 1, "source_sha256": "ab" * 32}
    for role, chain_id, name in (("auth", 31337, "FederationRegistry"), ("data", 31338, "ProvenanceLedger"))
}  # fmt: skip


def _federation(root: Path, name: str):
    public = init_site_identity(root / f"{name}-site" / "kit", site_id="hospA")
    return provision_federation(root / name, federation_name=name, site_public_files=[public])


def test_a_signed_record_verifies_and_any_change_is_refused(tmp_path: Path) -> None:
    admin = _federation(tmp_path, "fed")
    path = sign_chain_record(ca_key_path=admin.ca_dir / "ca_key.pem", manifest=admin.manifest, chains=CHAINS, out_path=tmp_path / "chains.json")
    assert load_chain_record(path, admin.manifest) == CHAINS
    document = json.loads(path.read_text())
    document["chains"]["data"]["address"] = "0x" + "11" * 20
    path.write_text(json.dumps(document))
    with pytest.raises(SignatureError, match="not signed by federation"):
        load_chain_record(path, admin.manifest)


def test_another_federations_ca_cannot_vouch_for_the_chains(tmp_path: Path) -> None:
    ours, theirs = _federation(tmp_path, "ours"), _federation(tmp_path, "theirs")
    with pytest.raises(KitError, match="not the key of federation"):
        sign_chain_record(ca_key_path=theirs.ca_dir / "ca_key.pem", manifest=ours.manifest, chains=CHAINS, out_path=tmp_path / "c.json")
    path = sign_chain_record(ca_key_path=theirs.ca_dir / "ca_key.pem", manifest=theirs.manifest, chains=CHAINS, out_path=tmp_path / "c.json")
    with pytest.raises(SignatureError):
        load_chain_record(path, ours.manifest)
