"""Real parties on Flower's deployment engine, on loopback: a TLS SuperLink with SuperNode authentication,
three hospitals' SuperNodes (each a separate process tree with keys born at the site), and both anvil
chains. The apps are the ones pyproject.toml names (`medtwin.experiments.flower_apps`): the coordinator
records admissions and anchors on the chains, each site reads its approval and each round's anchor
from the chain folder its own site file names. Three encrypted DP rounds of breast_cancer (3 sites).

The module starts the parties once (the SuperNodes at once, as three hospitals would) and both tests
submit their own runs to them; each test asserts only on its own run ids. The kill/resume test runs
last: it SIGKILLs a hospital and the coordinator. Every process is stopped by PID in the module
fixtures' finalizers, also when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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
NUM_ROUNDS = 2  # round 2 starts from a verified encrypted aggregate; more rounds add time, not coverage
TASK = ["task=breast_cancer", "task.num_sites=3"]


@dataclass
class Deployment:
    root: Path
    admin_dir: Path
    site_files: dict[str, Path]
    state_dirs: dict[str, Path]
    coordinator: CoordinatorProcess
    sites: dict[str, SiteProcess]
    timings: dict[str, float] = field(default_factory=dict)  # the module's setup phases


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


@pytest.fixture(scope="module")
def parties() -> Iterator[list]:
    """Every process the module starts; stopped by PID (sites first, then the SuperLink) even when a test fails."""
    started: list = []
    yield started
    survivors = []
    for party in reversed(started):
        try:
            party.stop()
        except DeploymentError as error:
            survivors.append(str(error))
    assert not survivors, survivors


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, parties: list) -> Iterator[Deployment]:
    """Keys born at each hospital, the admin's provisioning, the coordinator's SuperLink and the three
    hospitals' SuperNodes (started at once); both anvil chains (started by the first proposal) are
    stopped by PID at the end."""
    from medtwin.chain import chain_down

    root = tmp_path_factory.mktemp("deployment")
    timings: dict[str, float] = {}
    try:
        started = time.monotonic()
        kits = {site: root / site / "kit" for site in SITES}
        public_files = [init_site_identity(kits[site], site_id=site) for site in SITES]  # at each hospital
        admin = provision_federation(root / "admin", federation_name="deploy-test", site_public_files=public_files)
        for site in SITES:
            join_federation(kits[site], admin.manifest_path)
        site_files = {site: write_site_file(root, site, index, kits[site]) for index, site in enumerate(SITES)}
        timings["identities + provision + join"] = time.monotonic() - started

        started = time.monotonic()
        coordinator = CoordinatorProcess(admin.root, root / "coordinator")
        parties.append(coordinator)
        coordinator.start()
        ports = dict(zip(SITES, free_ports(len(SITES)), strict=True))  # chosen apart: three starts at once cannot pick one port twice
        sites = {site: SiteProcess(site_files[site], coordinator.address, port=ports[site], max_wait_time_s=20) for site in SITES}
        parties.extend(sites.values())
        with ThreadPoolExecutor(max_workers=len(SITES)) as pool:
            list(pool.map(SiteProcess.start, sites.values()))  # each raises here if its SuperNode did not connect
        timings["coordinator + 3 SuperNodes start"] = time.monotonic() - started
        yield Deployment(
            root=root, admin_dir=admin.root, site_files=site_files, state_dirs={site: root / site / "state" for site in SITES},
            coordinator=coordinator, sites=sites, timings=timings,
        )  # fmt: skip
    finally:
        chain_down(root / "chain")


def propose_and_approve(
    deployment: Deployment, *overrides: str, rounds: int = NUM_ROUNDS, timeout_s: float = 120, approvers: tuple[str, ...] = SITES
) -> tuple[str, str]:
    """The coordinator's proposal (what it runs); the admin registers the sites on the auth chain and each
    hospital approves exactly that text there."""
    from medtwin.core.identity import load_manifest
    from medtwin.experiments.chain_wiring import approve_run_on_chain, enrol_federation, open_chains

    run_id = f"deploy-{time.time_ns()}"
    config = compose_config(
        [
            *TASK, "privacy=dp", "privacy.target_epsilon=3", "privacy.target_delta=1e-5",
            f"federation.num_rounds={rounds}", "federation.min_sites=2", f"federation.round_timeout_s={timeout_s:g}",
            "strategy.local_steps=20", "strategy.batch_size=8",
            f"runs_dir={deployment.root / 'runs'}", f"run_id={run_id}", "progress=false", "baselines.enabled=false",
            "chain=anvil", f"chain.state_dir={deployment.root / 'chain'}", "chain.auth_port=0", "chain.data_port=0",
            *overrides,
        ]
    )  # fmt: skip
    text = config_to_yaml(config)
    session = open_chains(config.chain)  # starts both anvil nodes the first time (stopped by the `deployment` fixture)
    kits = {site: deployment.root / site / "kit" for site in SITES}
    if approvers == SITES:  # the admin registers the sites not registered yet; every site approves
        enrol_federation(session, load_manifest(deployment.admin_dir), run_id=run_id, proposal_text=text, site_kits=kits)
    else:  # the sites are registered already; only `approvers` approve this run with their own accounts
        for site in approvers:
            approve_run_on_chain(session, site_id=site, kit_dir=kits[site], run_id=run_id, proposal_text=text)
    return run_id, text


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


def refuse_unregistered_and_plaintext_supernodes(deployment: Deployment, parties: list) -> dict[str, float]:
    """A SuperNode with a key the coordinator never registered, and a plaintext one, try to join at the same
    time; the SuperLink refuses both."""
    coordinator, started = deployment.coordinator, time.monotonic()
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
        rogue = SiteProcess(rogue_site_file(deployment), coordinator.address, max_wait_time_s=10, max_retries=2, activation_patience_s=0)
        parties.append(rogue)
        with pytest.raises(DeploymentError, match="refused this SuperNode's key"):
            rogue.start()
        unregistered_refused_s = time.monotonic() - started
        returncode = insecure.wait(timeout=60)
    finally:
        still_running = tree.stop()
    assert not still_running and returncode != 0, insecure_log.read_text()
    return {"unregistered SuperNode refused": unregistered_refused_s, "plaintext SuperNode refused": time.monotonic() - started}


def check_run_results(deployment: Deployment, run_dir: Path, run_id: str) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == NUM_ROUNDS
    assert summary["sites"] == sorted(SITES)
    for site_id, state_dir in deployment.state_dirs.items():
        ledger = json.loads((state_dir / "privacy-ledger.json").read_text())["ledger"]
        assert sorted(ledger["runs"][run_id]["rounds"]) == [str(n) for n in range(1, NUM_ROUNDS + 1)], site_id
        assert 0 < ledger["runs"][run_id]["epsilon"] <= 3.0 + 1e-6
    return summary


def test_three_hospitals_run_encrypted_dp_rounds_over_tls_with_the_chains_wired_in(deployment: Deployment, parties: list) -> None:
    """crypto=ckks: site0 (the key steward) makes the key set and wraps it for the others; the coordinator
    gets only the key-less public context (its path in the run config). Only registered SuperNodes join."""
    import torch

    from medtwin.core.he import ckks_parameters_from_config
    from medtwin.core.identity import install_he_secret, steward_generate_he_keys
    from medtwin.core.model_vector import model_to_vector
    from medtwin.core.tasks import get_task

    timings = dict(deployment.timings)
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

    coordinator, sites = deployment.coordinator, list(deployment.sites.values())
    assert {site.node_id for site in sites} == {coordinator.registered[site_id] for site_id in SITES}
    assert (deployment.root / "coordinator" / "superlink.db").is_file()
    timings |= refuse_unregistered_and_plaintext_supernodes(deployment, parties)
    assert sorted(online_nodes(coordinator)) == sorted(site.node_id for site in sites)

    run_id, proposal = propose_and_approve(deployment, "crypto=ckks", f"crypto.key_id={distribution.key_id}")
    proposal_file = deployment.root / "proposal-ckks.yaml"
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

    chain = open_readonly(deployment.root / "chain")
    anchors = chain.data.anchors(run_id)
    assert [anchor.round_index for anchor in anchors] == list(range(1, NUM_ROUNDS + 1))
    assert anchors[-1].aggregate_hash.removeprefix("0x") == summary["final_aggregate_sha256"]
    assert summary["chain"]["anchors_written"] == NUM_ROUNDS and summary["chain"]["backend"] == "anvil"
    admitted = {(d.site_id, d.round_index) for d in chain.auth.decisions(run_id=run_id) if d.granted and d.action == "admit_update"}
    # each site is registered with, and approved the run from, the chain account born in its own kit
    from medtwin.core.identity import chain_address_of, load_chain_account_key

    for site in SITES:
        own_address = chain_address_of(load_chain_account_key(deployment.root / site / "kit"))
        assert chain.auth.site(site).address.lower() == own_address.lower()
        assert chain.auth.approval(site_id=site, run_id=run_id) is not None
    assert admitted == {(site, round_) for site in SITES for round_ in range(1, NUM_ROUNDS + 1)}

    # a run site2 did not approve: site2 refuses it (signed), the others train it
    started = time.monotonic()
    run_id_2, proposal_2 = propose_and_approve(deployment, rounds=1, approvers=("site0", "site1"))
    proposal_file.write_text(proposal_2)
    run_dir_2 = submit_proposal(proposal_file, coordinator_state=deployment.root / "coordinator", public_context=None, timeout_s=300)
    assert json.loads((run_dir_2 / "summary.json").read_text())["rounds_completed"] == 1
    trained = [json.loads(line) for line in (run_dir_2 / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert trained[0]["participants"] == ["site0", "site1"] and trained[0]["rejected"]["site2"].startswith("refused:not_approved")
    timings["a run site2 did not approve (1 round)"] = time.monotonic() - started
    print("\nper-phase wall time (s):\n" + "\n".join(f"  {name:<70} {seconds:7.1f}" for name, seconds in timings.items()))


def sigkill(tree: ProcessTree) -> list[int]:
    """SIGKILL every process of a party at once (a machine losing power), by the PIDs its tree recorded."""
    tree.scan()
    pids = [process.pid for process in tree.seen if process.is_alive()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def wait_for(predicate, *, timeout_s: float, what: str) -> float:  # noqa: ANN001
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(0.2)
    return time.monotonic()


def replies_cover_ledger(deployment: Deployment, site_id: str, run_id: str) -> bool:
    """Every round the site's ledger spent on has its signed reply stored (nothing is still training)."""
    state = deployment.state_dirs[site_id]
    rounds = json.loads((state / "privacy-ledger.json").read_text())["ledger"]["runs"].get(run_id, {}).get("rounds", {})
    return all((state / "replies" / run_id / f"train-{int(round_):06d}.json").is_file() for round_ in rounds)


def metrics_of(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def record_of(run_dir: Path, phase: str, server_round: int) -> dict | None:
    return next((r for r in metrics_of(run_dir) if r.get("phase") == phase and r.get("round") == server_round), None)


def test_a_killed_hospital_costs_one_deadline_and_a_killed_coordinator_resumes_without_a_second_spend(
    deployment: Deployment, parties: list
) -> None:
    """DP rounds of 3 hospitals (plain aggregation, both chains). SIGKILL one hospital's whole process tree
    after round 1: round 2 closes at its deadline with the other two, naming the dead site; later rounds do
    not wait for it. SIGKILL the coordinator (SuperLink and ServerApp) once round 2 is checkpointed; start
    it again on the same state; `medtwin run --federation --resume` continues at round 3: every round is
    anchored once, and no site spends a round twice (a round it trained before the crash is resent)."""
    rounds, timeout_s = 3, 15.0  # the deadline: a live site's round 1 (a new run) takes ~5 s here, up to ~9 s on a loaded machine
    timings = dict(deployment.timings)
    coordinator, sites = deployment.coordinator, deployment.sites
    run_id, proposal = propose_and_approve(deployment, rounds=rounds, timeout_s=timeout_s)
    proposal_file = deployment.root / "proposal-kill.yaml"
    proposal_file.write_text(proposal)
    run_dir = deployment.root / "runs" / run_id
    first_attempt: dict[str, object] = {}

    def submit() -> None:
        try:
            first_attempt["run_dir"] = submit_proposal(proposal_file, coordinator_state=deployment.root / "coordinator", public_context=None, timeout_s=600)
        except Exception as error:  # noqa: BLE001 - the coordinator is killed under it
            first_attempt["error"] = error

    submitter = threading.Thread(target=submit, daemon=True)
    submitter.start()
    wait_for(lambda: record_of(run_dir, "train", 1) is not None, timeout_s=300, what="round 1")
    assert sigkill(sites["site2"]._tree)
    killed_at = time.monotonic()
    closed_at = wait_for(lambda: record_of(run_dir, "train", 2) is not None, timeout_s=120, what="round 2")
    train_2, evaluate_1 = record_of(run_dir, "train", 2), record_of(run_dir, "evaluate", 1)
    assert train_2["participants"] == ["site0", "site1"], train_2
    # named by its site in whichever phase it died in (then it sits out, not waited for again)
    assert (evaluate_1 or {}).get("missed", []) + train_2["missed"] == ["site2"], (evaluate_1, train_2)
    timings["SIGKILL of a SuperNode -> round 2 closed"] = closed_at - killed_at

    checkpoint = run_dir / "checkpoints" / "round-00002.json"
    wait_for(checkpoint.is_file, timeout_s=120, what="round 2's checkpoint")
    assert sigkill(coordinator._tree)
    # the hospitals keep running: a round one had begun finishes there and its signed reply is kept; their
    # SuperNodes retry until the SuperLink is back
    for site_id in ("site0", "site1"):
        wait_for(lambda: replies_cover_ledger(deployment, site_id, run_id), timeout_s=60, what=f"{site_id}'s round to finish")
    coordinator.stop()
    submitter.join(timeout=120)
    assert "run_dir" not in first_attempt, "the first attempt cannot have finished: its coordinator was killed"

    started = time.monotonic()
    coordinator = CoordinatorProcess(deployment.admin_dir, deployment.root / "coordinator", port=coordinator.port)
    parties.append(coordinator)
    coordinator.start()
    wait_for(lambda: len(online_nodes(coordinator)) == 2, timeout_s=120, what="the two live SuperNodes to reconnect")
    timings["coordinator restarted, 2 SuperNodes reconnected"] = time.monotonic() - started
    started = time.monotonic()
    resumed = submit_proposal(
        proposal_file, coordinator_state=deployment.root / "coordinator", public_context=None, timeout_s=600, resume=run_id
    )
    timings[f"resumed run (rounds 3..{rounds})"] = time.monotonic() - started
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["rounds_completed"] == rounds and summary["resumed_after_round"] == 2
    trains = [(r["round"], r["participants"]) for r in metrics_of(run_dir) if r.get("phase") == "train"]
    assert [round_ for round_, _ in trains] == list(range(1, rounds + 1))  # each round once in metrics.jsonl
    assert all("site2" not in participants for round_, participants in trains if round_ >= 2)
    waits = [r.get("time_s", 0.0) for r in metrics_of(run_dir) if r.get("phase") == "train" and r["round"] >= 3]
    timings.update({f"round {r['round']} {r['phase']}": r.get("time_s", 0.0) for r in metrics_of(run_dir)})
    assert max(waits) < timeout_s, waits  # later rounds never waited for the dead site

    from medtwin.chain import open_readonly

    anchors = open_readonly(deployment.root / "chain").data.anchors(run_id)
    assert [anchor.round_index for anchor in anchors] == list(range(1, rounds + 1))  # no round anchored twice
    for site_id in ("site0", "site1"):
        ledger = json.loads((deployment.state_dirs[site_id] / "privacy-ledger.json").read_text())["ledger"]
        assert sorted(ledger["runs"][run_id]["rounds"], key=int) == [str(n) for n in range(1, rounds + 1)], site_id
        assert summary["privacy"][site_id]["epsilon"] == pytest.approx(ledger["runs"][run_id]["epsilon"]), site_id
    print("\nper-phase wall time (s):\n" + "\n".join(f"  {name:<70} {seconds:7.1f}" for name, seconds in timings.items()))


def coordinator_bin() -> str:
    import sys

    return str(Path(sys.executable).parent)


def free_ports(count: int) -> list[int]:
    """`count` different loopback ports free now (every probe stays bound until all are chosen)."""
    import socket
    from contextlib import ExitStack

    with ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]


def free_port() -> int:
    return free_ports(1)[0]


def offline_env(flwr_home: Path) -> dict[str, str]:
    import os

    from medtwin.experiments.flower_local import OFFLINE_ENVIRONMENT

    flwr_home.mkdir(parents=True, exist_ok=True)
    return {**os.environ, **OFFLINE_ENVIRONMENT, "FLWR_HOME": str(flwr_home), "PATH": f"{coordinator_bin()}:{os.environ.get('PATH', '')}"}
