"""Run one federated experiment in Flower's simulation engine (Ray): `medtwin run ...`."""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from medtwin.client.app import build_client_app, initial_model
from medtwin.client.codec import CkksSiteCodec, PlainSiteCodec
from medtwin.client.global_state import initial_global_state
from medtwin.client.server_optimizer import ServerOptimizerSettings, server_step
from medtwin.core.artifacts import ArtifactStore
from medtwin.core.config import MedtwinConfig, config_from_yaml, config_to_yaml
from medtwin.core.errors import ConfigError
from medtwin.core.ids import ensure_id
from medtwin.core.model_vector import model_to_vector
from medtwin.core.protocol import record_from_bytes
from medtwin.core.report import render_report
from medtwin.core.rundir import RunDirectory, atomic_write_text
from medtwin.core.tasks import VitalsTask, check_task_data, get_task
from medtwin.core.tasks.vitals.page import TWIN_PAGE, twin_page
from medtwin.server.app import build_server_app, check_new_run, make_run_id

from .baselines import compute_baselines, final_model_evaluator
from .chain_wiring import ChainProvenance, enrol_federation, open_chains
from .flower_apps import coordinator_provenance, site_approval_check
from .federation_setup import SimulatedFederation, prepare_federation, site_state_dir
from .simulated_sites import INDEX_FILE, approve_locally, read_site_index, write_site_files

logger = logging.getLogger("medtwin")

OFFLINE_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_DEDUP_LOGS": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # makes Ray bind its services to 127.0.0.1 only
}


def simulate(config: MedtwinConfig, *, resume: bool = False) -> Path:
    """Baselines (if enabled), then the federated run on virtual sites; returns the run directory.

    `resume=True` continues run `config.run_id` after its last checkpoint; `config` must be composed from
    the same overrides as the run's start (the coordinator refuses a resume whose config differs)."""
    for key, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    from flwr.simulation import run_simulation

    if not config.run_id:
        config.run_id = make_run_id(config)
    if not resume:
        check_new_run(config.runs_dir, config.run_id)  # before any party is prepared
    # every site's split (the partition, each CSV file) once, before anything starts: not once per site inside Ray
    check_task_data(config.task)
    setup = prepare_parties(config, resume=resume)
    provenance = connect_chains(config, setup)
    baselines = None
    if config.baselines.enabled:
        logger.info("training baselines: each site alone, and pooled")
        baselines = compute_baselines(config)
    backend_config = {
        "client_resources": {"num_cpus": config.federation.client_num_cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": os.cpu_count() or 2, "include_dashboard": False, "log_to_driver": True},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(
            server_app=build_server_app(setup.coordinator_config, setup.federation.coordinator, provenance, resume=resume),
            client_app=build_client_app(
                proposal_text=setup.proposal_text, site_files=setup.site_files, approval_check_for=site_approval_check
            ),
            num_supernodes=config.task.num_sites,
            backend_config=backend_config,
        )
    run_path = Path(config.runs_dir) / config.run_id
    if not (run_path / "summary.json").exists():
        raise RuntimeError(f"the simulation ended without writing {run_path / 'summary.json'}; see the log above")
    add_simulation_findings(config, run_path, setup.federation, baselines)
    return run_path


@dataclass(frozen=True)
class SimulatedParties:
    """What the harness prepared, standing in for admin, key steward and every hospital."""

    federation: SimulatedFederation
    coordinator_config: MedtwinConfig  # what the coordinator runs and proposes: no site paths, the run's key id
    proposal_text: str  # exactly what every site parses, hashes and approves
    site_files: dict[int, str]  # partition id -> that hospital's site file
    approvals: str  # "local" | "chain"


def coordinator_view(config: MedtwinConfig) -> MedtwinConfig:
    """The coordinator's config: no site's file paths (each hospital's path is in its own site file)."""
    if config.task.csv is None:
        return config
    return replace(config, task=replace(config.task, csv=replace(config.task.csv, site_files=[])))


def stored_key_id(config: MedtwinConfig) -> str:
    """The CKKS key set a run was started with (its config.yaml: the proposal its sites approved)."""
    path = Path(config.runs_dir) / ensure_id(config.run_id, key="run_id") / "config.yaml"
    if not path.is_file():
        raise ConfigError("run_id", f"no run {config.run_id!r} to resume: {path} does not exist", "check runs_dir and the run id")
    return config_from_yaml(path.read_text(encoding="utf-8")).crypto.key_id


def prepare_parties(
    config: MedtwinConfig, *, site_files_folder: Path | None = None, resume: bool = False
) -> SimulatedParties:
    """Identities and keys (admin, steward, hospitals), one site file per hospital, and their approvals.
    Resuming, the run keeps its CKKS key set and its hospitals' site files."""
    federation = prepare_federation(config, config.run_id, he_key_id=stored_key_id(config) if resume else "")
    config.crypto.key_id = federation.he_key_id  # the run's CKKS key set: part of what every site approves
    coordinator_config = coordinator_view(config)
    proposal_text = config_to_yaml(coordinator_config)
    approvals = "chain" if config.chain.name in CHAINS_SITES_CAN_READ else "local"
    site_ids = get_task(config.task).site_ids()
    folder = site_files_folder or federation.root / "site-files"
    if resume and (folder / INDEX_FILE).is_file():
        site_files = read_site_index(folder)
        return SimulatedParties(federation, coordinator_config, proposal_text, site_files, approvals)
    site_files = write_site_files(
        config,
        site_ids=site_ids,
        kit_dirs=federation.kit_dirs,
        state_dirs={site_id: site_state_dir(config, site_id) for site_id in site_ids},
        folder=folder,
        approvals=approvals,
        chain_state_dir=Path(config.chain.state_dir).resolve(),
    )
    if approvals == "local":
        approve_locally(site_files, run_id=config.run_id, proposal_text=proposal_text)
    return SimulatedParties(federation, coordinator_config, proposal_text, site_files, approvals)


CHAINS_SITES_CAN_READ = ("anvil", "rpc")  # `embedded` lives in the harness process only


def connect_chains(config: MedtwinConfig, setup: SimulatedParties) -> ChainProvenance | None:
    """Start/open both chains and enrol the sites and their approvals of this run (acting for admin and
    sites); returns the coordinator's recorder, built as the deployed ServerApp builds it."""
    if config.chain.name == "none":
        return None
    session = open_chains(config.chain)
    enrol_federation(
        session, setup.federation.manifest, run_id=config.run_id, proposal_text=setup.proposal_text,
        site_kits=setup.federation.kit_dirs,
    )  # fmt: skip
    if setup.approvals != "chain":
        logger.warning("chain=%s cannot be read by the sites (Ray actors): they approve in their own state", config.chain.name)
    return coordinator_provenance(setup.coordinator_config, setup.federation.coordinator, session=session)


def final_average(config: MedtwinConfig, run_dir: RunDirectory, federation: SimulatedFederation, digest: str) -> np.ndarray:
    """The average weights of aggregate `digest`, decoded by the first site's own codec."""
    aggregate = record_from_bytes(ArtifactStore(run_dir.artifacts).get(digest))
    first_kit = federation.kit_dirs[get_task(config.task).site_ids()[0]]
    codec = CkksSiteCodec.from_kit(first_kit, config.crypto.key_id) if config.crypto.name == "ckks" else PlainSiteCodec()
    return codec.average(aggregate)[0]


def final_weights(config: MedtwinConfig, run_dir: RunDirectory, federation: SimulatedFederation, digest: str) -> np.ndarray:
    """The federated model after the last round (aggregate `digest`): its average under FedAvg; under a
    server optimiser (strategy.server_optimizer) the model the sites stepped to, replayed here from the
    initial model and every round's aggregate with the sites' own step (client/global_state.py)."""
    settings = ServerOptimizerSettings.from_strategy(config.strategy)
    if not settings.stateful:
        return final_average(config, run_dir, federation, digest)
    by_round = {int(record["round"]): str(record["aggregate_sha256"]) for record in run_dir.read_metrics() if record["phase"] == "train"}
    rounds = sorted(by_round)  # a resumed run may record a round twice: its last record is the aggregate sent on
    if rounds != list(range(1, len(rounds) + 1)) or by_round[rounds[-1]] != digest:
        raise RuntimeError(
            f"{run_dir.metrics_path}: the training rounds {rounds} do not lead to the final aggregate {digest[:16]}...: "
            f"cannot replay the {settings.name} steps"
        )
    state = initial_global_state(
        run_id=run_dir.run_id, settings=settings, weights=model_to_vector(initial_model(get_task(config.task), seed=config.seed))
    )
    weights, moments = state.weights, state.moments
    for server_round in rounds:
        average = final_average(config, run_dir, federation, by_round[server_round])
        weights, moments = server_step(settings, weights=weights, moments=moments, average=average, server_round=server_round)
    return weights


def measured_decryption_error(run_dir: RunDirectory, federation: SimulatedFederation, average: np.ndarray) -> float:
    """max |decrypted average - plaintext average| / max |weight|, from the sites' kept plaintext updates."""
    last_train = [record for record in run_dir.read_metrics() if record["phase"] == "train"][-1]
    kits = federation.kit_dirs
    packed = sum(np.load(kits[site] / "state" / f"last-update-{run_dir.run_id}.npy") for site in last_train["participants"])
    exact = packed[:-1] / packed[-1]
    return float(np.max(np.abs(average - exact)) / max(np.max(np.abs(exact)), 1e-12))


def add_simulation_findings(
    config: MedtwinConfig, run_path: Path, federation: SimulatedFederation, baselines: dict | None
) -> None:
    """What only the simulation harness can know: baselines vs federated, and the measured HE error."""
    run_dir = RunDirectory(run_path.parent, run_path.name)
    summary = run_dir.read_summary()
    average = final_average(config, run_dir, federation, summary["final_aggregate_sha256"])
    if config.crypto.name == "ckks":
        summary["crypto"]["max_decryption_error"] = measured_decryption_error(run_dir, federation, average)
    weights = final_weights(config, run_dir, federation, summary["final_aggregate_sha256"])
    if baselines is not None:
        row, pooled_test_metrics = final_model_evaluator(config)(weights)
        baselines["rows"]["federated"] = row
        baselines.setdefault("pooled_test_metrics", {})["federated"] = pooled_test_metrics
        summary["baselines"] = baselines
    task = get_task(config.task)
    if isinstance(task, VitalsTask):  # the twin at one test patient's bedside, with the federated model
        summary["twin"] = twin_page(task, task.model_with_weights(weights, seed=config.seed), run_path / TWIN_PAGE)
    run_dir.write_summary(summary)
    atomic_write_text(run_path / "report.md", render_report(summary, run_dir.read_metrics(), run_path))
    logger.debug("summary: %s", json.dumps(summary["final_metrics"]))
