"""One patient's twin: follow their stream with a released forecaster, show the band, flag departures.

`PatientTwin.follow(series)` puts the stream on the grid and, for every cell, forecasts it from the
window that ended `horizon_steps` earlier (the band the twin drew an hour before). It personalises
to the patient: over their first `baseline_h` hours it learns their offset from the population
forecast (a patient whose SpO2 always runs at 93 is not deteriorating) and their own baseline
level and spread. The deviation score of a cell is the mean, over the observed vitals, of

    h(z_forecast)² + h(z_baseline)²,  z_forecast = (observed − offset − forecast) / σ_forecast,
                                      z_baseline = (observed − baseline) / max(σ_baseline, σ_forecast)

where h keeps the part of a deviation that points the way deterioration goes (HR and RR up, SpO2
and SBP down, temperature either way — as NEWS2's own tables do); the score is its median over the
last `sustain_steps` cells, so a single artefact (a probe-off SpO2) does not make a departure. An alert opens when the smoothed score stays above
`threshold` — a departure sustained for the smoothing window — and names the vitals that drove it
(each vital's share of the score: the score is a sum over vitals, so the shares are exact) with
NEWS2 beside it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .generator import PatientSeries
from .model import split_output
from .news2 import news2_score
from .windows import FORECAST_INDEX, FORECAST_SIGNALS, GriddedSeries, WindowShape, grid_series, input_row, unstandardise

__all__ = ["DEFAULT_THRESHOLD", "Alert", "PatientTwin", "TwinTrace"]

BAND_Z = 1.645
DEFAULT_THRESHOLD = 6.0  # smoothed deviation score; set from the training patients (see detection.calibrate_threshold)


@dataclass(frozen=True)
class Alert:
    start_h: float
    end_h: float
    drivers: tuple[tuple[str, float], ...]  # (vital, share of the deviation score), largest first
    news2: float  # NEWS2 at the alert's first cell


@dataclass(frozen=True)
class TwinTrace:
    """Everything the twin saw and said about one patient, per grid cell (units: each vital's own)."""

    times_h: np.ndarray  # [G]
    observed: np.ndarray  # [G, 5], NaN = no reading
    forecast: np.ndarray  # [G, 5], NaN before the first full window
    lower: np.ndarray  # [G, 5] the 90 % band, personalised
    upper: np.ndarray
    score: np.ndarray  # [G] smoothed deviation score (NaN before the twin can judge)
    news2: np.ndarray  # [G]
    alerts: tuple[Alert, ...]
    onset_h: float | None


class PatientTwin:
    def __init__(
        self,
        model: nn.Module,
        shape: WindowShape,
        *,
        grid_min: float,
        baseline_h: float = 4.0,
        sustain_steps: int = 4,
        threshold: float = DEFAULT_THRESHOLD,
    ) -> None:
        self.model, self.shape, self.grid_min = model, shape, grid_min
        self.baseline_steps = max(2, round(baseline_h * 60 / grid_min))
        self.sustain_steps, self.threshold = max(1, sustain_steps), threshold

    def follow(self, series: PatientSeries) -> TwinTrace:
        return self.follow_gridded(grid_series(series, grid_min=self.grid_min))

    def follow_gridded(self, gridded: GriddedSeries) -> TwinTrace:
        cells, lag = len(gridded.times_h), self.shape.horizon_steps
        observed = gridded.values[:, FORECAST_INDEX]  # standardised
        mean = np.full((cells, len(FORECAST_SIGNALS)), np.nan, np.float32)
        sigma = np.full_like(mean, np.nan)
        origins = list(range(self.shape.window_steps, cells - lag + 1))
        if origins:
            rows = np.stack([input_row(gridded.values[end - self.shape.window_steps : end]) for end in origins])
            self.model.eval()
            with torch.no_grad():
                predicted, log_variance = split_output(self.model(torch.from_numpy(rows)), self.shape.target_width)
            last = slice((lag - 1) * len(FORECAST_SIGNALS), lag * len(FORECAST_SIGNALS))  # the horizon's last cell
            targets = np.array(origins) + lag - 1
            mean[targets] = predicted.numpy()[:, last]
            sigma[targets] = np.exp(0.5 * log_variance.numpy()[:, last])
        offset, baseline, spread = self._personal_baseline(observed, mean, sigma)
        z_forecast = (observed - offset - mean) / sigma
        z_baseline = (observed - baseline) / np.fmax(spread, sigma)
        with _quiet():
            per_vital = _towards_harm(z_forecast) ** 2 + _towards_harm(z_baseline) ** 2  # NaN where unobserved or not yet forecast
        score = self._smoothed(per_vital)
        news2 = self._news2(gridded)
        shown_mean = mean + offset
        trace_values = {
            "observed": unstandardise(observed),
            "forecast": unstandardise(shown_mean),
            "lower": unstandardise(shown_mean - BAND_Z * sigma),
            "upper": unstandardise(shown_mean + BAND_Z * sigma),
        }
        alerts = self._alerts(gridded.times_h, score, per_vital, news2)
        return TwinTrace(gridded.times_h, **trace_values, score=score, news2=news2, alerts=alerts, onset_h=gridded.onset_h)

    def _personal_baseline(self, observed: np.ndarray, mean: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per vital over the first judged cells: offset from the forecast, own level, own spread (0 if unseen)."""
        first = self.shape.window_steps + self.shape.horizon_steps - 1
        window = slice(first, first + self.baseline_steps)
        with _quiet():
            offset = np.nan_to_num(np.nanmean(observed[window] - mean[window], axis=0))
            baseline = np.nanmean(observed[: first + self.baseline_steps], axis=0)
            spread = np.nanstd(observed[: first + self.baseline_steps], axis=0)
        population = np.zeros(len(FORECAST_SIGNALS), np.float32)  # the reference centre, standardised
        baseline = np.where(np.isnan(baseline), population, baseline)
        return offset, baseline, np.nan_to_num(spread, nan=1.0)

    def _smoothed(self, per_vital: np.ndarray) -> np.ndarray:
        with _quiet():
            cell_score = np.nanmean(per_vital, axis=1)
        score = np.full(len(cell_score), np.nan)
        for end in range(len(cell_score)):
            recent = cell_score[max(0, end - self.sustain_steps + 1) : end + 1]
            if np.isfinite(recent).sum() >= max(1, self.sustain_steps // 2):
                score[end] = float(np.nanmedian(recent))  # a median: one artefact (a probe-off SpO2) is not a departure
        return score

    def _news2(self, gridded: GriddedSeries) -> np.ndarray:
        """NEWS2 per cell from the last charted value of each vital (carried up to `NEWS2_CARRY_STEPS` cells),
        as a ward scores the latest observation set."""
        vitals = _carried(unstandardise(gridded.values[:, FORECAST_INDEX]), NEWS2_CARRY_STEPS)
        column = {name: vitals[:, position] for position, name in enumerate(FORECAST_SIGNALS)}
        return news2_score(
            rr=column["rr"], spo2=column["spo2"], sbp=column["sbp"], hr=column["hr"], temp=column["temp"],
            on_oxygen=gridded.on_oxygen, alert=gridded.alert,
        ).astype(np.float64)  # fmt: skip

    def _alerts(self, times_h: np.ndarray, score: np.ndarray, per_vital: np.ndarray, news2: np.ndarray) -> tuple[Alert, ...]:
        alerts: list[Alert] = []
        above = np.nan_to_num(score, nan=0.0) >= self.threshold
        start = None
        for cell in range(len(above) + 1):
            if cell < len(above) and above[cell]:
                start = cell if start is None else start
                continue
            if start is not None:
                recent = per_vital[max(0, start - self.sustain_steps + 1) : start + 1]
                with _quiet():
                    contribution = np.nan_to_num(np.nanmean(recent, axis=0))
                total = float(contribution.sum()) or 1.0
                drivers = sorted(((name, float(c) / total) for name, c in zip(FORECAST_SIGNALS, contribution, strict=True)), key=lambda d: -d[1])
                alerts.append(Alert(float(times_h[start]), float(times_h[cell - 1]), tuple(drivers), float(news2[start])))
                start = None
        return tuple(alerts)


NEWS2_CARRY_STEPS = 4  # a charted vital counts for NEWS2 for up to 4 grid cells (1 h at 15 min)


def _carried(values: np.ndarray, limit: int) -> np.ndarray:
    """Each column's last observed value carried forward over at most `limit` missing cells."""
    carried = values.copy()
    for column in range(values.shape[1]):
        last, age = np.nan, limit + 1
        for row in range(values.shape[0]):
            if np.isnan(values[row, column]):
                age += 1
                if age <= limit:
                    carried[row, column] = last
            else:
                last, age = values[row, column], 0
    return carried


# the direction in which each forecast vital moves when a patient deteriorates (temperature: either way)
HARM_DIRECTION = np.array([{"hr": 1.0, "rr": 1.0, "spo2": -1.0, "sbp": -1.0, "temp": 0.0}[name] for name in FORECAST_SIGNALS])


def _towards_harm(z: np.ndarray) -> np.ndarray:
    """The part of each deviation that points the way deterioration goes (HR, RR up; SpO2, SBP down;
    temperature either way): a patient whose HR settles below their baseline is not an alarm."""
    directed = np.where(HARM_DIRECTION == 0.0, np.abs(z), z * HARM_DIRECTION)
    return np.where(np.isnan(z), np.nan, np.maximum(directed, 0.0))


@contextmanager
def _quiet() -> Iterator[None]:
    """numpy's 'mean of empty slice' warnings are expected here (cells without readings)."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", category=RuntimeWarning)
        yield
