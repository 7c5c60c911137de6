"""The coordinator's Flower ServerApp: run the round loop, write the run directory."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from medtwin.core.config import MedtwinConfig, config_to_yaml
from medtwin.core.protocol import average_from_sum, unpack_plain
from medtwin.core.report import render_report
from medtwin.core.rundir import RunDirectory, atomic_write_text
from medtwin.core.runconfig import config_from_run_config
from medtwin.core.tasks import get_task

from .aggregation import PlainAggregator
from .loop import LoopResult, RoundLoop
from .progress import RoundProgress

logger = logging.getLogger("medtwin.coordinator")

FinalModelEvaluator = Callable[[np.ndarray], dict[str, Any]]


@dataclass
class RunExtras:
    """What the wiring layer adds in simulation, where it can see every site's data."""

    baselines: dict[str, Any] | None = None
    evaluate_final_model: FinalModelEvaluator | None = None  # plaintext runs only


def make_run_id(config: MedtwinConfig) -> str:
    if config.run_id:
        return config.run_id
    digest = hashlib.sha256(config_to_yaml(config).encode()).hexdigest()[:6]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{config.task.name}-{digest}"


def run_federation(grid: Grid, config: MedtwinConfig, extras: RunExtras | None = None) -> Path:
    """Run a whole federated training and return its run directory."""
    extras = extras or RunExtras()
    started = time.monotonic()
    run_id = make_run_id(config)
    run_dir = RunDirectory(config.runs_dir, run_id)
    run_dir.write_config(config_to_yaml(config))
    task = get_task(config.task)
    logger.info("run %s: task %s, strategy %s, writing to %s", run_id, config.task.name, config.strategy.name, run_dir.path)
    with RoundProgress(
        total_rounds=config.federation.num_rounds, enabled=config.progress, primary_metric=task.primary_metric
    ) as progress:

        def on_record(record: dict) -> None:
            run_dir.append_metrics(record)
            progress.record(record)

        loop = RoundLoop(grid=grid, config=config, run_id=run_id, aggregator=PlainAggregator(), on_record=on_record)
        result = loop.run()
    summary = build_summary(config, run_id, task.primary_metric, result, extras, wall_time_s=time.monotonic() - started)
    run_dir.write_summary(summary)
    atomic_write_text(run_dir.path / "report.md", render_report(summary, run_dir.read_metrics(), run_dir.path))
    logger.info("run %s finished: %s", run_id, run_dir.path / "report.md")
    return run_dir.path


def build_summary(
    config: MedtwinConfig,
    run_id: str,
    primary_metric: str,
    result: LoopResult,
    extras: RunExtras,
    *,
    wall_time_s: float,
) -> dict[str, Any]:
    num_parameters = 0
    baselines = extras.baselines
    if result.aggregate is not None:
        average, _ = average_from_sum(unpack_plain(result.aggregate))
        num_parameters = int(average.size)
        if extras.evaluate_final_model is not None and baselines is not None:
            baselines = {**baselines, "rows": {**baselines["rows"], "federated": extras.evaluate_final_model(average)}}
    return {
        "run_id": run_id,
        "task": config.task.name,
        "strategy": config.strategy.name,
        "primary_metric": primary_metric,
        "rounds_completed": result.rounds_completed,
        "sites": sorted(set(result.sites.values())),
        "final_metrics": {"sites": result.final_site_metrics, "pooled": result.final_pooled_metrics},
        "privacy": {},
        "crypto": {
            "scheme": "plain",
            "parameters": {"dtype": "float64"},
            "num_parameters": num_parameters,
            "bytes_per_parameter": result.update_bytes / max(1, result.accepted_updates) / max(1, num_parameters),
            "max_decryption_error": 0.0,
        },
        "chain": {"backend": config.chain.name, "chain_ids": {}, "contracts": {}, "anchors_written": 0},
        "baselines": baselines,
        "rejections": [
            {"round": rejection.server_round, "site": rejection.site_id, "reason": rejection.reason} for rejection in result.rejections
        ],
        "round_time_s": result.round_times_s,
        "wall_time_s": wall_time_s,
        "seed": config.seed,
    }


def build_server_app(config: MedtwinConfig | None = None, extras: RunExtras | None = None) -> ServerApp:
    """A ServerApp bound to `config`, or (None) to the config carried in the run's run_config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, config or config_from_run_config(context.run_config), extras)

    return app


app = build_server_app()
