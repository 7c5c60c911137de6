"""Clinical metrics against scikit-learn on the same scores, and how sites release them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
    roc_auc_score,
)

from medtwin.client.release import DP_RELEASED_METRICS, release_metrics
from medtwin.client.site_file import EvaluationPolicy
from medtwin.core.config import compose_config
from medtwin.core.errors import ConfigError
from medtwin.core.tasks import get_task
from medtwin.core.tasks.metrics import BINARY_METRICS, binary_metrics, expected_calibration_error, regression_metrics


def _scored(seed: int = 0, count: int = 400) -> tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(seed)
    labels = (generator.random(count) < 0.3).astype(np.float32)
    scores = np.clip(0.3 + 0.35 * (labels - 0.3) + generator.normal(0, 0.2, count), 0, 1).astype(np.float32)
    return labels, scores


def test_binary_metrics_equal_scikit_learn_on_the_same_scores() -> None:
    labels, scores = _scored()
    metrics = binary_metrics(labels, scores)
    assert metrics["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert metrics["auprc"] == pytest.approx(average_precision_score(labels, scores))
    assert metrics["brier"] == pytest.approx(brier_score_loss(labels, scores))
    assert metrics["accuracy"] == pytest.approx(np.mean((scores >= 0.5) == (labels == 1)))
    prob_true, prob_pred = calibration_curve(labels, scores, n_bins=10, strategy="uniform")
    bins = np.searchsorted(np.linspace(0, 1, 11)[1:-1], scores)
    weights = np.bincount(bins, minlength=10)[np.bincount(bins, minlength=10) > 0] / len(scores)
    assert metrics["ece"] == pytest.approx(float(np.sum(weights * np.abs(prob_true - prob_pred))))
    assert set(metrics) == {*BINARY_METRICS, "n"} and metrics["n"] == 400.0


def test_sensitivity_and_specificity_at_a_threshold() -> None:
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0], dtype=np.float32)
    scores = np.array([0.9, 0.6, 0.4, 0.2, 0.7, 0.35, 0.3, 0.1, 0.0], dtype=np.float32)
    at_half = binary_metrics(labels, scores)
    assert at_half["sensitivity"] == pytest.approx(2 / 4) and at_half["specificity"] == pytest.approx(4 / 5)
    lower = binary_metrics(labels, scores, decision_threshold=0.3)
    assert lower["sensitivity"] == pytest.approx(3 / 4) and lower["specificity"] == pytest.approx(2 / 5)  # >= is positive
    assert lower["accuracy"] == at_half["accuracy"]  # accuracy stays at 0.5 (FLamby's definition)


def test_ece_is_near_zero_when_calibrated_and_large_when_not() -> None:
    generator = np.random.default_rng(1)
    scores = generator.random(200_000)
    calibrated_labels = (generator.random(scores.size) < scores).astype(np.float64)
    assert expected_calibration_error(calibrated_labels, scores) < 0.01
    overconfident = np.where(generator.random(scores.size) < 0.5, 0.95, 0.05)
    coin_flips = (generator.random(scores.size) < 0.5).astype(np.float64)  # the truth is 50/50 whatever the score
    assert expected_calibration_error(coin_flips, overconfident) == pytest.approx(0.45, abs=0.01)


def test_undefined_metrics_are_nan_not_errors() -> None:
    one_class = binary_metrics(np.ones(5), np.linspace(0, 1, 5))
    assert math.isnan(one_class["auroc"]) and math.isnan(one_class["auprc"]) and math.isnan(one_class["specificity"])
    assert one_class["sensitivity"] == pytest.approx(0.6)
    assert all(math.isnan(value) for name, value in binary_metrics(np.zeros(0), np.zeros(0)).items() if name != "n")
    assert math.isnan(regression_metrics(np.ones(1), np.zeros(1))["r2"])


def test_regression_metrics_equal_scikit_learn() -> None:
    generator = np.random.default_rng(2)
    targets = generator.normal(size=300)
    predictions = targets + generator.normal(0, 0.5, 300)
    metrics = regression_metrics(targets, predictions)
    assert metrics["mse"] == pytest.approx(mean_squared_error(targets, predictions))
    assert metrics["rmse"] == pytest.approx(math.sqrt(mean_squared_error(targets, predictions)))
    assert metrics["mae"] == pytest.approx(mean_absolute_error(targets, predictions))
    assert metrics["r2"] == pytest.approx(r2_score(targets, predictions))


def test_a_binary_task_evaluates_every_metric_at_the_configured_threshold() -> None:
    config = compose_config(["task=fed_heart_disease", "task.decision_threshold=0.3"])
    task = get_task(config.task)
    site = task.load_site(0)
    torch.manual_seed(0)
    model = task.build_model()
    metrics = task.evaluate(model, site.x_test, site.y_test)
    with torch.no_grad():
        scores = model(torch.from_numpy(site.x_test)).reshape(-1).numpy()
    assert metrics == pytest.approx(binary_metrics(site.y_test, scores, decision_threshold=0.3))
    assert metrics["auroc"] == pytest.approx(roc_auc_score(site.y_test, scores))


def test_a_regression_task_evaluates_mse_rmse_mae_r2() -> None:
    task = get_task(compose_config(["task=diabetes_progression"]).task)
    site = task.load_site(0)
    torch.manual_seed(0)
    assert set(task.evaluate(task.build_model(), site.x_test, site.y_test)) == {"mse", "rmse", "mae", "r2", "n"}


def test_a_decision_threshold_outside_0_1_is_refused_at_config_load() -> None:
    with pytest.raises(ConfigError, match="task.decision_threshold"):
        compose_config(["task.decision_threshold=1.5"])


# --- releases of the new metrics ------------------------------------------------------------------


def test_exact_and_rounded_releases_carry_every_defined_metric() -> None:
    labels, scores = _scored()
    metrics = binary_metrics(labels, scores)
    assert release_metrics(metrics, EvaluationPolicy(release="exact")) == metrics
    rounded = release_metrics(metrics, EvaluationPolicy(release="rounded", decimals=2))
    assert set(rounded) == set(metrics) and rounded["n"] == 400.0
    assert all(rounded[name] == round(metrics[name], 2) for name in BINARY_METRICS)


def test_no_policy_releases_an_undefined_metric() -> None:
    one_class = binary_metrics(np.ones(8), np.linspace(0, 1, 8))
    for release in ("exact", "rounded", "dp"):
        released = release_metrics(one_class, EvaluationPolicy(release=release))
        assert all(math.isfinite(value) for value in released.values())
        assert "auroc" not in released and "specificity" not in released


def test_dp_release_stays_on_accuracy_with_the_whole_epsilon() -> None:
    """AUROC & co. have no 1/n sensitivity: a DP release withholds them and keeps accuracy's noise as before."""
    labels, scores = _scored(count=10_000)
    metrics = binary_metrics(labels, scores)
    assert DP_RELEASED_METRICS == ("accuracy",)
    policy = EvaluationPolicy(release="dp", epsilon_per_release=1.0, decimals=6)
    draws = [release_metrics(metrics, policy) for _ in range(400)]
    assert all(set(draw) == {"accuracy", "n"} for draw in draws)
    noise = np.array([draw["accuracy"] - metrics["accuracy"] for draw in draws])
    # Laplace scale 1/(n * eps) = 1e-4 with the whole epsilon on accuracy (std sqrt(2) * 1e-4)
    assert 0.7e-4 < float(np.std(noise)) < 2.1e-4
    regression = regression_metrics(np.arange(10.0), np.arange(10.0) + 1)
    assert release_metrics(regression, policy) == {"n": 10.0}
