"""Hydra entry point: `python -m medtwin.experiments.run [-m] key=value ...` (also `medtwin run -m ...`).

Thin on purpose: Hydra composes the packaged configs (the tree `medtwin run` composes), the result is
converted and validated once (`to_config`), and `simulate` runs it — the code path of `medtwin run`.
With `-m` Hydra's launcher runs one job per point of the sweep; each job's run directory lands in its
own job folder under the sweep folder, beside Hydra's `.hydra/overrides.yaml`:

    <hydra.sweep.dir>/<job num>/.hydra/overrides.yaml
    <hydra.sweep.dir>/<job num>/<run_id>/summary.json, metrics.jsonl, ...

`python -m medtwin.experiments.collect <hydra.sweep.dir>` turns that folder into one results table.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from medtwin.core.config import MedtwinConfig
from medtwin.core.config.compose import (
    CONFIG_MODULE,
    check_override,
    register_schemas,
    to_config,
)
from medtwin.core.rundir import RunDirectory
from omegaconf import DictConfig

from .tracking import check_tracking, track

logger = logging.getLogger("medtwin")

CONFIG_NAME = "config"  # as compose_config composes it
QUIET_LOGGERS = ("flwr", "ray", "alembic")


def job_config(cfg: DictConfig) -> MedtwinConfig:
    """The typed config of this Hydra job; in a sweep, its run directory goes into the job's folder."""
    for override in HydraConfig.get().overrides.task:
        check_override(override)  # the same named refusals as `medtwin run`
    config = to_config(cfg)
    hydra_config = HydraConfig.get()
    if hydra_config.mode == RunMode.MULTIRUN:
        config.runs_dir = hydra_config.runtime.output_dir  # <sweep dir>/<job num>: one run per job folder
    return config


def primary_result(run_path: Path) -> float:
    """The primary metric of a finished run's federated model on the pooled test set (what a sweeper such
    as Optuna optimises): with baselines, the figure their table compares with each site alone and pooled
    training (the pooled test rows, pooled-train normalisation); without, the sites' pooled evaluation."""
    summary = RunDirectory(run_path.parent, run_path.name).read_summary()
    federated = summary.get("baselines", {}).get("rows", {}).get("federated")
    value = federated["pooled_test"] if federated else summary["final_metrics"]["pooled"].get(summary["primary_metric"])
    return float(value) if value is not None else math.nan


register_schemas()  # `base_config` and the `base_<group>` schemas the YAML defaults name


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name=CONFIG_NAME)
def main(cfg: DictConfig) -> float:
    from .simulate import simulate

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    config = job_config(cfg)
    check_tracking(config)
    run_path = simulate(config)
    track(run_path)
    result = primary_result(run_path)
    logger.info("run directory %s: pooled %s", run_path, result)
    return result


if __name__ == "__main__":
    main()
