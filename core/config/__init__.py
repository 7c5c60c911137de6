"""Typed configuration: dataclass schemas registered with Hydra, composed once, then plain objects."""

from __future__ import annotations

from .chain import ChainConfig
from .compose import compose_config, config_from_yaml, config_to_yaml, register_schemas
from .crypto import CryptoConfig
from .federation import FederationConfig
from .privacy import PrivacyConfig
from .root import BaselineConfig, MedtwinConfig
from .strategy import StrategyConfig
from .task import CsvColumnConfig, CsvSchemaConfig, PartitionConfig, TaskConfig

__all__ = [
    "BaselineConfig",
    "ChainConfig",
    "CryptoConfig",
    "CsvColumnConfig",
    "CsvSchemaConfig",
    "FederationConfig",
    "MedtwinConfig",
    "PartitionConfig",
    "PrivacyConfig",
    "StrategyConfig",
    "TaskConfig",
    "compose_config",
    "config_from_yaml",
    "config_to_yaml",
    "register_schemas",
]
