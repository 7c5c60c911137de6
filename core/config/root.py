"""The root config: one typed tree composed by Hydra from configs/."""

from __future__ import annotations

from dataclasses import dataclass, field

from .chain import ChainConfig
from .crypto import CryptoConfig
from .federation import FederationConfig
from .privacy import PrivacyConfig
from .strategy import StrategyConfig
from .task import TaskConfig


@dataclass
class BaselineConfig:
    """Recipe of the non-federated baselines (FLamby: Adam, lr 1e-3, batch 4, 50 epochs)."""

    enabled: bool = True  # also train each site alone and a pooled model (simulation only)
    epochs: int = 50
    batch_size: int = 4
    optimizer: str = "adam"
    learning_rate: float = 0.001


@dataclass
class TrackingConfig:
    """Optional experiment tracking (the researcher's side; sites never read it): after a run, its
    config, per-round and final metrics and report go to a local MLflow store (experiments/tracking.py)."""

    mlflow_uri: str = ""  # empty: off. A local store: `sqlite:///path/mlflow.db` or a path ending in .db
    experiment: str = "medtwin"


@dataclass
class MedtwinConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    crypto: CryptoConfig = field(default_factory=CryptoConfig)
    chain: ChainConfig = field(default_factory=ChainConfig)
    seed: int = 42
    run_id: str = ""  # empty: generated from time + config hash
    runs_dir: str = "runs"
    # simulation: a folder of site files (<site_id>.yaml) the harness's simulated hospitals read;
    # empty = written per task from configs/sites/simulation.yaml
    sites_dir: str = ""
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    progress: bool = True  # live progress display
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
