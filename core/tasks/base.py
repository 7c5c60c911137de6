"""What a twin task is: data of each site, a model, a loss and metrics, registered by name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..config import TaskConfig
from ..errors import UnknownTaskError
from ..model_vector import vector_to_model
from ..score_histogram import ScoreHistogram
from .metrics import binary_metrics, regression_metrics


@dataclass(frozen=True)
class SiteSplit:
    """One site's data, already preprocessed and normalised the way the task's protocol says."""

    site_id: str
    x_train: np.ndarray  # float32 [n_train, n_features]
    y_train: np.ndarray  # float32 [n_train]
    x_test: np.ndarray  # float32 [n_test, n_features]
    y_test: np.ndarray  # float32 [n_test]
    # the patient of each training row, when a patient owns several rows (the vitals twin's windows):
    # DP-SGD then protects a patient, not a row. None: one row per patient.
    train_units: np.ndarray | None = None

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_train_units(self) -> int:
        """Patients in the training rows (the unit DP's sample rate and guarantee are about)."""
        return self.num_train if self.train_units is None else len(np.unique(self.train_units))

    @property
    def num_test(self) -> int:
        return int(self.x_test.shape[0])


class TwinTask(ABC):
    """A digital-twin learning task. Subclasses are registered with `@register_task(name)`."""

    name: str
    kind: str  # "binary" | "regression"
    primary_metric: str  # key of `evaluate`'s result that ranks models ("accuracy", "mse")
    higher_is_better: bool
    normalization_modes: tuple[str, ...] = ("site",)  # `task.normalization` values this task supports
    groups_rows_by_patient: bool = False  # its SiteSplits carry train_units (DP samples patients, not rows)

    def __init__(self, config: TaskConfig) -> None:
        self.config = config

    @abstractmethod
    def site_ids(self) -> list[str]:
        """Stable ids of the sites, in site-index order."""

    @abstractmethod
    def load_site(self, index: int) -> SiteSplit:
        """The data one site holds (what a hospital's ClientApp loads)."""

    def load_all_sites(self) -> list[SiteSplit]:
        return [self.load_site(index) for index in range(len(self.site_ids()))]

    def load_site_unnormalised(self, index: int) -> SiteSplit:
        """One site's train/test rows before normalisation (float64, NaN where missing), for
        `task.normalization=federated`; tasks that support it override this."""
        raise NotImplementedError(f"task {self.name} has no federated normalisation")

    def feature_reference(self):
        """The public per-feature range sites encode their statistics against (a `FeatureReference`);
        tasks that support `task.normalization=federated` override this."""
        raise NotImplementedError(f"task {self.name} has no federated normalisation")

    @abstractmethod
    def load_pooled(self) -> SiteSplit:
        """All sites' train and test rows together, normalised with pooled-train statistics."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh model; callers seed torch first so every site starts from the same weights."""

    def model_with_weights(self, weights: np.ndarray, *, seed: int) -> nn.Module:
        """A model of this task holding `weights` (a flat vector, e.g. a decoded aggregate)."""
        torch.manual_seed(seed)
        model = self.build_model()
        vector_to_model(model, weights)
        return model

    @abstractmethod
    def loss_fn(self) -> nn.Module:
        """Loss on the model's output, e.g. BCELoss on sigmoid probabilities."""

    def predict(self, model: nn.Module, x: np.ndarray) -> np.ndarray:
        """The model's output on rows `x`, one value a row (binary: the probability of label 1)."""
        model.eval()
        with torch.no_grad():
            return model(torch.from_numpy(x)).reshape(-1).numpy()

    def evaluate(self, model: nn.Module, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """Metrics of `model` on (x, y) (see `metrics.py`), with `n` the row count."""
        output = self.predict(model, x)
        if self.kind == "binary":
            return binary_metrics(y, output, decision_threshold=self.config.decision_threshold)
        return regression_metrics(y, output)


    def score_histogram(self, model: nn.Module, x: np.ndarray, y: np.ndarray) -> ScoreHistogram | None:
        """A binary task's per-class histogram of `model`'s scores on (x, y) (core/score_histogram.py);
        None for other tasks."""
        if self.kind != "binary":
            return None
        return ScoreHistogram.of_scores(y, self.predict(model, x))


TaskFactory = Callable[[TaskConfig], TwinTask]
_REGISTRY: dict[str, TaskFactory] = {}


def register_task(name: str) -> Callable[[TaskFactory], TaskFactory]:
    def decorator(factory: TaskFactory) -> TaskFactory:
        _REGISTRY[name] = factory
        return factory

    return decorator


def registered_tasks() -> list[str]:
    return sorted(_REGISTRY)


def get_task(config: TaskConfig) -> TwinTask:
    if config.name not in _REGISTRY:
        raise UnknownTaskError(config.name, registered_tasks())
    return _REGISTRY[config.name](config)
