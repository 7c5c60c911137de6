"""NEWS2, the Royal College of Physicians' National Early Warning Score 2 (2017), SpO2 scale 1.

Parameter bands (points), exactly as in the RCP chart:

- respiration rate (/min): <=8: 3, 9-11: 1, 12-20: 0, 21-24: 2, >=25: 3
- SpO2 scale 1 (%): <=91: 3, 92-93: 2, 94-95: 1, >=96: 0
- air or oxygen: supplemental oxygen 2, air 0
- systolic BP (mmHg): <=90: 3, 91-100: 2, 101-110: 1, 111-219: 0, >=220: 3
- pulse (/min): <=40: 3, 41-50: 1, 51-90: 0, 91-110: 1, 111-130: 2, >=131: 3
- consciousness: alert 0; new confusion, V, P or U 3
- temperature (degC): <=35.0: 3, 35.1-36.0: 1, 36.1-38.0: 0, 38.1-39.0: 1, >=39.1: 2

Non-integer readings: the chart's integer (temperature: 0.1 degC) bands are read as intervals
closed on the right, (previous upper bound, upper bound]. So HR 90.5 scores 1 (it is above 90),
HR 50.5 scores 0, RR 20.4 scores 2, SpO2 95.5 scores 0, temperature 38.05 scores 1. At the chart's
own resolution this is identical to the table. Temperature boundaries (35.0, 36.0, 38.0, 39.0) are
exact in binary, but round computed temperatures to 0.1 degC before scoring.

Missing readings: a NaN parameter (including a NaN in a float `on_oxygen` / `alert` array) scores
0, so the aggregate is a lower bound; `news2_missing_parameters` counts the missing parameters per
observation (0-7) so callers can discard or flag incomplete scores. SpO2 scale 2 (hypercapnic
respiratory failure) is not implemented.

Clinical risk (`news2_risk`): aggregate 0-4 "low"; 0-4 with any single parameter scoring 3
"low-medium"; 5-6 "medium"; >= 7 "high".
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import ArrayLike

from .generator import SIGNALS, PatientSeries

__all__ = [
    "NEWS2_PARAMETERS",
    "news2_components",
    "news2_for_patient",
    "news2_missing_parameters",
    "news2_risk",
    "news2_score",
]

NEWS2_PARAMETERS: tuple[str, ...] = ("rr", "spo2", "on_oxygen", "sbp", "hr", "alert", "temp")

# (upper bounds of each band, closed on the right; points of each band, one more than bounds)
_BANDS: dict[str, tuple[tuple[float, ...], tuple[int, ...]]] = {
    "rr": ((8, 11, 20, 24), (3, 1, 0, 2, 3)),
    "spo2": ((91, 93, 95), (3, 2, 1, 0)),
    "sbp": ((90, 100, 110, 219), (3, 2, 1, 0, 3)),
    "hr": ((40, 50, 90, 110, 130), (3, 1, 0, 1, 2, 3)),
    "temp": ((35.0, 36.0, 38.0, 39.0), (3, 1, 0, 1, 2)),
}


def _banded_points(values: np.ndarray, parameter: str) -> np.ndarray:
    bounds, points = _BANDS[parameter]
    band = np.digitize(values, np.asarray(bounds, dtype=np.float64), right=True)  # bounds[i-1] < x <= bounds[i]
    scored = np.asarray(points, dtype=np.int8)[band]
    return np.where(np.isnan(values), np.int8(0), scored).astype(np.int8)


def _as_float_arrays(**parameters: ArrayLike) -> dict[str, np.ndarray]:
    arrays = {name: np.asarray(value, dtype=np.float64) for name, value in parameters.items()}
    shapes = np.broadcast_shapes(*(array.shape for array in arrays.values()))
    return {name: np.broadcast_to(array, shapes) for name, array in arrays.items()}


def news2_components(*, rr: ArrayLike, spo2: ArrayLike, sbp: ArrayLike, hr: ArrayLike, temp: ArrayLike, on_oxygen: ArrayLike, alert: ArrayLike) -> dict[str, np.ndarray]:
    """Points (int8, broadcast shape of the inputs) of each parameter in NEWS2_PARAMETERS; NaN scores 0.

    `on_oxygen` and `alert` are booleans (any non-zero is True); as floats, NaN means not recorded."""
    arrays = _as_float_arrays(rr=rr, spo2=spo2, sbp=sbp, hr=hr, temp=temp, on_oxygen=on_oxygen, alert=alert)
    components = {name: _banded_points(arrays[name], name) for name in ("rr", "spo2", "sbp", "hr", "temp")}
    oxygen, alert_array = arrays["on_oxygen"], arrays["alert"]
    components["on_oxygen"] = np.where(~np.isnan(oxygen) & (oxygen != 0), 2, 0).astype(np.int8)
    components["alert"] = np.where(~np.isnan(alert_array) & (alert_array == 0), 3, 0).astype(np.int8)
    return {name: components[name] for name in NEWS2_PARAMETERS}


def news2_score(*, rr: ArrayLike, spo2: ArrayLike, sbp: ArrayLike, hr: ArrayLike, temp: ArrayLike, on_oxygen: ArrayLike, alert: ArrayLike) -> np.ndarray:
    """Aggregate NEWS2 (int16, 0-20) per observation: the sum of `news2_components`."""
    components = news2_components(rr=rr, spo2=spo2, sbp=sbp, hr=hr, temp=temp, on_oxygen=on_oxygen, alert=alert)
    return np.sum(np.stack([points.astype(np.int16) for points in components.values()]), axis=0, dtype=np.int16)


def news2_missing_parameters(*, rr: ArrayLike, spo2: ArrayLike, sbp: ArrayLike, hr: ArrayLike, temp: ArrayLike, on_oxygen: ArrayLike = False, alert: ArrayLike = True) -> np.ndarray:
    """How many of the 7 parameters are NaN (int8, 0-7) per observation: those scored 0 by default."""
    arrays = _as_float_arrays(rr=rr, spo2=spo2, sbp=sbp, hr=hr, temp=temp, on_oxygen=on_oxygen, alert=alert)
    return np.sum(np.stack([np.isnan(array) for array in arrays.values()]), axis=0, dtype=np.int8)


def news2_risk(score: ArrayLike, components: Mapping[str, ArrayLike]) -> np.ndarray:
    """RCP clinical risk per observation: "low", "low-medium", "medium" or "high" (dtype '<U10')."""
    score = np.asarray(score)
    single_three = np.zeros(score.shape, dtype=bool)
    for points in components.values():
        single_three = single_three | (np.asarray(points) == 3)
    risk = np.where(score >= 7, "high", np.where(score >= 5, "medium", np.where(single_three, "low-medium", "low")))
    return risk.astype("<U10")


def news2_for_patient(series: PatientSeries) -> np.ndarray:
    """NEWS2 (int16 [T]) of every sample of a generated patient; missing readings score 0."""
    column = {name: series.values[:, SIGNALS.index(name)] for name in ("rr", "spo2", "sbp", "hr", "temp")}
    return news2_score(**column, on_oxygen=series.on_oxygen, alert=series.alert)
