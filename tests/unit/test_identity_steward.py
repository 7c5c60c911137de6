"""The key-steward flow: CKKS keys made by a site, wrapped per site, only a key-less context for the coordinator."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag

from medtwin.core.he import (
    choose_ckks_parameters,
    decrypt_average,
    encrypt_update,
    load_context,
    sum_encrypted,
    update_digest,
)
from medtwin.core.identity import (
    EnvelopeError,
    HeKeyDistribution,
    KitError,
    ProvisionedFederation,
    install_he_secret,
    load_site_he_context,
    load_site_kit,
    provision_federation,
    sign_update,
    steward_generate_he_keys,
    unwrap_he_secret,
    verify_update,
)

SITES = ["hosp0", "hosp1", "hosp2"]
NUM_PARAMETERS = 1500


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> ProvisionedFederation:
    return provision_federation(tmp_path_factory.mktemp("steward") / "fed", federation_name="demo", site_ids=SITES)


@pytest.fixture(scope="module")
def distribution(federation: ProvisionedFederation) -> HeKeyDistribution:
    params = choose_ckks_parameters(
        num_parameters=NUM_PARAMETERS, num_sites=len(SITES), max_abs_weight_bound=1.0, max_total_examples=1000
    )
    result = steward_generate_he_keys(federation.site_kits["hosp0"], params)
    for site in SITES[1:]:
        install_he_secret(federation.site_kits[site], result.envelope_paths[site])
    return result


def test_steward_writes_secret_locally_envelopes_per_site_and_a_public_context(
    federation: ProvisionedFederation, distribution: HeKeyDistribution
) -> None:
    assert set(distribution.envelope_paths) == {"hosp1", "hosp2"}  # not to itself
    assert stat.S_IMODE(distribution.secret_context_path.stat().st_mode) == 0o600
    for site in SITES:
        stored = federation.site_kits[site] / "he" / "secret_context.bin"
        assert stat.S_IMODE(stored.stat().st_mode) == 0o600
        assert load_site_he_context(federation.site_kits[site]).key_id.hex() == distribution.key_id
    public = load_context(distribution.public_context_path.read_bytes(), expected_kind="public")
    assert not public.is_private and public.key_id.hex() == distribution.key_id
    secret_bytes = distribution.secret_context_path.read_bytes()
    for path in distribution.envelope_paths.values():
        envelope = path.read_bytes()
        assert secret_bytes[-64:] not in envelope and b"PRIVATE" not in envelope


def test_a_round_with_kits_signatures_and_the_public_context(
    federation: ProvisionedFederation, distribution: HeKeyDistribution
) -> None:
    rng = np.random.default_rng(3)
    weights = {site: rng.uniform(-1, 1, NUM_PARAMETERS) for site in SITES}
    counts = {"hosp0": 100, "hosp1": 250, "hosp2": 50}
    replies = []
    for site in SITES:
        kit = load_site_kit(federation.site_kits[site])
        chunks = encrypt_update(load_site_he_context(kit), weights[site], counts[site])
        signature = sign_update(kit.signing_key, run_id="r1", server_round=1, site_id=site, ciphertext_digest=update_digest(chunks))
        replies.append((site, chunks, signature))
    accepted = []  # the coordinator: manifest keys + public context only
    for site, chunks, signature in replies:
        public_key = federation.manifest.site(site).signing_public_key
        verify_update(public_key, signature, run_id="r1", server_round=1, site_id=site, ciphertext_digest=update_digest(chunks))
        accepted.append(chunks)
    summed = sum_encrypted(distribution.public_context_path.read_bytes(), accepted)
    average, total = decrypt_average(load_site_he_context(federation.site_kits["hosp2"]), summed, NUM_PARAMETERS)
    expected = sum(weights[site] * counts[site] for site in SITES) / sum(counts.values())
    assert total == 400
    np.testing.assert_allclose(average, expected, atol=1e-3)


def test_site_a_cannot_open_site_b_envelope(federation: ProvisionedFederation, distribution: HeKeyDistribution) -> None:
    envelope_for_2 = json.loads(distribution.envelope_paths["hosp2"].read_text())
    with pytest.raises(EnvelopeError, match="recipient_site='hosp2'"):
        unwrap_he_secret(federation.site_kits["hosp1"], envelope_for_2)
    # relabelled so the binding matches hosp1: the key agreement still fails (AES-GCM tag)
    hosp1 = federation.manifest.site("hosp1")
    forged = {**envelope_for_2, "recipient_site": "hosp1", "recipient_key_fingerprint": hosp1.key_agreement_key_fingerprint}
    with pytest.raises(EnvelopeError, match="InvalidTag") as caught:
        unwrap_he_secret(federation.site_kits["hosp1"], forged)
    assert isinstance(caught.value.__cause__, InvalidTag)


def test_altered_envelopes_fail_authentication(federation: ProvisionedFederation, distribution: HeKeyDistribution) -> None:
    envelope = json.loads(distribution.envelope_paths["hosp1"].read_text())
    ciphertext = bytearray(base64.b64decode(envelope["ciphertext"]))
    ciphertext[10] ^= 0x01
    with pytest.raises(EnvelopeError, match="InvalidTag"):
        unwrap_he_secret(federation.site_kits["hosp1"], {**envelope, "ciphertext": base64.b64encode(ciphertext).decode()})
    with pytest.raises(EnvelopeError, match="InvalidTag"):  # the key id is bound as associated data
        unwrap_he_secret(federation.site_kits["hosp1"], {**envelope, "key_id": "00" * 16})
    with pytest.raises(KitError, match="not in federation"):
        unwrap_he_secret(federation.site_kits["hosp1"], {**envelope, "sender_site": "mallory"})
    assert unwrap_he_secret(federation.site_kits["hosp1"], envelope) == distribution.secret_context_path.read_bytes()


def test_steward_refuses_to_replace_existing_keys(federation: ProvisionedFederation, distribution: HeKeyDistribution) -> None:
    params = load_site_he_context(federation.site_kits["hosp0"]).parameters
    with pytest.raises(KitError, match="already exists"):
        steward_generate_he_keys(federation.site_kits["hosp0"], params)


def test_installed_secret_with_loose_permissions_is_refused(tmp_path: Path) -> None:
    federation = provision_federation(tmp_path / "fed", federation_name="f", site_ids=["a", "b"])
    params = choose_ckks_parameters(num_parameters=10, num_sites=2, max_total_examples=100)
    result = steward_generate_he_keys(federation.site_kits["a"], params, outbox_dir=tmp_path / "outbox")
    assert result.public_context_path == tmp_path / "outbox" / "public_context.bin"
    result.secret_context_path.chmod(0o640)
    with pytest.raises(KitError, match="chmod 600"):
        load_site_he_context(federation.site_kits["a"])
