"""Synthetic, deterministic hospital vital-sign series with labelled deterioration episodes.

Everything here is SYNTHETIC: no patient data was used, only published adult reference values.
It is a plausible, reproducible test bed for federated digital-twin models, not a validated
physiological simulator. Not modelled: drugs (beta-blockers, antipyretics, vasopressors, sedatives),
treatment response (an episode never resolves within the stay), arrhythmias, pain, inter-signal
lags (activity and episode effects act at the sampling instant), SpO2 scale 2 / long-term oxygen,
baseline delirium, and correlations between patients.

Assumptions and their sources
-----------------------------
- Adult resting norms: HR ~ N(75, 10) beats/min (AHA: normal resting 60-100), RR ~ N(16, 2)
  breaths/min and SBP ~ N(125, 15) mmHg (the "0 points" bands of the Royal College of Physicians
  NEWS2 report, 2017: RR 12-20, SBP 111-219, HR 51-90), SBP rising ~0.5 mmHg per year of age over 50
  (Framingham / population blood-pressure surveys), core temperature 36.8 +- 0.3 degC (clinical
  thermometry references; NEWS2 normal band 36.1-38.0), SpO2 97 +- 1 % in room air (WHO pulse-oximetry
  manual: normal 95-100 %). Chronic-disease patients are 1 % lower and one in five is COPD-like
  with a baseline SpO2 of 92-94 % (British Thoracic Society oxygen guideline target 88-92/94-98 %).
- Circadian rhythm: one cosine with its nadir at 04:00 and peak at 16:00; amplitudes HR 4 beats/min,
  SBP 6 mmHg, RR 0.5 breaths/min, core temperature 0.3 degC (chronobiology literature: core
  temperature varies ~0.5-1 degC peak to trough with its minimum in the early morning; HR and BP
  dip at night, the "nocturnal dip" of ambulatory BP monitoring being ~10-20 %, part of which is
  sleep/inactivity and modelled here through the activity signal). SpO2 is 0.5 % lower asleep.
- Clock: post-operative patients arrive from theatre between 10:00 and 20:00, others at any hour
  (`PatientSeries.admit_clock_h`, `.clock_h`).
- Activity (0 = still, 1 = vigorous, as from a wrist/chest accelerometer): asleep ~22:30-07:00
  with rare small awakenings; awake background plus Poisson bouts of 5-30 min. Post-operative
  patients start at 25 % of their mobility and mobilise with a 24 h time constant (enhanced
  recovery after surgery, ERAS, pathways); older patients are less active. Activity raises HR
  by up to 25 beats/min, RR by 5 breaths/min and SBP by 12 mmHg at full intensity.
- Post-operative course: HR (+5-15) and RR (+0-2) are raised early and settle with a 6-18 h time
  constant; a benign inflammatory temperature hump (+0.2-0.7 degC) peaks 6-18 h after surgery
  (post-operative fever in the first 48 h is usually non-infectious). Half of post-operative
  patients arrive on supplemental oxygen for 2-6 h. Supplemental oxygen raises SpO2 by 2 %.
- Noise: AR(1) physiological variability (time constants 15-60 min; SD HR 3, RR 0.8, SpO2 0.5,
  SBP 5, temp 0.08) plus white measurement noise; readings are rounded like monitors (HR, RR, SBP
  integers; SpO2 integer capped at 100 %; temperature to 0.1 degC).
- Deterioration (sepsis-like, after Sepsis-3 / SIRS: HR > 90, RR > 20, temperature > 38 or < 36;
  qSOFA: RR >= 22, SBP <= 100, altered mentation): onset uniform in [8 h, stay - 4 h], then a ramp
  of 2-8 h to a full change of HR +25-40, RR +8-14, SpO2 -4 to -8, SBP -20 to -40, temperature
  +1.0-2.0 degC (15 % of episodes hypothermic instead: -0.8 to -1.5 degC), activity falling by
  50-90 %. A shared severity in [0, 1] scales all changes. The ramp is ((t - onset) / ramp) ** 1.5:
  changes START SUBTLY at `drift_start_h` (after a quarter of the ramp only 1/8 of the full
  change, e.g. HR +4). The labelled `onset_h` is clinical recognition, half-way through the ramp
  (35 % of the full change, e.g. HR +10, RR +3 to +5: about when SIRS criteria are first met) —
  what chart review dates an episode by; the hours of drift before it are what an early-warning
  detector can catch and population thresholds such as NEWS2 mostly miss. Severe episodes (severity > 0.5) get
  supplemental oxygen once 70 % of the change is reached and, in 70 % of them,
  new confusion (alert False) 0-2 h after the ramp ends.
- Data quality: each reading is missing at random with `missing_rate` (activity independently);
  sensor dropouts (Poisson, `dropout_rate_per_day`) blank all signals for 20-120 min; artefacts
  (`artefact_rate` of rows) replace one reading: SpO2 probe-off (50-85 %), motion HR spike
  (x1.4-2.0), cuff motion SBP (+-40 mmHg) or displaced temperature probe (33.0-35.5 degC).
  Artefacts are observed values (mask True) and are not labelled.

Determinism: patient i of a site draws from ``SeedSequence([seed, crc32(site_id), i])``; which
patients have an episode is drawn from ``SeedSequence([seed, crc32(site_id), 2**32 - 1])`` and
exactly ``round(episode_fraction * num_patients)`` patients get one. A patient's stream is
consumed identically with or without an episode, so the same patient can be generated both ways.
"""

from __future__ import annotations

import math
import numbers
import operator
import zlib
from dataclasses import dataclass

import numpy as np

__all__ = [
    "COHORTS", "MIN_HOURS_AFTER_ONSET_H", "MIN_HOURS_BEFORE_ONSET_H", "SIGNALS", "UNITS",
    "PatientSeries", "SiteProfile", "generate_patient", "generate_site", "site_profiles",
]  # fmt: skip

SIGNALS: tuple[str, ...] = ("hr", "rr", "spo2", "sbp", "temp", "activity")
UNITS: dict[str, str] = {
    "hr": "beats/min", "rr": "breaths/min", "spo2": "%", "sbp": "mmHg", "temp": "degC", "activity": "a.u. 0-1",
}  # fmt: skip
COHORTS: tuple[str, ...] = ("postop", "chronic", "unknown")  # "unknown": a site's own stream (ingest.py) says nothing
MIN_HOURS_BEFORE_ONSET_H = 8.0
MIN_HOURS_AFTER_ONSET_H = 4.0
MAX_PATIENTS_PER_SITE = 1_000_000
_ALLOCATION_STREAM = 2**32 - 1  # never a patient index
_HR, _RR, _SPO2, _SBP, _TEMP, _ACTIVITY = range(len(SIGNALS))
_COMPARISONS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
_PLAUSIBLE_RANGE = {_HR: (20, 250), _RR: (4, 60), _SPO2: (50, 100), _SBP: (50, 250), _TEMP: (32.0, 42.5)}


def _check_number(field: str, value: object, *, above: float | None = None, at_least: float | None = None, below: float | None = None, at_most: float | None = None) -> None:
    """Raise ValueError naming `SiteProfile.<field>` unless `value` is a finite real within the bounds."""
    bounds = [(">", above), (">=", at_least), ("<", below), ("<=", at_most)]
    condition = " and ".join(f"{symbol} {bound:g}" for symbol, bound in bounds if bound is not None)
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(float(value)):
        raise ValueError(f"SiteProfile.{field} must be a finite number {condition}, got {value!r}")
    number = float(value)
    if not all(_COMPARISONS[symbol](number, bound) for symbol, bound in bounds if bound is not None):
        raise ValueError(f"SiteProfile.{field} must be {condition}, got {value!r}")


@dataclass(frozen=True)
class SiteProfile:
    """One hospital ward: its case mix, monitoring cadence and data quality."""

    site_id: str
    num_patients: int
    hours: float  # length of each patient's series
    cadence_min: float  # sampling interval
    age_mean: float
    age_sd: float
    postop_fraction: float  # the rest are chronic-disease patients
    missing_rate: float  # fraction of single readings missing at random
    dropout_rate_per_day: float  # expected sensor dropouts (20-120 min gaps) per patient-day
    artefact_rate: float  # fraction of rows with one reading replaced by an artefact
    episode_fraction: float  # fraction of patients who develop a deterioration episode
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.site_id, str) or not self.site_id.strip():
            raise ValueError(f"SiteProfile.site_id must be a non-empty string, got {self.site_id!r}")
        count = self.num_patients
        if not isinstance(count, numbers.Integral) or isinstance(count, bool) or not 1 <= count <= MAX_PATIENTS_PER_SITE:
            raise ValueError(f"SiteProfile.num_patients must be an integer in [1, {MAX_PATIENTS_PER_SITE}], got {count!r}")
        _check_number("hours", self.hours, above=0, at_most=24 * 365)
        _check_number("cadence_min", self.cadence_min, above=0, at_most=self.hours * 60.0)
        _check_number("age_mean", self.age_mean, at_least=18, at_most=100)
        _check_number("age_sd", self.age_sd, at_least=0, at_most=30)
        _check_number("postop_fraction", self.postop_fraction, at_least=0, at_most=1)
        _check_number("missing_rate", self.missing_rate, at_least=0, below=1)
        _check_number("dropout_rate_per_day", self.dropout_rate_per_day, at_least=0, at_most=48)
        _check_number("artefact_rate", self.artefact_rate, at_least=0, below=1)
        _check_number("episode_fraction", self.episode_fraction, at_least=0, at_most=1)
        minimum_h = MIN_HOURS_BEFORE_ONSET_H + MIN_HOURS_AFTER_ONSET_H
        if self.episode_fraction > 0 and self.hours < minimum_h:
            raise ValueError(
                f"SiteProfile.hours must be >= {minimum_h:g} when episode_fraction > 0 "
                f"(onset needs {MIN_HOURS_BEFORE_ONSET_H:g} h before and {MIN_HOURS_AFTER_ONSET_H:g} h after), got {self.hours!r}"
            )

    @property
    def num_samples(self) -> int:
        return max(1, math.floor(self.hours * 60.0 / self.cadence_min + 1e-9))


@dataclass(frozen=True, eq=False)
class PatientSeries:
    """One patient's stay. `values` is float32 [T, 6] in SIGNALS order, NaN where not observed."""

    patient_id: str
    site_id: str
    cohort: str  # "postop" | "chronic"
    age: float
    times_h: np.ndarray  # float64 [T], hours since admission
    values: np.ndarray  # float32 [T, len(SIGNALS)]
    on_oxygen: np.ndarray  # bool [T], supplemental oxygen
    alert: np.ndarray  # bool [T], AVPU "A"; False = new confusion / V / P / U
    onset_h: float | None  # labelled onset (clinical recognition, half-way through the ramp); None without an episode
    drift_start_h: float | None = None  # when the physiology starts to change, before the label
    admit_clock_h: float = 0.0  # clock time (hour of day) at admission

    def __post_init__(self) -> None:
        if self.cohort not in COHORTS:
            raise ValueError(f"PatientSeries.cohort must be one of {COHORTS}, got {self.cohort!r}")
        length = self.times_h.shape[0]
        if self.values.shape != (length, len(SIGNALS)):
            raise ValueError(f"PatientSeries.values must have shape ({length}, {len(SIGNALS)}), got {self.values.shape}")
        for name in ("on_oxygen", "alert"):
            if getattr(self, name).shape != (length,):
                raise ValueError(f"PatientSeries.{name} must have shape ({length},), got {getattr(self, name).shape}")

    @property
    def mask(self) -> np.ndarray:
        """bool [T, 6]: True where a reading was observed."""
        return ~np.isnan(self.values)

    @property
    def clock_h(self) -> np.ndarray:
        """float64 [T]: hour of day (0-24) of every sample."""
        return np.mod(self.admit_clock_h + self.times_h, 24.0)

    def signal(self, name: str) -> np.ndarray:
        return self.values[:, SIGNALS.index(name)]


# name, description, age mean/sd, post-op fraction, cadence, missing, dropouts/day, artefacts, episodes
_WARD_ARCHETYPES: tuple[tuple[str, float, float, float, float, float, float, float, float], ...] = (
    ("surgical ward: mostly post-operative, younger, 5-min wearable monitoring", 55.0, 15.0, 0.85, 5.0, 0.03, 0.5, 0.010, 0.15),
    ("medical ward: older chronic-disease patients, 15-min cadence, more missingness", 74.0, 11.0, 0.10, 15.0, 0.10, 1.5, 0.020, 0.25),
    ("step-down unit: mixed case mix, 5-min cadence, high acuity", 65.0, 13.0, 0.50, 5.0, 0.02, 0.3, 0.015, 0.35),
    ("community hospital: frail elderly, 10-min cadence, lower-grade sensors", 79.0, 9.0, 0.25, 10.0, 0.07, 1.0, 0.030, 0.10),
)


def _site_letters(index: int) -> str:
    letters = ""
    index += 1
    while index > 0:
        index, remainder = divmod(index - 1, 26)
        letters = chr(ord("a") + remainder) + letters
    return letters


def site_profiles(num_sites: int = 4, *, num_patients: int = 60, hours: float = 48.0) -> list[SiteProfile]:
    """Heterogeneous wards "ward-a", "ward-b", ...: surgical, medical, step-down, community, then the
    same four again with older patients, more missingness/artefacts and more episodes per cycle."""
    if isinstance(num_sites, bool) or not isinstance(num_sites, numbers.Integral) or num_sites < 1:
        raise ValueError(f"site_profiles num_sites must be an integer >= 1, got {num_sites!r}")
    profiles = []
    for index in range(num_sites):
        description, age, age_sd, postop, cadence, missing, dropouts, artefacts, episodes = _WARD_ARCHETYPES[index % 4]
        cycle = index // 4
        profiles.append(
            SiteProfile(
                site_id=f"ward-{_site_letters(index)}",
                num_patients=num_patients,
                hours=hours,
                cadence_min=cadence,
                age_mean=min(90.0, age + 2.5 * cycle),
                age_sd=age_sd,
                postop_fraction=postop,
                missing_rate=min(0.5, missing * (1.0 + 0.2 * cycle)),
                dropout_rate_per_day=dropouts * (1.0 + 0.1 * cycle),
                artefact_rate=min(0.2, artefacts * (1.0 + 0.2 * cycle)),
                episode_fraction=min(0.6, episodes * (1.0 + 0.15 * cycle)),
                description=description + (f" (variant {cycle})" if cycle else ""),
            )
        )
    return profiles


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _site_hash(site_id: str) -> int:
    return zlib.crc32(site_id.encode("utf-8"))


def _episode_flags(profile: SiteProfile, seed: int) -> np.ndarray:
    count = math.floor(profile.episode_fraction * profile.num_patients + 0.5)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _site_hash(profile.site_id), _ALLOCATION_STREAM]))
    flags = np.zeros(profile.num_patients, dtype=bool)
    flags[rng.choice(profile.num_patients, size=count, replace=False)] = True
    return flags


def generate_site(profile: SiteProfile, *, seed: int) -> list[PatientSeries]:
    """Every patient of a site; exactly round(episode_fraction * num_patients) have an episode."""
    seed = _check_seed(seed)
    flags = _episode_flags(profile, seed)
    return [generate_patient(profile, index, seed=seed, has_episode=bool(flags[index])) for index in range(profile.num_patients)]


@dataclass(frozen=True)
class _Baseline:
    age: float
    cohort: str
    admit_clock_h: float
    hr: float
    rr: float
    spo2: float
    sbp: float
    temp: float
    activity_propensity: float
    wake_clock_h: float
    sleep_clock_h: float


@dataclass(frozen=True)
class _Episode:
    onset_h: float
    ramp_h: float
    severity: float
    change: np.ndarray  # full change per vital: hr, rr, spo2, sbp, temp
    activity_drop: float
    confused: bool
    confusion_delay_h: float


def _draw_baseline(profile: SiteProfile, rng: np.random.Generator) -> _Baseline:
    age = float(np.clip(rng.normal(profile.age_mean, profile.age_sd), 18.0, 100.0))
    cohort = "postop" if rng.random() < profile.postop_fraction else "chronic"
    chronic = cohort == "chronic"
    copd_like = rng.random() < 0.2
    spo2_normal = rng.normal(96.0 if chronic else 97.0, 1.0)
    spo2_copd = rng.uniform(92.0, 94.0)
    return _Baseline(
        age=age,
        cohort=cohort,
        admit_clock_h=float(rng.uniform(10.0, 20.0) if not chronic else rng.uniform(0.0, 24.0)),
        hr=float(np.clip(rng.normal(75.0, 10.0) + (3.0 if chronic else 0.0), 50.0, 110.0)),
        rr=float(np.clip(rng.normal(16.0, 2.0) + (1.0 if chronic else 0.0), 10.0, 22.0)),
        spo2=float(np.clip(spo2_copd if (chronic and copd_like) else spo2_normal, 91.0, 99.5)),
        sbp=float(np.clip(rng.normal(125.0, 15.0) + 0.5 * max(0.0, age - 50.0), 95.0, 190.0)),
        temp=float(np.clip(rng.normal(36.8, 0.3), 36.0, 37.5)),
        activity_propensity=float(rng.uniform(0.5, 1.0) * np.clip(1.0 - 0.006 * (age - 50.0), 0.5, 1.1)),
        wake_clock_h=float(rng.normal(7.0, 0.5)),
        sleep_clock_h=float(rng.normal(22.5, 0.7)),
    )


RECOGNITION_FRACTION = 0.5  # the label sits this far into the ramp


def _draw_episode(profile: SiteProfile, rng: np.random.Generator) -> _Episode:
    latest_onset_h = max(MIN_HOURS_BEFORE_ONSET_H, profile.hours - MIN_HOURS_AFTER_ONSET_H)
    severity = float(rng.uniform())
    spread = np.clip(severity + rng.normal(0.0, 0.15, size=5), 0.0, 1.0)
    low = np.array([25.0, 8.0, -4.0, -20.0, 1.0])
    high = np.array([40.0, 14.0, -8.0, -40.0, 2.0])
    change = low + (high - low) * spread
    if rng.random() < 0.15:  # hypothermic sepsis
        change[4] = -(0.8 + 0.7 * spread[4])
    return _Episode(
        onset_h=float(rng.uniform(MIN_HOURS_BEFORE_ONSET_H, latest_onset_h)),
        ramp_h=float(rng.uniform(2.0, 8.0)),
        severity=severity,
        change=change,
        activity_drop=0.5 + 0.4 * severity,
        confused=bool(severity > 0.5 and rng.random() < 0.7),
        confusion_delay_h=float(rng.uniform(0.0, 2.0)),
    )


def _ar1_noise(rng: np.random.Generator, length: int, cadence_min: float, sd: float, tau_min: float) -> np.ndarray:
    """Stationary AR(1) with the given SD and correlation time, via a truncated impulse response."""
    phi = math.exp(-cadence_min / tau_min)
    kernel_length = max(1, math.ceil(math.log(1e-4) / math.log(phi))) if phi > 0 else 1
    kernel = phi ** np.arange(kernel_length)
    innovations = rng.normal(0.0, sd * math.sqrt(1.0 - phi * phi), size=length + kernel_length - 1)
    return np.convolve(innovations, kernel, mode="valid")


def _activity(times_h: np.ndarray, clock_h: np.ndarray, base: _Baseline, cadence_min: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(activity in [0, 1], awake 0/1) per sample."""
    awake = ((clock_h >= base.wake_clock_h) & (clock_h < base.sleep_clock_h)).astype(np.float64)
    if base.cohort == "postop":
        mobility = 0.25 + 0.75 * (1.0 - np.exp(-times_h / 24.0))
    else:
        mobility = np.full_like(times_h, 0.7)
    cadence_h = cadence_min / 60.0
    bout_rate_per_h = np.where(awake > 0, 1.2 * base.activity_propensity * mobility, 0.15)
    starts = rng.random(times_h.shape[0]) < np.clip(bout_rate_per_h * cadence_h, 0.0, 1.0)
    durations = np.maximum(1, np.round(rng.uniform(5.0, 30.0, times_h.shape[0]) / cadence_min)).astype(np.int64)
    intensity = np.where(awake > 0, rng.uniform(0.3, 0.8, times_h.shape[0]) * mobility, rng.uniform(0.05, 0.2, times_h.shape[0]))
    step = np.zeros(times_h.shape[0] + 1)
    start_index = np.flatnonzero(starts)
    np.add.at(step, start_index, intensity[start_index])
    np.add.at(step, np.minimum(start_index + durations[start_index], times_h.shape[0]), -intensity[start_index])
    bouts = np.cumsum(step)[:-1]
    background = 0.12 * base.activity_propensity * mobility * awake + 0.02
    activity = np.clip(background + bouts + rng.normal(0.0, 0.02, times_h.shape[0]), 0.0, 1.0)
    return activity, awake


def _episode_ramp(times_h: np.ndarray, episode: _Episode) -> np.ndarray:
    """0 before onset, ((t - onset) / ramp) ** 1.5 during the ramp, 1 after: a subtle start."""
    return np.clip((times_h - episode.onset_h) / episode.ramp_h, 0.0, 1.0) ** 1.5


def generate_patient(profile: SiteProfile, patient_index: int, *, seed: int, has_episode: bool) -> PatientSeries:
    """Patient `patient_index` of `profile`'s site, drawn from SeedSequence([seed, crc32(site_id), index])."""
    seed = _check_seed(seed)
    if isinstance(patient_index, bool) or not isinstance(patient_index, numbers.Integral) or not 0 <= patient_index < MAX_PATIENTS_PER_SITE:
        raise ValueError(f"patient_index must be an integer in [0, {MAX_PATIENTS_PER_SITE}), got {patient_index!r}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _site_hash(profile.site_id), int(patient_index)]))
    base = _draw_baseline(profile, rng)
    episode = _draw_episode(profile, rng)  # always drawn: the stream is the same with or without an episode
    postop = _draw_postop_course(rng)  # always drawn, used for post-operative patients only
    times_h = np.arange(profile.num_samples, dtype=np.float64) * (profile.cadence_min / 60.0)
    clock_h = np.mod(base.admit_clock_h + times_h, 24.0)
    activity, awake = _activity(times_h, clock_h, base, profile.cadence_min, rng)
    ramp = _episode_ramp(times_h, episode) if has_episode else np.zeros_like(times_h)
    activity = activity * (1.0 - episode.activity_drop * ramp)
    on_oxygen = times_h < (postop.oxygen_h if base.cohort == "postop" else 0.0)
    alert = np.ones(times_h.shape[0], dtype=bool)
    if has_episode and episode.severity > 0.5:
        on_oxygen = on_oxygen | (ramp >= 0.7)
    if has_episode and episode.confused:
        alert = times_h < episode.onset_h + episode.ramp_h + episode.confusion_delay_h
    clean = _clean_vitals(times_h, clock_h, base, postop, activity, awake, on_oxygen, profile.cadence_min, rng)
    clean[:, :_ACTIVITY] += ramp[:, None] * episode.change[None, :]
    values = _apply_artefacts(_round_like_monitors(clean), profile.artefact_rate, rng)
    values = _apply_missingness(values, times_h, profile, rng)
    return PatientSeries(
        patient_id=f"{profile.site_id}-p{int(patient_index):04d}",
        site_id=profile.site_id,
        cohort=base.cohort,
        age=round(base.age, 1),
        times_h=times_h,
        values=values.astype(np.float32),
        on_oxygen=on_oxygen,
        alert=alert,
        onset_h=round(episode.onset_h + RECOGNITION_FRACTION * episode.ramp_h, 4) if has_episode else None,
        drift_start_h=round(episode.onset_h, 4) if has_episode else None,
        admit_clock_h=round(base.admit_clock_h, 4),
    )


@dataclass(frozen=True)
class _PostopCourse:
    hr_rise: float
    rr_rise: float
    settle_h: float
    fever_rise: float
    fever_peak_h: float
    oxygen_h: float


def _draw_postop_course(rng: np.random.Generator) -> _PostopCourse:
    return _PostopCourse(
        hr_rise=float(rng.uniform(5.0, 15.0)),
        rr_rise=float(rng.uniform(0.0, 2.0)),
        settle_h=float(rng.uniform(6.0, 18.0)),
        fever_rise=float(rng.uniform(0.2, 0.7)),
        fever_peak_h=float(rng.uniform(6.0, 18.0)),
        oxygen_h=float(rng.uniform(2.0, 6.0)) if rng.random() < 0.5 else 0.0,
    )


def _clean_vitals(
    times_h: np.ndarray, clock_h: np.ndarray, base: _Baseline, postop: _PostopCourse, activity: np.ndarray,
    awake: np.ndarray, on_oxygen: np.ndarray, cadence_min: float, rng: np.random.Generator,
) -> np.ndarray:  # fmt: skip
    """float64 [T, 6] before episode, rounding, artefacts and missingness (measurement noise included)."""
    length = times_h.shape[0]
    is_postop = 1.0 if base.cohort == "postop" else 0.0
    settle = is_postop * np.exp(-times_h / postop.settle_h)
    fever = is_postop * postop.fever_rise * (times_h / postop.fever_peak_h) * np.exp(1.0 - times_h / postop.fever_peak_h)
    circadian = -np.cos(2.0 * np.pi * (clock_h - 4.0) / 24.0)  # -1 at 04:00, +1 at 16:00
    clean = np.empty((length, len(SIGNALS)))
    clean[:, _HR] = base.hr + 4.0 * circadian + 25.0 * activity + postop.hr_rise * settle + _ar1_noise(rng, length, cadence_min, 3.0, 30.0)
    clean[:, _RR] = base.rr + 0.5 * circadian + 5.0 * activity + postop.rr_rise * settle + _ar1_noise(rng, length, cadence_min, 0.8, 20.0)
    clean[:, _SPO2] = base.spo2 - 0.5 * (1.0 - awake) + 2.0 * on_oxygen + _ar1_noise(rng, length, cadence_min, 0.5, 15.0)
    clean[:, _SBP] = base.sbp + 6.0 * circadian + 12.0 * activity + _ar1_noise(rng, length, cadence_min, 5.0, 30.0)
    clean[:, _TEMP] = base.temp + 0.3 * circadian + fever + _ar1_noise(rng, length, cadence_min, 0.08, 60.0)
    clean[:, :_ACTIVITY] += rng.normal(0.0, 1.0, (length, _ACTIVITY)) * np.array([1.0, 0.7, 0.5, 4.0, 0.05])
    clean[:, _ACTIVITY] = activity
    return clean


def _round_like_monitors(clean: np.ndarray) -> np.ndarray:
    values = clean.copy()
    for column, (low, high) in _PLAUSIBLE_RANGE.items():
        values[:, column] = np.clip(values[:, column], low, high)
    values[:, [_HR, _RR, _SPO2, _SBP]] = np.round(values[:, [_HR, _RR, _SPO2, _SBP]])
    values[:, _TEMP] = np.round(values[:, _TEMP], 1)
    values[:, _ACTIVITY] = np.round(values[:, _ACTIVITY], 2)
    return values


def _apply_artefacts(values: np.ndarray, artefact_rate: float, rng: np.random.Generator) -> np.ndarray:
    """Replace one reading in `artefact_rate` of rows: SpO2 probe-off, HR motion, SBP cuff motion, temp probe."""
    length = values.shape[0]
    hit = rng.random(length) < artefact_rate
    kind = rng.integers(0, 4, length)
    values = values.copy()
    probe_off, motion_hr, cuff, temp_probe = (hit & (kind == k) for k in range(4))
    values[probe_off, _SPO2] = np.round(rng.uniform(50.0, 85.0, length))[probe_off]
    values[motion_hr, _HR] = np.minimum(250.0, np.round(values[:, _HR] * rng.uniform(1.4, 2.0, length)))[motion_hr]
    values[cuff, _SBP] = np.clip(np.round(values[:, _SBP] + rng.uniform(-40.0, 40.0, length)), 50.0, 250.0)[cuff]
    values[temp_probe, _TEMP] = np.round(rng.uniform(33.0, 35.5, length), 1)[temp_probe]
    return values


def _apply_missingness(values: np.ndarray, times_h: np.ndarray, profile: SiteProfile, rng: np.random.Generator) -> np.ndarray:
    """Readings missing at random (activity independently), plus 20-120 min dropouts of every signal."""
    values = values.copy()
    values[rng.random(values.shape) < profile.missing_rate] = np.nan
    dropouts = rng.poisson(profile.dropout_rate_per_day * profile.hours / 24.0)
    starts_h = rng.uniform(0.0, profile.hours, dropouts)
    durations_h = rng.uniform(20.0, 120.0, dropouts) / 60.0
    for start_h, duration_h in zip(starts_h, durations_h):
        values[(times_h >= start_h) & (times_h < start_h + duration_h)] = np.nan
    return values
