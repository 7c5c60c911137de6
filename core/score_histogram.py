"""Per-class score histograms: how sites let the coordinator compute AUROC, AUPRC and ECE on the union
of their test sets without sending row-level records. The counts still tell the coordinator every
test row's label and score to the bin (0.001), only not which row is whose; see the end of this note.

A binary site counts its test rows of label 0 and of label 1 in `SCORE_HISTOGRAM_BINS` equal-width
bins of [0, 1] and sums the scores in each bin. Histograms add: the sum over sites is the histogram of
the union, and every figure below is computed from it as scikit-learn computes it on the union with
each score replaced by its bin (`roc_auc_score` and `average_precision_score` of the bin index).

- AUROC: rows sharing a bin count as ties (one half). The exact AUROC on the union lies within
  `auroc_max_error()` — half the fraction of positive-negative pairs sharing a bin — of this figure,
  and the coordinator can compute that bound from the histogram alone.
- AUPRC: average precision with one threshold per bin.
- ECE: exact. Bins are grouped `SCORE_HISTOGRAM_BINS / CALIBRATION_BINS` at a time into the ECE's 10
  bins, and the per-bin score sums give each group's mean predicted score, so the figure equals
  `expected_calibration_error` on the union (up to float rounding, and a score exactly on a bin edge).

A bin is (left edge, right edge], with a score of 0 in the first bin: `calibration_curve`'s binning.

Why 1000 bins: equal-width bins lose only the order of a positive and a negative whose scores share
a bin. Measured over 20 draws of 4 sites (score distributions as in tests/unit/test_score_histogram.py),
the worst |histogram AUROC - exact AUROC| was 0.0001 with scores spread over [0, 1], 0.0007 with
scores squeezed into [0, 0.05] (a rare-event model) and 0.004 into [0, 0.02]; with 200 bins these
were 0.0004, 0.0096 and 0.044. No equal-width bin count helps a saturated sigmoid (many scores
within 0.001 of 0 or 1: error up to 0.024 in the same measurement); there `auroc_max_error()` says
how far off the figure may be. Finer bins tell the coordinator each patient's score more finely; at
1000 bins the counts already place every test row's score to 0.001, which is why `dp` sites withhold
the histogram (client/release.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from .errors import MedtwinError

__all__ = [
    "CALIBRATION_BINS",
    "SCORE_HISTOGRAM_BINS",
    "ScoreHistogram",
    "ScoreHistogramError",
    "pool_histograms",
]

SCORE_HISTOGRAM_BINS = 1000
CALIBRATION_BINS = 10  # the ECE's bins, here and in core/tasks/metrics.py (which takes it from here)
FIELDS = ("negatives", "positives", "score_sums")
NAN = float("nan")
# a released per-bin score sum may be off its bin's range by rounding (`rounded` policy: `decimals`
# >= 0, so at most 0.5) and float error; a sum past its range by more than this is refused, and a sum
# within the slack is clipped to the range: the slack is for rounding, not score mass the rows lack
SCORE_SUM_SLACK = 0.5 + 1e-6


class ScoreHistogramError(MedtwinError):
    """A score histogram is malformed; carries every problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("score histogram refused: " + "; ".join(self.problems))


def bin_of(scores: np.ndarray, *, num_bins: int = SCORE_HISTOGRAM_BINS) -> np.ndarray:
    """The bin index of each score in [0, 1] (calibration_curve's uniform binning)."""
    inner_edges = np.linspace(0.0, 1.0, num_bins + 1)[1:-1]
    return np.searchsorted(inner_edges, scores)


@dataclass(frozen=True)
class ScoreHistogram:
    """Test rows of label 0 and of label 1 per score bin, and the sum of the scores in each bin."""

    negatives: tuple[int, ...]
    positives: tuple[int, ...]
    score_sums: tuple[float, ...]

    @classmethod
    def of_scores(cls, labels: np.ndarray, scores: np.ndarray, *, num_bins: int = SCORE_HISTOGRAM_BINS) -> ScoreHistogram:
        """The histogram of one site's test rows: 0/1 `labels`, probabilities `scores` (clipped to [0, 1])."""
        positive = np.asarray(labels, dtype=np.float64).reshape(-1) >= 0.5
        scores = np.clip(np.asarray(scores, dtype=np.float64).reshape(-1), 0.0, 1.0)
        bins = bin_of(scores, num_bins=num_bins)
        return cls(
            negatives=tuple(int(count) for count in np.bincount(bins[~positive], minlength=num_bins)),
            positives=tuple(int(count) for count in np.bincount(bins[positive], minlength=num_bins)),
            score_sums=tuple(float(total) for total in np.bincount(bins, weights=scores, minlength=num_bins)),
        )

    @classmethod
    def checked(cls, values: Mapping[str, object], *, rows: float, num_bins: int = SCORE_HISTOGRAM_BINS) -> ScoreHistogram:
        """A histogram from untrusted `values` (a site's reply); raises `ScoreHistogramError` naming every
        problem: wrong fields or lengths, counts that are not non-negative integers or do not sum to the
        site's released test-row count `rows`, score sums that are not finite or outside their bin's range
        by more than rounding explains. Each score sum is clipped to what its bin's rows can add up to."""
        if not isinstance(values, Mapping):
            raise ScoreHistogramError([f"a histogram is named lists, not {type(values).__name__}"])
        problems = []
        unknown = sorted(str(name)[:40] for name in values if name not in FIELDS)
        if unknown:
            problems.append(f"unknown field(s) {unknown}")
        lists = {}
        for name in FIELDS:
            value = values.get(name)
            if not isinstance(value, list | tuple) or len(value) != num_bins:
                shown = f"{len(value)} values" if isinstance(value, list | tuple) else type(value).__name__
                problems.append(f"{name} must be {num_bins} values (got {shown})")
            else:
                lists[name] = value
        for name in ("negatives", "positives"):
            if name in lists and not all(isinstance(count, int) and not isinstance(count, bool) and count >= 0 for count in lists[name]):
                problems.append(f"{name} must be non-negative integers")
                del lists[name]
        if "score_sums" in lists:
            sums = lists["score_sums"]
            if not all(isinstance(total, int | float) and not isinstance(total, bool) and math.isfinite(total) for total in sums):
                problems.append("score_sums must be finite numbers")
                del lists["score_sums"]
        if not problems:
            total_rows = sum(lists["negatives"]) + sum(lists["positives"])
            if not (isinstance(rows, int | float) and math.isfinite(rows) and total_rows == rows):
                problems.append(f"counts sum to {total_rows} rows but the site released n={rows!r:.20}")
            edges = np.linspace(0.0, 1.0, num_bins + 1)
            in_bin = np.asarray(lists["negatives"], dtype=np.float64) + np.asarray(lists["positives"], dtype=np.float64)
            sums = np.asarray(lists["score_sums"], dtype=np.float64)
            outside = (sums < in_bin * edges[:-1] - SCORE_SUM_SLACK) | (sums > in_bin * edges[1:] + SCORE_SUM_SLACK)
            if outside.any():
                problems.append(f"score sum of bin {int(np.argmax(outside))} is outside what its rows' scores allow")
        if problems:
            raise ScoreHistogramError(problems)
        # unclipped, 10 rows' empty bins could each carry ±0.5 of phantom score: ±500 over the ECE's bins
        score_sums = np.clip(sums, in_bin * edges[:-1], in_bin * edges[1:])
        return cls(
            negatives=tuple(lists["negatives"]),
            positives=tuple(lists["positives"]),
            score_sums=tuple(float(total) for total in score_sums),
        )

    def to_values(self) -> dict[str, list[int] | list[float]]:
        """Plain lists (what a Flower MetricRecord, JSON and the signed claim carry)."""
        return {"negatives": list(self.negatives), "positives": list(self.positives), "score_sums": list(self.score_sums)}

    def rounded(self, decimals: int) -> ScoreHistogram:
        """The same counts with each bin's score sum rounded (the `rounded` release policy)."""
        return ScoreHistogram(self.negatives, self.positives, tuple(round(total, decimals) for total in self.score_sums))

    @property
    def num_bins(self) -> int:
        return len(self.negatives)

    @property
    def rows(self) -> int:
        return sum(self.negatives) + sum(self.positives)

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (
            np.asarray(self.negatives, dtype=np.float64),
            np.asarray(self.positives, dtype=np.float64),
            np.asarray(self.score_sums, dtype=np.float64),
        )

    def auroc(self) -> float:
        """AUROC with the rows of a bin tied; NaN without both classes."""
        negatives, positives, _ = self._arrays()
        pairs = negatives.sum() * positives.sum()
        if pairs == 0:
            return NAN
        negatives_below = np.cumsum(negatives) - negatives
        return float(np.sum(positives * (negatives_below + 0.5 * negatives)) / pairs)

    def auroc_max_error(self) -> float:
        """How far the exact AUROC on the rows can be from `auroc()`: half the share of positive-negative
        pairs that share a bin (their order is unknown; `auroc()` counts each as a half). NaN without both classes."""
        negatives, positives, _ = self._arrays()
        pairs = negatives.sum() * positives.sum()
        return float(0.5 * np.sum(negatives * positives) / pairs) if pairs else NAN

    def auprc(self) -> float:
        """Average precision with one threshold per bin (highest first); NaN without both classes."""
        negatives, positives, _ = self._arrays()
        total_positives = positives.sum()
        if total_positives == 0 or negatives.sum() == 0:
            return NAN
        true_positives = np.cumsum(positives[::-1])
        called = true_positives + np.cumsum(negatives[::-1])
        filled = positives[::-1] > 0  # recall steps only where a bin holds positives
        precision = true_positives[filled] / called[filled]
        return float(np.sum(positives[::-1][filled] / total_positives * precision))

    def calibration_bins(self, num_bins: int = CALIBRATION_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, label-1 rows, score sum) per bin of `num_bins` equal-width bins (histogram bins grouped)."""
        if self.num_bins % num_bins:
            raise ValueError(f"{self.num_bins} histogram bins do not group into {num_bins} calibration bins")
        negatives, positives, sums = (values.reshape(num_bins, -1).sum(axis=1) for values in self._arrays())
        return negatives + positives, positives, sums

    def ece(self, num_bins: int = CALIBRATION_BINS) -> float:
        """Expected calibration error over `num_bins` equal-width bins, as `expected_calibration_error`."""
        rows, positives, sums = self.calibration_bins(num_bins)
        total = rows.sum()
        return float(np.sum(np.abs(positives - sums)) / total) if total else NAN

    def reliability(self, num_bins: int = CALIBRATION_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean predicted score, observed positive fraction, rows) of each non-empty calibration bin."""
        rows, positives, sums = self.calibration_bins(num_bins)
        filled = rows > 0
        return sums[filled] / rows[filled], positives[filled] / rows[filled], rows[filled]

    def metrics(self) -> dict[str, float]:
        """The figures the coordinator reports from a pooled histogram, by metric name."""
        return {"auroc": self.auroc(), "auroc_max_error": self.auroc_max_error(), "auprc": self.auprc(), "ece": self.ece()}


def pool_histograms(histograms: Iterable[ScoreHistogram]) -> ScoreHistogram | None:
    """The bin-wise sum of `histograms` (the histogram of the union of their rows); None if there are none."""
    histograms = list(histograms)
    if not histograms:
        return None
    if len({histogram.num_bins for histogram in histograms}) != 1:
        raise ValueError("histograms with different bin counts do not add")
    return ScoreHistogram(
        negatives=tuple(int(sum(values)) for values in zip(*(h.negatives for h in histograms), strict=True)),
        positives=tuple(int(sum(values)) for values in zip(*(h.positives for h in histograms), strict=True)),
        score_sums=tuple(float(math.fsum(values)) for values in zip(*(h.score_sums for h in histograms), strict=True)),
    )
