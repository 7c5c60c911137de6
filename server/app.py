"""The coordinator's Flower ServerApp: run the round loop, write the run directory."""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from medtwin.core.artifacts import ArtifactStore
from medtwin.core.config import MedtwinConfig, config_to_yaml
from medtwin.core.provenance import ProvenanceRecorder, RunDescription
from medtwin.core.errors import ConfigError
from medtwin.core.identity import load_manifest
from medtwin.core.report import render_report
from medtwin.core.rundir import RunDirectory, atomic_write_text
from medtwin.core.runconfig import config_from_run_config
from medtwin.core.tasks import get_task

from .aggregation import Aggregator, CkksAggregator, PlainAggregator
from .loop import LoopResult, RoundLoop
from .progress import RoundProgress

logger = logging.getLogger("medtwin.coordinator")

PUBLIC_CONTEXT_KEY = "medtwin-he-public-context"
MANIFEST_KEY = "medtwin-federation-manifest"


@dataclass(frozen=True)
class CoordinatorSetup:
    """What the coordinator holds besides the config: public material only."""

    public_context_path: str = ""  # CKKS context without any key (crypto=ckks)
    manifest_path: str = ""  # federation.json: the sites' public signing keys (required for every scheme)

    @classmethod
    def from_run_config(cls, run_config: dict) -> CoordinatorSetup:
        return cls(str(run_config.get(PUBLIC_CONTEXT_KEY, "")), str(run_config.get(MANIFEST_KEY, "")))


def make_run_id(config: MedtwinConfig) -> str:
    if config.run_id:
        return config.run_id
    digest = hashlib.sha256(config_to_yaml(config).encode()).hexdigest()[:6]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{config.task.name}-{digest}"


def manifest_path_of(setup: CoordinatorSetup) -> str:
    """federation.json's path: every scheme needs the sites' public keys to verify every reply."""
    if not setup.manifest_path:
        raise ConfigError(
            MANIFEST_KEY,
            "the coordinator needs the federation manifest (federation.json) to verify every site reply, plain or encrypted",
            f"pass run-config key {MANIFEST_KEY} = path of federation.json (written by the federation admin)",
        )
    return setup.manifest_path


def make_aggregator(config: MedtwinConfig, setup: CoordinatorSetup) -> Aggregator:
    manifest_path_of(setup)
    if config.crypto.name == "plain":
        return PlainAggregator()
    if not setup.public_context_path:
        raise ConfigError(
            PUBLIC_CONTEXT_KEY,
            "ckks needs the federation's public HE context at the coordinator",
            f"pass run-config key {PUBLIC_CONTEXT_KEY} (written by the key steward)",
        )
    return CkksAggregator.from_files(public_context_path=setup.public_context_path)


def run_federation(
    grid: Grid,
    config: MedtwinConfig,
    setup: CoordinatorSetup | None = None,
    provenance: ProvenanceRecorder | None = None,
) -> Path:
    """Run a whole federated training and return its run directory."""
    started = time.monotonic()
    setup = setup or CoordinatorSetup()
    manifest = load_manifest(manifest_path_of(setup))  # before anything is written: no manifest, no run
    aggregator = make_aggregator(config, setup)
    run_id = make_run_id(config)
    run_dir = RunDirectory(config.runs_dir, run_id)
    config_yaml = config_to_yaml(config)
    run_dir.write_config(config_yaml)
    task = get_task(config.task)
    if provenance is not None:
        provenance.start_run(
            RunDescription(
                run_id=run_id,
                task=config.task.name,
                config_yaml=config_yaml,
                dp_parameters=_as_dict(config.privacy),
                he_parameters=aggregator.describe()["parameters"],
            )
        )
    logger.info(
        "run %s: task %s, strategy %s, aggregation %s, writing to %s",
        run_id, config.task.name, config.strategy.name, aggregator.scheme, run_dir.path,
    )
    with RoundProgress(
        total_rounds=config.federation.num_rounds, enabled=config.progress, primary_metric=task.primary_metric
    ) as progress:

        def on_record(record: dict) -> None:
            run_dir.append_metrics(record)
            progress.record(record)

        loop = RoundLoop(
            grid=grid,
            config=config,
            run_id=run_id,
            aggregator=aggregator,
            manifest=manifest,
            artifacts=ArtifactStore(run_dir.artifacts),
            on_record=on_record,
            provenance=provenance,
        )
        result = loop.run()
    summary = build_summary(config, run_id, task.primary_metric, result, aggregator, wall_time_s=time.monotonic() - started)
    if provenance is not None and result.aggregate_digests:
        summary["chain"] = provenance.finish_run(
            run_id=run_id, final_aggregate_digest=result.aggregate_digests[-1], rounds_completed=result.rounds_completed
        )
    run_dir.write_summary(summary)
    atomic_write_text(run_dir.path / "report.md", render_report(summary, run_dir.read_metrics(), run_dir.path))
    logger.info("run %s finished: %s", run_id, run_dir.path / "report.md")
    return run_dir.path


def build_summary(
    config: MedtwinConfig,
    run_id: str,
    primary_metric: str,
    result: LoopResult,
    aggregator: Aggregator,
    *,
    wall_time_s: float,
) -> dict[str, Any]:
    num_parameters = result.num_parameters
    crypto = aggregator.describe() | {
        "num_parameters": num_parameters,
        "bytes_per_parameter": result.update_bytes / max(1, result.accepted_updates) / max(1, num_parameters),
        "max_decryption_error_bound": max(result.he_error_bounds, default=0.0),
        "max_decryption_error": 0.0 if aggregator.scheme == "plain" else None,  # measured in simulation
    }
    crypto["wire_expansion_vs_float32"] = crypto["bytes_per_parameter"] / 4
    return {
        "run_id": run_id,
        "task": config.task.name,
        "strategy": config.strategy.name,
        "primary_metric": primary_metric,
        "rounds_completed": result.rounds_completed,
        "sites": sorted(set(result.sites.values())),
        "final_metrics": {"sites": result.final_site_metrics, "pooled": result.final_pooled_metrics},
        "privacy": result.privacy,
        "privacy_text": privacy_paragraph(config, result.privacy),
        "crypto": crypto,
        "chain": {"backend": config.chain.name, "chain_ids": {}, "contracts": {}, "anchors_written": 0},
        "final_aggregate_sha256": result.aggregate_digests[-1] if result.aggregate_digests else None,
        "rejections": [
            {"round": rejection.server_round, "site": rejection.site_id, "code": rejection.code, "reason": rejection.reason}
            for rejection in result.rejections
        ],
        "round_time_s": result.round_times_s,
        "wall_time_s": wall_time_s,
        "seed": config.seed,
    }


def _as_dict(node: object) -> dict[str, Any]:
    return dict(vars(node)) if hasattr(node, "__dict__") else {}


def privacy_paragraph(config: MedtwinConfig, privacy: dict[str, dict[str, float]]) -> str:
    """One paragraph a clinician can read."""
    if config.privacy.name != "dp" or not privacy:
        return (
            "This run used no differential privacy: patient records never left their hospital, but the model "
            "updates carry no formal guarantee against someone trying to infer whether a patient was included."
        )
    worst = max(values["epsilon"] for values in privacy.values())
    delta = max(values["delta"] for values in privacy.values())
    per_site = ", ".join(f"{site} ε={values['epsilon']:.2f}" for site, values in sorted(privacy.items()))
    return (
        f"Every hospital trained with differential privacy (DP-SGD): each patient's influence on an update was "
        f"clipped and hidden under calibrated random noise before the update left the hospital. The privacy spent "
        f"in this run is at most ε={worst:.2f} with δ={delta:.0e} ({per_site}). In plain words: whether or not any "
        f"single patient's record was used changes the probability of any outcome of this training by at most a "
        f"factor of e^ε ≈ {math.exp(worst):.1f}, except with probability δ. Smaller ε is stronger protection; "
        f"each hospital's own policy caps it ({config.privacy.target_epsilon:g} was requested for the whole run), "
        f"and each hospital's ledger keeps counting across runs and restarts."
    )


def build_server_app(
    config: MedtwinConfig | None = None,
    setup: CoordinatorSetup | None = None,
    provenance: ProvenanceRecorder | None = None,
) -> ServerApp:
    """A ServerApp bound to `config`, or (None) to the config carried in the run's run_config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = dict(context.run_config)
        run_federation(
            grid,
            config or config_from_run_config(run_config),
            setup or CoordinatorSetup.from_run_config(run_config),
            provenance,
        )

    return app


app = build_server_app()
