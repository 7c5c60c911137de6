"""How a site releases evaluation metrics, as its site file says: exact, rounded, or DP-noised.

`dp` adds Laplace noise to each bounded metric (values in [0, 1] that are means over the test
rows: sensitivity 1/n) with the release's ε split evenly across them; unbounded metrics (MSE, MAE)
are withheld under `dp`. The ε is reserved in the site's budget ledger before anything leaves.
"""

from __future__ import annotations

import math
import secrets

import numpy as np

from .site_file import EvaluationPolicy

__all__ = ["BOUNDED_METRICS", "release_metrics"]

BOUNDED_METRICS = ("accuracy", "auroc", "auprc", "brier")


def release_metrics(metrics: dict[str, float], policy: EvaluationPolicy) -> dict[str, float]:
    """The metrics as released; `n` (the test-set size) is public, like the training-set size."""
    if policy.release == "exact":
        return dict(metrics)
    if policy.release == "rounded":
        return {name: value if name == "n" else round(value, policy.decimals) for name, value in metrics.items()}
    count = max(float(metrics.get("n", 0.0)), 1.0)
    bounded = [name for name in BOUNDED_METRICS if name in metrics and math.isfinite(metrics[name])]
    if not bounded:
        return {"n": metrics.get("n", 0.0)}
    epsilon_each = policy.epsilon_per_release / len(bounded)
    generator = np.random.default_rng(secrets.randbits(128))  # never the config seed: noise must be unpredictable
    released = {"n": metrics.get("n", 0.0)}
    for name in bounded:
        noisy = metrics[name] + generator.laplace(0.0, 1.0 / (count * epsilon_each))
        released[name] = round(float(min(1.0, max(0.0, noisy))), policy.decimals)
    return released
