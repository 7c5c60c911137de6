"""core.tasks.vitals.news2: the RCP NEWS2 (2017) table, SpO2 scale 1, vectorised, with NaN handling."""

from __future__ import annotations

import numpy as np
import pytest

from medtwin.core.tasks.vitals import (
    NEWS2_PARAMETERS,
    SIGNALS,
    SiteProfile,
    generate_site,
    news2_components,
    news2_for_patient,
    news2_missing_parameters,
    news2_risk,
    news2_score,
)

NORMAL = {"rr": 16.0, "spo2": 98.0, "sbp": 120.0, "hr": 70.0, "temp": 37.0, "on_oxygen": False, "alert": True}

BOUNDARIES = {
    "rr": [(0, 3), (8, 3), (8.5, 1), (9, 1), (11, 1), (11.5, 0), (12, 0), (20, 0), (20.5, 2), (21, 2), (24, 2), (24.5, 3), (25, 3), (40, 3)],
    "spo2": [(80, 3), (91, 3), (91.5, 2), (92, 2), (93, 2), (93.5, 1), (94, 1), (95, 1), (95.5, 0), (96, 0), (100, 0)],
    "sbp": [(60, 3), (90, 3), (90.5, 2), (91, 2), (100, 2), (101, 1), (110, 1), (110.5, 0), (111, 0), (219, 0), (219.5, 3), (220, 3), (260, 3)],
    "hr": [
        (30, 3), (40, 3), (40.5, 1), (41, 1), (50, 1), (50.5, 0), (51, 0), (90, 0), (90.5, 1), (91, 1),
        (110, 1), (110.5, 2), (111, 2), (130, 2), (130.5, 3), (131, 3), (180, 3),
    ],
    "temp": [
        (34.0, 3), (35.0, 3), (35.05, 1), (35.1, 1), (36.0, 1), (36.05, 0), (36.1, 0), (38.0, 0), (38.05, 1),
        (38.1, 1), (39.0, 1), (39.05, 2), (39.1, 2), (41.0, 2),
    ],
    "on_oxygen": [(False, 0), (True, 2)],
    "alert": [(True, 0), (False, 3)],
}  # fmt: skip

CASES = [(parameter, value, points) for parameter, rows in BOUNDARIES.items() for value, points in rows]


@pytest.mark.parametrize(("parameter", "value", "points"), CASES)
def test_every_band_boundary_of_the_rcp_table(parameter: str, value: float, points: int) -> None:
    inputs = NORMAL | {parameter: value}
    components = news2_components(**inputs)
    assert int(components[parameter]) == points
    assert all(int(score) == 0 for name, score in components.items() if name != parameter)
    assert int(news2_score(**inputs)) == points


@pytest.mark.parametrize(("parameter", "value", "points"), [case for case in CASES if case[0] in ("rr", "spo2", "sbp", "hr", "temp")])
def test_float32_readings_score_like_the_table(parameter: str, value: float, points: int) -> None:
    assert int(news2_components(**NORMAL | {parameter: np.float32(value)})[parameter]) == points


def test_worked_example_scores_seven_and_high_risk() -> None:
    example = {"rr": 22, "spo2": 95, "on_oxygen": False, "sbp": 105, "hr": 112, "alert": True, "temp": 38.4}
    components = news2_components(**example)
    assert {name: int(points) for name, points in components.items()} == {
        "rr": 2, "spo2": 1, "on_oxygen": 0, "sbp": 1, "hr": 2, "alert": 0, "temp": 1,
    }  # fmt: skip
    assert tuple(components) == NEWS2_PARAMETERS
    score = news2_score(**example)
    assert int(score) == 7
    assert str(news2_risk(score, components)) == "high"


def test_all_normal_scores_zero_and_worst_case_scores_twenty() -> None:
    assert int(news2_score(**NORMAL)) == 0
    worst = {"rr": 30, "spo2": 85, "on_oxygen": True, "sbp": 80, "hr": 140, "alert": False, "temp": 34.0}
    assert int(news2_score(**worst)) == 20


def test_vectorised_over_arrays_with_broadcasting() -> None:
    hr = np.array([[40, 41, 90], [91, 111, 131]], dtype=np.float32)
    score = news2_score(rr=16, spo2=98, sbp=120, hr=hr, temp=37.0, on_oxygen=False, alert=True)
    assert score.shape == (2, 3)
    assert score.tolist() == [[3, 1, 0], [1, 2, 3]]
    on_oxygen = np.array([False, True, True])
    score = news2_score(rr=[8, 16, 25], spo2=98, sbp=120, hr=70, temp=37.0, on_oxygen=on_oxygen, alert=[True, True, False])
    assert score.tolist() == [3, 2, 8]
    assert news2_components(rr=[8, 16, 25], spo2=98, sbp=120, hr=70, temp=37.0, on_oxygen=on_oxygen, alert=True)["rr"].dtype == np.int8


def test_missing_parameters_score_zero_and_are_counted() -> None:
    nan = float("nan")
    inputs = {"rr": [25, nan, nan], "spo2": [nan, 91, nan], "sbp": [nan, nan, nan], "hr": [nan, 131, nan], "temp": [nan, 37.0, nan]}
    score = news2_score(**inputs, on_oxygen=[True, False, nan], alert=[True, True, nan])
    assert score.tolist() == [5, 6, 0]
    missing = news2_missing_parameters(**inputs, on_oxygen=[True, False, nan], alert=[True, True, nan])
    assert missing.tolist() == [4, 2, 7]
    assert news2_missing_parameters(**NORMAL).tolist() == 0


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, "low"),
        ({"rr": 8}, "low-medium"),  # a single 3 with aggregate 3
        ({"hr": 111, "sbp": 101, "temp": 38.1}, "low"),  # 2 + 1 + 1 = 4, no single 3
        ({"hr": 111, "sbp": 101, "spo2": 94, "temp": 38.1}, "medium"),  # 5
        ({"alert": False, "temp": 38.1, "spo2": 95, "sbp": 101}, "medium"),  # 6 with a single 3: still medium
        ({"rr": 21, "hr": 111, "spo2": 94, "on_oxygen": True}, "high"),  # 7
    ],
)
def test_clinical_risk_bands(overrides: dict, expected: str) -> None:
    inputs = NORMAL | overrides
    assert str(news2_risk(news2_score(**inputs), news2_components(**inputs))) == expected


def test_risk_is_vectorised() -> None:
    inputs = {"rr": [16, 8, 25, 25], "spo2": [98, 98, 91, 91], "sbp": 120, "hr": [70, 70, 70, 131], "temp": 37.0, "on_oxygen": False, "alert": True}
    risk = news2_risk(news2_score(**inputs), news2_components(**inputs))
    assert risk.tolist() == ["low", "low-medium", "medium", "high"]


def test_news2_for_a_generated_patient_matches_the_columns() -> None:
    profile = SiteProfile(
        site_id="news2-check", num_patients=3, hours=24.0, cadence_min=15.0, age_mean=70.0, age_sd=10.0, postop_fraction=0.5,
        missing_rate=0.1, dropout_rate_per_day=1.0, artefact_rate=0.02, episode_fraction=1.0,
    )  # fmt: skip
    for patient in generate_site(profile, seed=3):
        column = {name: patient.values[:, SIGNALS.index(name)] for name in ("rr", "spo2", "sbp", "hr", "temp")}
        expected = news2_score(**column, on_oxygen=patient.on_oxygen, alert=patient.alert)
        scores = news2_for_patient(patient)
        assert scores.shape == patient.times_h.shape and scores.dtype == np.int16
        np.testing.assert_array_equal(scores, expected)
        assert scores.min() >= 0 and scores.max() <= 20
