"""The key-steward flow: CKKS keys made by a site, wrapped per site, stored per key id and never
silently replaced; only a key-less context for the coordinator."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag

from medtwin.core.he import (
    HeContextError,
    choose_ckks_parameters,
    decrypt_average,
    encrypt_update,
    load_context,
    sum_encrypted,
    update_digest,
)
from medtwin.core.identity import (
    EnvelopeError,
    FederationManifest,
    HeKeyDistribution,
    KitError,
    ReplyClaim,
    init_site_identity,
    install_he_secret,
    installed_he_key_ids,
    join_federation,
    load_site_he_context,
    load_site_kit,
    provision_federation,
    sign_claim,
    steward_generate_he_keys,
    unwrap_he_secret,
    verify_claim,
)

SITES = ["hosp0", "hosp1", "hosp2"]
NUM_PARAMETERS = 1500


def joined_kits(base: Path, site_ids: list[str], federation_name: str) -> tuple[FederationManifest, dict[str, Path]]:
    """Each site makes its own identity; the admin provisions from the public files; every site joins."""
    kits = {site: base / site / "kit" for site in site_ids}
    public_files = [init_site_identity(kits[site], site_id=site) for site in site_ids]
    admin = provision_federation(base / "admin", federation_name=federation_name, site_public_files=public_files)
    for kit in kits.values():
        join_federation(kit, admin.manifest_path)
    return admin.manifest, kits


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> tuple[FederationManifest, dict[str, Path]]:
    return joined_kits(tmp_path_factory.mktemp("steward"), SITES, "demo")


@pytest.fixture(scope="module")
def kits(federation: tuple[FederationManifest, dict[str, Path]]) -> dict[str, Path]:
    return federation[1]


@pytest.fixture(scope="module")
def manifest(federation: tuple[FederationManifest, dict[str, Path]]) -> FederationManifest:
    return federation[0]


@pytest.fixture(scope="module")
def distribution(kits: dict[str, Path]) -> HeKeyDistribution:
    params = choose_ckks_parameters(
        num_parameters=NUM_PARAMETERS, num_sites=len(SITES), max_abs_weight_bound=1.0, max_total_examples=1000
    )
    result = steward_generate_he_keys(kits["hosp0"], params)
    for site in SITES[1:]:
        install_he_secret(kits[site], result.envelope_paths[site])
    return result


@pytest.fixture
def small_federation(tmp_path: Path) -> dict[str, Path]:
    return joined_kits(tmp_path, ["a", "b"], "f")[1]


SMALL_PARAMS = {"num_parameters": 10, "num_sites": 2, "max_total_examples": 100}


def test_steward_writes_secret_per_key_id_envelopes_per_site_and_a_public_context(
    kits: dict[str, Path], distribution: HeKeyDistribution
) -> None:
    assert set(distribution.envelope_paths) == {"hosp1", "hosp2"}  # not to itself
    assert distribution.secret_context_path == kits["hosp0"] / "he" / distribution.key_id / "secret_context.bin"
    assert distribution.public_context_path == kits["hosp0"] / "he-outbox" / distribution.key_id / "public_context.bin"
    for site in SITES:
        stored = kits[site] / "he" / distribution.key_id / "secret_context.bin"
        assert stat.S_IMODE(stored.stat().st_mode) == 0o600
        assert installed_he_key_ids(kits[site]) == [distribution.key_id]
        assert load_site_he_context(kits[site], distribution.key_id).key_id.hex() == distribution.key_id
        assert load_site_he_context(kits[site]).key_id.hex() == distribution.key_id  # the only key set
    secret_bytes = distribution.secret_context_path.read_bytes()
    for path in distribution.envelope_paths.values():
        envelope = path.read_bytes()
        assert secret_bytes[-64:] not in envelope and b"PRIVATE" not in envelope


def test_the_coordinators_public_context_holds_no_secret_key(distribution: HeKeyDistribution) -> None:
    public_bytes = distribution.public_context_path.read_bytes()
    public = load_context(public_bytes, expected_kind="public")
    assert not public.is_private and public.key_id.hex() == distribution.key_id
    assert public.secret_key is None
    with pytest.raises(HeContextError, match="expected a secret HE context"):
        load_context(public_bytes, expected_kind="secret")


def test_a_round_with_kits_signed_claims_and_the_public_context(
    kits: dict[str, Path], manifest: FederationManifest, distribution: HeKeyDistribution
) -> None:
    rng = np.random.default_rng(3)
    weights = {site: rng.uniform(-1, 1, NUM_PARAMETERS) for site in SITES}
    counts = {"hosp0": 100, "hosp1": 250, "hosp2": 50}
    replies = []
    for site in SITES:
        kit = load_site_kit(kits[site])
        chunks = encrypt_update(load_site_he_context(kit, distribution.key_id), weights[site], counts[site])
        claim = ReplyClaim(
            kind="update",
            run_id="r1",
            server_round=1,
            site_id=site,
            payload_sha256=update_digest(chunks).hex(),
            num_examples=counts[site],
        )
        replies.append((claim, chunks, sign_claim(kit.signing_key, claim)))
    accepted = []  # the coordinator: manifest keys + public context only
    for claim, chunks, signature in replies:
        assert claim.payload_sha256 == update_digest(chunks).hex()
        verify_claim(manifest.site(claim.site_id).signing_public_key, signature, claim)
        accepted.append(chunks)
    summed = sum_encrypted(distribution.public_context_path.read_bytes(), accepted)
    average, total = decrypt_average(load_site_he_context(kits["hosp2"], distribution.key_id), summed, NUM_PARAMETERS)
    expected = sum(weights[site] * counts[site] for site in SITES) / sum(counts.values())
    assert total == 400
    np.testing.assert_allclose(average, expected, atol=1e-3)


def test_site_a_cannot_open_site_b_envelope(
    kits: dict[str, Path], manifest: FederationManifest, distribution: HeKeyDistribution
) -> None:
    envelope_for_2 = json.loads(distribution.envelope_paths["hosp2"].read_text())
    with pytest.raises(EnvelopeError, match="recipient_site='hosp2'"):
        unwrap_he_secret(kits["hosp1"], envelope_for_2)
    # relabelled so the binding matches hosp1: the key agreement still fails (AES-GCM tag)
    hosp1 = manifest.site("hosp1")
    forged = {**envelope_for_2, "recipient_site": "hosp1", "recipient_key_fingerprint": hosp1.key_agreement_key_fingerprint}
    with pytest.raises(EnvelopeError, match="InvalidTag") as caught:
        unwrap_he_secret(kits["hosp1"], forged)
    assert isinstance(caught.value.__cause__, InvalidTag)


def test_altered_envelopes_fail_authentication(kits: dict[str, Path], distribution: HeKeyDistribution) -> None:
    envelope = json.loads(distribution.envelope_paths["hosp1"].read_text())
    ciphertext = bytearray(base64.b64decode(envelope["ciphertext"]))
    ciphertext[10] ^= 0x01
    with pytest.raises(EnvelopeError, match="InvalidTag"):
        unwrap_he_secret(kits["hosp1"], {**envelope, "ciphertext": base64.b64encode(ciphertext).decode()})
    with pytest.raises(EnvelopeError, match="InvalidTag"):  # the key id is bound as associated data
        unwrap_he_secret(kits["hosp1"], {**envelope, "key_id": "00" * 16})
    with pytest.raises(KitError, match="not in federation"):
        unwrap_he_secret(kits["hosp1"], {**envelope, "sender_site": "mallory"})
    assert unwrap_he_secret(kits["hosp1"], envelope) == distribution.secret_context_path.read_bytes()


def test_steward_refuses_to_replace_a_stored_key_id(
    kits: dict[str, Path], distribution: HeKeyDistribution, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = load_site_he_context(kits["hosp0"], distribution.key_id)
    before = distribution.secret_context_path.read_bytes()
    monkeypatch.setattr("medtwin.core.identity.steward.create_secret_context", lambda params: stored)
    with pytest.raises(KitError, match="already exists"):
        steward_generate_he_keys(kits["hosp0"], stored.parameters, outbox_dir=kits["hosp0"].parent / "outbox-again")
    assert distribution.secret_context_path.read_bytes() == before


def test_reinstalling_the_same_key_is_a_no_op(small_federation: dict[str, Path], tmp_path: Path) -> None:
    params = choose_ckks_parameters(**SMALL_PARAMS)
    result = steward_generate_he_keys(small_federation["a"], params, outbox_dir=tmp_path / "outbox")
    path = install_he_secret(small_federation["b"], result.envelope_paths["b"])
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    assert install_he_secret(small_federation["b"], result.envelope_paths["b"]) == path
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def test_installing_a_different_secret_for_a_stored_key_id_is_refused(
    small_federation: dict[str, Path], tmp_path: Path
) -> None:
    params = choose_ckks_parameters(**SMALL_PARAMS)
    first = steward_generate_he_keys(small_federation["a"], params, outbox_dir=tmp_path / "first")
    second = steward_generate_he_keys(small_federation["a"], params, outbox_dir=tmp_path / "second")
    path = install_he_secret(small_federation["b"], first.envelope_paths["b"])
    other_secret = unwrap_he_secret(small_federation["b"], second.envelope_paths["b"])
    path.write_bytes(other_secret)  # what is stored under first.key_id differs from the envelope's content
    with pytest.raises(KitError, match="never silently replaces"):
        install_he_secret(small_federation["b"], first.envelope_paths["b"])
    assert path.read_bytes() == other_secret  # untouched
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_two_key_ids_coexist_and_an_ambiguous_load_is_refused(small_federation: dict[str, Path], tmp_path: Path) -> None:
    params = choose_ckks_parameters(**SMALL_PARAMS)
    first = steward_generate_he_keys(small_federation["a"], params, outbox_dir=tmp_path / "first")
    second = steward_generate_he_keys(small_federation["a"], params)  # default outbox: per key id
    assert first.key_id != second.key_id
    assert first.secret_context_path.read_bytes() != second.secret_context_path.read_bytes()
    for result in (first, second):
        install_he_secret(small_federation["b"], result.envelope_paths["b"])
    expected = sorted([first.key_id, second.key_id])
    for site in ("a", "b"):
        assert installed_he_key_ids(small_federation[site]) == expected
        for result in (first, second):
            assert load_site_he_context(small_federation[site], result.key_id).key_id.hex() == result.key_id
        with pytest.raises(KitError, match="holds 2 HE key sets") as caught:
            load_site_he_context(small_federation[site])
        assert all(key_id in str(caught.value) for key_id in expected)
    with pytest.raises(KitError, match="no HE key set " + "ab" * 16):
        load_site_he_context(small_federation["b"], "ab" * 16)
    with pytest.raises(KitError, match="32 lower-case hex"):
        load_site_he_context(small_federation["b"], "../../etc")


def test_a_kit_without_keys_says_how_to_get_them(small_federation: dict[str, Path]) -> None:
    with pytest.raises(KitError, match="holds no HE key set; run `medtwin site keygen`"):
        load_site_he_context(small_federation["b"])


def test_installed_secret_with_loose_permissions_is_refused(small_federation: dict[str, Path], tmp_path: Path) -> None:
    params = choose_ckks_parameters(**SMALL_PARAMS)
    result = steward_generate_he_keys(small_federation["a"], params, outbox_dir=tmp_path / "outbox")
    assert result.public_context_path == tmp_path / "outbox" / "public_context.bin"
    result.secret_context_path.chmod(0o640)
    with pytest.raises(KitError, match="chmod 600"):
        load_site_he_context(small_federation["a"], result.key_id)


def test_site_keygen_derives_the_precision_from_the_runs_dp_noise_like_the_simulation(tmp_path: Path) -> None:
    """One code path: the deployed steward, given the run's overrides, picks the parameters a simulation
    of that run would (1 % of the DP noise); without them, the configured default."""
    from dataclasses import replace

    from typer.testing import CliRunner

    from medtwin.core.config import compose_config
    from medtwin.core.he import ckks_parameters_from_config, he_precision_of_run
    from medtwin.experiments.cli import app

    _, kits = joined_kits(tmp_path, SITES, "keygen")
    run = ["task=csv_example", "privacy=dp", "privacy.target_epsilon=1", "strategy.learning_rate=0.1"]
    common = ["site", "keygen", "--kit", str(kits["hosp0"]), "--num-parameters", "7", "--num-sites", "3", "--max-total-examples", "400"]
    noisy = CliRunner(env={"COLUMNS": "300"}).invoke(app, [*common, *run])
    assert noisy.exit_code == 0, noisy.output
    config = compose_config(["crypto=ckks", *run])
    config = replace(config, crypto=replace(config.crypto, max_total_examples=400))
    precision = he_precision_of_run(config, num_sites=3, max_total_examples=400, grouped_by_patient=False)
    assert precision.derived_from == "dp" and precision.max_relative_error > 1e-5
    expected = ckks_parameters_from_config(config.crypto, num_parameters=7, num_sites=3, max_relative_error=precision.max_relative_error)
    assert f"N={expected.poly_modulus_degree}, primes {expected.coeff_mod_bit_sizes}" in noisy.output
    assert f"precision target {precision.max_relative_error:.3g} (dp" in noisy.output
    default = CliRunner(env={"COLUMNS": "300"}).invoke(app, common)
    assert default.exit_code == 0, default.output
    assert "precision target 1e-05 (config" in default.output
    default_crypto = replace(compose_config(["crypto=ckks"]).crypto, max_total_examples=400)
    at_default = ckks_parameters_from_config(default_crypto, num_parameters=7, num_sites=3)
    assert f"N={at_default.poly_modulus_degree}, primes {at_default.coeff_mod_bit_sizes}" in default.output
    assert expected.data_bits < at_default.data_bits  # the DP run pays fewer bits
