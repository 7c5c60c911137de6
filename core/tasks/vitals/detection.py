"""Deterioration detection, scored the way early-warning systems are: twin vs NEWS2 vs both.

Per grid cell a detector gives a score; a cell is positive when the patient's labelled onset lies
within the next `warning_h` hours or began at most `after_h` ago (cells later in an episode are
left out: the patient is known to be ill by then). AUROC and AUPRC are over the same cells for
every detector — those the twin can judge (scikit-learn; cells of one patient are correlated, so
read them with the episode counts and with the patient-level bootstrap intervals of `bootstrap`).
An alert is a run of cells at or above the detector's threshold; it sounds when the run begins and
again every 2 h while it lasts. An episode is detected when an alert is active anywhere in its
positive window, and its lead time is the labelled onset minus the first such cell (positive =
before onset); a false alarm is an alarm sounding in a negative cell, counted per patient-day of
negative cells. `detector_outcomes` keeps all of this patient by patient; a report sums it.

Detectors: the twin's smoothed deviation score (threshold calibrated on separate calibration
patients to a false-alarm budget), NEWS2 (threshold 5, the RCP's urgent-response trigger; and at
the threshold that gives the twin's false-alarm budget on the same calibration patients, so lead
times compare at equal alarm burden), and the hybrid — score max(twin / its threshold, NEWS2 / 5).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from .twin import TwinTrace

__all__ = [
    "NEWS2_TRIGGER",
    "DetectionReport",
    "DetectorOutcomes",
    "alert_starts",
    "calibrate_threshold",
    "cell_labels",
    "detector_outcomes",
    "news2_score_of",
    "score_detectors",
    "twin_score",
]

NEWS2_TRIGGER = 5.0
REARM_STEPS = 8  # an alarm still on sounds again after 8 cells (2 h at 15 min)


@dataclass(frozen=True)
class DetectionReport:
    detector: str
    threshold: float
    auroc: float
    auprc: float
    episodes: int
    detected: int  # episodes with an alert in their positive window
    median_lead_h: float | None  # over detected episodes; positive = before the labelled onset
    false_alarms_per_patient_day: float

    def to_dict(self) -> dict[str, float | int | str | None]:
        return asdict(self)


def cell_labels(times_h: np.ndarray, onset_h: float | None, *, warning_h: float, after_h: float) -> np.ndarray:
    """1 = positive, 0 = negative, -1 = left out (later in the episode)."""
    labels = np.zeros(len(times_h), np.int8)
    if onset_h is not None:
        labels[(times_h >= onset_h - warning_h) & (times_h < onset_h + after_h)] = 1
        labels[times_h >= onset_h + after_h] = -1
    return labels


def alert_starts(score: np.ndarray, threshold: float, *, rearm_steps: int = REARM_STEPS) -> np.ndarray:
    """Indices of the cells where an alarm fires: where a run of `score >= threshold` begins, and again
    every `rearm_steps` cells while it lasts (a silenced alarm sounds again) — so an alarm that never
    stops costs what it costs on a ward, not one alarm per stay."""
    above = np.nan_to_num(score, nan=-np.inf) >= threshold
    fires, run = [], 0
    for cell, on in enumerate(above):
        run = run + 1 if on else 0
        if on and (run - 1) % rearm_steps == 0:
            fires.append(cell)
    return np.array(fires, dtype=np.int64)


def _step_h(trace: TwinTrace) -> float:
    return float(trace.times_h[1] - trace.times_h[0]) if len(trace.times_h) > 1 else 0.0


def _patient_days(traces: Sequence[TwinTrace], labels: Sequence[np.ndarray]) -> float:
    total_h = sum(_step_h(trace) * float((label == 0).sum()) for trace, label in zip(traces, labels, strict=True))
    return max(total_h / 24.0, 1e-9)


@dataclass(frozen=True, eq=False)
class DetectorOutcomes:
    """One detector's results patient by patient: what a report sums over the patients, and what a
    patient-level bootstrap (`bootstrap.detection_intervals`) draws patients from."""

    detector: str
    threshold: float
    cell_patient: np.ndarray  # [C] index of the patient of each judged cell
    cell_label: np.ndarray  # [C] 1 = positive, 0 = negative
    cell_score: np.ndarray  # [C]
    false_alarms: np.ndarray  # [P] alarms sounding in the patient's negative cells
    negative_days: np.ndarray  # [P] days of the patient's negative cells
    has_episode: np.ndarray  # [P] a labelled onset with positive cells
    lead_h: np.ndarray  # [P] labelled onset minus the first alerted positive cell; NaN = no episode or missed

    @property
    def num_patients(self) -> int:
        return len(self.lead_h)

    def report(self) -> DetectionReport:
        two_classes = len(np.unique(self.cell_label)) == 2
        leads = self.lead_h[np.isfinite(self.lead_h)]
        return DetectionReport(
            detector=self.detector,
            threshold=self.threshold,
            auroc=float(roc_auc_score(self.cell_label, self.cell_score)) if two_classes else float("nan"),
            auprc=float(average_precision_score(self.cell_label, self.cell_score)) if two_classes else float("nan"),
            episodes=int(self.has_episode.sum()),
            detected=len(leads),
            median_lead_h=float(np.median(leads)) if len(leads) else None,
            false_alarms_per_patient_day=float(self.false_alarms.sum()) / max(float(self.negative_days.sum()), 1e-9),
        )


def _outcomes(
    name: str, threshold: float, scores: Sequence[np.ndarray], traces: Sequence[TwinTrace], labels: Sequence[np.ndarray],
    judged: Sequence[np.ndarray],
) -> DetectorOutcomes:  # fmt: skip
    false_alarms, negative_days, has_episode, lead_h = [], [], [], []
    for score, trace, label in zip(scores, traces, labels, strict=True):
        false_alarms.append(int((label[alert_starts(score, threshold)] == 0).sum()))
        negative_days.append(_step_h(trace) * float((label == 0).sum()) / 24.0)
        episode = trace.onset_h is not None and bool((label == 1).any())
        # an alert active in the warning window counts, whenever it began
        warned = np.flatnonzero((label == 1) & (np.nan_to_num(score, nan=-np.inf) >= threshold))
        has_episode.append(episode)
        lead_h.append(trace.onset_h - float(trace.times_h[warned[0]]) if episode and len(warned) else np.nan)
    return DetectorOutcomes(
        detector=name,
        threshold=float(threshold),
        cell_patient=np.concatenate([np.full(int(cells.sum()), patient) for patient, cells in enumerate(judged)]),
        cell_label=np.concatenate([label[cells] for label, cells in zip(labels, judged, strict=True)]),
        cell_score=np.concatenate([score[cells] for score, cells in zip(scores, judged, strict=True)]),
        false_alarms=np.array(false_alarms, dtype=np.int64),
        negative_days=np.array(negative_days, dtype=np.float64),
        has_episode=np.array(has_episode, dtype=bool),
        lead_h=np.array(lead_h, dtype=np.float64),
    )


def _labels(traces: Sequence[TwinTrace], warning_h: float, after_h: float) -> list[np.ndarray]:
    return [cell_labels(t.times_h, t.onset_h, warning_h=warning_h, after_h=after_h) for t in traces]


def twin_score(trace: TwinTrace) -> np.ndarray:
    return trace.score


def news2_score_of(trace: TwinTrace) -> np.ndarray:
    return trace.news2


def calibrate_threshold(
    traces: Sequence[TwinTrace], *, false_alarms_per_day: float, warning_h: float, after_h: float,
    score_of: Callable[[TwinTrace], np.ndarray] = twin_score,
) -> float:  # fmt: skip
    """The lowest threshold whose false alarms on these calibration patients stay within the budget."""
    labels = _labels(traces, warning_h, after_h)
    days = _patient_days(traces, labels)
    scores = [score_of(t) for t in traces]
    finite = np.concatenate([score[np.isfinite(score)] for score in scores])
    for threshold in np.unique(np.concatenate([np.quantile(finite, np.linspace(0.5, 0.999, 120)), np.unique(finite)[-200:]])):
        alarms = sum(int((label[alert_starts(score, threshold)] == 0).sum()) for score, label in zip(scores, labels, strict=True))
        if alarms / days <= false_alarms_per_day:
            return float(threshold)
    return float(finite.max()) + 1.0


def detector_outcomes(
    traces: Sequence[TwinTrace], *, twin_threshold: float, warning_h: float, after_h: float, news2_matched_threshold: float | None = None
) -> list[DetectorOutcomes]:
    """Every detector on the same cells: those the twin can judge (a full window behind them) and not left out."""
    labels = _labels(traces, warning_h, after_h)
    judged = [(label >= 0) & np.isfinite(t.score) for t, label in zip(traces, labels, strict=True)]
    twin = [t.score for t in traces]
    news2 = [np.where(np.isfinite(t.score), t.news2, np.nan) for t in traces]
    hybrid = [np.fmax(t.score / twin_threshold, t.news2 / NEWS2_TRIGGER) for t in traces]
    outcomes = [
        _outcomes("twin", twin_threshold, twin, traces, labels, judged),
        _outcomes("news2", NEWS2_TRIGGER, news2, traces, labels, judged),
        _outcomes("twin+news2", 1.0, hybrid, traces, labels, judged),
    ]
    if news2_matched_threshold is not None:  # NEWS2 at the twin's false-alarm budget: lead times compared fairly
        outcomes.append(_outcomes("news2 (same false-alarm budget)", news2_matched_threshold, news2, traces, labels, judged))
    return outcomes


def score_detectors(
    traces: Sequence[TwinTrace], *, twin_threshold: float, warning_h: float, after_h: float, news2_matched_threshold: float | None = None
) -> list[DetectionReport]:
    """Every detector's report on the same cells (see `detector_outcomes`)."""
    outcomes = detector_outcomes(
        traces, twin_threshold=twin_threshold, warning_h=warning_h, after_h=after_h, news2_matched_threshold=news2_matched_threshold
    )
    return [outcome.report() for outcome in outcomes]
