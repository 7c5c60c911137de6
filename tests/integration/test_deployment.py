"""Real parties on Flower's deployment engine, on loopback: a TLS SuperLink with SuperNode authentication,
three hospitals' SuperNodes (each a separate process tree with keys born at the site), and both anvil
chains. The apps are the ones pyproject.toml names (`medtwin.experiments.flower_apps`): the coordinator
records admissions and anchors on the chains, each site reads its approval and each round's anchor
from the chain folder its own site file names. Three encrypted DP rounds of breast_cancer (3 sites).
Every process is stopped by PID in the fixtures' finalizers, also when the test fails.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from medtwin.core.config import compose_config, config_to_yaml
from medtwin.core.identity import init_site_identity, join_federation, provision_federation
from medtwin.experiments.cli_deploy import submit_proposal
from medtwin.experiments.deployment import (
    CoordinatorProcess,
    DeploymentError,
    SiteProcess,
    list_supernodes,
)
from medtwin.experiments.flower_local import ProcessTree

pytestmark = pytest.mark.slow

SITES = ("site0", "site1", "site2")  # breast_cancer split into 3 hospitals; index = position
NUM_ROUNDS = 3
TASK = ["task=breast_cancer", "task.num_sites=3"]


@dataclass
class Deployment:
    root: Path
    admin_dir: Path
    site_files: dict[str, Path]
    state_dirs: dict[str, Path]
    timings: dict[str, float] = field(default_factory=dict)


def write_site_file(root: Path, site_id: str, index: int, kit_dir: Path) -> Path:
    path = root / site_id / "site.yaml"
    document = {
        "site_id": site_id,
        "data": {"builtin": {"task": "breast_cancer", "index": index, "num_sites": len(SITES)}},
        "accept": {"tasks": ["breast_cancer"], "max_rounds": 20, "max_local_steps": 200},
        "privacy": {"max_epsilon": 3.0, "max_delta": 1e-4},
        "evaluation": {"release": "rounded", "min_participants": 2},
        "approvals": "chain",
        "chain": {"state_dir": str(root / "chain")},
        "kit_dir": str(kit_dir),
        "state_dir": str(root / site_id / "state"),
    }
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
def deployment(tmp_path: Path) -> Deployment:
    started = time.monotonic()
    kits = {site: tmp_path / site / "kit" for site in SITES}
    public_files = [init_site_identity(kits[site], site_id=site) for site in SITES]  # at each hospital
    admin = provision_federation(tmp_path / "admin", federation_name="deploy-test", site_public_files=public_files)
    for site in SITES:
        join_federation(kits[site], admin.manifest_path)
    site_files = {site: write_site_file(tmp_path, site, index, kits[site]) for index, site in enumerate(SITES)}
    result = Deployment(
        root=tmp_path, admin_dir=admin.root, site_files=site_files, state_dirs={site: tmp_path / site / "state" for site in SITES}
    )
    result.timings["identities + provision + join"] = time.monotonic() - started
    return result


def propose_and_approve(deployment: Deployment, *overrides: str) -> tuple[str, str]:
    """The coordinator's proposal (what it runs); the admin registers the sites on the auth chain and each
    hospital approves exactly that text there."""
    from medtwin.core.identity import load_manifest
    from medtwin.experiments.chain_wiring import enrol_federation, open_chains

    run_id = f"deploy-{time.time_ns()}"
    config = compose_config(
        [
            *TASK, "privacy=dp", "privacy.target_epsilon=3", "privacy.target_delta=1e-5",
            f"federation.num_rounds={NUM_ROUNDS}", "federation.min_sites=2", "federation.round_timeout_s=120",
            "strategy.local_steps=20", "strategy.batch_size=8",
            f"runs_dir={deployment.root / 'runs'}", f"run_id={run_id}", "progress=false", "baselines.enabled=false",
            "chain=anvil", f"chain.state_dir={deployment.root / 'chain'}", "chain.auth_port=0", "chain.data_port=0",
            *overrides,
        ]
    )  # fmt: skip
    text = config_to_yaml(config)
    session = open_chains(config.chain)  # starts both anvil nodes (stopped by the `chains` fixture)
    kits = {site: deployment.root / site / "kit" for site in SITES}
    enrol_federation(session, load_manifest(deployment.admin_dir), run_id=run_id, proposal_text=text, site_kits=kits)
    return run_id, text


@pytest.fixture
def chains(deployment: Deployment) -> Iterator[Path]:
    from medtwin.chain import chain_down

    yield deployment.root / "chain"
    chain_down(deployment.root / "chain")


@pytest.fixture
def parties() -> Iterator[list]:
    """Every process the test starts; stopped by PID (sites first, then the SuperLink) even when the test fails."""
    started: list = []
    yield started
    survivors = []
    for party in reversed(started):
        try:
            party.stop()
        except DeploymentError as error:
            survivors.append(str(error))
    assert not survivors, survivors


def rogue_site_file(deployment: Deployment) -> Path:
    """A copy of site0's kit with a fresh SuperNode key the coordinator never registered."""
    source = deployment.site_files["site0"]
    document = yaml.safe_load(source.read_text())
    kit = deployment.root / "rogue" / "kit"
    kit.mkdir(parents=True, mode=0o700)
    for name in ("ca_cert.pem", "federation.json", "site.json", "signing_key.pem", "key_agreement_key.pem"):
        (kit / name).write_bytes((Path(document["kit_dir"]) / name).read_bytes())
        (kit / name).chmod(0o600)
    key = ec.generate_private_key(ec.SECP384R1())
    (kit / "supernode_auth_key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    (kit / "supernode_auth_key").chmod(0o600)
    document.update(kit_dir=str(kit), state_dir=str(deployment.root / "rogue" / "state"))
    path = deployment.root / "rogue" / "site.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def online_nodes(coordinator: CoordinatorProcess) -> list[str]:
    return [node["node-id"] for node in list_supernodes(coordinator.flwr_home, coordinator.connection) if node["status"] == "online"]


def refuse_unregistered_and_plaintext_supernodes(deployment: Deployment, coordinator: CoordinatorProcess, parties: list) -> None:
    timings = deployment.timings
    started = time.monotonic()
    rogue = SiteProcess(rogue_site_file(deployment), coordinator.address, max_wait_time_s=10, max_retries=2)
    parties.append(rogue)
    with pytest.raises(DeploymentError, match="refused this SuperNode's key"):
        rogue.start()
    timings["unregistered SuperNode refused"] = time.monotonic() - started
    started = time.monotonic()
    insecure_log = deployment.root / "insecure-supernode.log"
    with insecure_log.open("wb") as log_file:
        insecure = subprocess.Popen(
            [str(Path(coordinator_bin()) / "flower-supernode"), "--insecure", "--superlink", coordinator.address,
             "--port", str(free_port()), "--max-wait-time", "10", "--max-retries", "2"],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env=offline_env(deployment.root / "insecure-home"),
        )  # fmt: skip
    tree = ProcessTree(insecure)
    try:
        returncode = insecure.wait(timeout=60)
    finally:
        assert not tree.stop()
    assert returncode != 0, insecure_log.read_text()
    timings["plaintext SuperNode refused"] = time.monotonic() - started


def check_run_results(deployment: Deployment, run_dir: Path, run_id: str) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == NUM_ROUNDS
    assert summary["sites"] == sorted(SITES)
    for site_id, state_dir in deployment.state_dirs.items():
        ledger = json.loads((state_dir / "privacy-ledger.json").read_text())["ledger"]
        assert sorted(ledger["runs"][run_id]["rounds"]) == [str(n) for n in range(1, NUM_ROUNDS + 1)], site_id
        assert 0 < ledger["runs"][run_id]["epsilon"] <= 3.0 + 1e-6
    return summary


def test_three_hospitals_run_encrypted_dp_rounds_over_tls_with_the_chains_wired_in(
    deployment: Deployment, parties: list, chains: Path
) -> None:
    """crypto=ckks: site0 (the key steward) makes the key set and wraps it for the others; the coordinator
    gets only the key-less public context (its path in the run config). Only registered SuperNodes join."""
    import torch

    from medtwin.core.he import ckks_parameters_from_config
    from medtwin.core.identity import install_he_secret, steward_generate_he_keys
    from medtwin.core.model_vector import model_to_vector
    from medtwin.core.tasks import get_task

    timings = deployment.timings
    started = time.monotonic()
    config = compose_config([*TASK, "crypto=ckks"])
    task = get_task(config.task)
    crypto = replace(config.crypto, max_total_examples=2 * sum(site.num_train for site in task.load_all_sites()))
    torch.manual_seed(config.seed)
    parameters = ckks_parameters_from_config(crypto, num_parameters=int(model_to_vector(task.build_model()).size), num_sites=config.task.num_sites)
    kits = {site: deployment.root / site / "kit" for site in SITES}
    distribution = steward_generate_he_keys(kits["site0"], parameters, outbox_dir=deployment.root / "steward-outbox")
    for site_id, envelope in distribution.envelope_paths.items():
        install_he_secret(kits[site_id], envelope)  # each hospital opens its own envelope
    timings["steward keygen + envelopes"] = time.monotonic() - started

    started = time.monotonic()
    coordinator = CoordinatorProcess(deployment.admin_dir, deployment.root / "coordinator")
    parties.append(coordinator)
    coordinator.start()
    sites = [SiteProcess(deployment.site_files[site], coordinator.address, max_wait_time_s=20) for site in SITES]
    for site in sites:
        parties.append(site)
        site.start()
    timings["coordinator + 3 SuperNodes start"] = time.monotonic() - started
    assert {site.node_id for site in sites} == {coordinator.registered[site_id] for site_id in SITES}
    assert (deployment.root / "coordinator" / "superlink.db").is_file()
    refuse_unregistered_and_plaintext_supernodes(deployment, coordinator, parties)
    assert sorted(online_nodes(coordinator)) == sorted(site.node_id for site in sites)

    run_id, proposal = propose_and_approve(deployment, "crypto=ckks", f"crypto.key_id={distribution.key_id}")
    proposal_file = deployment.root / "proposal.yaml"
    proposal_file.write_text(proposal)
    started = time.monotonic()
    run_dir = submit_proposal(  # what `medtwin run --federation <state> --proposal <file>` does
        proposal_file, coordinator_state=deployment.root / "coordinator", public_context=distribution.public_context_path, timeout_s=900
    )
    timings[f"CKKS + DP run ({NUM_ROUNDS} rounds, 3 sites, both chains)"] = time.monotonic() - started
    assert run_dir == deployment.root / "runs" / run_id
    summary = check_run_results(deployment, run_dir, run_id)
    assert summary["crypto"]["scheme"] == "ckks"
    # summary, chains and ledgers agree: one anchor per round, with each site's signed epsilon
    from medtwin.chain import open_readonly

    chain = open_readonly(chains)
    anchors = chain.data.anchors(run_id)
    assert [anchor.round_index for anchor in anchors] == list(range(1, NUM_ROUNDS + 1))
    assert anchors[-1].aggregate_hash.removeprefix("0x") == summary["final_aggregate_sha256"]
    assert summary["chain"]["anchors_written"] == NUM_ROUNDS and summary["chain"]["backend"] == "anvil"
    admitted = {(d.site_id, d.round_index) for d in chain.auth.decisions() if d.granted and d.action == "admit_update"}
    # each site is registered with, and approved the run from, the chain account born in its own kit
    from medtwin.core.identity import chain_address_of, load_chain_account_key

    for site in SITES:
        own_address = chain_address_of(load_chain_account_key(deployment.root / site / "kit"))
        assert chain.auth.site(site).address.lower() == own_address.lower()
        assert chain.auth.approval(site_id=site, run_id=run_id) is not None
    assert admitted == {(site, round_) for site in SITES for round_ in range(1, NUM_ROUNDS + 1)}
    started = time.monotonic()
    for party in reversed(parties):
        party.stop()
    timings["stop everything"] = time.monotonic() - started
    print("\nper-phase wall time (s):\n" + "\n".join(f"  {name:<70} {seconds:7.1f}" for name, seconds in timings.items()))


def coordinator_bin() -> str:
    import sys

    return str(Path(sys.executable).parent)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def offline_env(flwr_home: Path) -> dict[str, str]:
    import os

    from medtwin.experiments.flower_local import OFFLINE_ENVIRONMENT

    flwr_home.mkdir(parents=True, exist_ok=True)
    return {**os.environ, **OFFLINE_ENVIRONMENT, "FLWR_HOME": str(flwr_home), "PATH": f"{coordinator_bin()}:{os.environ.get('PATH', '')}"}
