"""The FLamby reproduction's table from per-seed baselines (experiments/reproduce_flamby_heart.py)."""

from __future__ import annotations

import pytest

from medtwin.experiments.reproduce_flamby_heart import BASELINE_LABELS, SETTINGS, markdown, table_rows

MODELS = [*BASELINE_LABELS, "federated"]


def baselines(accuracy: float) -> dict:
    """One run's `summary["baselines"]` as `simulate` writes it (only what the table reads)."""
    rows = {model: {"pooled_test": accuracy + index / 100, "mean_of_sites": accuracy - 0.05} for index, model in enumerate(MODELS)}
    metrics = {model: {"auroc": 0.8, "brier": 0.2} for model in MODELS}
    return {"rows": rows, "pooled_test_metrics": metrics}


def test_one_row_per_baseline_then_per_setting_with_flamby_beside_it() -> None:
    per_seed = {SETTINGS[0].label: [baselines(0.70), baselines(0.80)], SETTINGS[3].label: [baselines(0.60)]}
    rows = table_rows(per_seed)
    assert [row["model"] for row in rows] == [*BASELINE_LABELS.values(), SETTINGS[0].label, SETTINGS[3].label]
    fedavg = rows[len(BASELINE_LABELS)]
    assert fedavg["pooled_test_accuracy"]["mean"] == pytest.approx(0.75 + 0.05)  # federated is the 6th model: +0.05
    assert fedavg["pooled_test_accuracy"]["std"] == pytest.approx(0.05) and fedavg["pooled_test_accuracy"]["n"] == 2
    assert fedavg["flamby_pooled_test_accuracy"] == 0.748  # FLamby's FedAvg
    assert rows[-1]["flamby_pooled_test_accuracy"] is None  # FLamby publishes no comparable FedAdam figure
    assert rows[0]["model"] == "Pooled training" and rows[0]["flamby_pooled_test_accuracy"] == 0.795
    text = markdown(rows, seeds=(42, 43), commit="abc1234", command="python -m medtwin.experiments.reproduce_flamby_heart")
    assert "seeds 42 43, commit `abc1234`" in text
    assert f"| {SETTINGS[0].label} | 0.800 ± 0.050 | 0.748 |" in text
