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
"""

from __future__ import annotations

import math

__all__ = [
    "SITE_LEVEL_METRICS",
    "WEIGHTED_SITE_MEAN_PREFIX",
    "pool_site_metrics",
    "pooled_name",
]

SITE_LEVEL_METRICS = frozenset({"auroc", "auprc", "ece", "sensitivity", "specificity", "r2"})
WEIGHTED_SITE_MEAN_PREFIX = "row_weighted_site_mean_"


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
