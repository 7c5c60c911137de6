"""Metrics clinicians read, on one site's test rows, computed with scikit-learn.

Binary (scores are predicted probabilities of label 1):
- ``accuracy``: at 0.5, FLamby's definition (comparable with its published tables);
- ``auroc`` (`roc_auc_score`), ``auprc`` (`average_precision_score`), ``brier`` (`brier_score_loss`);
- ``ece``: expected calibration error over ``CALIBRATION_BINS`` = 10 equal-width probability bins,
  binned exactly as `sklearn.calibration.calibration_curve(strategy="uniform")` bins:
  sum over non-empty bins of (rows in bin / rows) * |mean label - mean score|;
- ``sensitivity`` (true-positive rate) and ``specificity`` (true-negative rate) calling a row
  positive when its score >= `decision_threshold` (`task.decision_threshold`, default 0.5).

Regression: ``mse``, ``rmse``, ``mae``, ``r2`` (`r2_score`).

Every result carries ``n``, the row count. A metric that is undefined on these rows — AUROC, AUPRC
with a single class, sensitivity without positives, R² with fewer than 2 rows — is NaN, never an
error: a small site's test split may hold one class only.

How the coordinator pools them over sites, and what each pooled figure is called:
`core/pooled_metrics.py`.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
    roc_auc_score,
)

from ..score_histogram import CALIBRATION_BINS

__all__ = [
    "BINARY_METRICS",
    "CALIBRATION_BINS",
    "REGRESSION_METRICS",
    "binary_metrics",
    "expected_calibration_error",
    "regression_metrics",
]

BINARY_METRICS = ("accuracy", "auroc", "auprc", "brier", "ece", "sensitivity", "specificity")
REGRESSION_METRICS = ("mse", "rmse", "mae", "r2")
NAN = float("nan")


def expected_calibration_error(labels: np.ndarray, scores: np.ndarray, *, num_bins: int = CALIBRATION_BINS) -> float:
    """ECE over `num_bins` equal-width bins of [0, 1] (calibration_curve's uniform binning); NaN on no rows."""
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    scores = np.clip(np.asarray(scores, dtype=np.float64).reshape(-1), 0.0, 1.0)
    if len(scores) == 0:
        return NAN
    inner_edges = np.linspace(0.0, 1.0, num_bins + 1)[1:-1]
    bins = np.searchsorted(inner_edges, scores)
    rows = np.bincount(bins, minlength=num_bins).astype(np.float64)
    score_sums = np.bincount(bins, weights=scores, minlength=num_bins)
    label_sums = np.bincount(bins, weights=labels, minlength=num_bins)
    filled = rows > 0
    gaps = np.abs(label_sums[filled] - score_sums[filled]) / rows[filled]
    return float(np.sum(rows[filled] / len(scores) * gaps))


def _rate(hits: np.ndarray, among: np.ndarray) -> float:
    return float(np.mean(hits[among])) if among.any() else NAN


def binary_metrics(labels: np.ndarray, scores: np.ndarray, *, decision_threshold: float = 0.5) -> dict[str, float]:
    """Every binary metric of probabilities `scores` against 0/1 `labels`, plus `n`."""
    positive = np.asarray(labels, dtype=np.float64).reshape(-1) >= 0.5
    scores = np.clip(np.asarray(scores, dtype=np.float64).reshape(-1), 0.0, 1.0)
    count = len(positive)
    if count == 0:
        return {name: NAN for name in BINARY_METRICS} | {"n": 0.0}
    both_classes = 0 < positive.sum() < count
    called = scores >= decision_threshold
    return {
        "accuracy": float(np.mean((scores >= 0.5) == positive)),
        "auroc": float(roc_auc_score(positive, scores)) if both_classes else NAN,
        "auprc": float(average_precision_score(positive, scores)) if both_classes else NAN,
        "brier": float(brier_score_loss(positive, scores)),
        "ece": expected_calibration_error(positive, scores),
        "sensitivity": _rate(called, positive),
        "specificity": _rate(~called, ~positive),
        "n": float(count),
    }


def regression_metrics(targets: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """MSE, RMSE, MAE and R² of `predictions` against `targets`, plus `n`."""
    targets = np.asarray(targets, dtype=np.float64).reshape(-1)
    predictions = np.asarray(predictions, dtype=np.float64).reshape(-1)
    count = len(targets)
    if count == 0:
        return {name: NAN for name in REGRESSION_METRICS} | {"n": 0.0}
    mse = float(mean_squared_error(targets, predictions))
    return {
        "mse": mse,
        "rmse": math.sqrt(mse),
        "mae": float(mean_absolute_error(targets, predictions)),
        "r2": float(r2_score(targets, predictions)) if count >= 2 else NAN,
        "n": float(count),
    }
