"""core.tasks.vitals.generator: shapes, determinism, site heterogeneity, episodes, physiology, missingness."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from medtwin.core.tasks.vitals import (
    MIN_HOURS_AFTER_ONSET_H,
    MIN_HOURS_BEFORE_ONSET_H,
    SIGNALS,
    UNITS,
    PatientSeries,
    SiteProfile,
    generate_patient,
    generate_site,
    generator,
    news2_for_patient,
    site_profiles,
)

HR, RR, SPO2, SBP, TEMP, ACTIVITY = range(len(SIGNALS))


def small_profile(**overrides: object) -> SiteProfile:
    settings: dict = {
        "site_id": "test-ward", "num_patients": 12, "hours": 36.0, "cadence_min": 10.0, "age_mean": 65.0, "age_sd": 12.0,
        "postop_fraction": 0.5, "missing_rate": 0.05, "dropout_rate_per_day": 1.0, "artefact_rate": 0.01, "episode_fraction": 0.25,
    }  # fmt: skip
    return SiteProfile(**(settings | overrides))


@pytest.fixture(scope="module")
def episode_site() -> list[PatientSeries]:
    profile = small_profile(num_patients=40, hours=48.0, episode_fraction=0.5, missing_rate=0.02, dropout_rate_per_day=0.5)
    return generate_site(profile, seed=11)


@pytest.fixture(scope="module")
def quiet_site() -> list[PatientSeries]:
    return generate_site(small_profile(num_patients=40, hours=48.0, episode_fraction=0.0), seed=5)


def assert_same_patients(first: list[PatientSeries], second: list[PatientSeries]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert (a.patient_id, a.cohort, a.age, a.onset_h, a.admit_clock_h) == (b.patient_id, b.cohort, b.age, b.onset_h, b.admit_clock_h)
        np.testing.assert_array_equal(a.times_h, b.times_h)
        np.testing.assert_array_equal(a.values, b.values)  # NaN == NaN here
        np.testing.assert_array_equal(a.on_oxygen, b.on_oxygen)
        np.testing.assert_array_equal(a.alert, b.alert)


def test_signals_and_units_are_documented() -> None:
    assert SIGNALS == ("hr", "rr", "spo2", "sbp", "temp", "activity")
    assert set(UNITS) == set(SIGNALS)


def test_arrays_have_documented_shapes_dtypes_and_monitor_rounding() -> None:
    profile = small_profile()
    patients = generate_site(profile, seed=0)
    assert len(patients) == profile.num_patients
    assert len({patient.patient_id for patient in patients}) == profile.num_patients
    for patient in patients:
        length = round(profile.hours * 60 / profile.cadence_min)
        assert patient.site_id == "test-ward" and patient.cohort in ("postop", "chronic")
        assert patient.times_h.dtype == np.float64 and patient.times_h.shape == (length,)
        np.testing.assert_allclose(np.diff(patient.times_h), profile.cadence_min / 60.0)
        assert patient.times_h[0] == 0.0
        assert patient.values.dtype == np.float32 and patient.values.shape == (length, len(SIGNALS))
        assert patient.on_oxygen.dtype == np.bool_ and patient.on_oxygen.shape == (length,)
        assert patient.alert.dtype == np.bool_ and patient.alert.shape == (length,)
        assert patient.mask.dtype == np.bool_ and patient.mask.shape == (length, len(SIGNALS))
        np.testing.assert_array_equal(patient.mask, ~np.isnan(patient.values))
        assert np.all((patient.clock_h >= 0) & (patient.clock_h < 24))
        values = patient.values.astype(np.float64)
        integers = values[:, [HR, RR, SPO2, SBP]]
        observed = ~np.isnan(integers)
        assert np.all(integers[observed] == np.round(integers[observed]))
        spo2, temp, activity = (values[:, column] for column in (SPO2, TEMP, ACTIVITY))
        assert np.nanmax(spo2) <= 100
        temp = temp[~np.isnan(temp)]
        assert np.allclose(temp * 10, np.round(temp * 10), atol=1e-3)
        assert np.nanmin(activity) >= 0 and np.nanmax(activity) <= 1


def test_same_seed_is_identical_and_another_seed_differs() -> None:
    profile = small_profile(num_patients=6)
    assert_same_patients(generate_site(profile, seed=42), generate_site(profile, seed=42))
    other = generate_site(profile, seed=43)
    assert not np.array_equal(generate_site(profile, seed=42)[0].values, other[0].values, equal_nan=True)


def test_sites_get_independent_streams() -> None:
    first = generate_site(small_profile(site_id="ward-x", num_patients=3), seed=1)
    second = generate_site(small_profile(site_id="ward-y", num_patients=3), seed=1)
    for a, b in zip(first, second):
        assert not np.array_equal(a.values, b.values, equal_nan=True)


def test_streams_do_not_depend_on_the_python_hash_salt() -> None:
    # the generator module alone (numpy only) in fresh interpreters with different hash salts
    script = (
        "import importlib.util, sys; import numpy as np;"
        f"spec = importlib.util.spec_from_file_location('vitals_generator', {str(generator.__file__)!r});"
        "module = importlib.util.module_from_spec(spec); sys.modules['vitals_generator'] = module; spec.loader.exec_module(module);"
        "p = module.site_profiles(2, num_patients=2, hours=24.0)[1];"
        "print(float(np.nansum(module.generate_site(p, seed=9)[1].values)))"
    )
    outputs = set()
    for salt in ("1", "2"):
        environment = os.environ | {"PYTHONHASHSEED": salt}
        outputs.add(subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, check=True).stdout)
    profile = site_profiles(2, num_patients=2, hours=24.0)[1]
    outputs.add(f"{float(np.nansum(generate_site(profile, seed=9)[1].values))}\n")
    assert len(outputs) == 1


def test_a_patient_is_the_same_with_or_without_an_episode_until_onset() -> None:
    profile = small_profile()
    with_episode = generate_patient(profile, 3, seed=7, has_episode=True)
    without = generate_patient(profile, 3, seed=7, has_episode=False)
    assert with_episode.drift_start_h is not None and without.onset_h is None and without.drift_start_h is None
    assert with_episode.drift_start_h < with_episode.onset_h  # the label (clinical recognition) comes after the drift starts
    before = with_episode.times_h < with_episode.drift_start_h
    np.testing.assert_array_equal(with_episode.values[before], without.values[before])
    np.testing.assert_array_equal(with_episode.mask, without.mask)


def test_site_profiles_are_heterogeneous_wards() -> None:
    profiles = site_profiles()
    assert [profile.site_id for profile in profiles] == ["ward-a", "ward-b", "ward-c", "ward-d"]
    for field in ("cadence_min", "age_mean", "missing_rate", "episode_fraction", "postop_fraction"):
        values = [getattr(profile, field) for profile in profiles]
        assert len(set(values)) >= 3, f"{field} barely differs between sites: {values}"
    assert all(profile.num_patients == 60 and profile.hours == 48.0 for profile in profiles)
    many = site_profiles(30, num_patients=5, hours=24.0)
    assert len({profile.site_id for profile in many}) == 30 and many[26].site_id == "ward-aa"
    assert dataclasses.replace(many[4], site_id="ward-a", description="") != dataclasses.replace(many[0], description="")
    with pytest.raises(ValueError, match="num_sites"):
        site_profiles(0)


def test_generated_sites_differ_in_age_cadence_and_missingness() -> None:
    profiles = site_profiles(4, num_patients=30, hours=24.0)
    sites = [generate_site(profile, seed=0) for profile in profiles]
    mean_age = [np.mean([patient.age for patient in site]) for site in sites]
    missing = [np.mean([np.isnan(patient.values).mean() for patient in site]) for site in sites]
    samples = [site[0].times_h.shape[0] for site in sites]
    assert mean_age[1] > mean_age[0] + 10  # medical ward older than surgical ward
    assert missing[1] > 2 * missing[2]  # medical ward misses more than the step-down unit
    assert len(set(samples)) == 3  # 5-, 15- and 10-minute cadences
    postop_share = [np.mean([patient.cohort == "postop" for patient in site]) for site in sites]
    assert postop_share[0] > 0.6 and postop_share[1] < 0.3


def test_episodes_hit_the_configured_fraction_inside_the_allowed_window(episode_site: list[PatientSeries]) -> None:
    onsets = [patient.drift_start_h for patient in episode_site if patient.onset_h is not None]
    assert len(onsets) == 20  # exactly round(0.5 * 40)
    assert all(MIN_HOURS_BEFORE_ONSET_H <= onset <= 48.0 - MIN_HOURS_AFTER_ONSET_H for onset in onsets)
    leads = [p.onset_h - p.drift_start_h for p in episode_site if p.onset_h is not None]
    assert all(1.0 - 1e-6 <= lead <= 4.0 + 1e-6 for lead in leads)  # half of a 2-8 h ramp
    counts = [sum(p.onset_h is not None for p in generate_site(profile, seed=0)) for profile in site_profiles(4, num_patients=20, hours=24.0)]
    assert counts == [round(profile.episode_fraction * 20) for profile in site_profiles(4, num_patients=20, hours=24.0)]


def test_during_an_episode_vitals_move_away_from_the_patients_own_baseline(episode_site: list[PatientSeries]) -> None:
    changes, news2_changes = [], []
    for patient in (p for p in episode_site if p.onset_h is not None):
        before = (patient.times_h >= patient.drift_start_h - 6) & (patient.times_h < patient.drift_start_h)
        during = patient.times_h >= patient.drift_start_h + 3
        changes.append(np.nanmean(patient.values[during], axis=0) - np.nanmean(patient.values[before], axis=0))
        scores = news2_for_patient(patient)
        news2_changes.append(scores[during].mean() - scores[before].mean())
    changes = np.array(changes)
    mean_change = changes.mean(axis=0)
    assert mean_change[HR] > 10 and mean_change[RR] > 4
    assert mean_change[SPO2] < -1.5 and mean_change[SBP] < -10
    assert mean_change[ACTIVITY] < 0
    assert np.mean(changes[:, HR] > 0) >= 0.9 and np.mean(changes[:, SBP] < 0) >= 0.9
    assert np.mean(news2_changes) > 2
    assert any(not patient.alert.all() for patient in episode_site if patient.onset_h is not None)


def test_episode_changes_start_subtly_at_the_drift_start(episode_site: list[PatientSeries]) -> None:
    first_hour, later = [], []
    for patient in (p for p in episode_site if p.onset_h is not None):
        before = patient.values[(patient.times_h >= patient.drift_start_h - 3) & (patient.times_h < patient.drift_start_h), HR]
        hour = patient.values[(patient.times_h >= patient.drift_start_h) & (patient.times_h < patient.drift_start_h + 1), HR]
        end = patient.values[patient.times_h >= patient.drift_start_h + 3.5, HR]
        if np.isnan(hour).all() or np.isnan(before).all():
            continue  # a dropout hid the hour
        first_hour.append(np.nanmean(hour) - np.nanmean(before))
        later.append(np.nanmean(end) - np.nanmean(before))
    assert len(first_hour) >= 15
    assert 0 < np.mean(first_hour) < 8 < np.mean(later)


def test_patients_without_episodes_stay_plausible(quiet_site: list[PatientSeries]) -> None:
    assert all(patient.onset_h is None and patient.alert.all() for patient in quiet_site)
    values = np.concatenate([patient.values for patient in quiet_site]).astype(np.float64)
    plausible = {HR: (35, 180), RR: (6, 40), SPO2: (85, 100), SBP: (70, 220), TEMP: (35.0, 40.0)}
    for column, (low, high) in plausible.items():
        observed = values[~np.isnan(values[:, column]), column]
        assert np.mean((observed >= low) & (observed <= high)) >= 0.99, SIGNALS[column]
    for patient in quiet_site:
        oxygen_times = patient.times_h[patient.on_oxygen]
        assert patient.cohort == "postop" or not patient.on_oxygen.any()
        assert oxygen_times.size == 0 or oxygen_times.max() <= 6.0  # only just after surgery


def test_night_heart_rate_is_lower_than_daytime(quiet_site: list[PatientSeries]) -> None:
    night, day = [], []
    for patient in quiet_site:
        hr, clock = patient.values[:, HR], patient.clock_h
        night.append(hr[(clock >= 1) & (clock < 5)])
        day.append(hr[(clock >= 10) & (clock < 20)])
    assert np.nanmean(np.concatenate(night)) < np.nanmean(np.concatenate(day)) - 4


def test_post_operative_patients_mobilise_over_the_stay(quiet_site: list[PatientSeries]) -> None:
    first_day, second_day = [], []
    for patient in (p for p in quiet_site if p.cohort == "postop"):
        daytime = (patient.clock_h >= 10) & (patient.clock_h < 20)
        first_day.append(patient.values[daytime & (patient.times_h < 24), ACTIVITY])
        second_day.append(patient.values[daytime & (patient.times_h >= 24), ACTIVITY])
    assert np.nanmean(np.concatenate(second_day)) > 1.2 * np.nanmean(np.concatenate(first_day))


@pytest.mark.parametrize("missing_rate", [0.0, 0.1, 0.3])
def test_random_missingness_matches_the_configured_rate(missing_rate: float) -> None:
    profile = small_profile(num_patients=20, missing_rate=missing_rate, dropout_rate_per_day=0.0, artefact_rate=0.0)
    masks = np.concatenate([patient.mask for patient in generate_site(profile, seed=2)])
    assert abs((1 - masks.mean()) - missing_rate) < 0.015
    if missing_rate > 0:  # activity goes missing independently of the vitals
        vitals_complete = masks[:, :ACTIVITY].all(axis=1)
        assert np.any(vitals_complete & ~masks[:, ACTIVITY])


def test_dropouts_blank_every_signal_for_20_to_120_minutes() -> None:
    profile = small_profile(num_patients=10, hours=48.0, cadence_min=5.0, missing_rate=0.0, dropout_rate_per_day=3.0, artefact_rate=0.0)
    blank_fraction = []
    for patient in generate_site(profile, seed=4):
        blank = ~patient.mask.any(axis=1)
        assert np.array_equal(blank, ~patient.mask.all(axis=1))  # a dropout takes every signal at once
        blank_fraction.append(blank.mean())
        edges = np.diff(np.concatenate([[0], blank.astype(int), [0]]))
        run_lengths_min = (np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)) * profile.cadence_min
        interior = run_lengths_min[:-1] if blank[-1] else run_lengths_min  # a gap may run past the end
        assert np.all(interior >= 15)  # >= 20 min, minus one sample of phase
    expected = 3.0 * 2 * 70 / (48 * 60)  # dropouts per patient x mean gap / stay
    assert 0.4 * expected < np.mean(blank_fraction) < 1.3 * expected


def test_artefacts_appear_only_when_configured() -> None:
    clean = np.concatenate([p.values for p in generate_site(small_profile(artefact_rate=0.0, episode_fraction=0.0), seed=8)])
    noisy = np.concatenate([p.values for p in generate_site(small_profile(artefact_rate=0.2, episode_fraction=0.0), seed=8)])
    assert np.nanmin(clean[:, SPO2]) >= 86
    assert np.sum(noisy[:, SPO2] < 86) > 10 and np.sum(noisy[:, TEMP] < 35.5) > 10


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("site_id", ""), ("num_patients", 0), ("num_patients", 2.5), ("hours", -1.0), ("hours", float("nan")),
        ("cadence_min", -5), ("cadence_min", 10_000.0), ("age_mean", 5.0), ("age_sd", -1.0), ("postop_fraction", 1.5),
        ("missing_rate", 1.0), ("dropout_rate_per_day", -0.1), ("artefact_rate", -0.01), ("episode_fraction", 2.0),
    ],
)  # fmt: skip
def test_invalid_profile_fields_name_the_field_and_value(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"SiteProfile\.{field} must .*got {value!r}".replace("(", r"\(").replace(")", r"\)")):
        small_profile(**{field: value})


def test_stays_too_short_for_an_episode_are_rejected_and_bad_seeds_too() -> None:
    with pytest.raises(ValueError, match=r"SiteProfile\.hours must be >= 12"):
        small_profile(hours=10.0)
    assert small_profile(hours=10.0, episode_fraction=0.0).num_samples == 60
    with pytest.raises(ValueError, match="seed"):
        generate_site(small_profile(), seed=-1)


def test_four_default_sites_generate_well_under_two_seconds() -> None:
    start = time.perf_counter()
    sites = [generate_site(profile, seed=0) for profile in site_profiles()]
    elapsed = time.perf_counter() - start
    assert sum(len(site) for site in sites) == 240
    assert elapsed < 2.0, f"generation took {elapsed:.2f} s"
