"""One figure per metric over all sites, from the metrics the sites released — and its one name.

The coordinator never sees a patient's score, only each site's released metrics and its test-row
count `n`. What that allows differs by metric, and a pooled figure's name says which it is:

- a mean over test rows (accuracy, Brier, MSE, MAE, and the vitals twin's masked means) pooled as
  the test-row-weighted mean of the site values IS the metric on the union of the sites' test rows;
  it keeps its name (`accuracy`, ...). RMSE on the union is the square root of that pooled MSE.
- AUROC, AUPRC, ECE, sensitivity, specificity and R² are not means over rows: the metric on the
  union cannot be computed from per-site values. The coordinator reports the test-row-weighted mean
  of the site values under the name `row_weighted_site_mean_<metric>` (e.g.
  `row_weighted_site_mean_auroc`), never under the metric's own name.

A metric a site did not release (withheld under `dp`, or undefined on its split, like AUROC on a
one-class test split) is pooled over the sites that released it, weighted by their rows only.

AUROC, AUPRC and ECE on the union of the test sets come from the sites' per-class score histograms
(core/score_histogram.py), summed bin by bin: `histogram_pooled_auroc`, `histogram_pooled_auprc`,
`histogram_pooled_ece`, with `histogram_pooled_auroc_max_error` (how far the exact AUROC on the union
can be from the histogram figure) and `histogram_pooled_n` (the test rows the histograms cover: sites
under `dp` withhold theirs). The name says how the figure was made — from binned scores, not from the
rows themselves — and never collides with the row-weighted site means, which are still reported: the
two answer different questions (the model on all patients vs the typical site).
"""

from __future__ import annotations

import math

from .score_histogram import ScoreHistogram, pool_histograms

__all__ = [
    "HISTOGRAM_POOLED_METRICS",
    "HISTOGRAM_POOLED_PREFIX",
    "SITE_LEVEL_METRICS",
    "WEIGHTED_SITE_MEAN_PREFIX",
    "histogram_pooled_metrics",
    "pool_site_metrics",
    "pooled_name",
]

SITE_LEVEL_METRICS = frozenset({"auroc", "auprc", "ece", "sensitivity", "specificity", "r2"})
WEIGHTED_SITE_MEAN_PREFIX = "row_weighted_site_mean_"
HISTOGRAM_POOLED_PREFIX = "histogram_pooled_"
HISTOGRAM_POOLED_METRICS = ("auroc", "auprc", "ece")


def pooled_name(metric: str) -> str:
    """The key under which the pooled figure of `metric` is reported (summary, report, run table)."""
    return WEIGHTED_SITE_MEAN_PREFIX + metric if metric in SITE_LEVEL_METRICS else metric


def pool_site_metrics(site_metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """Every released metric pooled over sites as the module docstring says, plus `n` (all test rows)."""
    counted = {site: metrics for site, metrics in site_metrics.items() if metrics.get("n", 0.0) > 0}
    total = sum(metrics["n"] for metrics in counted.values())
    if total <= 0:
        return {}
    names = sorted({name for metrics in counted.values() for name in metrics if name not in ("n", "rmse")})
    pooled: dict[str, float] = {}
    for name in names:
        released = [metrics for metrics in counted.values() if name in metrics and math.isfinite(metrics[name])]
        rows = sum(metrics["n"] for metrics in released)
        if rows > 0:
            pooled[pooled_name(name)] = sum(metrics[name] * metrics["n"] for metrics in released) / rows
    if "mse" in pooled and any("rmse" in metrics for metrics in counted.values()):
        pooled["rmse"] = math.sqrt(max(pooled["mse"], 0.0))
    pooled["n"] = total
    return dict(sorted(pooled.items()))


def histogram_pooled_metrics(histograms: dict[str, ScoreHistogram]) -> tuple[dict[str, float], ScoreHistogram | None]:
    """(figures named `histogram_pooled_<metric>`, the summed histogram) from the sites' verified
    histograms; a figure undefined on the union (AUROC with one class) is left out."""
    pooled = pool_histograms(histograms[site] for site in sorted(histograms))
    if pooled is None or pooled.rows == 0:
        return {}, None
    figures = pooled.metrics() | {"n": float(pooled.rows)}
    return {HISTOGRAM_POOLED_PREFIX + name: value for name, value in sorted(figures.items()) if math.isfinite(value)}, pooled
