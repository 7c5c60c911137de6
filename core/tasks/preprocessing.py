"""Per-site preprocessing shared by the tasks: seeded train/test split and z-score normalisation.

The conventions follow FLamby's Fed-Heart-Disease: each site splits its own rows with scikit-learn's
`train_test_split` (stratified on a binary label when both classes have more than two rows), and
each site z-scores its features with the mean and unbiased std (ddof=1) of its own train split,
plus a small epsilon added to the std.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import train_test_split

from ..errors import ConfigError
from .base import SiteSplit

__all__ = [
    "Standardiser",
    "fit_standardiser",
    "impute_with_train_mean",
    "pool_raw_splits",
    "raw_site_split",
    "split_train_test",
    "standardise_split",
    "stratify_labels",
]

STD_EPSILON = 1e-9


@dataclass(frozen=True)
class Standardiser:
    """Column statistics of a train split; `apply` maps any rows to z-scores with them."""

    mean: np.ndarray  # float64 [n_features]
    std: np.ndarray  # float64 [n_features], ddof=1, without epsilon
    epsilon: float = STD_EPSILON

    def apply(self, rows: np.ndarray) -> np.ndarray:
        return ((rows - self.mean) / (self.std + self.epsilon)).astype(np.float32)


def fit_standardiser(x_train: np.ndarray, *, guard_constant_columns: bool) -> Standardiser:
    """Mean and unbiased std of `x_train`'s columns.

    With `guard_constant_columns`, a column whose train std is (near) zero keeps std 1, so a test
    value that differs from the constant train value is not blown up to ~1e9. FLamby does not
    guard (Switzerland's `chol` is all zero); its task passes False to stay exact.
    """
    rows = np.asarray(x_train, dtype=np.float64)
    mean = rows.mean(axis=0)
    std = rows.std(axis=0, ddof=1) if rows.shape[0] > 1 else np.zeros(rows.shape[1])
    if guard_constant_columns:
        std = np.where(std < 1e-12, 1.0, std)
    return Standardiser(mean=mean, std=std)


def stratify_labels(labels: np.ndarray, *, min_per_class: int = 3) -> np.ndarray | None:
    """The labels to stratify on, or None when some class has fewer than `min_per_class` rows.

    FLamby stratifies when there are at least two classes and each has more than 2 examples.
    """
    levels, counts = np.unique(labels, return_counts=True)
    if len(levels) > 1 and bool(np.all(counts >= min_per_class)):
        return labels
    return None


def split_train_test(
    num_rows: int,
    *,
    test_fraction: float,
    seed: int,
    stratify: np.ndarray | None,
    site_id: str = "",
    test_fraction_key: str = "task.test_fraction",
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of (train, test), each in ascending (file) order, as FLamby keeps them.

    A split that would leave a side empty is a `ConfigError` naming `test_fraction_key`; when the test
    (or train) side is too small to hold every class, the split is not stratified (sklearn would refuse)."""
    num_test = math.ceil(test_fraction * num_rows)  # sklearn's rounding of a fractional test_size
    if not 1 <= num_test <= num_rows - 1:
        where = f"site {site_id!r}" if site_id else "a site"
        raise ConfigError(
            test_fraction_key,
            f"{test_fraction} of {where}'s {num_rows} rows leaves {num_test} test and {num_rows - num_test} train rows",
            f"each side needs a row: set {test_fraction_key} so that 1 <= ceil(fraction x {num_rows}) <= {num_rows - 1}, "
            "or give every site more rows (fewer task.num_sites, a larger task.partition.min_samples_per_site)",
        )
    if stratify is not None and min(num_test, num_rows - num_test) < len(np.unique(stratify)):
        stratify = None
    train_index, test_index = train_test_split(
        np.arange(num_rows), test_size=test_fraction, random_state=seed, shuffle=True, stratify=stratify
    )
    return np.sort(train_index), np.sort(test_index)



def impute_with_train_mean(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fill NaN cells of both splits with the train split's column means (0 if a column is all NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # all-NaN column: handled below
        means = np.nanmean(x_train, axis=0) if x_train.shape[0] else np.zeros(x_train.shape[1])
    means = np.where(np.isnan(means), 0.0, means)
    return np.where(np.isnan(x_train), means, x_train), np.where(np.isnan(x_test), means, x_test)


def raw_site_split(
    site_id: str,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    binary: bool,
    test_fraction: float,
    seed: int,
    test_fraction_key: str = "task.test_fraction",
) -> SiteSplit:
    """One site's rows split into train/test, NOT yet imputed or normalised (float64 inside)."""
    stratify = stratify_labels(labels) if binary else None
    train_index, test_index = split_train_test(
        features.shape[0], test_fraction=test_fraction, seed=seed, stratify=stratify, site_id=site_id,
        test_fraction_key=test_fraction_key,
    )  # fmt: skip
    return SiteSplit(
        site_id=site_id,
        x_train=np.asarray(features[train_index], dtype=np.float64),
        y_train=np.asarray(labels[train_index], dtype=np.float32),
        x_test=np.asarray(features[test_index], dtype=np.float64),
        y_test=np.asarray(labels[test_index], dtype=np.float32),
    )


def pool_raw_splits(raw_splits: list[SiteSplit]) -> SiteSplit:
    """The union of every site's train rows and of every site's test rows (still raw)."""
    return SiteSplit(
        site_id="pooled",
        x_train=np.concatenate([split.x_train for split in raw_splits]),
        y_train=np.concatenate([split.y_train for split in raw_splits]),
        x_test=np.concatenate([split.x_test for split in raw_splits]),
        y_test=np.concatenate([split.y_test for split in raw_splits]),
    )


def standardise_split(raw: SiteSplit, *, guard_constant_columns: bool = True) -> SiteSplit:
    """Impute NaNs with train means, then z-score both splits with the train split's statistics."""
    x_train, x_test = raw.x_train, raw.x_test
    if np.isnan(x_train).any() or np.isnan(x_test).any():
        x_train, x_test = impute_with_train_mean(x_train, x_test)
    standardiser = fit_standardiser(x_train, guard_constant_columns=guard_constant_columns)
    return SiteSplit(
        site_id=raw.site_id,
        x_train=standardiser.apply(x_train),
        y_train=raw.y_train.astype(np.float32),
        x_test=standardiser.apply(x_test),
        y_test=raw.y_test.astype(np.float32),
    )
