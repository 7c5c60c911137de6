"""Provenance end to end: a real simulated run (CKKS + DP) anchored on two real anvil chains, audited
from a fresh process, tampered with, run again with a revoked site, and re-audited after a node restart.

One 2-round Fed-Heart-Disease run is shared by the module; a second 1-round run revokes one site.
Needs anvil from npm (`npm install` at the repository root). Nodes run on free loopback ports in a tmp
state folder and are always stopped by PID in the fixture's finalizer, even when a test fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from medtwin.chain import AnvilNotFoundError, chain_down, chain_up, open_readonly, open_session, run_key
from medtwin.chain.backends import find_anvil, read_node
from medtwin.chain.encoding import label32
from medtwin.core.artifacts import ArtifactStore
from medtwin.core.config import MedtwinConfig, compose_config

pytestmark = pytest.mark.slow

SITES = ["cleveland", "hungarian", "switzerland", "va"]
RUN = "prov-run"
REVOKED_RUN = "prov-run-revoked"
REVOKED_SITE = "va"


@dataclass(frozen=True)
class Run:
    config: MedtwinConfig
    path: Path

    @property
    def state_dir(self) -> Path:
        return Path(self.config.chain.state_dir)

    @property
    def runs_dir(self) -> Path:
        return Path(self.config.runs_dir)

    @property
    def summary(self) -> dict[str, Any]:
        return json.loads((self.path / "summary.json").read_text())

    def records(self, phase: str) -> list[dict[str, Any]]:
        lines = (self.path / "metrics.jsonl").read_text().splitlines()
        return [record for record in map(json.loads, lines) if record["phase"] == phase]


def run_config(tmp: Path, *, run_id: str, rounds: int) -> MedtwinConfig:
    return compose_config(
        [
            "task=fed_heart_disease",
            f"federation.num_rounds={rounds}",
            "baselines.enabled=false",
            "progress=false",
            f"runs_dir={tmp / 'runs'}",
            "chain=anvil",
            f"chain.state_dir={tmp / 'chain'}",
            "chain.auth_port=0",  # 0 = a free port, chosen when the node starts
            "chain.data_port=0",
            "privacy=dp",
            "privacy.target_epsilon=1.0",
            "crypto=ckks",
            f"run_id={run_id}",
        ]
    )


def assert_nodes_stopped(state_dir: Path) -> None:
    chain_down(state_dir)  # by the PIDs recorded in nodes/*.pid
    for role in ("auth", "data"):
        node = read_node(state_dir, role)
        if node is not None:
            with pytest.raises(ProcessLookupError):
                os.kill(node.pid, 0)


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    try:
        find_anvil()
    except AnvilNotFoundError as error:
        pytest.fail(f"anvil is not installed — run `npm install` at the repository root.\n{error}")
    from medtwin.experiments.simulate import simulate

    tmp = tmp_path_factory.mktemp("provenance-run")
    config = run_config(tmp, run_id=RUN, rounds=2)
    try:
        yield Run(config=config, path=simulate(config))
    finally:
        assert_nodes_stopped(Path(config.chain.state_dir))


@pytest.fixture(scope="module")
def revoked_run(chain_run: Run) -> Run:
    """A second run on the same chains; the admin revokes one site after enrolment, before round 1.

    The sites' own chain check is stale (it approves whatever it is asked — a site that has not
    heard of its revocation), so the revoked site really trains and replies: the coordinator's
    admission check against the auth chain is what has to keep its update out.
    """
    from medtwin.experiments import simulate as simulate_module

    connect_chains = simulate_module.connect_chains

    class StaleSiteCheck:  # a RunApprovalCheck (core/provenance.py) that never looks at the chain
        def problem(self, **_binding: str) -> None:
            return None

        def aggregate_problem(self, **_binding: object) -> None:
            return None

    def connect_then_revoke(config, setup):
        provenance = connect_chains(config, setup)
        receipt = provenance.session.auth.revoke_site(site_id=REVOKED_SITE, reason="key compromised")
        assert receipt.mined, receipt
        return provenance

    config = run_config(chain_run.state_dir.parent, run_id=REVOKED_RUN, rounds=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(simulate_module, "connect_chains", connect_then_revoke)
        patch.setattr(simulate_module, "site_approval_check", lambda site_file: StaleSiteCheck())
        path = simulate_module.simulate(config)
    return Run(config=config, path=path)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`medtwin …` in a fresh Python process: it knows only the chain state folder and the runs folder."""
    return subprocess.run(
        [sys.executable, "-m", "medtwin.experiments.cli", *args],
        capture_output=True, text=True, timeout=180, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip


def cli_json(*args: str) -> tuple[int, dict[str, Any]]:
    done = cli(*args, "--json")
    assert done.stdout.strip(), done.stderr
    return done.returncode, json.loads(done.stdout)


def verify(run: Run, *, runs_dir: Path | None = None, run_id: str = RUN) -> tuple[int, dict[str, Any]]:
    return cli_json(
        "audit", "verify", run_id, "--state-dir", str(run.state_dir), "--runs-dir", str(runs_dir or run.runs_dir)
    )


@dataclass(frozen=True)
class ContractCall:
    method: str
    args: dict[str, Any]
    block: int
    sender: str


def contract_calls(gateway: Any, run_id: str) -> list[ContractCall]:
    """Every transaction sent to the gateway's contract about `run_id`, read block by block from the node."""
    w3, contract, key = gateway.client.w3, gateway.contract, run_key(run_id)
    calls = []
    for number in range(gateway.deploy_block, w3.eth.block_number + 1):
        for tx in w3.eth.get_block(number, full_transactions=True)["transactions"]:
            if (tx["to"] or "").lower() != contract.address.lower():
                continue
            function, args = contract.decode_function_input(tx["input"])
            if bytes(args.get("run_id", b"")) == key:
                calls.append(ContractCall(function.fn_name, dict(args), number, tx["from"]))
    return calls


def params_hash(parameters: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parameters, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


# -- the run and its chain footprint ---------------------------------------------------------------


def test_summary_chain_block_records_two_anchors_on_two_distinct_chains(chain_run: Run) -> None:
    summary = chain_run.summary
    assert summary["rounds_completed"] == 2
    assert summary["sites"] == SITES and summary["rejections"] == []
    chain = summary["chain"]
    assert chain["backend"] == "anvil"
    assert chain["anchors_written"] == 2
    assert chain["writes_pending_in_outbox"] == 0
    # finalized: every journaled write is in the anvil nodes' state dumps (a SIGKILL now loses nothing)
    assert chain["finalized"] is True
    assert all(journal["finalized_through"] == journal["writes"] > 0 for journal in chain["journal"].values()), chain["journal"]
    assert chain["chain_ids"]["auth"] != chain["chain_ids"]["data"]
    assert chain["chain_ids"] == {"auth": chain_run.config.chain.auth_chain_id, "data": chain_run.config.chain.data_chain_id}
    assert chain["auth"]["rpc_url"] != chain["data"]["rpc_url"]
    assert all(url.startswith("http://127.0.0.1:") for url in (chain["auth"]["rpc_url"], chain["data"]["rpc_url"]))
    session = open_readonly(chain_run.state_dir)
    assert session.auth.client.chain_id == chain["chain_ids"]["auth"]
    assert session.data.client.chain_id == chain["chain_ids"]["data"]
    anchors = session.data.anchors(RUN)
    assert [anchor.round_index for anchor in anchors] == [1, 2]
    for anchor, record in zip(anchors, chain_run.records("train"), strict=True):
        assert anchor.aggregate_hash == record["aggregate_sha256"]
        assert anchor.participant_count == len(SITES)


def test_each_round_is_mined_with_one_auth_tx_and_at_most_two_data_tx(chain_run: Run) -> None:
    trains = chain_run.records("train")
    assert [record["round"] for record in trains] == [1, 2]
    for record in trains:
        receipts = record["chain"]
        # durable in the outbox when the round closed, put on chain by the background senders (counted below)
        assert receipts["auth_tx"] == "sending" and receipts["anchor_tx"] == "sending", record["round"]
        assert receipts["dataset_tx"] in {"sending", None}
    assert trains[0]["chain"]["dataset_tx"] == "sending"  # first commitment of the sites' datasets
    assert trains[1]["chain"]["dataset_tx"] is None  # unchanged manifests are not committed again

    # Count what really reached the nodes: every transaction to each contract about this run.
    session = open_readonly(chain_run.state_dir)
    coordinator = session.deployment.coordinator.lower()
    auth_calls = contract_calls(session.auth, RUN)
    data_calls = contract_calls(session.data, RUN)
    assert all(call.sender.lower() == coordinator for call in data_calls)
    recorded = [call for call in auth_calls if call.method == "record_decisions"]
    assert all(call.sender.lower() == coordinator for call in recorded)
    anchors = {call.args["round_index"]: call for call in data_calls if call.method == "anchor_round"}
    assert sorted(anchors) == [1, 2]
    previous_anchor_block = 0
    for round_index in (1, 2):
        assert sum(call.args["round_index"] == round_index for call in recorded) == 1, round_index
        in_round = [
            call for call in data_calls
            if call.method in {"commit_datasets", "anchor_round"} and previous_anchor_block < call.block <= anchors[round_index].block
        ]  # fmt: skip
        assert 1 <= len(in_round) <= 2, (round_index, in_round)
        assert sum(call.method == "commit_datasets" for call in in_round) == int(trains[round_index - 1]["chain"]["dataset_tx"] is not None)
        previous_anchor_block = anchors[round_index].block
    assert sorted(call.method for call in data_calls) == sorted(
        ["register_run", "commit_datasets", "anchor_round", "anchor_round", "record_lineage"]
    )
    # one batch per round holds all 4 decisions: the 8 admit events share 2 transactions
    decisions = session.auth.decisions(run_id=RUN)
    assert len(decisions) == 2 * len(SITES)
    assert len({decision.tx_hash for decision in decisions}) == 2


# -- an auditor in a fresh process -------------------------------------------------------------------


def test_audit_verify_passes_in_a_fresh_process(chain_run: Run) -> None:
    code, report = verify(chain_run)
    assert code == 0, report
    assert report["ok"] is True and report["mismatches"] == []
    assert report["rounds_checked"] == 2
    assert report["artifacts_checked"] >= 2 * (len(SITES) + 2)  # updates + aggregate + manifest per round


def test_audit_lineage_lists_rounds_sites_epsilon_and_he_parameters(chain_run: Run) -> None:
    code, report = cli_json(
        "audit", "lineage", RUN, "--state-dir", str(chain_run.state_dir), "--runs-dir", str(chain_run.runs_dir)
    )
    assert code == 0 and report["problems"] == [], report
    summary = chain_run.summary
    assert [round_["round_index"] for round_ in report["rounds"]] == [1, 2]
    for round_, train in zip(report["rounds"], chain_run.records("train"), strict=True):
        participants = {p["site_id"]: p for p in round_["participants"]}
        assert sorted(participants) == SITES
        for site, participant in participants.items():
            assert participant["update_sha256"] == train["update_sha256"][site]
            assert participant["epsilon"] > 0
            assert participant["epsilon"] == pytest.approx(train["sites"][site]["epsilon"], abs=1e-6)  # micro-units on chain
            assert participant["approval_valid_then"] is True and participant["admitted_at"] > 0
        assert round_["he_error_bound"] > 0
    assert sorted(d["site_id"] for d in report["datasets"]) == SITES
    assert [model["model_hash"] for model in report["models"]] == [summary["final_aggregate_sha256"]]
    # The run's registered HE and DP parameters are exactly those the summary and the config state.
    registered = summary["crypto"]["parameters"] | ({"he_precision": summary["he_precision"]} if summary["he_precision"] else {})
    assert report["run"]["he_params_hash"] == params_hash(registered)
    assert summary["crypto"]["parameters"]["poly_modulus_degree"] > 0
    assert report["run"]["dp_params_hash"] == params_hash(dict(vars(chain_run.config.privacy)))
    # epsilon grows from round 1 to round 2 at every site, ending at what the summary reports
    first, last = ({p["site_id"]: p["epsilon"] for p in r["participants"]} for r in report["rounds"])
    for site in SITES:
        assert 0 < first[site] < last[site] == pytest.approx(summary["privacy"][site]["epsilon"], abs=1e-6)


def test_audit_access_lists_an_admit_decision_per_site_and_round(chain_run: Run) -> None:
    code, report = cli_json("audit", "access", "--run", RUN, "--state-dir", str(chain_run.state_dir))
    assert code == 0
    decisions = report["decisions"]
    assert sorted((d["site_id"], d["round_index"]) for d in decisions) == sorted((s, r) for s in SITES for r in (1, 2))
    assert all(d["action"] == "admit_update" and d["granted"] and d["reason"] == "ok" for d in decisions)
    updates = {(r["round"], s): digest for r in chain_run.records("train") for s, digest in r["update_sha256"].items()}
    assert all(d["subject"] == updates[(d["round_index"], d["site_id"])] for d in decisions)
    registered = [event for event in report["governance"] if event["kind"] == "SiteRegistered"]
    assert len(registered) == len(SITES)


def test_one_flipped_byte_in_a_stored_update_fails_verify_and_names_the_round(chain_run: Run, tmp_path: Path) -> None:
    copy_root = tmp_path / "runs"
    shutil.copytree(chain_run.path, copy_root / RUN)  # the auditor's copy; the run itself stays intact
    digest = chain_run.records("train")[1]["update_sha256"]["hungarian"]  # round 2
    store = ArtifactStore(copy_root / RUN / "artifacts")
    assert store.kinds()[digest] == "update"
    victim = store.path(digest)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    os.chmod(victim, 0o600)
    victim.write_bytes(bytes(data))

    code, report = verify(chain_run, runs_dir=copy_root)
    assert code == 1 and report["ok"] is False
    assert {m["round_index"] for m in report["mismatches"]} == {2}
    assert {m["kind"] for m in report["mismatches"]} == {"update", "merkle_root"}
    assert any("hungarian" in m["detail"] or digest in m["detail"] for m in report["mismatches"]), report
    table = cli("audit", "verify", RUN, "--state-dir", str(chain_run.state_dir), "--runs-dir", str(copy_root))
    assert table.returncode == 1 and "MISMATCH" in table.stdout, table.stdout
    assert re.search(r"\b2\s*│\s*merkle_root", table.stdout), table.stdout  # the table names round 2
    assert verify(chain_run)[0] == 0  # the untouched original still verifies


# -- a revoked site ----------------------------------------------------------------------------------


def test_a_revoked_sites_update_is_rejected_and_the_denial_is_on_the_auth_chain(revoked_run: Run) -> None:
    summary = revoked_run.summary
    assert summary["rounds_completed"] == 1
    [rejection] = summary["rejections"]
    assert rejection["site"] == REVOKED_SITE and rejection["round"] == 1
    assert "revoked" in rejection["reason"] and REVOKED_RUN in rejection["reason"]
    [train] = revoked_run.records("train")
    others = [site for site in SITES if site != REVOKED_SITE]
    assert train["participants"] == others  # the round closed with the other sites
    assert REVOKED_SITE not in train["update_sha256"]
    assert train["chain"]["anchor_tx"] == "sending"  # handed to the background sender; on chain per the audit below
    assert "revoked" in train["rejected"][REVOKED_SITE]
    assert REVOKED_SITE not in summary["privacy"]

    code, report = cli_json(
        "audit", "access", "--site", REVOKED_SITE, "--run", REVOKED_RUN, "--state-dir", str(revoked_run.state_dir)
    )
    assert code == 0
    [denial] = report["decisions"]
    assert denial["site_id"] == REVOKED_SITE and denial["round_index"] == 1
    assert denial["granted"] is False and denial["action"] == "reject_update"
    assert denial["reason"] == "not_admitted"
    revoked = [event for event in report["governance"] if event["kind"] == "SiteRevoked"]
    assert len(revoked) == 1 and revoked[0]["account"] == denial["actor"]
    assert label32("key compromised").hex() in revoked[0]["detail"]

    code, lineage = cli_json(
        "audit", "lineage", REVOKED_RUN, "--state-dir", str(revoked_run.state_dir), "--runs-dir", str(revoked_run.runs_dir)
    )
    assert [p["site_id"] for p in lineage["rounds"][0]["participants"]] == others
    assert verify(revoked_run, run_id=REVOKED_RUN)[0] == 0


def test_the_coordinators_admission_check_names_an_unregistered_site(chain_run: Run) -> None:
    from medtwin.experiments.chain_wiring import ChainProvenance

    provenance = ChainProvenance(session=open_session(chain_run.config.chain), artifacts_root=chain_run.path / "artifacts")
    assert provenance.admission_problem(site_id="cleveland", run_id=RUN) is None
    problem = provenance.admission_problem(site_id="st-elsewhere", run_id=RUN)
    assert problem is not None and "st-elsewhere is not registered" in problem
    assert "has not approved run no-such-run" in (provenance.admission_problem(site_id="cleveland", run_id="no-such-run") or "")


# -- restart -----------------------------------------------------------------------------------------


def test_stopping_and_restarting_the_nodes_keeps_every_record(chain_run: Run, revoked_run: Run) -> None:
    state_dir = chain_run.state_dir
    before = open_readonly(state_dir)
    anchors_before = before.data.anchors(RUN)
    decisions_before = before.auth.decisions()
    pids = {role: read_node(state_dir, role).pid for role in ("auth", "data")}

    assert len(chain_down(state_dir)) == 2
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    status = chain_up(chain_run.config.chain, state_dir)
    assert status.healthy, status.to_json()
    assert {node.role: node.pid for node in status.nodes}.keys() == pids.keys()
    assert all(node.pid != pids[node.role] for node in status.nodes)

    after = open_readonly(state_dir)
    assert after.data.anchors(RUN) == anchors_before
    assert after.auth.decisions() == decisions_before
    assert after.auth.site(REVOKED_SITE).revoked_at > 0
    code, report = verify(chain_run)
    assert code == 0 and report["rounds_checked"] == 2, report


def test_model_export_is_a_logged_act_of_an_admitted_site(chain_run: Run, tmp_path: Path) -> None:
    """Runs last: it adds an export decision and a release to the run's chain records."""
    kit = chain_run.runs_dir.parent / ".medtwin-sites" / "fed_heart_disease" / "cleveland" / "kit"
    common = ("--state-dir", str(chain_run.state_dir), "--runs-dir", str(chain_run.runs_dir))
    # a hostile coordinator points summary.json at one site's update: the site ignores it and exports
    # the aggregate anchored on the data chain for the run it approved
    summary_path = chain_run.path / "summary.json"
    honest_summary = summary_path.read_text()
    single_update = chain_run.records("train")[-1]["update_sha256"]["hungarian"]
    summary_path.write_text(honest_summary.replace(chain_run.summary["final_aggregate_sha256"], single_update))
    exported = cli("model", "export", RUN, "--site", "cleveland", "--kit", str(kit), "--out", str(tmp_path / "m.pt"), *common)
    assert exported.returncode == 0, exported.stderr
    import torch

    state = torch.load(tmp_path / "m.pt")
    summary_path.write_text(honest_summary)
    assert sum(tensor.numel() for tensor in state.values()) == chain_run.summary["crypto"]["num_parameters"]
    refused = cli("model", "export", RUN, "--site", "mallory", "--out", str(tmp_path / "x.pt"), *common)
    assert refused.returncode == 1 and not (tmp_path / "x.pt").exists()
    _, access = cli_json("audit", "access", "--state-dir", str(chain_run.state_dir))
    exports = [(d["granted"], d["reason"]) for d in access["decisions"] if d["action"] == "export_model"]
    assert (True, "ok") in exports and (False, "not_verified") in exports
    session = open_readonly(chain_run.state_dir)
    assert session.data.release(chain_run.summary["final_aggregate_sha256"]) is not None
    assert session.data.release(single_update) is None


def test_an_auditor_needs_only_the_admin_signed_chain_record_not_the_coordinators_files(chain_run: Run, tmp_path: Path) -> None:
    """The admin signs chain ids + contract addresses with the federation CA; the auditor, on another
    machine, holds federation.json, chains.json and the artifacts — no chain state folder at all."""
    admin = chain_run.runs_dir.parent / ".medtwin-kits" / "fed_heart_disease" / "admin"
    published = cli("federation", "publish-chains", "--admin-dir", str(admin), "--state-dir", str(chain_run.state_dir))
    assert published.returncode == 0, published.stderr
    auditor = tmp_path / "auditor"
    auditor.mkdir()
    for name in ("federation.json", "chains.json"):
        shutil.copy(admin / name, auditor / name)
    assert not (auditor / "ca_key.pem").exists() and "PRIVATE" not in (auditor / "chains.json").read_text()
    nowhere = tmp_path / "no-chain-state"  # the coordinator's deployment.json is not available to the auditor
    code, report = cli_json("audit", "verify", RUN, "--federation", str(auditor), "--state-dir", str(nowhere),
                            "--runs-dir", str(chain_run.runs_dir))  # fmt: skip
    assert code == 0 and report["rounds_checked"] >= 2, report
    # a chain record pointing at another contract (as a coordinator's file could) is not the admin's
    record = json.loads((auditor / "chains.json").read_text())
    record["chains"]["data"]["address"] = "0x" + "00" * 19 + "01"
    (auditor / "chains.json").write_text(json.dumps(record))
    forged = cli("audit", "verify", RUN, "--federation", str(auditor), "--runs-dir", str(chain_run.runs_dir))
    assert forged.returncode != 0 and "not signed by federation" in forged.stdout + forged.stderr
