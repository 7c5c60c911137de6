"""Rebuild the composed config from Flower's flat run_config (for `flwr run .` and deployment)."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from functools import lru_cache

from .config import MedtwinConfig, compose_config, config_from_yaml

OVERRIDES_KEY = "medtwin-overrides"
CONFIG_YAML_KEY = "medtwin-config-yaml"


def config_from_run_config(run_config: Mapping[str, object]) -> MedtwinConfig:
    """The resolved YAML if the run carries it, else configs/ composed with the carried overrides."""
    resolved = str(run_config.get(CONFIG_YAML_KEY, "") or "")
    if resolved:
        return _from_yaml(resolved)
    return _from_overrides(str(run_config.get(OVERRIDES_KEY, "") or ""))


@lru_cache(maxsize=8)
def _from_yaml(text: str) -> MedtwinConfig:
    return config_from_yaml(text)


@lru_cache(maxsize=8)
def _from_overrides(overrides: str) -> MedtwinConfig:
    return compose_config(shlex.split(overrides))
