"""Patient-level bootstrap intervals of the vital-signs twin's detection figures (core.tasks.vitals.bootstrap).

The traces are made up here, no model: each patient has their own score level (so a patient's cells
are correlated, as real ones are), a third of them an episode whose score rises from 4 h before the
labelled onset; NEWS2 follows the same patients, more weakly.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from medtwin.core.tasks.vitals.bootstrap import FIGURES, Interval, detection_intervals, draw_patients
from medtwin.core.tasks.vitals.detection import DetectorOutcomes, detector_outcomes
from medtwin.core.tasks.vitals.twin import TwinTrace

TWIN_THRESHOLD = 2.5


def made_up_traces(num_patients: int, *, seed: int, episode_every: int = 3) -> list[TwinTrace]:
    rng = np.random.default_rng(seed)
    times_h = np.arange(0.0, 48.0, 0.25)
    no_vitals = np.full((len(times_h), 5), np.nan)
    traces = []
    for patient in range(num_patients):
        onset_h = float(rng.uniform(16.0, 40.0)) if episode_every and patient % episode_every == 0 else None
        rise = np.zeros_like(times_h) if onset_h is None else np.clip((times_h - onset_h + 4.0) / 3.0, 0.0, 2.0)
        level = rng.normal(0.0, 0.7)  # the patient's own: their cells move together
        score = level + rise + rng.normal(0.0, 0.6, len(times_h))
        score[:12] = np.nan  # the twin judges nothing before its first full window
        news2 = np.clip(np.round(2.0 + level + 0.6 * rise + rng.normal(0.0, 1.0, len(times_h))), 0.0, 20.0)
        traces.append(TwinTrace(times_h=times_h, observed=no_vitals, forecast=no_vitals, lower=no_vitals, upper=no_vitals,
                                score=score, news2=news2, alerts=(), onset_h=onset_h))  # fmt: skip
    return traces


def outcomes_of(traces: list[TwinTrace]) -> list[DetectorOutcomes]:
    return detector_outcomes(traces, twin_threshold=TWIN_THRESHOLD, warning_h=4.0, after_h=2.0, news2_matched_threshold=4.0)


@pytest.fixture(scope="module")
def outcomes() -> list[DetectorOutcomes]:
    return outcomes_of(made_up_traces(45, seed=1))


def width(interval: Interval) -> float:
    assert interval.low is not None and interval.high is not None
    return interval.high - interval.low


def test_every_interval_is_the_percentile_of_the_figures_on_the_drawn_patients(outcomes: list[DetectorOutcomes]) -> None:
    """Recomputed the slow, obvious way: for each draw, put the drawn patients' cells together (a patient
    drawn twice twice) and ask scikit-learn; the paired difference from the same draw."""
    intervals = detection_intervals(outcomes, resamples=60, seed=7)
    by_name = {o.detector: o for o in outcomes}
    figures: dict[str, dict[str, list[float]]] = {name: {figure: [] for figure in FIGURES} for name in by_name}
    differences = []
    for drawn in draw_patients(outcomes[0].num_patients, resamples=60, seed=7):
        for name, outcome in by_name.items():
            cells = np.concatenate([np.flatnonzero(outcome.cell_patient == patient) for patient in drawn])
            labels, scores = outcome.cell_label[cells], outcome.cell_score[cells]
            leads = outcome.lead_h[drawn][np.isfinite(outcome.lead_h[drawn])]
            figures[name]["auroc"].append(roc_auc_score(labels, scores))
            figures[name]["auprc"].append(average_precision_score(labels, scores))
            figures[name]["median_lead_h"].append(float(np.median(leads)) if len(leads) else np.nan)
            figures[name]["false_alarms_per_patient_day"].append(outcome.false_alarms[drawn].sum() / outcome.negative_days[drawn].sum())
        differences.append(figures["twin"]["auroc"][-1] - figures["news2"]["auroc"][-1])
    assert intervals.skipped == 0 and intervals.used == 60  # 15 episodes among 45 patients: no draw lacks one
    for detector in intervals.detectors:
        for figure in FIGURES:
            expected = np.percentile(np.array(figures[detector.detector][figure])[np.isfinite(figures[detector.detector][figure])], [2.5, 97.5])
            interval = getattr(detector, figure)
            assert (interval.low, interval.high) == pytest.approx(tuple(expected), abs=1e-12), (detector.detector, figure)
    (paired,) = intervals.differences
    assert (paired.detector, paired.baseline) == ("twin", "news2")
    assert (paired.auroc.low, paired.auroc.high) == pytest.approx(tuple(np.percentile(differences, [2.5, 97.5])), abs=1e-12)


def test_each_interval_contains_its_estimate_and_the_estimates_are_the_reports(outcomes: list[DetectorOutcomes]) -> None:
    intervals = detection_intervals(outcomes, resamples=300, seed=0)
    assert [d.detector for d in intervals.detectors] == ["twin", "news2", "twin+news2", "news2 (same false-alarm budget)"]
    for detector, outcome in zip(intervals.detectors, outcomes, strict=True):
        report = outcome.report()
        for figure in FIGURES:
            interval = getattr(detector, figure)
            assert interval.estimate == pytest.approx(getattr(report, figure))
            assert interval.low is not None and interval.high is not None
            assert interval.low <= interval.estimate <= interval.high, (detector.detector, figure, interval)
            assert interval.low < interval.high  # patients differ: the figure moves from draw to draw
    (paired,) = intervals.differences
    assert paired.auroc.estimate == pytest.approx(outcomes[0].report().auroc - outcomes[1].report().auroc)
    assert paired.auroc.low is not None and paired.auroc.high is not None
    assert paired.auroc.low <= paired.auroc.estimate <= paired.auroc.high


def test_intervals_narrow_as_patients_grow() -> None:
    few = detection_intervals(outcomes_of(made_up_traces(30, seed=2)), resamples=300, seed=0)
    many = detection_intervals(outcomes_of(made_up_traces(300, seed=2)), resamples=300, seed=0)
    for small, large in zip(few.detectors, many.detectors, strict=True):
        for figure in FIGURES:  # 10× the patients: about 1/√10 ≈ 0.32 the width
            assert width(getattr(large, figure)) < 0.6 * width(getattr(small, figure)), (small.detector, figure)
    assert width(many.differences[0].auroc) < 0.6 * width(few.differences[0].auroc)


def test_the_same_seed_gives_the_same_intervals_and_another_seed_other_ones(outcomes: list[DetectorOutcomes]) -> None:
    first = detection_intervals(outcomes, resamples=200, seed=5).to_dict()
    assert detection_intervals(outcomes, resamples=200, seed=5).to_dict() == first
    other = detection_intervals(outcomes, resamples=200, seed=6).to_dict()
    assert other["detectors"][0]["auroc"] != first["detectors"][0]["auroc"]


def test_patients_are_drawn_not_cells_so_duplicating_every_cell_changes_no_interval(outcomes: list[DetectorOutcomes]) -> None:
    """A cell-level bootstrap would take 20 copies of a cell for 20 observations and narrow ~√20 ≈ 4.5×;
    drawing patients, a patient with 20× the cells is still one patient."""
    duplicated = [
        replace(o, cell_patient=np.repeat(o.cell_patient, 20), cell_label=np.repeat(o.cell_label, 20), cell_score=np.repeat(o.cell_score, 20))
        for o in outcomes
    ]
    once = detection_intervals(outcomes, resamples=200, seed=3)
    twenty = detection_intervals(duplicated, resamples=200, seed=3)
    for single, copied in zip(once.detectors, twenty.detectors, strict=True):
        for figure in ("auroc", "auprc"):
            assert width(getattr(copied, figure)) == pytest.approx(width(getattr(single, figure)), rel=1e-9), (single.detector, figure)
    assert width(twenty.differences[0].auroc) == pytest.approx(width(once.differences[0].auroc), rel=1e-9)


def test_the_difference_is_paired_a_detector_against_itself_differs_by_zero_in_every_draw(outcomes: list[DetectorOutcomes]) -> None:
    twin = outcomes[0]
    intervals = detection_intervals([*outcomes, replace(twin, detector="twin again")], resamples=200, seed=0,
                                    paired=[("twin", "twin again"), ("twin", "news2")])  # fmt: skip
    itself, versus_news2 = intervals.differences
    assert (itself.auroc.estimate, itself.auroc.low, itself.auroc.high) == (0.0, 0.0, 0.0)  # unpaired draws would spread
    assert itself.auroc.resamples_used == 200
    # twin and NEWS2 follow the same patients: the paired difference is tighter than the twin's own AUROC
    assert width(versus_news2.auroc) < width(intervals.detectors[0].auroc)


def test_draws_without_a_positive_or_a_negative_cell_are_skipped_and_counted() -> None:
    one_episode = outcomes_of(made_up_traces(6, seed=4, episode_every=6))  # patient 0 alone has an episode
    intervals = detection_intervals(one_episode, resamples=400, seed=0)
    assert 400 * 0.2 < intervals.skipped < 400 * 0.5  # (5/6)^6 ≈ 33 % of draws miss patient 0
    assert intervals.used + intervals.skipped == 400 and intervals.to_dict()["used"] == intervals.used
    for detector in intervals.detectors:
        assert detector.auroc.resamples_used == detector.false_alarms_per_patient_day.resamples_used == intervals.used
        assert detector.median_lead_h.resamples_used <= intervals.used  # and only draws with a detected episode
    no_episode = detection_intervals(outcomes_of(made_up_traces(6, seed=4, episode_every=0)), resamples=50, seed=0)
    assert no_episode.skipped == 50 and no_episode.used == 0
    assert no_episode.detectors[0].auroc == Interval(estimate=None, low=None, high=None, resamples_used=0)
    assert "0 used, 50 skipped" in no_episode.table()


def test_the_table_shows_each_figure_with_its_interval(outcomes: list[DetectorOutcomes]) -> None:
    assert Interval(estimate=0.765, low=0.72, high=0.81, resamples_used=1000).format() == "0.765 [0.720, 0.810]"
    assert Interval(estimate=0.25, low=-0.1, high=0.6, resamples_used=9).format(2, signed=True) == "+0.25 [-0.10, +0.60]"
    assert Interval(estimate=None, low=None, high=None, resamples_used=0).format() == "—"
    intervals = detection_intervals(outcomes, resamples=100, seed=0)
    table = intervals.table()
    twin_row = next(line for line in table.splitlines() if line.startswith("twin "))
    assert intervals.detectors[0].auroc.format() in twin_row and intervals.detectors[0].median_lead_h.format(2, signed=True) in twin_row
    assert f"AUROC twin − news2 (paired): {intervals.differences[0].auroc.format(signed=True)}" in table
    assert "95% patient-level bootstrap intervals: 100 draws of 45 patients (seed 0), 100 used, 0 skipped" in table


def test_bad_arguments_are_all_named_at_once(outcomes: list[DetectorOutcomes]) -> None:
    with pytest.raises(ValueError, match=r"(?s)resamples must be at least 1, got 0.*level must lie.*got 95.*no detector named 'ews'"):
        detection_intervals(outcomes, resamples=0, level=95, paired=[("twin", "ews")])
    shorter = replace(outcomes[1], cell_patient=outcomes[1].cell_patient[1:], cell_label=outcomes[1].cell_label[1:])
    with pytest.raises(ValueError, match="not scored on the same patients and cells"):
        detection_intervals([outcomes[0], shorter])
