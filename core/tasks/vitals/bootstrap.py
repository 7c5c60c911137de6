"""Patient-level (cluster) bootstrap confidence intervals for the deterioration-detection figures.

The cells of one patient are not independent (a score drifts for hours; one episode spans ~24
positive cells), so resampling cells would count a patient's ~190 correlated cells as ~190
observations and draw intervals far too narrow. Here the unit that was sampled is drawn: each
resample draws as many patients as were tested, with replacement, and every figure — AUROC,
AUPRC, median lead time, false alarms per patient-day — is recomputed on them (a patient drawn
twice counts twice). The interval is the percentile interval of the resampled figures (the 2.5th
and 97.5th percentiles at `level=0.95`); the draws come from `numpy.random.default_rng(seed)`, so
one seed gives one set of intervals.

Every detector is scored on the same draws, so the difference of two detectors' AUROCs is a paired
bootstrap: its interval is that of the per-draw differences. The issue's aim, twin AUROC ≥ NEWS2 +
0.05, is met with 95 % confidence when the lower bound of twin − NEWS2 is at least 0.05.

A draw with no positive or no negative cell has no AUROC; it is skipped for every figure and
counted. A median lead needs a detected episode: draws without one are left out of that
detector's lead interval alone. Every interval says how many draws it used.

AUROC and AUPRC are computed for a block of draws at once: with the judged cells sorted by score
once, a draw's positive and negative cells at each distinct score are sums of its patient counts,
and both figures are cumulative sums of those — the numbers scikit-learn gives on the drawn
patients' cells put together (tests/unit check that), without a sort per draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .detection import DetectorOutcomes

__all__ = [
    "DEFAULT_RESAMPLES",
    "FIGURES",
    "DetectionIntervals",
    "DetectorIntervals",
    "Interval",
    "PairedDifference",
    "detection_intervals",
    "draw_patients",
]

DEFAULT_RESAMPLES = 1000
BLOCK_CELLS = 1 << 20  # draws × cells scored at once (float64: 8 MB a matrix)
FIGURES = ("auroc", "auprc", "median_lead_h", "false_alarms_per_patient_day")  # as named in DetectionReport


@dataclass(frozen=True)
class Interval:
    estimate: float | None  # on the tested patients themselves
    low: float | None  # None: no draw could compute the figure
    high: float | None
    resamples_used: int

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)

    def format(self, digits: int = 3, *, signed: bool = False) -> str:
        """`0.765 [0.718, 0.812]`; `—` for a figure that could not be computed."""
        spec = f"{'+' if signed else ''}.{digits}f"
        estimate = "—" if self.estimate is None else format(self.estimate, spec)
        if self.low is None or self.high is None:
            return estimate
        return f"{estimate} [{format(self.low, spec)}, {format(self.high, spec)}]"


@dataclass(frozen=True)
class DetectorIntervals:
    detector: str
    auroc: Interval
    auprc: Interval
    median_lead_h: Interval
    false_alarms_per_patient_day: Interval


@dataclass(frozen=True)
class PairedDifference:
    """`detector`'s AUROC minus `baseline`'s, the two computed on the same drawn patients in every draw."""

    detector: str
    baseline: str
    auroc: Interval


@dataclass(frozen=True)
class DetectionIntervals:
    level: float
    seed: int
    patients: int
    resamples: int  # drawn
    skipped: int  # draws with no positive or no negative cell: no figure is computed on them
    detectors: tuple[DetectorIntervals, ...]
    differences: tuple[PairedDifference, ...]

    @property
    def used(self) -> int:
        return self.resamples - self.skipped

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "used": self.used}

    def table(self) -> str:
        """The figures with their intervals, one detector a row, then the paired differences and what was drawn."""
        header = ("detector", "AUROC", "AUPRC", "median lead (h)", "false alarms / patient-day")
        rows = [header] + [
            (d.detector, d.auroc.format(), d.auprc.format(), d.median_lead_h.format(2, signed=True),
             d.false_alarms_per_patient_day.format(2))
            for d in self.detectors
        ]  # fmt: skip
        widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines += [f"AUROC {d.detector} − {d.baseline} (paired): {d.auroc.format(signed=True)}" for d in self.differences]
        lines.append(
            f"{self.level:.0%} patient-level bootstrap intervals: {self.resamples} draws of {self.patients} patients "
            f"(seed {self.seed}), {self.used} used, {self.skipped} skipped (no positive or no negative cell)"
        )
        return "\n".join(lines)


def draw_patients(num_patients: int, *, resamples: int, seed: int) -> np.ndarray:
    """[resamples, num_patients] indices of the patients drawn, with replacement, in each resample."""
    return np.random.default_rng(seed).integers(0, num_patients, size=(resamples, num_patients))


def _times_drawn(draws: np.ndarray, num_patients: int) -> np.ndarray:
    """[resamples, num_patients] how many times each patient is drawn in each resample."""
    offsets = num_patients * np.arange(len(draws))[:, None]
    return np.bincount((draws + offsets).ravel(), minlength=len(draws) * num_patients).reshape(len(draws), num_patients)


def _ranking_figures(outcome: DetectorOutcomes, times_drawn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and AUPRC of every draw, as scikit-learn computes them on the drawn patients' cells put together."""
    order = np.argsort(-outcome.cell_score, kind="stable")  # highest score first
    score, patient, positive = outcome.cell_score[order], outcome.cell_patient[order], outcome.cell_label[order] == 1
    group_starts = np.flatnonzero(np.r_[True, score[1:] != score[:-1]])  # cells of one distinct score
    auroc, auprc = np.empty(len(times_drawn)), np.empty(len(times_drawn))
    block = max(1, BLOCK_CELLS // max(len(score), 1))
    for start in range(0, len(times_drawn), block):
        rows = slice(start, start + block)
        copies = times_drawn[rows][:, patient].astype(np.float64)  # [draws, cells] copies of each cell
        pos = np.add.reduceat(copies * positive, group_starts, axis=1)  # drawn positives at each distinct score
        neg = np.add.reduceat(copies * ~positive, group_starts, axis=1)
        pos_at_or_above, neg_at_or_above = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
        total_pos, total_neg = pos_at_or_above[:, -1], neg_at_or_above[:, -1]
        # AUROC: a negative's chance of scoring below a positive, ties counted half
        auroc[rows] = ((pos_at_or_above - pos / 2) * neg).sum(axis=1) / (total_pos * total_neg)
        # AUPRC (average precision): precision at each distinct score, weighted by the recall it adds
        flagged = pos_at_or_above + neg_at_or_above
        precision = np.divide(pos_at_or_above, flagged, out=np.zeros_like(flagged), where=flagged > 0)
        auprc[rows] = (pos * precision).sum(axis=1) / total_pos
    return auroc, auprc


def _row_medians(values: np.ndarray) -> np.ndarray:
    """The median of each row's finite values; NaN for a row with none."""
    ordered = np.sort(values, axis=1)  # NaN last
    finite = np.isfinite(ordered).sum(axis=1)
    rows = np.arange(len(values))
    low, high = ordered[rows, np.maximum(finite - 1, 0) // 2], ordered[rows, np.minimum(finite // 2, values.shape[1] - 1)]
    return np.where(finite > 0, (low + high) / 2, np.nan)


def _figures(outcome: DetectorOutcomes, draws: np.ndarray, times_drawn: np.ndarray) -> dict[str, np.ndarray]:
    """Every figure of `FIGURES` in every draw (NaN where a draw cannot compute it)."""
    auroc, auprc = _ranking_figures(outcome, times_drawn)
    negative_days = np.maximum(times_drawn @ outcome.negative_days, 1e-9)
    return {
        "auroc": auroc,
        "auprc": auprc,
        "median_lead_h": _row_medians(outcome.lead_h[draws]),
        "false_alarms_per_patient_day": (times_drawn @ outcome.false_alarms) / negative_days,
    }


def _interval(estimate: float | None, samples: np.ndarray, level: float) -> Interval:
    """The percentile interval of the draws' figures (NaN = a draw that could not compute it: left out)."""
    shown = None if estimate is None or not np.isfinite(estimate) else float(estimate)
    finite = samples[np.isfinite(samples)]
    if not len(finite):
        return Interval(estimate=shown, low=None, high=None, resamples_used=0)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return Interval(estimate=shown, low=float(low), high=float(high), resamples_used=len(finite))


def _check(outcomes: Sequence[DetectorOutcomes], resamples: int, level: float, paired: Sequence[tuple[str, str]]) -> None:
    problems = []
    if resamples < 1:
        problems.append(f"resamples must be at least 1, got {resamples}")
    if not 0.0 < level < 1.0:
        problems.append(f"level must lie strictly between 0 and 1 (0.95 for 95 % intervals), got {level}")
    if not outcomes:
        problems.append("no detector outcomes given (score the test patients with detection.detector_outcomes)")
    elif any(
        not np.array_equal(o.cell_patient, outcomes[0].cell_patient) or not np.array_equal(o.cell_label, outcomes[0].cell_label)
        for o in outcomes
    ):
        problems.append("the detectors were not scored on the same patients and cells (score them together: detection.detector_outcomes)")
    known = [o.detector for o in outcomes]
    for detector, baseline in paired:
        problems += [f"paired difference {detector!r} − {baseline!r}: no detector named {name!r} (known: {known})"
                     for name in (detector, baseline) if name not in known]  # fmt: skip
    if problems:
        raise ValueError("cannot bootstrap the detection figures:\n" + "\n".join(f"  - {problem}" for problem in problems))


def detection_intervals(
    outcomes: Sequence[DetectorOutcomes],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
    paired: Sequence[tuple[str, str]] = (("twin", "news2"),),
) -> DetectionIntervals:
    """Percentile intervals of every detector's figures over `resamples` draws of the tested patients,
    and of the paired AUROC differences `detector − baseline` named in `paired`."""
    _check(outcomes, resamples, level, paired)
    num_patients = outcomes[0].num_patients
    draws = draw_patients(num_patients, resamples=resamples, seed=seed)
    times_drawn = _times_drawn(draws, num_patients)
    cells = outcomes[0]  # every detector has the same cells (checked)
    positives = np.bincount(cells.cell_patient, weights=(cells.cell_label == 1).astype(np.float64), minlength=num_patients)
    negatives = np.bincount(cells.cell_patient, weights=(cells.cell_label == 0).astype(np.float64), minlength=num_patients)
    usable = (times_drawn @ positives > 0) & (times_drawn @ negatives > 0)
    figures = {o.detector: _figures(o, draws[usable], times_drawn[usable]) for o in outcomes}
    reports = {o.detector: o.report() for o in outcomes}
    detectors = tuple(
        DetectorIntervals(detector=name, **{figure: _interval(getattr(report, figure), figures[name][figure], level) for figure in FIGURES})
        for name, report in reports.items()
    )
    differences = tuple(
        PairedDifference(
            detector=detector,
            baseline=baseline,
            auroc=_interval(
                reports[detector].auroc - reports[baseline].auroc, figures[detector]["auroc"] - figures[baseline]["auroc"], level
            ),
        )
        for detector, baseline in paired
    )
    return DetectionIntervals(
        level=level, seed=seed, patients=num_patients, resamples=resamples, skipped=int((~usable).sum()),
        detectors=detectors, differences=differences,
    )  # fmt: skip
