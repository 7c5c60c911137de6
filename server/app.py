"""The coordinator's Flower ServerApp: run the round loop, write the run directory, resume a stopped run."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from medtwin.core.artifacts import ArtifactStore
from medtwin.core.config import MedtwinConfig, config_to_yaml
from medtwin.core.errors import ConfigError
from medtwin.core.hashing import config_hash
from medtwin.core.he import CkksParameters, he_precision_of_run
from medtwin.core.ids import ensure_id
from medtwin.core.provenance import ProvenanceRecorder, RunDescription
from medtwin.core.identity import load_manifest
from medtwin.core.report import render_report
from medtwin.core.rundir import RunDirectory, atomic_write_text
from medtwin.core.runconfig import config_from_run_config
from medtwin.core.tasks import get_task

from .aggregation import Aggregator, CkksAggregator, PlainAggregator
from .checkpoint import CheckpointError, RoundCheckpoint, load_latest_checkpoint
from .loop import LoopResult, RoundLoop
from .progress import RoundProgress

logger = logging.getLogger("medtwin.coordinator")

PUBLIC_CONTEXT_KEY = "medtwin-he-public-context"
MANIFEST_KEY = "medtwin-federation-manifest"
REGISTRY_KEY = "medtwin-supernode-registry"
RESUME_KEY = "medtwin-resume"  # "true": continue the proposal's run after its latest checkpoint


@dataclass(frozen=True)
class CoordinatorSetup:
    """What the coordinator holds besides the config: public material only."""

    public_context_path: str = ""  # CKKS context without any key (crypto=ckks)
    manifest_path: str = ""  # federation.json: the sites' public signing keys (required for every scheme)
    registry_path: str = ""  # deployment: which SuperNode id the coordinator registered for each site's key

    @classmethod
    def from_run_config(cls, run_config: dict) -> CoordinatorSetup:
        return cls(
            str(run_config.get(PUBLIC_CONTEXT_KEY, "")), str(run_config.get(MANIFEST_KEY, "")), str(run_config.get(REGISTRY_KEY, ""))
        )

    def node_sites(self) -> dict[int, str]:
        """SuperNode id -> site id, from the registry `medtwin coordinator start` wrote when it registered each
        site's key: names a node that never replied (e.g. died before its first reply) by its site."""
        if not self.registry_path:
            return {}
        try:
            registry = json.loads(Path(self.registry_path).read_text(encoding="utf-8"))
            return {int(entry["node_id"]): str(site_id) for site_id, entry in registry.items() if str(entry["node_id"]).isdigit()}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
            raise ConfigError(
                REGISTRY_KEY, f"cannot read the SuperNode registry {self.registry_path}: {error}",
                "pass the registered-supernodes.json that `medtwin coordinator start` wrote, or leave the key empty",
            ) from error


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
    *,
    resume: bool = False,
) -> Path:
    """Run a whole federated training and return its run directory.

    With `resume=True`, continue the run `config.run_id` after its latest checkpoint instead: its run
    directory must exist with the same config, the checkpoint must agree with the chain's last anchor,
    and metrics.jsonl is continued (rounds already recorded are not written again).
    """
    started = time.monotonic()
    setup = setup or CoordinatorSetup()
    manifest = load_manifest(manifest_path_of(setup))  # before anything is written: no manifest, no run
    aggregator = make_aggregator(config, setup)
    config_yaml = config_to_yaml(config)
    checkpoint: RoundCheckpoint | None = None
    if resume:
        run_id = resume_run_id(config)
        checkpoint = checkpoint_to_resume(Path(config.runs_dir) / run_id, config_yaml, provenance)
        run_dir = RunDirectory(config.runs_dir, run_id)
        set_aside_stopped_summary(run_dir.path)
        recorded = keep_metrics_up_to(run_dir, checkpoint)
    else:
        run_id = make_run_id(config)
        check_new_run(config.runs_dir, run_id)
        run_dir = RunDirectory(config.runs_dir, run_id)
        run_dir.write_config(config_yaml)
        ArtifactStore(run_dir.artifacts).put(config_yaml.encode("utf-8"), kind="config")  # the plan, for auditors with only the store
        recorded = set()
    task = get_task(config.task)
    he_precision = he_precision_record(config, aggregator, grouped_by_patient=task.groups_rows_by_patient)
    if provenance is not None:
        he_parameters = aggregator.describe()["parameters"]
        provenance.start_run(  # a resumed run is registered already: recorders skip a known run
            RunDescription(
                run_id=run_id,
                task=config.task.name,
                config_yaml=config_yaml,
                dp_parameters=_as_dict(config.privacy),
                # the precision target (and its DP noise floor) is committed with the HE parameters
                he_parameters=he_parameters if he_precision is None else {**he_parameters, "he_precision": he_precision},
            )
        )
    logger.info(
        "run %s: task %s, strategy %s, aggregation %s, writing to %s%s",
        run_id, config.task.name, config.strategy.name, aggregator.scheme, run_dir.path,
        f", resuming after round {checkpoint.server_round}" if checkpoint is not None else "",
    )
    with RoundProgress(
        total_rounds=config.federation.num_rounds, enabled=config.progress, primary_metric=task.primary_metric
    ) as progress:

        def on_record(record: dict) -> None:
            key = (record.get("round"), record.get("phase"))
            if key in recorded:  # never twice in metrics.jsonl
                logger.warning("round %s %s is already in %s; not recorded again", *key, run_dir.metrics_path)
                return
            recorded.add(key)
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
            checkpoints=run_dir.checkpoints,
            config_sha256=config_hash(config_yaml),
            resume_from=checkpoint,
            node_sites=setup.node_sites(),
            task_kind=task.kind,
        )
        result = loop.run()
    summary = build_summary(
        config, run_id, task.primary_metric, result, aggregator, wall_time_s=time.monotonic() - started, he_precision=he_precision
    )
    summary["resumed_after_round"] = checkpoint.server_round if checkpoint is not None else None
    summary["stopped"] = result.stopped or None  # a stopped run is continued with --resume; it has no final model yet
    failure: Exception | None = None
    if provenance is not None and result.aggregate_digests:
        try:
            summary["chain"] = provenance.finish_run(
                run_id=run_id, final_aggregate_digest=result.aggregate_digests[-1], rounds_completed=result.rounds_completed,
                final=not result.stopped,
            )
        except Exception as error:  # noqa: BLE001 - the run trained: its summary is written whatever the chain says
            logger.error("run %s: recording the end of the run on the chains failed: %s", run_id, error)
            summary["chain"] = {"error": f"{type(error).__name__}: {str(error)[:500]}"}
            failure = error
    run_dir.write_summary(summary)
    atomic_write_text(run_dir.path / "report.md", render_report(summary, run_dir.read_metrics(), run_dir.path))
    logger.info("run %s finished: %s", run_id, run_dir.path / "report.md")
    if failure is not None:
        raise failure
    return run_dir.path


def check_new_run(runs_dir: str | Path, run_id: str) -> None:
    """A run id is used once: a run folder that holds anything already is never appended to or replaced."""
    path = Path(runs_dir) / ensure_id(run_id, key="run_id")
    if path.is_dir() and any(path.iterdir()):
        state = "finished" if (path / "summary.json").is_file() and not _stopped_summary(path) else "started and stopped"
        raise ConfigError(
            "run_id",
            f"run {run_id} already exists in {runs_dir} ({state}); nothing in it is appended to or replaced",
            f"pick another run_id (or leave it empty for a fresh one){'' if state == 'finished' else f', or continue it with --resume {run_id}'}",
        )


def _stopped_summary(run_path: Path) -> str:
    """The `stopped` reason of the run's summary.json ("" if it finished, or has no readable summary)."""
    try:
        return str(json.loads((run_path / "summary.json").read_text(encoding="utf-8")).get("stopped") or "")
    except (OSError, ValueError, AttributeError):
        return ""


def set_aside_stopped_summary(run_path: Path) -> None:
    """A stopped run being resumed keeps its stopped summary and report under their round's name."""
    if not _stopped_summary(run_path):
        return
    rounds = json.loads((run_path / "summary.json").read_text(encoding="utf-8")).get("rounds_completed", 0)
    tag, attempt = f"stopped-after-round-{rounds}", 1
    while any((run_path / f"{name}.{tag}{suffix}").exists() for name, suffix in (("summary", ".json"), ("report", ".md"))):
        attempt += 1  # stopped after the same round again: keep both
        tag = f"stopped-after-round-{rounds}-{attempt}"
    for name in ("summary.json", "report.md"):
        source = run_path / name
        if source.is_file():
            os.replace(source, run_path / f"{source.stem}.{tag}{source.suffix}")


def resume_run_id(config: MedtwinConfig) -> str:
    if not config.run_id:
        raise ConfigError(
            "run_id",
            "resuming needs the id of the run to continue, got none",
            f"pass run_id=<the run's folder name under {config.runs_dir}>",
        )
    return ensure_id(config.run_id, key="run_id")


def checkpoint_to_resume(run_path: Path, config_yaml: str, provenance: ProvenanceRecorder | None) -> RoundCheckpoint:
    """The latest checkpoint of the run at `run_path`, once it is safe to continue from; else `CheckpointError`."""
    stored_config = run_path / "config.yaml"
    if not stored_config.is_file():
        raise CheckpointError(
            f"cannot resume run {run_path.name}: {stored_config} does not exist — check runs_dir and run_id, "
            "or start the run anew without resume"
        )
    if (run_path / "summary.json").is_file() and not _stopped_summary(run_path):
        raise CheckpointError(f"run {run_path.name} already finished ({run_path / 'summary.json'} exists); nothing to resume")
    expected = config_hash(stored_config.read_text(encoding="utf-8"))
    if config_hash(config_yaml) != expected:
        raise CheckpointError(
            f"cannot resume run {run_path.name} with another config: {stored_config} hashes to {expected[:16]}..., "
            f"the config given to resume to {config_hash(config_yaml)[:16]}... — resume with exactly the run's "
            "config.yaml (sites approved that config, not this one)"
        )
    checkpoint = load_latest_checkpoint(run_path / "checkpoints")
    if checkpoint is None:
        raise CheckpointError(
            f"cannot resume run {run_path.name}: {run_path / 'checkpoints'} holds no checkpoint (the run stopped before "
            "its first round closed) — start a new run with another run_id"
        )
    if checkpoint.config_sha256 != expected or checkpoint.run_id != run_path.name:
        raise CheckpointError(
            f"checkpoint of round {checkpoint.server_round} in {run_path / 'checkpoints'} was written for run "
            f"{checkpoint.run_id!r} under config {checkpoint.config_sha256[:16]}..., not run {run_path.name!r} under "
            f"{expected[:16]}... — it was copied from another run; remove it"
        )
    anchor_problem = checkpoint_anchor_problem(checkpoint, provenance)
    if anchor_problem:
        raise CheckpointError(anchor_problem)
    return checkpoint


def checkpoint_anchor_problem(checkpoint: RoundCheckpoint, provenance: ProvenanceRecorder | None) -> str | None:
    """None if the chain's last anchor of the run agrees with `checkpoint`, else why resuming would be wrong."""
    last_anchor = getattr(provenance, "last_anchor", None)
    if last_anchor is None:
        return None
    anchored = last_anchor(checkpoint.run_id)
    if anchored is None:
        if checkpoint.server_round:
            logger.warning(
                "run %s: no anchor found on the data chain, the checkpoint is at round %d (writes may wait in the outbox)",
                checkpoint.run_id, checkpoint.server_round,
            )
        return None
    anchored_round, anchored_digest = anchored
    anchored_digest = anchored_digest.lower().removeprefix("0x")
    if anchored_round < 1:
        return f"run {checkpoint.run_id}: the provenance recorder reports anchored round {anchored_round}, not a round number"
    where = f"run {checkpoint.run_id}: the data chain's last anchor is round {anchored_round}"
    if anchored_round > checkpoint.server_round:
        return (
            f"{where}, the latest checkpoint is round {checkpoint.server_round}: the coordinator stopped after anchoring "
            "a round it did not checkpoint, and sites will not train an anchored round again — the run cannot be resumed "
            "safely; start a new run"
        )
    if checkpoint.aggregate_digests[anchored_round - 1] != anchored_digest:
        return (
            f"{where} with aggregate {anchored_digest[:16]}..., the checkpoint has "
            f"{checkpoint.aggregate_digests[anchored_round - 1][:16]}... for that round — the checkpoint does not describe "
            "the anchored run (restored from another copy?); restore the checkpoints folder of this run"
        )
    if anchored_round < checkpoint.server_round:
        logger.warning(
            "%s, the checkpoint round %d: later anchors may still wait in the outbox", where, checkpoint.server_round
        )
    return None


def keep_metrics_up_to(run_dir: RunDirectory, checkpoint: RoundCheckpoint) -> set[tuple[int, str]]:
    """Cut metrics.jsonl back to what `checkpoint` covers (a crash may leave a half-done round); returns its (round, phase)s."""
    kept_lines, kept, dropped = [], set(), 0
    lines = run_dir.metrics_path.read_text(encoding="utf-8").splitlines() if run_dir.metrics_path.exists() else []
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key = (int(record["round"]), str(record["phase"]))
        except (ValueError, KeyError, TypeError):
            dropped += 1  # a line torn by the crash
            continue
        covered = key[0] < checkpoint.server_round or (
            key[0] == checkpoint.server_round and (key[1] == "train" or not checkpoint.evaluation_pending)
        )
        if covered and key not in kept:
            kept_lines.append(line)
            kept.add(key)
        else:
            dropped += 1
    if dropped:
        logger.warning("%s: %d line(s) after the checkpoint of round %d dropped", run_dir.metrics_path, dropped, checkpoint.server_round)
        atomic_write_text(run_dir.metrics_path, "".join(f"{line}\n" for line in kept_lines))
    return kept


def build_summary(
    config: MedtwinConfig,
    run_id: str,
    primary_metric: str,
    result: LoopResult,
    aggregator: Aggregator,
    *,
    wall_time_s: float,
    he_precision: dict[str, Any] | None = None,
) -> dict[str, Any]:
    num_parameters = result.num_parameters
    at_run_totals = None
    if he_precision is not None and he_precision["dp_noise_std"] and result.he_error_bounds:
        # the bound the sites reported at the run's real totals (fewer examples than the full scale: larger)
        at_run_totals = {"ratio_to_noise": max(result.he_error_bounds) / he_precision["dp_noise_std"]}
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
        "server_optimizer": config.strategy.server_optimizer,  # none: FedAvg's average; adam/yogi/avgm: applied by the sites
        "primary_metric": primary_metric,
        "decision_threshold": config.task.decision_threshold,  # binary: sensitivity/specificity cut-off
        "rounds_completed": result.rounds_completed,
        "sites": sorted(set(result.sites.values())),
        "final_metrics": {
            "sites": result.final_site_metrics,
            "pooled": result.final_pooled_metrics,
            # the sites' score histograms summed: what the histogram_pooled_* figures and the reliability plot come from
            "pooled_score_histogram": result.final_score_histogram.to_values() if result.final_score_histogram else None,
        },
        "privacy": result.privacy,
        "privacy_text": privacy_paragraph(config, result.privacy),
        "crypto": crypto,
        # CKKS precision target: from the DP noise or the config (None: no CKKS); registered on the data chain
        # with the HE parameters, so {**crypto.parameters, "he_precision": he_precision} hashes to he_params_hash
        "he_precision": he_precision,
        "he_precision_at_run_totals": at_run_totals,
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


def he_precision_record(config: MedtwinConfig, aggregator: Aggregator, *, grouped_by_patient: bool) -> dict[str, Any] | None:
    """The run's CKKS precision target against its DP noise floor, for the key set the run uses (None: no CKKS).
    `parameters_meet_target` is False when the key set was made for a coarser target than this config derives."""
    if aggregator.scheme != "ckks":
        return None
    parameters = CkksParameters.from_dict(aggregator.describe()["parameters"])
    precision = he_precision_of_run(
        config,
        num_sites=parameters.num_sites,
        max_total_examples=parameters.max_total_examples,
        grouped_by_patient=grouped_by_patient,
    )
    return precision.record(parameters) | {
        "parameters_meet_target": parameters.predicted_error_bound <= precision.max_relative_error
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
    *,
    resume: bool = False,
) -> ServerApp:
    """A ServerApp bound to `config`, or (None) to the config carried in the run's run_config.

    `resume=True` continues the run `config.run_id` after its latest checkpoint (see `run_federation`).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = dict(context.run_config)
        run_federation(
            grid,
            config or config_from_run_config(run_config),
            setup or CoordinatorSetup.from_run_config(run_config),
            provenance,
            resume=resume,
        )

    return app


app = build_server_app()
