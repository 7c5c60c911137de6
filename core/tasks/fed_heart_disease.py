"""FLamby's Fed-Heart-Disease: the four UCI Heart Disease centres, logistic regression, accuracy.

The protocol (see data/fed_heart_disease/README.md) is reproduced exactly, with numpy instead of
pandas: parse every field as float with `?` missing; drop `slope`, `ca`, `thal`; drop rows with any
missing value among the 10 kept features; label `num > 0`; one-hot `cp` and `restecg` over all
centres combined with the first level dropped (13 features, in the column order pandas'
`get_dummies(columns=[cp, restecg], drop_first=True)` gives); per-centre 66/34 split with
scikit-learn's `train_test_split(random_state=43)`; per-centre z-scores with its own train split's
mean and unbiased std + 1e-9 (pooled: pooled-train statistics).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from torch import nn

from ..config import TaskConfig
from ..errors import ConfigError
from .base import SiteSplit, TwinTask, register_task
from .models import FlatBCELoss, logistic_regression
from .preprocessing import fit_standardiser, split_train_test, stratify_labels

__all__ = ["CENTRES", "FEATURE_NAMES", "FedHeartDiseaseTask"]

DATA_DIR = Path(__file__).parent / "data" / "fed_heart_disease"
CENTRES = ("cleveland", "hungarian", "switzerland", "va")
RAW_COLUMNS = (
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
    "thalach", "exang", "oldpeak", "slope", "ca", "thal", "num",
)  # fmt: skip
KEPT_FEATURES = RAW_COLUMNS[:10]
ONE_HOT_COLUMNS = ("cp", "restecg")
FEATURE_NAMES = (
    "age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak",
    "cp_2", "cp_3", "cp_4", "restecg_1", "restecg_2",
)  # fmt: skip


@dataclass(frozen=True)
class _CentreRows:
    features: np.ndarray  # float32 [n, 13], one-hot encoded, not normalised
    labels: np.ndarray  # float32 [n], 0/1
    train_index: np.ndarray
    test_index: np.ndarray


def _read_centre_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Kept features (float64 [n, 10], complete rows only, file order) and binary labels."""
    rows = []
    for line in path.read_text(encoding="ascii").splitlines():
        if line.strip():
            rows.append([float("nan") if cell.strip() == "?" else float(cell) for cell in line.split(",")])
    table = np.asarray(rows, dtype=np.float64)
    features = table[:, : len(KEPT_FEATURES)]
    complete = ~np.isnan(features).any(axis=1)
    labels = (table[complete, -1] > 0).astype(np.float64)
    return features[complete], labels


def _one_hot_drop_first(features: np.ndarray) -> np.ndarray:
    """pandas `get_dummies(columns=[cp, restecg], drop_first=True)` in numpy, same column order."""
    one_hot_positions = [KEPT_FEATURES.index(name) for name in ONE_HOT_COLUMNS]
    plain_positions = [i for i in range(len(KEPT_FEATURES)) if i not in one_hot_positions]
    blocks = [features[:, plain_positions]]
    for position in one_hot_positions:
        levels = np.unique(features[:, position])  # sorted, as pandas orders categories
        blocks.append(np.stack([features[:, position] == level for level in levels[1:]], axis=1))
    return np.concatenate(blocks, axis=1).astype(np.float32)


@lru_cache(maxsize=8)
def _prepare(split_seed: int, test_fraction: float) -> tuple[_CentreRows, ...]:
    per_centre = [_read_centre_file(DATA_DIR / f"processed.{centre}.data") for centre in CENTRES]
    encoded = _one_hot_drop_first(np.concatenate([features for features, _ in per_centre]))
    centres = []
    start = 0
    for features, labels in per_centre:
        count = features.shape[0]
        train_index, test_index = split_train_test(
            count, test_fraction=test_fraction, seed=split_seed, stratify=stratify_labels(labels)
        )
        centres.append(
            _CentreRows(
                features=encoded[start : start + count],
                labels=labels.astype(np.float32),
                train_index=train_index,
                test_index=test_index,
            )
        )
        start += count
    return tuple(centres)


@register_task("fed_heart_disease")
class FedHeartDiseaseTask(TwinTask):
    name = "fed_heart_disease"
    kind = "binary"
    primary_metric = "accuracy"
    higher_is_better = True
    feature_names = FEATURE_NAMES

    def __init__(self, config: TaskConfig) -> None:
        super().__init__(config)
        if config.num_sites != len(CENTRES):
            raise ConfigError(
                "task.num_sites",
                f"fed_heart_disease has exactly {len(CENTRES)} natural centres, got num_sites={config.num_sites}",
                f"set task.num_sites={len(CENTRES)}",
            )

    def site_ids(self) -> list[str]:
        return list(CENTRES)

    def _centres(self) -> tuple[_CentreRows, ...]:
        return _prepare(int(self.config.split_seed), float(self.config.test_fraction))

    def load_site(self, index: int) -> SiteSplit:
        if not 0 <= index < len(CENTRES):
            raise IndexError(f"site index {index} out of range 0..{len(CENTRES) - 1}")
        centre = self._centres()[index]
        x_train = centre.features[centre.train_index]
        standardiser = fit_standardiser(x_train, guard_constant_columns=False)
        return SiteSplit(
            site_id=CENTRES[index],
            x_train=standardiser.apply(x_train),
            y_train=centre.labels[centre.train_index].copy(),
            x_test=standardiser.apply(centre.features[centre.test_index]),
            y_test=centre.labels[centre.test_index].copy(),
        )

    def load_pooled(self) -> SiteSplit:
        centres = self._centres()
        x_train = np.concatenate([c.features[c.train_index] for c in centres])
        standardiser = fit_standardiser(x_train, guard_constant_columns=False)
        return SiteSplit(
            site_id="pooled",
            x_train=standardiser.apply(x_train),
            y_train=np.concatenate([c.labels[c.train_index] for c in centres]),
            x_test=standardiser.apply(np.concatenate([c.features[c.test_index] for c in centres])),
            y_test=np.concatenate([c.labels[c.test_index] for c in centres]),
        )

    def build_model(self) -> nn.Module:
        return logistic_regression(len(FEATURE_NAMES))

    def loss_fn(self) -> nn.Module:
        return FlatBCELoss()
