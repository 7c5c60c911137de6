"""How a site releases evaluation metrics, as its site file says: exact, rounded, or DP-noised.

`exact` releases every metric the task computed; `rounded` rounds every metric but `n` to
`evaluation.decimals`; a metric undefined on the site's split (NaN, e.g. AUROC on a one-class test
split) is released under no policy. `dp` releases only
`DP_RELEASED_METRICS`, each with Laplace noise of sensitivity 1/n (a mean over the test rows of a
value in [0, 1]) and the release's ε split evenly across them; everything else is withheld. The ε is
reserved in the site's budget ledger before anything leaves.

`DP_RELEASED_METRICS` is accuracy alone, on purpose. AUROC, AUPRC, sensitivity and specificity are
not means over all rows: one patient moves them by up to 1/(rows of the smaller class), which is
not public, so a 1/n sensitivity would understate their noise. Brier is a mean over rows (1/n
would be right) but adding it splits the same ε across two metrics, doubling accuracy's noise;
ECE is not a row mean, and MSE, MAE, RMSE and R² are unbounded. Releasing any of them under DP needs its
own sensitivity analysis first.

A binary site's per-class score histogram (core/score_histogram.py: its test rows counted per label in
1000 score bins, with each bin's score sum) lets the coordinator compute AUROC, AUPRC and ECE on the
union of all sites' test sets. It is row-level: anyone who can score a known patient with the model
reads that patient's label off the bin. So it leaves a site only if its file opts in
(`evaluation.score_histogram: true`; off by default). Then `exact` releases it as computed, `rounded` with each bin's score sum
rounded to `evaluation.decimals` (the counts are integers already). `dp` withholds it: the counts
place every test patient's label and score to 0.001, one patient moves up to two counts by one, and
noising 2000 counts with the release's ε would leave the figures meaningless at hospital test-set
sizes (and a noisy count can be negative or fractional, which the coordinator refuses). Releasing it
under DP needs its own mechanism (e.g. a coarser histogram with its own ε), not this one.
"""

from __future__ import annotations

import math
import secrets

import numpy as np

from medtwin.core.score_histogram import ScoreHistogram

from .site_file import EvaluationPolicy

__all__ = ["DP_RELEASED_METRICS", "release_metrics", "release_score_histogram"]

DP_RELEASED_METRICS = ("accuracy",)


def release_metrics(metrics: dict[str, float], policy: EvaluationPolicy) -> dict[str, float]:
    """The metrics as released; `n` (the test-set size) is public, like the training-set size.

    A metric undefined on this site's split (NaN, e.g. AUROC when the test rows hold one class) is
    not released under any policy: the coordinator accepts finite numbers only.
    """
    metrics = {name: value for name, value in metrics.items() if math.isfinite(value)}
    if policy.release == "exact":
        return metrics
    if policy.release == "rounded":
        return {name: value if name == "n" else round(value, policy.decimals) for name, value in metrics.items()}
    count = max(float(metrics.get("n", 0.0)), 1.0)
    bounded = [name for name in DP_RELEASED_METRICS if name in metrics]
    if not bounded:
        return {"n": metrics.get("n", 0.0)}
    epsilon_each = policy.epsilon_per_release / len(bounded)
    generator = np.random.default_rng(secrets.randbits(128))  # never the config seed: noise must be unpredictable
    released = {"n": metrics.get("n", 0.0)}
    for name in bounded:
        noisy = metrics[name] + generator.laplace(0.0, 1.0 / (count * epsilon_each))
        released[name] = round(float(min(1.0, max(0.0, noisy))), policy.decimals)
    return released


def release_score_histogram(histogram: ScoreHistogram | None, policy: EvaluationPolicy) -> ScoreHistogram | None:
    """The score histogram as released under `policy` (see the module docstring), or None if withheld."""
    if histogram is None or not policy.score_histogram or policy.release == "dp":
        return None
    if policy.release == "rounded":
        return histogram.rounded(policy.decimals)
    return histogram
