"""From irregular vital-sign series to fixed-size learning windows.

Sites sample at different cadences (5–15 min) and miss readings; every series is first put on one
time grid (`grid_min`): each cell holds the mean of the readings that fell into it, or nothing
(mask 0) — gaps are kept as gaps, never filled in silently. Values are standardised with fixed
clinical reference scales (`REFERENCE`: one scale shared by every site, like a published reference
range), so a site's data never sets another site's normalisation.

A window is `window_steps` grid cells of all signals plus their masks (the model input, flattened
to one row) and the next `horizon_steps` cells of the forecast vitals (the target: standardised
values, 0 where missing, followed by their masks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .generator import SIGNALS, PatientSeries

__all__ = [
    "FORECAST_SIGNALS",
    "REFERENCE",
    "GriddedSeries",
    "WindowShape",
    "grid_series",
    "input_row",
    "make_windows",
    "standardise",
    "unstandardise",
]

FORECAST_SIGNALS = ("hr", "rr", "spo2", "sbp", "temp")  # what the twin forecasts; activity is context only
# (centre, scale) per signal: adult reference values, e.g. HR 80 ± 15 beats/min
REFERENCE: dict[str, tuple[float, float]] = {
    "hr": (80.0, 15.0),
    "rr": (16.0, 4.0),
    "spo2": (96.0, 3.0),
    "sbp": (125.0, 20.0),
    "temp": (37.0, 0.6),
    "activity": (0.3, 0.3),
}
FORECAST_INDEX = np.array([SIGNALS.index(name) for name in FORECAST_SIGNALS])


@dataclass(frozen=True)
class WindowShape:
    window_steps: int  # grid cells the model sees
    horizon_steps: int  # grid cells it forecasts

    @property
    def input_width(self) -> int:
        return self.window_steps * 2 * len(SIGNALS)

    @property
    def target_width(self) -> int:
        return self.horizon_steps * len(FORECAST_SIGNALS)


@dataclass(frozen=True)
class GriddedSeries:
    """One patient on the common grid: standardised values (NaN where no reading) and clinical context."""

    patient_id: str
    times_h: np.ndarray  # float64 [G], start of each cell
    values: np.ndarray  # float32 [G, len(SIGNALS)], standardised, NaN = no reading in the cell
    on_oxygen: np.ndarray  # bool [G]: any reading on supplemental oxygen in the cell
    alert: np.ndarray  # bool [G]: alert (AVPU "A") throughout the cell
    onset_h: float | None


def _reference(signals: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(centres, scales) of `signals`, float32."""
    return (np.array([REFERENCE[name][0] for name in signals], dtype=np.float32),
            np.array([REFERENCE[name][1] for name in signals], dtype=np.float32))  # fmt: skip


def standardise(values: np.ndarray, signals: tuple[str, ...] = SIGNALS) -> np.ndarray:
    centre, scale = _reference(signals)
    return ((values - centre) / scale).astype(np.float32)


def unstandardise(values: np.ndarray, signals: tuple[str, ...] = FORECAST_SIGNALS) -> np.ndarray:
    centre, scale = _reference(signals)
    return (values * scale + centre).astype(np.float32)


def grid_series(series: PatientSeries, *, grid_min: float) -> GriddedSeries:
    """Mean of the readings in each `grid_min` cell; a cell without a reading stays NaN."""
    cells = np.floor(series.times_h * 60.0 / grid_min).astype(np.int64)
    count = int(cells.max()) + 1 if len(cells) else 0
    observed = ~np.isnan(series.values)
    sums = np.zeros((count, len(SIGNALS)), dtype=np.float64)
    hits = np.zeros((count, len(SIGNALS)), dtype=np.float64)
    np.add.at(sums, cells, np.where(observed, series.values, 0.0))
    np.add.at(hits, cells, observed)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(hits > 0, sums / np.maximum(hits, 1), np.nan)
    oxygen = np.zeros(count, dtype=bool)
    np.logical_or.at(oxygen, cells, series.on_oxygen)
    alert = np.ones(count, dtype=bool)
    np.logical_and.at(alert, cells, series.alert)
    return GriddedSeries(
        patient_id=series.patient_id,
        times_h=np.arange(count) * grid_min / 60.0,
        values=standardise(means.astype(np.float32)),
        on_oxygen=oxygen,
        alert=alert,
        onset_h=series.onset_h,
    )


def input_row(values: np.ndarray) -> np.ndarray:
    """One model input from `window_steps` gridded cells: values (0 where missing) then masks, flattened."""
    mask = ~np.isnan(values)
    return np.concatenate([np.where(mask, values, 0.0), mask], axis=1).astype(np.float32).reshape(-1)


def make_windows(gridded: GriddedSeries, shape: WindowShape, *, stride_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs [n, input_width], targets [n, 2 * target_width]) of every window with at least one observed target."""
    rows, targets = [], []
    total = len(gridded.times_h)
    for end in range(shape.window_steps, total - shape.horizon_steps + 1, stride_steps):
        future = gridded.values[end : end + shape.horizon_steps][:, FORECAST_INDEX]
        mask = ~np.isnan(future)
        if not mask.any():
            continue
        rows.append(input_row(gridded.values[end - shape.window_steps : end]))
        targets.append(np.concatenate([np.where(mask, future, 0.0).reshape(-1), mask.reshape(-1)]))
    if not rows:
        return np.zeros((0, shape.input_width), np.float32), np.zeros((0, 2 * shape.target_width), np.float32)
    return np.stack(rows).astype(np.float32), np.stack(targets).astype(np.float32)
