"""crypto=ckks through the whole simulated federation: same model as plaintext FedAvg, no key at the coordinator.

Two 2-round Fed-Heart-Disease runs in Flower's simulation engine (Ray) — one with CKKS-encrypted
aggregation, one in plaintext, same seed — then their run directories are compared.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from medtwin.client.codec import CkksSiteCodec
from medtwin.core.artifacts import ArtifactStore
from medtwin.core.config import MedtwinConfig, compose_config
from medtwin.core.he import SECURITY_TABLE_BITS
from medtwin.core.plain_payload import average_from_sum
from medtwin.core.protocol import record_from_bytes

pytestmark = pytest.mark.slow

SITES = ["cleveland", "hungarian", "switzerland", "va"]


@dataclass(frozen=True)
class Run:
    config: MedtwinConfig
    path: Path

    @property
    def summary(self) -> dict:
        return json.loads((self.path / "summary.json").read_text())

    def final_aggregate(self):
        return record_from_bytes(ArtifactStore(self.path / "artifacts").get(self.summary["final_aggregate_sha256"]))


def _simulate(tmp: Path, crypto: str) -> Run:
    from medtwin.experiments.simulate import simulate

    config = compose_config(
        [
            "task=fed_heart_disease",
            "federation.num_rounds=2",
            f"crypto={crypto}",
            "baselines.enabled=false",
            "progress=false",
            f"runs_dir={tmp / crypto / 'runs'}",
        ]
    )
    return Run(config=config, path=simulate(config))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    tmp = tmp_path_factory.mktemp("encrypted-simulation")
    return {crypto: _simulate(tmp, crypto) for crypto in ("ckks", "plain")}


def _site_kits(run: Run) -> dict[str, Path]:
    from medtwin.experiments.federation_setup import site_kit_dir

    return {site: site_kit_dir(run.config, site) for site in SITES}


def _codec(run: Run, site: str) -> CkksSiteCodec:
    """The site's codec for the run's key set (a hospital's kit keeps one key set per CKKS run)."""
    key_id = yaml.safe_load((run.path / "config.yaml").read_text())["crypto"]["key_id"]
    return CkksSiteCodec.from_kit(_site_kits(run)[site], key_id)


def test_runs_complete_with_every_site_and_no_rejection(runs: dict[str, Run]) -> None:
    for crypto, run in runs.items():
        summary = run.summary
        assert summary["rounds_completed"] == 2, crypto
        assert summary["sites"] == SITES, crypto
        assert summary["rejections"] == [], crypto
        assert summary["crypto"]["scheme"] == crypto


def test_ckks_parameters_are_128_bit_secure(runs: dict[str, Run]) -> None:
    crypto = runs["ckks"].summary["crypto"]
    parameters = crypto["parameters"]
    degree = parameters["poly_modulus_degree"]
    assert parameters["security_level"] == 128
    assert degree in SECURITY_TABLE_BITS[128]
    assert sum(parameters["coeff_mod_bit_sizes"]) <= SECURITY_TABLE_BITS[128][degree]
    assert parameters["num_parameters"] == crypto["num_parameters"] > 0
    assert crypto["bytes_per_parameter"] > runs["plain"].summary["crypto"]["bytes_per_parameter"]


def test_measured_decryption_error_is_within_the_bound(runs: dict[str, Run]) -> None:
    crypto = runs["ckks"].summary["crypto"]
    bound = crypto["max_decryption_error_bound"]
    assert 0.0 < bound < 1e-3
    assert crypto["max_decryption_error"] is not None
    assert 0.0 <= crypto["max_decryption_error"] <= max(1e-4, bound)


def test_decrypted_final_aggregate_matches_the_sites_plaintext_updates(runs: dict[str, Run]) -> None:
    """Absolute error of the last round's average, recomputed from the sites' kept plaintext updates."""
    run = runs["ckks"]
    kits = _site_kits(run)
    codec = _codec(run, "va")
    average, total = codec.average(run.final_aggregate())
    last_train = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    participants = [record for record in last_train if record["phase"] == "train"][-1]["participants"]
    assert participants == SITES
    packed = sum(np.load(kits[site] / "state" / f"last-update-{run.config.run_id}.npy") for site in participants)
    exact = packed[:-1] / packed[-1]
    assert total == packed[-1]
    assert float(np.max(np.abs(average - exact))) <= codec.error_bound(total_examples=total)


def test_encrypted_run_trains_the_plaintext_model(runs: dict[str, Run]) -> None:
    ckks_average, ckks_total = _codec(runs["ckks"], "cleveland").average(runs["ckks"].final_aggregate())
    plain_average, plain_total = average_from_sum(runs["plain"].final_aggregate())
    assert ckks_total == plain_total
    np.testing.assert_allclose(ckks_average, plain_average, rtol=0, atol=1e-3)

    ckks_sites = runs["ckks"].summary["final_metrics"]["sites"]
    plain_sites = runs["plain"].summary["final_metrics"]["sites"]
    assert set(ckks_sites) == set(plain_sites) == set(SITES)
    for site in SITES:
        test_examples = plain_sites[site]["n"]
        assert ckks_sites[site]["n"] == test_examples
        # at most one test example classified differently (1/16 for Switzerland)
        assert abs(ckks_sites[site]["accuracy"] - plain_sites[site]["accuracy"]) <= 1 / test_examples + 1e-9, site


def test_coordinator_run_directory_holds_no_secret(runs: dict[str, Run]) -> None:
    run = runs["ckks"]
    kits = _site_kits(run)
    files = [path for path in run.path.rglob("*") if path.is_file()]
    assert files and not any(path.name == "secret_context.bin" for path in files)
    for kit in kits.values():
        assert run.path not in kit.parents  # kits live beside the run directory, never inside it
    key_id = yaml.safe_load((run.path / "config.yaml").read_text())["crypto"]["key_id"]
    secret = (kits["cleveland"] / "he" / key_id / "secret_context.bin").read_bytes()
    assert all((kit / "he" / key_id / "secret_context.bin").read_bytes() == secret for kit in kits.values())
    # windows of the secret context that the public one does not share: the key material (a few KB for N = 1024)
    from medtwin.experiments.federation_setup import kits_root

    public_context = next(kits_root(run.config, run.config.run_id).rglob("public_context.bin")).read_bytes()
    windows = [secret[start : start + 48] for start in range(len(secret) - 48, len(secret) // 2, -241)]
    windows = [window for window in windows if window not in public_context]
    assert len(windows) >= 5
    site_private_keys = [(kit / "signing_key.pem").read_bytes() for kit in kits.values()]
    for path in files:
        data = path.read_bytes()
        assert not any(window in data for window in windows), f"{path} holds HE secret-key bytes"
        assert b"PRIVATE KEY" not in data, f"{path} holds a private key"
        assert not any(key in data for key in site_private_keys), path
    config_text = (run.path / "config.yaml").read_text()
    assert "secret_context" not in config_text and ".medtwin-kits" not in config_text and "BEGIN" not in config_text
