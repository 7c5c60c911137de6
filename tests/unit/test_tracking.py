"""Optional MLflow tracking (experiments/tracking.py): a run directory logged to a local SQLite store."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlflow  # the tracking extra is part of `make install`
import pytest
import yaml

from medtwin.core.config import compose_config
from medtwin.core.errors import ConfigError
from medtwin.experiments.tracking import check_tracking, log_run, store_uri, track



def write_run(root: Path, *, mlflow_uri: str = "") -> Path:
    """A finished run directory as `simulate` leaves it (only what tracking reads)."""
    run = root / "runs" / "heart-run"
    run.mkdir(parents=True)
    config = {"task": {"name": "fed_heart_disease"}, "strategy": {"learning_rate": 0.01, "local_steps": 100}, "seed": 42,
              "tracking": {"mlflow_uri": mlflow_uri, "experiment": "tests"}}  # fmt: skip
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    summary = {
        "primary_metric": "accuracy",
        "final_metrics": {"pooled": {"accuracy": 0.8, "row_weighted_site_mean_auroc": 0.85, "n": 100.0}, "sites": {}},
        "privacy": {"cleveland": {"epsilon": 2.9, "delta": 1e-5}, "va": {"epsilon": float("nan")}},
        "crypto": {"scheme": "ckks", "bytes_per_parameter": 4.2, "num_parameters": 14},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    records = [{"phase": "train", "round": 1, "time_s": 2.0}, {"phase": "evaluate", "round": 1, "time_s": 1.0, "pooled": {"accuracy": 0.7}},
               {"phase": "train", "round": 2, "time_s": 2.5}, {"phase": "evaluate", "round": 2, "time_s": 1.0, "pooled": {"accuracy": 0.8}}]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    (run / "accuracy_per_round.png").write_bytes(b"\x89PNG not really")
    return run


def test_a_run_directory_is_logged_with_params_metrics_and_artifacts(tmp_path: Path) -> None:
    run = write_run(tmp_path)
    store = tmp_path / "mlflow.db"
    mlflow_run_id = log_run(run, uri=str(store), experiment="tests")
    client = mlflow.MlflowClient(tracking_uri=store_uri(str(store)))
    logged = client.get_run(mlflow_run_id)
    assert logged.data.params["strategy.learning_rate"] == "0.01" and logged.data.params["task.name"] == "fed_heart_disease"
    assert logged.data.tags["medtwin.run_id"] == "heart-run" and logged.data.tags["medtwin.crypto"] == "ckks"
    assert logged.data.metrics["final_accuracy"] == 0.8 and logged.data.metrics["final_row_weighted_site_mean_auroc"] == 0.85
    assert logged.data.metrics["epsilon_cleveland"] == 2.9 and "epsilon_va" not in logged.data.metrics  # NaN is not a figure
    history = client.get_metric_history(mlflow_run_id, "pooled_accuracy")
    assert [(point.step, point.value) for point in history] == [(1, 0.7), (2, 0.8)]
    assert [point.value for point in client.get_metric_history(mlflow_run_id, "train_time_s")] == [2.0, 2.5]
    artifacts = {artifact.path for artifact in client.list_artifacts(mlflow_run_id)}
    assert {"summary.json", "config.yaml", "accuracy_per_round.png"} <= artifacts
    assert (tmp_path / "mlflow.artifacts").is_dir()  # beside the store, not in the working directory


def test_track_follows_the_runs_own_config(tmp_path: Path) -> None:
    assert track(write_run(tmp_path / "off")) is None  # tracking off: nothing logged, nothing created
    assert not list((tmp_path / "off").glob("*.db"))
    store = tmp_path / "on" / "mlflow.db"
    run = write_run(tmp_path / "on", mlflow_uri=f"sqlite:///{store}")
    mlflow_run_id = track(run)
    assert mlflow.MlflowClient(tracking_uri=store_uri(str(store))).get_run(mlflow_run_id).info.run_name == "heart-run"


def test_a_failed_log_never_fails_the_finished_run(tmp_path: Path, caplog) -> None:
    run = write_run(tmp_path, mlflow_uri=str(tmp_path / "mlflow.db"))
    (run / "summary.json").write_text("{not json")
    assert track(run) is None
    assert "log it later with" in caplog.text


@pytest.mark.parametrize("uri", ["http://tracking.example:5000", "databricks", "file:./mlruns", "mlflow.sqlite"])
def test_only_a_local_store_is_accepted(uri: str) -> None:
    with pytest.raises(ConfigError, match="tracking.mlflow_uri"):
        store_uri(uri)


def test_tracking_is_checked_at_config_load(monkeypatch) -> None:
    config = compose_config(["tracking.mlflow_uri=results/mlflow.db"])
    check_tracking(config)  # installed: fine
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"tracking.mlflow_uri.*\.\[tracking\]"):
        check_tracking(config)
    check_tracking(compose_config([]))  # off by default: nothing to check
