"""Tasks on scikit-learn's bundled datasets, split across synthetic sites by `partition.py`.

Both follow the same recipe: partition all rows across `task.num_sites` sites with
`task.partition` (seed `task.split_seed`), split each site's rows into train/test with
`task.test_fraction` (same seed), z-score each site with its own train statistics (FLamby's
convention); the pooled view is the union of the site splits with pooled-train statistics.

- ``breast_cancer``: Wisconsin diagnostic (569 x 30), label 1 = benign as sklearn encodes it;
  MLP 30 -> 16 -> 1 with a sigmoid, BCE, accuracy.
- ``diabetes_progression``: disease progression after one year (442 x 10), regression; MLP
  10 -> 32 -> 1, MSE. The target is expressed in units of the pooled-train target std around the
  pooled-train mean (one scale shared by every site, like a published reference range), so MSE
  is O(1) and comparable between sites and the pooled model.
"""

from __future__ import annotations

from abc import abstractmethod
import threading
from collections import OrderedDict
from dataclasses import astuple, replace

import numpy as np
from sklearn.datasets import load_breast_cancer, load_diabetes
from torch import nn

from .base import SiteSplit, TwinTask, register_task
from .federated_statistics import FeatureReference
from .models import FlatBCELoss, FlatMSELoss, mlp
from .partition import partition_indices
from .preprocessing import pool_raw_splits, raw_site_split, standardise_split

__all__ = ["BreastCancerTask", "DiabetesProgressionTask", "PartitionedTask"]

SPLITS_KEPT = 4  # splits kept per process (a sweep may vary the split); each is the size of its dataset
_SPLITS: OrderedDict[tuple, list[SiteSplit]] = OrderedDict()  # (task class, split key) -> every site's rows
_SPLITS_LOCK = threading.Lock()  # the simulation's driver reads splits from several threads


class PartitionedTask(TwinTask):
    """A pooled dataset cut into synthetic sites; subclasses supply rows, model and loss."""

    num_features: int
    normalization_modes = ("site", "federated")
    _raw_splits_cache: list[SiteSplit] | None = None

    @abstractmethod
    def load_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """All rows of the dataset: features float64 [n, num_features], labels [n]."""

    def site_ids(self) -> list[str]:
        return [f"site{index}" for index in range(self.config.num_sites)]

    def raw_splits(self) -> list[SiteSplit]:
        """Every site's train/test rows before normalisation: computed once per process for a split
        (each simulated site builds its own task object, so a per-object cache would redo the whole
        partition for every site: O(sites^2) per round). Shared arrays: callers must not write to them."""
        if self._raw_splits_cache is None:
            key = (type(self), *self.split_key())
            with _SPLITS_LOCK:
                if key not in _SPLITS:
                    _SPLITS[key] = self.compute_raw_splits()
                    while len(_SPLITS) > SPLITS_KEPT:
                        _SPLITS.popitem(last=False)
                _SPLITS.move_to_end(key)
                self._raw_splits_cache = _SPLITS[key]
        return self._raw_splits_cache

    def split_key(self) -> tuple:
        """Everything that decides the split, as a hashable key: sites, test fraction, seed, partition."""
        return (self.config.num_sites, self.config.test_fraction, self.config.split_seed, astuple(self.config.partition))

    def compute_raw_splits(self) -> list[SiteSplit]:
        """Partition all rows across the sites, then split each site's rows into train and test."""
        features, labels = self.load_rows()
        partition = self.config.partition
        parts = partition_indices(
            labels,
            num_sites=self.config.num_sites,
            scheme=partition.scheme,
            seed=self.config.split_seed,
            dirichlet_alpha=partition.dirichlet_alpha,
            quantity_sigma=partition.quantity_sigma,
            min_samples_per_site=partition.min_samples_per_site,
            regression_label_bins=partition.regression_label_bins,
        )
        splits = [
            raw_site_split(
                site_id,
                features[rows],
                labels[rows],
                binary=self.kind == "binary",
                test_fraction=self.config.test_fraction,
                seed=self.config.split_seed,
            )
            for site_id, rows in zip(self.site_ids(), parts, strict=True)
        ]
        return self.transform_targets(splits)

    def transform_targets(self, raw_splits: list[SiteSplit]) -> list[SiteSplit]:
        """Hook for a shared target scale; identity by default."""
        return raw_splits

    def load_site(self, index: int) -> SiteSplit:
        if not 0 <= index < self.config.num_sites:
            raise IndexError(f"site index {index} out of range 0..{self.config.num_sites - 1}")
        return standardise_split(self.raw_splits()[index])

    def load_site_unnormalised(self, index: int) -> SiteSplit:
        if not 0 <= index < self.config.num_sites:
            raise IndexError(f"site index {index} out of range 0..{self.config.num_sites - 1}")
        return self.raw_splits()[index]

    def feature_reference(self) -> FeatureReference:
        """The range of every feature over the whole public dataset (what its documentation states)."""
        features, _ = self.load_rows()
        return FeatureReference.from_bounds(np.nanmin(features, axis=0), np.nanmax(features, axis=0))

    def load_pooled(self) -> SiteSplit:
        return standardise_split(pool_raw_splits(self.raw_splits()))


@register_task("breast_cancer")
class BreastCancerTask(PartitionedTask):
    name = "breast_cancer"
    kind = "binary"
    primary_metric = "accuracy"
    higher_is_better = True
    num_features = 30
    hidden_units = 16

    def load_rows(self) -> tuple[np.ndarray, np.ndarray]:
        features, labels = load_breast_cancer(return_X_y=True)
        return features.astype(np.float64), labels.astype(np.float32)

    def build_model(self) -> nn.Module:
        return mlp(self.num_features, hidden_units=self.hidden_units, sigmoid_output=True)

    def loss_fn(self) -> nn.Module:
        return FlatBCELoss()


@register_task("diabetes_progression")
class DiabetesProgressionTask(PartitionedTask):
    name = "diabetes_progression"
    kind = "regression"
    primary_metric = "mse"
    higher_is_better = False
    num_features = 10
    hidden_units = 32

    def load_rows(self) -> tuple[np.ndarray, np.ndarray]:
        # scaled=False: raw features; every site z-scores them with its own train statistics.
        features, target = load_diabetes(return_X_y=True, scaled=False)
        return features.astype(np.float64), target.astype(np.float64)

    def transform_targets(self, raw_splits: list[SiteSplit]) -> list[SiteSplit]:
        pooled_train_target = np.concatenate([split.y_train for split in raw_splits]).astype(np.float64)
        mean = float(pooled_train_target.mean())
        std = float(pooled_train_target.std(ddof=1))
        return [
            replace(
                split,
                y_train=((split.y_train - mean) / std).astype(np.float32),
                y_test=((split.y_test - mean) / std).astype(np.float32),
            )
            for split in raw_splits
        ]

    def build_model(self) -> nn.Module:
        return mlp(self.num_features, hidden_units=self.hidden_units, sigmoid_output=False)

    def loss_fn(self) -> nn.Module:
        return FlatMSELoss()
