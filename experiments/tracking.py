"""Optional experiment tracking: a finished run directory, logged to a local MLflow store.

Off by default. `tracking.mlflow_uri=sqlite:///mlflow.db` (or a path ending in `.db`) on `medtwin run`,
`python -m medtwin.experiments.run -m ...` or a deployed `medtwin run --federation ...` logs each run
once it has finished; `python -m medtwin.experiments.tracking <run dir> --mlflow-uri <store>` logs
one afterwards. Needs the `tracking` extra (`pip install -e '.[tracking]'`, which `make install`
includes). Browse with `mlflow ui --backend-store-uri <store>` (the full `mlflow` package).

What is logged is what the run directory already holds for the researcher — never patient data:
- params: the run's composed config (config.yaml), flattened (`strategy.learning_rate`, ...);
- metrics: each evaluated round's pooled figures under their one pooled name (step = round), each
  round's wall time, the final pooled figures (`final_<name>`) and the ε each site spent;
- tags: medtwin run id, task, crypto scheme, primary metric;
- artifacts: summary.json, report.md, config.yaml and the run's plots (PNG).

Only a local store is accepted (SQLite, MLflow's recommended local backend; its file store is in
maintenance mode): the figures stay on the researcher's machine. Each MLflow run is tagged with the
medtwin run id; logging a run id again (a resumed run) logs a new MLflow run, it never edits one.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from medtwin.core.config import MedtwinConfig
from medtwin.core.errors import ConfigError
from medtwin.core.rundir import RunDirectory

__all__ = ["check_tracking", "log_run", "store_uri", "track"]

logger = logging.getLogger("medtwin")

URI_KEY = "tracking.mlflow_uri"
INSTALL_FIX = "pip install -e '.[tracking]' (or `make install`), or leave tracking.mlflow_uri empty"
MAX_PARAM_CHARS = 500  # MLflow caps a param value at 6000 characters; a config value longer than this is not a setting


def store_uri(value: str) -> str:
    """The SQLAlchemy URI of a local SQLite store, from `sqlite:///path` or a path ending in `.db`."""
    if value.startswith("sqlite:///"):
        path = Path(value.removeprefix("sqlite:///"))
    elif "://" not in value and value.endswith(".db"):
        path = Path(value)
    else:
        raise ConfigError(
            URI_KEY, f"{value[:80]!r} is not a local MLflow store",
            "give sqlite:///path/mlflow.db or a path ending in .db: tracking stays on this machine",
        )  # fmt: skip
    return f"sqlite:///{path.expanduser().resolve()}"


def check_tracking(config: MedtwinConfig) -> None:
    """Before a run starts: tracking, if asked for, has a local store and MLflow is installed."""
    if not config.tracking.mlflow_uri:
        return
    store_uri(config.tracking.mlflow_uri)
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ConfigError(URI_KEY, "MLflow is not installed", INSTALL_FIX) from None


def _flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(tree, dict):
        flat: dict[str, str] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    value = tree if isinstance(tree, str) else yaml.safe_dump(tree, default_flow_style=True).strip().removesuffix("\n...")
    return {prefix.rstrip("."): value} if len(value) <= MAX_PARAM_CHARS else {}


def _finite(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    return {
        f"{prefix}{name}": float(value)
        for name, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


def log_run(run_path: Path, *, uri: str, experiment: str = "medtwin") -> str:
    """Log the finished run at `run_path` to the MLflow store `uri`; returns the MLflow run id."""
    import mlflow

    run_path = Path(run_path)
    directory = RunDirectory(run_path.parent, run_path.name)
    summary = directory.read_summary()
    config_path = run_path / "config.yaml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    uri = store_uri(uri)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:  # artifacts beside the database, not in the cwd
        artifacts = Path(uri.removeprefix("sqlite:///")).with_suffix(".artifacts")
        mlflow.create_experiment(experiment, artifact_location=artifacts.as_uri())
    mlflow.set_experiment(experiment)
    crypto = summary.get("crypto") or {}
    tags = {
        "medtwin.run_id": run_path.name, "medtwin.primary_metric": str(summary.get("primary_metric", "")),
        "medtwin.task": str((config.get("task") or {}).get("name", "")), "medtwin.crypto": str(crypto.get("scheme", "")),
    }  # fmt: skip
    with mlflow.start_run(run_name=run_path.name, tags=tags) as active:
        mlflow.log_params(_flatten(config))
        for record in directory.read_metrics():
            step = int(record.get("round", 0))
            mlflow.log_metrics(_finite(record.get("pooled") or {}, "pooled_"), step=step)
            mlflow.log_metrics(_finite({f"{record.get('phase', 'phase')}_time_s": record.get("time_s")}), step=step)
        final = summary.get("final_metrics") or {}
        mlflow.log_metrics(_finite(final.get("pooled") or {}, "final_"))
        spent = {site: values.get("epsilon") for site, values in (summary.get("privacy") or {}).items() if isinstance(values, dict)}
        mlflow.log_metrics(_finite(spent, "epsilon_"))
        mlflow.log_metrics(_finite({"update_bytes_per_parameter": crypto.get("bytes_per_parameter")}))
        for path in sorted([run_path / "summary.json", run_path / "report.md", config_path, *run_path.glob("*.png")]):
            if path.is_file():
                mlflow.log_artifact(str(path))
        return active.info.run_id


def _tracking_of(run_path: Path) -> tuple[str, str]:
    """(mlflow_uri, experiment) as the run's own config.yaml says — the same for every engine."""
    try:
        config = yaml.safe_load((run_path / "config.yaml").read_text(encoding="utf-8")) or {}
        tracking = config.get("tracking") or {}
        return str(tracking.get("mlflow_uri") or ""), str(tracking.get("experiment") or "medtwin")
    except (OSError, yaml.YAMLError, AttributeError):
        return "", "medtwin"


def track(run_path: Path) -> str | None:
    """After a run (simulated, swept or deployed): log it if its config sets `tracking.mlflow_uri`. A
    failure is reported, never raised — the run directory is complete either way and can be logged
    again with this module's command."""
    uri, experiment = _tracking_of(Path(run_path))
    if not uri:
        return None
    try:
        run_id = log_run(run_path, uri=uri, experiment=experiment)
    except Exception as error:  # noqa: BLE001 - tracking is optional; the run itself succeeded
        logger.warning(
            "run %s finished but was not logged to %s (%s: %s); log it later with "
            "`python -m medtwin.experiments.tracking %s --mlflow-uri %s`",
            Path(run_path).name, uri, type(error).__name__, str(error)[:200], run_path, uri,
        )  # fmt: skip
        return None
    logger.info("run %s logged to MLflow %s (experiment %r, MLflow run %s)", Path(run_path).name, uri, experiment, run_id)
    return run_id


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m medtwin.experiments.tracking", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run directory (<runs_dir>/<run_id>, with summary.json)")
    parser.add_argument("--mlflow-uri", required=True, help="the local store: sqlite:///path/mlflow.db or path.db")
    parser.add_argument("--experiment", default="medtwin")
    arguments = parser.parse_args(argv)
    try:
        store_uri(arguments.mlflow_uri)
    except ConfigError as error:
        parser.error(str(error))
    print(log_run(arguments.run_dir, uri=arguments.mlflow_uri, experiment=arguments.experiment))


if __name__ == "__main__":
    main()
