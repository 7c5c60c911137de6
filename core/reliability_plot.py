"""The reliability diagram of the federated model on the union of the sites' test sets, drawn from the
sites' summed score histograms (core/score_histogram.py): per calibration bin, the observed fraction of
label-1 rows against the mean predicted score, with the rows per bin beneath."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .score_histogram import ScoreHistogram, ScoreHistogramError  # noqa: E402

__all__ = ["RELIABILITY_PLOT", "plot_reliability"]

RELIABILITY_PLOT = "reliability.png"


def plot_reliability(histogram: ScoreHistogram, path: Path) -> None:
    """Write the reliability diagram of `histogram` to `path` (PNG)."""
    mean_score, observed, _ = histogram.reliability()
    rows_per_bin, _, _ = histogram.calibration_bins()
    bin_width = 1.0 / len(rows_per_bin)
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(5.6, 6.0), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    top.plot(mean_score, observed, marker="o", color="black", label="federated model, all sites")
    top.set_ylabel("observed fraction of positives")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_title(f"Reliability on {histogram.rows} test rows (ECE {histogram.ece():.3f})")
    top.grid(alpha=0.3)
    top.legend(fontsize=8, loc="upper left")
    bottom.bar([(index + 0.5) * bin_width for index in range(len(rows_per_bin))], rows_per_bin, width=0.9 * bin_width, color="grey")
    bottom.set_xlabel("mean predicted score (rows per 0.1-wide score bin below)")
    bottom.set_ylabel("rows")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def histogram_from_summary(values: object) -> ScoreHistogram | None:
    """The pooled histogram a summary.json holds (`final_metrics.pooled_score_histogram`), or None if it
    holds none or a malformed one (a report is still written without the plot)."""
    if not isinstance(values, Mapping):
        return None
    try:
        rows = sum(count for name in ("negatives", "positives") for count in values[name] if isinstance(count, int))
        return ScoreHistogram.checked(values, rows=rows)
    except (KeyError, TypeError, ScoreHistogramError):
        return None
