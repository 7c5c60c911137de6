"""Run one federated experiment in Flower's simulation engine (Ray): `medtwin run ...`."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from medtwin.client.app import build_client_app
from medtwin.core.config import MedtwinConfig
from medtwin.server.app import RunExtras, build_server_app, make_run_id

from .baselines import compute_baselines, final_model_evaluator

logger = logging.getLogger("medtwin")

OFFLINE_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_DEDUP_LOGS": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
}


def simulate(config: MedtwinConfig) -> Path:
    """Baselines (if enabled), then the federated run on virtual sites; returns the run directory."""
    for key, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    from flwr.simulation import run_simulation

    if not config.run_id:
        config.run_id = make_run_id(config)
    extras = RunExtras()
    if config.baselines.enabled:
        logger.info("training baselines: each site alone, and pooled")
        extras = RunExtras(baselines=compute_baselines(config), evaluate_final_model=final_model_evaluator(config))
    server_app = build_server_app(config, extras)
    client_app = build_client_app(config)
    backend_config = {
        "client_resources": {"num_cpus": config.federation.client_num_cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": os.cpu_count() or 2, "include_dashboard": False, "log_to_driver": True},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=config.task.num_sites,
            backend_config=backend_config,
        )
    run_path = Path(config.runs_dir) / config.run_id
    if not (run_path / "summary.json").exists():
        raise RuntimeError(f"the simulation ended without writing {run_path / 'summary.json'}; see the log above")
    return run_path
