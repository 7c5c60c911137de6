"""The deployment demo: every party as its own process, on loopback — `make deploy-demo`.

    python -m medtwin.experiments.deploy_demo [--rounds 3] [--root .medtwin/deploy-demo]

What a newcomer sees, step by step (each step is the library call behind the party's command):

    4 hospitals   own identity, site file                 medtwin site init / a site.yaml
    admin         federation from public files            medtwin federation init
    admin         both anvil chains, signed chains.json   medtwin chain up / federation publish-chains
    hospitals     join; site 0 makes the CKKS key set     medtwin site join / site keygen / install-key
    coordinator   TLS SuperLink + SuperNode auth          medtwin coordinator start
    hospitals     one SuperNode each (node_config = site file only)   medtwin site start
    admin/sites   sites registered, each approves the run on the auth chain
    researcher    submits the run (Fed-Heart-Disease, DP + CKKS)      flwr run
    auditor       a separate process with only federation.json + chains.json and the artifacts
                  runs `medtwin audit verify --federation …`

Everything started is stopped by PID at the end, also on failure; the demo's files stay under
`--root/<timestamp>/` (new hospitals each time: their ledgers start empty, they are new sites).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

from medtwin.chain import chain_down, read_deployment
from medtwin.core.config import compose_config, config_to_yaml
from medtwin.core.identity import (
    CHAINS_FILE,
    init_site_identity,
    install_he_secret,
    join_federation,
    provision_federation,
    sign_chain_record,
    steward_generate_he_keys,
)
from medtwin.core.tasks import get_task

from .chain_wiring import enrol_federation, open_chains
from .cli import print_summary
from .cli_deploy import submit_proposal
from .deployment import CoordinatorProcess, SiteProcess
from .federation_setup import he_parameters_for

logger = logging.getLogger("medtwin.deploy_demo")

SITES = ("cleveland", "hungarian", "switzerland", "va")


def site_file(root: Path, site_id: str, index: int) -> Path:
    path = root / site_id / "site.yaml"
    document = {
        "site_id": site_id,
        "data": {"builtin": {"task": "fed_heart_disease", "index": index}},
        "accept": {"tasks": ["fed_heart_disease"], "crypto": ["ckks"], "max_rounds": 50, "max_local_steps": 500},
        "privacy": {"require_dp": True, "max_epsilon": 3.0, "max_delta": 1e-4, "max_total_epsilon": 10.0},
        "evaluation": {"release": "rounded", "decimals": 3, "min_participants": 2},
        "approvals": "chain",
        "chain": {"state_dir": str(root / "chain")},
        "kit_dir": "kit",
        "state_dir": "state",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def run_demo(root: Path, *, rounds: int) -> int:
    started = time.monotonic()
    parties: list = []
    chain_dir = root / "chain"
    try:
        print(f"[1/8] 4 hospitals create their own identities under {root}/<site>/kit", flush=True)
        kits = {site: root / site / "kit" for site in SITES}
        public = [init_site_identity(kits[site], site_id=site) for site in SITES]
        files = {site: site_file(root, site, index) for index, site in enumerate(SITES)}

        print("[2/8] the admin builds the federation from their public files; the sites join", flush=True)
        admin = provision_federation(root / "admin", federation_name="deploy-demo", site_public_files=public)
        for site in SITES:
            join_federation(kits[site], admin.manifest_path)

        config = compose_config(
            [
                "task=fed_heart_disease", "strategy=fedavg_tuned", "privacy=dp", "privacy.target_epsilon=3.0",
                "crypto=ckks", f"federation.num_rounds={rounds}", "federation.min_sites=2",
                "chain=anvil", f"chain.state_dir={chain_dir}", "chain.auth_port=0", "chain.data_port=0",
                f"runs_dir={root / 'runs'}", "progress=false", "baselines.enabled=false",
                f"run_id=deploy-demo-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}",
            ]
        )  # fmt: skip
        print("[3/8] both anvil chains; the admin signs which chains belong to the federation", flush=True)
        session = open_chains(config.chain)
        deployment = read_deployment(chain_dir)
        assert deployment is not None
        chains = {
            role: {
                "chain_id": chain.chain_id, "address": chain.address, "rpc_url": chain.rpc_url, "contract": chain.contract,
                "deploy_block": chain.deploy_block, "source_sha256": chain.source_sha256,
            }  # fmt: skip
            for role, chain in (("auth", deployment.auth), ("data", deployment.data))
        }
        sign_chain_record(ca_key_path=admin.ca_dir / "ca_key.pem", manifest=admin.manifest, chains=chains, out_path=admin.root / CHAINS_FILE)

        print("[4/8] cleveland (key steward) makes the CKKS key set and wraps it for the others", flush=True)
        parameters = he_parameters_for(config, get_task(config.task))
        keys = steward_generate_he_keys(kits["cleveland"], parameters, outbox_dir=root / "steward-outbox")
        for site, envelope in keys.envelope_paths.items():
            install_he_secret(kits[site], envelope)
        config.crypto.key_id = keys.key_id

        print("[5/8] the coordinator starts a TLS SuperLink with SuperNode authentication", flush=True)
        coordinator = CoordinatorProcess(admin.root, root / "coordinator")
        parties.append(coordinator)
        coordinator.start()
        print(f"      SuperLink pid {coordinator.pid} at {coordinator.address}", flush=True)

        print("[6/8] each hospital starts its SuperNode (node_config names only its site file)", flush=True)
        for site in SITES:
            process = SiteProcess(files[site], coordinator.address)
            parties.append(process)
            process.start()
            print(f"      {site}: pid {process.pid}, node {process.node_id}", flush=True)

        proposal = config_to_yaml(config)
        print(f"[7/8] run {config.run_id}: each site approves it on the auth chain with its own account; the researcher submits it", flush=True)
        enrol_federation(session, admin.manifest, run_id=config.run_id, proposal_text=proposal, site_kits=kits)
        proposal_file = root / "proposal.yaml"
        proposal_file.write_text(proposal, encoding="utf-8")
        clock = time.monotonic()
        run_path = submit_proposal(  # = medtwin run --federation <coordinator state> --proposal proposal.yaml
            proposal_file, coordinator_state=root / "coordinator", public_context=keys.public_context_path, timeout_s=1800
        )
        print(f"      {rounds} rounds in {time.monotonic() - clock:.0f} s", flush=True)
        print_summary(run_path)

        print("[8/8] an auditor with only federation.json + chains.json verifies the run (separate process)", flush=True)
        auditor = root / "auditor"
        auditor.mkdir(exist_ok=True)
        for name in ("federation.json", CHAINS_FILE):
            shutil.copy(admin.root / name, auditor / name)
        audit = subprocess.run(
            [sys.executable, "-m", "medtwin.experiments.cli", "audit", "verify", config.run_id,
             "--federation", str(auditor), "--runs-dir", str(root / "runs")],
            check=False,
        )  # fmt: skip
        print(f"deployment demo finished in {time.monotonic() - started:.0f} s", flush=True)
        return audit.returncode
    finally:
        for party in reversed(parties):
            party.stop()
        chain_down(chain_dir)
        print("every process stopped by PID; chain state kept in", chain_dir, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--root", type=Path, default=Path(".medtwin/deploy-demo"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    root = (args.root / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")).resolve()
    return run_demo(root, rounds=args.rounds)


if __name__ == "__main__":
    raise SystemExit(main())
