"""Schema of the `task/` config group: which twin, and how its data is split across sites."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING


@dataclass
class PartitionConfig:
    """How a pooled dataset is split across synthetic sites (ignored by naturally split tasks)."""

    scheme: str = "iid"  # iid | dirichlet | quantity
    dirichlet_alpha: float = 0.5  # label skew: smaller alpha = more skew
    quantity_sigma: float = 1.0  # quantity skew: lognormal sigma of site sizes
    min_samples_per_site: int = 10
    regression_label_bins: int = 5  # dirichlet on a regression target: number of quantile bins


@dataclass
class CsvColumnConfig:
    name: str = MISSING
    type: str = "float"  # float | int | category | bool
    categories: list[str] = field(default_factory=list)  # allowed values for `category`
    allow_missing: bool = False
    min: float | None = None  # plausible range (float/int): a value outside is an error naming row and column
    max: float | None = None


@dataclass
class CsvSchemaConfig:
    """Bring-your-own tabular data: one CSV per site, described here."""

    site_files: list[str] = field(default_factory=list)  # one path per site (simulation)
    features: list[CsvColumnConfig] = field(default_factory=list)
    target: str = MISSING
    task_type: str = "binary"  # binary | regression
    missing_policy: str = "reject"  # reject | drop_row | impute_mean
    test_fraction: float = 0.34
    hidden_units: int = 16  # MLP hidden width; 0 = linear model (logistic regression if binary)


@dataclass
class VitalsConfig:
    """The vital-signs twin: generated hospital wards (see docs/VITALS.md) and the forecasting windows."""

    patients_per_site: int = 60
    hours: float = 48.0  # each patient's monitored stay
    grid_min: float = 15.0  # common grid every site's readings are put on (sites sample every 5–15 min)
    window_h: float = 3.0  # history the twin sees
    horizon_h: float = 1.0  # future it forecasts
    stride_h: float = 0.5  # spacing of training windows


@dataclass
class TaskConfig:
    name: str = MISSING  # registered task name: fed_heart_disease | breast_cancer | diabetes_progression | csv | vitals
    num_sites: int = 4
    test_fraction: float = 0.34
    split_seed: int = 43
    # binary tasks: a test row is called positive when its score >= this (sensitivity, specificity);
    # accuracy stays at 0.5, FLamby's definition
    decision_threshold: float = 0.5
    # site: each site z-scores with its own train statistics (FLamby's per-centre protocol);
    # federated: every site uses the global mean/variance of all sites' training rows, summed like
    # updates before round 1 (core/tasks/federated_statistics.py); refused with privacy=dp
    normalization: str = "site"
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    csv: CsvSchemaConfig | None = None
    vitals: VitalsConfig | None = None
