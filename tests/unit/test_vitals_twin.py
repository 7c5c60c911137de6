"""The vital-signs twin as a task and as a per-patient monitor.

A small configuration (4 wards × 30 patients × 48 h) and one model trained on the pooled training
patients for a few epochs, shared by the module (about 10 s on 2 cores).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from medtwin.client.training import train_epochs
from medtwin.core.config import compose_config
from medtwin.core.errors import ConfigError
from medtwin.core.tasks import VitalsTask, get_task
from medtwin.core.tasks.vitals import generate_patient, site_profiles
from medtwin.core.tasks.vitals.bootstrap import detection_intervals
from medtwin.core.tasks.vitals.detection import alert_starts, calibrate_threshold, cell_labels, detector_outcomes, score_detectors
from medtwin.core.tasks.vitals.twin import PatientTwin
from medtwin.core.tasks.vitals.windows import WindowShape, grid_series, make_windows

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SMALL = ["task=vitals", "task.vitals.patients_per_site=30", "task.vitals.hours=48"]


@pytest.fixture(scope="module")
def task() -> VitalsTask:
    built = get_task(compose_config(SMALL).task)
    assert isinstance(built, VitalsTask)
    return built


@pytest.fixture(scope="module")
def model(task: VitalsTask) -> torch.nn.Module:
    pooled = task.load_pooled()
    torch.manual_seed(0)
    trained = task.build_model()
    train_epochs(trained, pooled.x_train, pooled.y_train, loss_fn=task.loss_fn(), epochs=8, batch_size=64,
                 optimizer_name="adam", learning_rate=3e-3, seed=0)  # fmt: skip
    return trained


def test_each_ward_is_a_site_split_by_patient(task: VitalsTask) -> None:
    assert task.site_ids() == ["ward-a", "ward-b", "ward-c", "ward-d"]
    for ward, split in zip(task.wards(), task.load_all_sites(), strict=True):
        assert not {p.patient_id for p in ward.train} & {p.patient_id for p in ward.test}  # no patient on both sides
        assert 4 <= len(ward.test) <= 15 and split.x_train.shape[1] == task.shape.input_width  # ~30 % of 30, by id hash
        assert split.y_train.shape[1] == 2 * task.shape.target_width and split.num_train > 100


def test_gaps_stay_gaps_on_the_grid_and_in_the_windows() -> None:
    patient = generate_patient(site_profiles(1, num_patients=4, hours=24.0)[0], 0, seed=3, has_episode=False)
    patient.values[10:40, 0] = np.nan  # a 2.5 h HR gap at a 5-min cadence
    gridded = grid_series(patient, grid_min=15.0)
    assert np.isnan(gridded.values[4:13, 0]).all()  # cells fully inside the gap have no HR
    x, y = make_windows(gridded, WindowShape(window_steps=4, horizon_steps=2), stride_steps=1)
    masks = x.reshape(len(x), 4, 2, 6)[:, :, 1, 0]
    assert (masks == 0).any() and set(np.unique(masks)) <= {0.0, 1.0}  # the model is told what is missing
    assert np.isfinite(x).all() and np.isfinite(y).all()


def test_the_twin_forecasts_held_out_patients_better_than_their_last_reading(task: VitalsTask, model: torch.nn.Module) -> None:
    pooled = task.load_pooled()
    metrics = task.evaluate(model, pooled.x_test, pooled.y_test)
    assert metrics["mae"] < 0.97 * metrics["naive_mae"], metrics
    assert 0.75 < metrics["coverage"] < 0.99  # the 90 % band is roughly calibrated
    assert 2.0 < metrics["mae_hr"] < 8.0 and metrics["mae_temp"] < 0.3  # beats/min, °C


def test_an_episode_raises_an_alert_before_the_labelled_onset_and_stable_days_raise_none(task: VitalsTask, model: torch.nn.Module) -> None:
    twin = PatientTwin(model, task.shape, grid_min=task.settings.grid_min)
    train = [twin.follow_gridded(p) for ward in task.wards() for p in ward.train]
    twin = PatientTwin(model, task.shape, grid_min=task.settings.grid_min,
                       threshold=calibrate_threshold(train, false_alarms_per_day=1.0, warning_h=4.0, after_h=2.0))  # fmt: skip
    # a new patient of the step-down unit, the same stream with and without an injected episode
    profile = replace(site_profiles(4, num_patients=30, hours=48.0)[2], missing_rate=0.0, artefact_rate=0.0, dropout_rate_per_day=0.0)
    ill = twin.follow(generate_patient(profile, 1, seed=11, has_episode=True))
    assert ill.onset_h is not None and ill.alerts, "the episode raised no alert"
    first = ill.alerts[0]
    assert first.start_h < ill.onset_h, (first, ill.onset_h)
    news2_trigger = ill.times_h[np.argmax(ill.news2 >= 5)]
    assert first.start_h < news2_trigger  # earlier than the guideline's urgent-response trigger
    assert abs(sum(share for _, share in first.drivers) - 1.0) < 1e-6  # exact shares of the score
    assert first.drivers[0][1] > 0.2 and np.isfinite(first.news2)
    stable = twin.follow(generate_patient(profile, 1, seed=11, has_episode=False))  # the same stream, no episode
    assert [a for a in stable.alerts if a.start_h < 24.0] == [], stable.alerts  # a stable day raises none
    # nor at the hours where the ill twin began to alert: that alert is the episode's, not the stream's
    assert not [a for a in stable.alerts if a.start_h < first.start_h + 2.0 and a.end_h > first.start_h - 2.0], (first, stable.alerts)
    alerts = sum(len(twin.follow(generate_patient(profile, i, seed=11, has_episode=False)).alerts) for i in range(8))
    assert alerts / 16 <= 1.0  # false alarms per stable patient-day, within the calibrated budget
    finite = np.isfinite(stable.lower[:, 0]) & np.isfinite(stable.observed[:, 0])
    inside = (stable.observed[finite, 0] >= stable.lower[finite, 0]) & (stable.observed[finite, 0] <= stable.upper[finite, 0])
    assert inside.mean() > 0.75  # a stable patient's HR mostly inside their band


def test_detection_scores_follow_the_definitions() -> None:
    times = np.arange(0, 24, 0.25)
    labels = cell_labels(times, 12.0, warning_h=4.0, after_h=2.0)
    assert labels[times < 8].max() == 0 and (labels[(times >= 8) & (times < 14)] == 1).all() and (labels[times >= 14] == -1).all()
    assert list(alert_starts(np.array([0, 7, 8, 1, 9, np.nan, 9]), 7.0)) == [1, 4, 6]
    assert list(alert_starts(np.full(20, 9.0), 7.0, rearm_steps=8)) == [0, 8, 16]  # a continuous alarm sounds again


def test_the_twin_warns_earlier_than_news2_on_held_out_patients(task: VitalsTask, model: torch.nn.Module) -> None:
    twin = PatientTwin(model, task.shape, grid_min=task.settings.grid_min)
    train = [twin.follow_gridded(p) for ward in task.wards() for p in ward.train]
    threshold = calibrate_threshold(train, false_alarms_per_day=1.0, warning_h=4.0, after_h=2.0)
    test = [twin.follow_gridded(p) for ward in task.wards() for p in ward.test]
    reports = {report.detector: report for report in score_detectors(test, twin_threshold=threshold, warning_h=4.0, after_h=2.0)}
    twin_report, news2_report = reports["twin"], reports["news2"]
    assert twin_report.episodes > 0 and twin_report.detected >= news2_report.detected - 1, reports
    assert twin_report.median_lead_h is not None and news2_report.median_lead_h is not None
    assert twin_report.median_lead_h > news2_report.median_lead_h + 0.25, reports  # earlier than the guideline's trigger
    assert twin_report.false_alarms_per_patient_day <= 1.5 and news2_report.threshold == 5.0
    intervals = detection_intervals(detector_outcomes(test, twin_threshold=threshold, warning_h=4.0, after_h=2.0), resamples=200, seed=0)
    twin_auroc = intervals.detectors[0].auroc  # patient-level bootstrap on the same held-out patients
    assert twin_auroc.estimate == pytest.approx(twin_report.auroc) and twin_auroc.low < twin_report.auroc < twin_auroc.high
    assert intervals.used + intervals.skipped == 200 and twin_auroc.resamples_used == intervals.used > 150


def test_bad_vitals_settings_name_their_key() -> None:
    with pytest.raises(ConfigError, match="task.vitals.window_h"):
        get_task(compose_config([*SMALL, "task.vitals.window_h=50"]).task).wards()  # generated stays are 48 h
    with pytest.raises(ConfigError, match="task.vitals.grid_min"):
        get_task(compose_config([*SMALL, "task.vitals.grid_min=0"]).task)
    with pytest.raises(ConfigError, match="task.vitals.hours"):
        get_task(compose_config([*SMALL, "task.vitals.hours=6"]).task)


def test_the_bedside_command_follows_a_patient_from_a_released_model(task: VitalsTask, model: torch.nn.Module, tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from medtwin.core.config import config_to_yaml
    from medtwin.experiments.cli import app

    torch.save(model.state_dict(), tmp_path / "twin.pt")
    (tmp_path / "config.yaml").write_text(config_to_yaml(compose_config(SMALL)))
    common = ["twin", "follow", "--model", str(tmp_path / "twin.pt"), "--config", str(tmp_path / "config.yaml")]
    result = CliRunner().invoke(app, [*common, "--generated", "ward-c:1:episode", "--plot", str(tmp_path / "p.png"), "--json"])
    assert result.exit_code == 0, result.output
    followed = json.loads(result.output)
    assert followed["patient"] == "ward-c-p0001" and followed["alerts"] and followed["max_news2"] >= 5
    assert set(followed["latest_forecast"]) == {"at_h", "hr", "rr", "spo2", "sbp", "temp"}
    assert (tmp_path / "p.png").stat().st_size > 10_000
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    refused = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["twin", "follow", "--model", str(tmp_path / "bad.pt"), "--config", str(tmp_path / "config.yaml"),
                                       "--generated", "ward-a:0"])  # fmt: skip
    assert refused.exit_code != 0 and "not this task's released model" in refused.output


def test_adding_a_patient_moves_no_other_patient_between_train_and_test() -> None:
    """DP's guarantee is about neighbouring data sets: one more patient in a site's file must change
    the training set by at most that patient, never reshuffle the others."""
    from medtwin.core.tasks.vitals_task import _split_patients

    ids = [f"p-{index:04d}" for index in range(200)]
    train, test = _split_patients(ids, 3, 0.3)
    assert 40 <= len(test) <= 80 and sorted(train + test) == list(range(200))
    for new_id in ("a-first", "p-0100x", "zzz-last"):
        grown = sorted([*ids, new_id])
        grown_train, _ = _split_patients(grown, 3, 0.3)
        before = {ids[i] for i in train}
        after = {grown[i] for i in grown_train}
        assert after - {new_id} == before
    assert _split_patients(ids, 4, 0.3)[1] != test  # the seed matters
    assert _split_patients(["only-a", "only-b"], 3, 0.0)[1] and _split_patients(["only-a", "only-b"], 3, 1.0)[0]  # both sides non-empty


def test_an_untrained_twin_forecasts_each_vitals_last_reading(task: VitalsTask) -> None:
    """The mean is persistence plus a learned correction that starts at zero: DP noise on a few
    hundred patients can cost the correction, not the forecast itself."""
    pooled = task.load_pooled()
    metrics = task.evaluate(task.build_model(), pooled.x_test, pooled.y_test)
    assert metrics["mae"] == pytest.approx(metrics["naive_mae"], rel=1e-6)
