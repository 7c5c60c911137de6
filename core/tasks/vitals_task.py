"""`vitals`: the patient vital-signs twin as a federated task.

Each site is a generated hospital ward (`vitals.site_profiles`: wards differ in case mix, age,
monitoring cadence, missingness and deterioration prevalence). Its patients are split into train
and test *patients* (`task.test_fraction`, seed `task.split_seed`): no patient's windows are on
both sides. Rows are forecasting windows (`vitals.windows`); the model forecasts the next
`horizon_h` of HR, RR, SpO2, SBP and temperature with a band (`vitals.model`).

Metrics (lower is better unless said): `mae` — mean absolute forecast error in reference-scale
units over every observed target (the ranking metric); `mae_<signal>` in the signal's own unit;
`naive_mae` — the same error of repeating each vital's last reading (the baseline a twin must beat);
`coverage` — share of observed targets inside the 90 % band (higher is better up to 0.9).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import TaskConfig
from ..config.task import VitalsConfig
from ..errors import ConfigError
from .base import SiteSplit, TwinTask, register_task
from .vitals import MIN_HOURS_AFTER_ONSET_H, MIN_HOURS_BEFORE_ONSET_H, PatientSeries, SiteProfile, generate_site, site_profiles
from .vitals.ingest import VitalsInputError, read_streams
from .vitals.model import GaussianForecastLoss, VitalsForecaster, persistence_forecast, split_output
from .vitals.windows import FORECAST_SIGNALS, REFERENCE, GriddedSeries, WindowShape, grid_series, make_windows

__all__ = ["VitalsTask", "window_shape"]

BAND_Z = 1.645  # ±z σ is the 90 % band
MAX_WINDOW_BYTES = 2**30  # the windows a site builds for one split


def window_shape(settings: VitalsConfig) -> WindowShape:
    return WindowShape(
        window_steps=max(1, round(settings.window_h * 60 / settings.grid_min)),
        horizon_steps=max(1, round(settings.horizon_h * 60 / settings.grid_min)),
    )


def _check_settings(settings: VitalsConfig) -> None:
    for key in ("hours", "grid_min", "window_h", "horizon_h", "stride_h"):
        if not getattr(settings, key) > 0:
            raise ConfigError(f"task.vitals.{key}", f"must be > 0, got {getattr(settings, key)}")
    if settings.patients_per_site < 2:
        raise ConfigError("task.vitals.patients_per_site", f"needs at least 2 patients (one to train, one to test), got {settings.patients_per_site}")
    shortest_h = MIN_HOURS_BEFORE_ONSET_H + MIN_HOURS_AFTER_ONSET_H
    if settings.hours < shortest_h:
        raise ConfigError("task.vitals.hours", f"must be >= {shortest_h:g} (an episode needs room before and after its onset), got {settings.hours}")


def _check_generated_stay(settings: VitalsConfig) -> None:
    if settings.window_h + settings.horizon_h > settings.hours:
        raise ConfigError("task.vitals.window_h", f"window_h + horizon_h ({settings.window_h + settings.horizon_h}) exceed a stay of hours={settings.hours}")


@dataclass(frozen=True)
class _Ward:
    train: tuple[GriddedSeries, ...]
    test: tuple[GriddedSeries, ...]
    raw_test: tuple[PatientSeries, ...]


@lru_cache(maxsize=4)
def _wards(num_sites: int, patients: int, hours: float, grid_min: float, seed: int, test_fraction: float) -> tuple[_Ward, ...]:
    wards = []
    for index, profile in enumerate(site_profiles(num_sites, num_patients=patients, hours=hours)):
        series = generate_site(profile, seed=seed)
        train_ids, test_ids = _split_patients([patient.patient_id for patient in series], seed, test_fraction)
        gridded = [grid_series(patient, grid_min=grid_min) for patient in series]
        wards.append(
            _Ward(
                train=tuple(gridded[i] for i in train_ids),
                test=tuple(gridded[i] for i in test_ids),
                raw_test=tuple(series[i] for i in test_ids),
            )
        )
    return tuple(wards)


def _split_patients(patient_ids: list[str], seed: int, test_fraction: float) -> tuple[list[int], list[int]]:
    """(train, test) patient indices, each in order. A patient's side comes from a keyed hash of their
    own id alone, so adding or removing one patient never moves another between train and test (DP's
    neighbouring data sets stay neighbours). About `test_fraction` are held out; if a side would be
    empty, the patient whose hash is nearest the cut changes side."""
    draws = [
        int.from_bytes(hashlib.sha256(f"medtwin/vitals-split/v1\x00{seed}\x00{patient_id}".encode()).digest()[:8], "big") / 2**64
        for patient_id in patient_ids
    ]
    test = {index for index, draw in enumerate(draws) if draw < test_fraction}
    if len(patient_ids) >= 2 and not test:
        test = {min(range(len(draws)), key=lambda index: draws[index])}
    if len(patient_ids) >= 2 and len(test) == len(patient_ids):
        test.discard(max(range(len(draws)), key=lambda index: draws[index]))
    return [i for i in range(len(patient_ids)) if i not in test], sorted(test)


@register_task("vitals")
class VitalsTask(TwinTask):
    name = "vitals"
    kind = "regression"
    groups_rows_by_patient = True
    primary_metric = "mae"
    higher_is_better = False

    def __init__(self, config: TaskConfig) -> None:
        super().__init__(config)
        self.settings = config.vitals or VitalsConfig()
        _check_settings(self.settings)
        self.shape = window_shape(self.settings)
        self.stride_steps = max(1, round(self.settings.stride_h * 60 / self.settings.grid_min))

    def profiles(self) -> list[SiteProfile]:
        return site_profiles(self.config.num_sites, num_patients=self.settings.patients_per_site, hours=self.settings.hours)

    def site_ids(self) -> list[str]:
        return [profile.site_id for profile in self.profiles()]

    def wards(self) -> tuple[_Ward, ...]:
        settings = self.settings
        _check_generated_stay(settings)
        return _wards(
            self.config.num_sites, settings.patients_per_site, settings.hours, settings.grid_min,
            self.config.split_seed, self.config.test_fraction,
        )  # fmt: skip

    def _rows(self, patients: tuple[GriddedSeries, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(windows, targets, the patient position of each window): DP-SGD's unit is the patient."""
        span = self.shape.window_steps + self.shape.horizon_steps
        windows = sum(max(0, (len(p.times_h) - span) // self.stride_steps + 1) for p in patients)
        size = windows * (self.shape.input_width + 2 * self.shape.target_width) * 4
        if size > MAX_WINDOW_BYTES:  # a proposal's grid and stride decide this: refuse before allocating
            raise ConfigError(
                "task.vitals.stride_h",
                f"these settings cut {windows} windows ({size / 2**30:.1f} GiB) from the site's streams, more than {MAX_WINDOW_BYTES / 2**30:g} GiB",
                "use a coarser grid_min or a longer stride_h",
            )
        pairs = [make_windows(patient, self.shape, stride_steps=self.stride_steps) for patient in patients]
        units = np.concatenate([np.full(len(x), position, np.int64) for position, (x, _) in enumerate(pairs)])
        return np.concatenate([x for x, _ in pairs]), np.concatenate([y for _, y in pairs]), units

    def _split(self, site_id: str, train: tuple[GriddedSeries, ...], test: tuple[GriddedSeries, ...]) -> SiteSplit:
        x_train, y_train, units = self._rows(train)
        x_test, y_test, _ = self._rows(test)
        dense = np.unique(units, return_inverse=True)[1].astype(np.int64)  # 0..k-1: a patient without windows leaves no gap
        return SiteSplit(site_id, x_train, y_train, x_test, y_test, train_units=dense)

    def load_site(self, index: int) -> SiteSplit:
        ward = self.wards()[index]
        return self._split(self.site_ids()[index], ward.train, ward.test)

    def load_site_streams(self, path: str | Path, *, site_id: str) -> SiteSplit:
        """A hospital's own streams (long-format .csv or .parquet, or a FHIR R4 bundle .json), split by patient with
        `task.test_fraction` / `task.split_seed`; `VitalsInputError` names every bad row or resource."""
        path = Path(path)
        series = read_streams(path, site_id=site_id)
        if len(series) < 2:
            raise VitalsInputError(path, [f"{len(series)} patient(s): a site needs at least 2 (one to train on, one to test)"])
        train_ids, test_ids = _split_patients([patient.patient_id for patient in series], self.config.split_seed, self.config.test_fraction)
        gridded = [grid_series(patient, grid_min=self.settings.grid_min) for patient in series]
        split = self._split(site_id, tuple(gridded[i] for i in train_ids), tuple(gridded[i] for i in test_ids))
        if not split.num_train or not split.num_test:
            raise VitalsInputError(path, [f"the streams are too short for one {self.settings.window_h + self.settings.horizon_h:g} h window on each side"])
        return split

    def load_pooled(self) -> SiteSplit:
        splits = self.load_all_sites()
        offsets = np.cumsum([0] + [split.num_train_units for split in splits])
        return SiteSplit(
            "pooled",
            np.concatenate([split.x_train for split in splits]),
            np.concatenate([split.y_train for split in splits]),
            np.concatenate([split.x_test for split in splits]),
            np.concatenate([split.y_test for split in splits]),
            train_units=np.concatenate([split.train_units + offset for split, offset in zip(splits, offsets, strict=False)]),
        )

    def build_model(self) -> nn.Module:
        return VitalsForecaster(self.shape)

    def loss_fn(self) -> nn.Module:
        return GaussianForecastLoss(self.shape.target_width)

    def evaluate(self, model: nn.Module, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        width = self.shape.target_width
        model.eval()
        with torch.no_grad():
            mean, log_variance = split_output(model(torch.from_numpy(x)), width)
        mean, sigma = mean.numpy(), np.exp(0.5 * log_variance.numpy())
        values, mask = y[:, :width], y[:, width:] > 0.5
        metrics = {"n": float(len(y))}
        if not mask.any():
            return metrics | {"mae": float("nan"), "naive_mae": float("nan"), "coverage": float("nan")}
        error = np.abs(mean - values)
        metrics["mae"] = float(error[mask].mean())
        naive = persistence_forecast(torch.from_numpy(x), self.shape).numpy()  # each vital's last reading
        metrics["naive_mae"] = float(np.abs(naive - values)[mask].mean())
        metrics["coverage"] = float((error <= BAND_Z * sigma)[mask].mean())
        per_signal = error.reshape(len(y), self.shape.horizon_steps, len(FORECAST_SIGNALS))
        signal_mask = mask.reshape(per_signal.shape)
        for position, name in enumerate(FORECAST_SIGNALS):
            observed = signal_mask[:, :, position]
            if observed.any():
                metrics[f"mae_{name}"] = float(per_signal[:, :, position][observed].mean() * REFERENCE[name][1])
        return metrics
