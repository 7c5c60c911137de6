"""Compose the Hydra config tree into a `MedtwinConfig`, and round-trip it through YAML."""

from __future__ import annotations

from collections.abc import Sequence

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from .chain import ChainConfig
from .crypto import CryptoConfig
from .federation import FederationConfig
from .privacy import PrivacyConfig
from .root import MedtwinConfig
from .strategy import StrategyConfig
from .task import TaskConfig

CONFIG_MODULE = "medtwin.configs"
GROUP_SCHEMAS = {
    "task": TaskConfig,
    "strategy": StrategyConfig,
    "federation": FederationConfig,
    "privacy": PrivacyConfig,
    "crypto": CryptoConfig,
    "chain": ChainConfig,
}


def register_schemas() -> None:
    """Register the root schema and one `base_<group>` schema per config group."""
    store = ConfigStore.instance()
    store.store(name="base_config", node=MedtwinConfig)
    for group, schema in GROUP_SCHEMAS.items():
        store.store(group=group, name=f"base_{group}", node=schema)


def compose_config(overrides: Sequence[str] = ()) -> MedtwinConfig:
    """Compose configs/ with Hydra overrides (e.g. ``["task=breast_cancer"]``) into typed objects."""
    register_schemas()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        composed = compose(config_name="config", overrides=list(overrides))
    return to_config(composed)


def to_config(composed: object) -> MedtwinConfig:
    """Turn a composed DictConfig (from compose or @hydra.main) into a validated `MedtwinConfig`."""
    from .validate import validate_config

    config = OmegaConf.to_object(composed)
    if not isinstance(config, MedtwinConfig):
        raise TypeError(f"composed config is {type(config).__name__}, expected MedtwinConfig")
    validate_config(config)
    return config


def config_to_yaml(config: MedtwinConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def config_from_yaml(text: str) -> MedtwinConfig:
    merged = OmegaConf.merge(OmegaConf.structured(MedtwinConfig), OmegaConf.create(text))
    return to_config(merged)
