"""Federated normalisation: every site z-scores with the global mean and variance of the sites' training rows.

`task.normalization=federated` replaces each site's own train statistics (FLamby's per-centre
convention, `task.normalization=site`) by statistics of the union of all sites' training rows,
computed from per-site sums that travel like model updates (same codec, signatures and round
certificate; under `crypto=ckks` the coordinator only adds ciphertexts). Pure numpy: the messages
and certificates are the client's business (client/normalization.py).

What a site packs. The codec sends [n_i * w_i ..., n_i] for a vector w_i with |w_i| <= the scheme's
bound, so a site sends the per-row averages of its sums and its row count n_i: for every feature j,
with u = (x - c_j) / h_j on the task's public reference range [c_j - h_j, c_j + h_j]
(`TwinTask.feature_reference`, the same at every site; a row outside it is refused),

    w_i = [observed_j / n_i ..., sum u_j / n_i ..., sum u_j^2 / n_i ..., 0 ...]   (3 values a feature)

padded with zeros to the model's size (the HE parameters are chosen for it). The certified sum,
divided by N = sum n_i, gives the share of observed cells and the first two moments of u; the
global mean and unbiased variance (ddof=1, as `fit_standardiser`) follow. Missing cells (NaN) count
in no sum, so the mean is numpy's `nanmean` of the union and missing cells become the mean (z = 0).

What a site refuses (`ImplausibleStatisticsError`): padding that is not zero, shares outside
[0, 1], moments outside what values in [-1, 1] can give, a negative variance, fewer than two
observed values of a feature — each beyond `tolerance`, the decoding error bound of the scheme.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..config.normalization import NORMALIZATION_MODES, STATISTICS_PER_FEATURE
from ..errors import MedtwinError
from .base import SiteSplit
from .preprocessing import Standardiser

__all__ = [
    "NORMALIZATION_MODES",
    "STATISTICS_PER_FEATURE",
    "FeatureReference",
    "ImplausibleStatisticsError",
    "standardise_with",
    "standardiser_from_average",
    "statistics_vector",
]



class ImplausibleStatisticsError(MedtwinError):
    """Decoded statistics no honest sum of sites' training rows can give, or rows outside the reference."""


@dataclass(frozen=True)
class FeatureReference:
    """A public per-feature range [centre - half_range, centre + half_range] every site encodes against."""

    centre: np.ndarray  # float64 [n_features]
    half_range: np.ndarray  # float64 [n_features], > 0

    @classmethod
    def from_bounds(cls, low: np.ndarray, high: np.ndarray) -> FeatureReference:
        low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
        half_range = (high - low) / 2.0
        return cls(centre=(high + low) / 2.0, half_range=np.where(half_range > 0, half_range, 1.0))

    @property
    def num_features(self) -> int:
        return int(self.centre.size)


def statistics_vector(x_train: np.ndarray, reference: FeatureReference, *, length: int) -> np.ndarray:
    """What a site packs (with count = its training rows): see the module docstring."""
    rows = np.asarray(x_train, dtype=np.float64)
    features = reference.num_features
    if rows.ndim != 2 or rows.shape[1] != features or rows.shape[0] < 1:
        raise ImplausibleStatisticsError(f"training rows of shape {rows.shape}, expected (n >= 1, {features})")
    if length < STATISTICS_PER_FEATURE * features:
        raise ImplausibleStatisticsError(
            f"{STATISTICS_PER_FEATURE * features} statistics do not fit in an update of {length} values"
        )
    observed = ~np.isnan(rows)
    scaled = np.where(observed, (np.where(observed, rows, 0.0) - reference.centre) / reference.half_range, 0.0)
    outside = np.abs(scaled) > 1.0 + 1e-12
    if outside.any():
        column = int(np.argmax(outside.any(axis=0)))
        raise ImplausibleStatisticsError(
            f"{int(outside.sum())} training value(s) lie outside the task's reference range (first in feature #{column})"
        )
    count = rows.shape[0]
    vector = np.zeros(length)
    vector[:features] = observed.sum(axis=0) / count
    vector[features : 2 * features] = scaled.sum(axis=0) / count
    vector[2 * features : 3 * features] = np.square(scaled).sum(axis=0) / count
    return vector


def standardiser_from_average(
    average: np.ndarray, *, total_rows: float, reference: FeatureReference, tolerance: float
) -> Standardiser:
    """The global `Standardiser` from a decoded average of statistics vectors over `total_rows` rows;
    raises `ImplausibleStatisticsError` for values no honest sum gives (beyond `tolerance` per value)."""
    features = reference.num_features
    values = np.asarray(average, dtype=np.float64)
    if values.ndim != 1 or values.size < STATISTICS_PER_FEATURE * features or not np.all(np.isfinite(values)):
        raise ImplausibleStatisticsError(f"the statistics hold {values.size} value(s) (finite: {bool(np.all(np.isfinite(values)))})")
    share, first, second = (values[k * features : (k + 1) * features] for k in range(STATISTICS_PER_FEATURE))
    padding = values[STATISTICS_PER_FEATURE * features :]
    problems = []
    if padding.size and float(np.max(np.abs(padding))) > tolerance:
        problems.append("the padding after the statistics is not zero")
    if np.any(share < -tolerance) or np.any(share > 1 + tolerance):
        problems.append("a share of observed values is outside [0, 1]")
    if np.any(np.abs(first) > share + tolerance) or np.any(second < -tolerance) or np.any(second > share + tolerance):
        problems.append("a moment is beyond what values in the reference range give")
    spread = second - np.square(first) / np.maximum(share, tolerance)  # sum (u - mean)^2 / N
    if np.any(spread < -4 * tolerance):
        problems.append("a variance is negative")
    observed = share * total_rows
    if np.any(observed < 2 - max(tolerance * total_rows, 0.5)):
        problems.append("a feature has fewer than two observed training values")
    if problems:
        raise ImplausibleStatisticsError("; ".join(problems))
    observed = np.maximum(np.round(observed), 2.0)
    mean_scaled = first / np.maximum(share, tolerance)
    variance_scaled = np.maximum(spread, 0.0) * total_rows / (observed - 1)
    std = reference.half_range * np.sqrt(variance_scaled)
    # a (near) constant column keeps std 1, as fit_standardiser(guard_constant_columns=True) does;
    # "near" is what the scheme's decoding error alone could make of a zero variance
    noise_floor = reference.half_range * np.sqrt(4 * tolerance * total_rows / (observed - 1))
    std = np.where(std <= np.maximum(noise_floor, 1e-12), 1.0, std)
    return Standardiser(mean=reference.centre + reference.half_range * mean_scaled, std=std)


def standardise_with(raw: SiteSplit, standardiser: Standardiser) -> SiteSplit:
    """A raw `SiteSplit` z-scored with given statistics; missing cells take the mean (z = 0)."""

    def apply(rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.float64)
        return standardiser.apply(np.where(np.isnan(rows), standardiser.mean, rows))

    return replace(raw, x_train=apply(raw.x_train), y_train=raw.y_train.astype(np.float32),
                   x_test=apply(raw.x_test), y_test=raw.y_test.astype(np.float32))  # fmt: skip
