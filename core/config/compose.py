"""Compose the Hydra config tree into a `MedtwinConfig`, and round-trip it through YAML."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from importlib import resources
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from ..errors import ConfigError
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
    """Compose configs/ with Hydra overrides (e.g. ``["task=breast_cancer"]``) into typed objects.

    Every override is checked before Hydra sees it — an unknown group option or key gets a
    `ConfigError` naming it with the closest valid ones — and what Hydra still refuses (a value of
    the wrong type) comes back as a `ConfigError` too: no Hydra traceback reaches a user."""
    for override in overrides:
        check_override(override)
    register_schemas()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            composed = compose(config_name="config", overrides=list(overrides))
    except Exception as error:  # noqa: BLE001 - Hydra and OmegaConf raise many types; the user gets one line
        raise _config_error(error, overrides) from None
    return to_config(composed)


def group_options(group: str) -> list[str]:
    """The options of a config group: the YAML files in configs/<group>/."""
    folder = resources.files(CONFIG_MODULE) / group
    return sorted(entry.name.removesuffix(".yaml") for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def _did_you_mean(value: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def check_override(override: str) -> None:
    """`group=option` must name an existing option; `a.b.c=value` an existing key of the schema."""
    key, separator, value = override.lstrip("+~").partition("=")
    if not separator or key.startswith("hydra"):
        return
    if key in GROUP_SCHEMAS:
        options = group_options(key)
        if "," in value:
            raise ConfigError(key, f"{value!r} is a sweep", "sweeps run with Hydra's multirun (`-m`), not in one composed config")
        if value not in options:
            raise ConfigError(key, f"unknown option {value!r}", f"{_did_you_mean(value, options)}options: {', '.join(options)}")
        return
    node: Any = MedtwinConfig
    walked = []
    for part in key.split("."):
        if typing.get_origin(node) in (list, tuple) and part.isdigit():  # `task.csv.features.0.min`
            walked.append(part)
            node = _optional_inner(typing.get_args(node)[0])
            continue
        if not dataclasses.is_dataclass(node):
            return  # below a free-form field (a mapping, a scalar list): anything goes
        fields = {field.name: field for field in dataclasses.fields(node)}
        if part not in fields:
            where = ".".join(walked)
            full = f"{where}.{part}" if where else part
            guess = difflib.get_close_matches(part, list(fields), n=1, cutoff=0.6)
            hint = f"did you mean {'.'.join([*walked, guess[0]])!r}? " if guess else ""
            raise ConfigError(full, "no such config key", f"{hint}keys{' of ' + where if where else ''}: {', '.join(sorted(fields))}")
        walked.append(part)
        node = _field_type(node, part)


def _field_type(schema: Any, name: str) -> Any:
    return _optional_inner(typing.get_type_hints(schema)[name])


def _optional_inner(hint: Any) -> Any:
    """`X | None` -> X; anything else unchanged (a `list[X]` stays a list)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return hint


def _config_error(error: Exception, overrides: Sequence[str]) -> ConfigError:
    """Hydra's refusal as one line: the key, the value and what it expected."""
    text = str(error)
    cause = error.__cause__ or error.__context__
    detail = str(cause).splitlines()[0] if cause is not None else text.splitlines()[0]
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key and (f"override {override}" in text or f"'{key}'" in text or key in detail):
            return ConfigError(key, f"cannot use {value!r}: {detail}")
    first = text.splitlines()[0] if text else type(error).__name__
    return ConfigError("overrides", f"{first} (in: {' '.join(overrides)})", "check each key exists for the chosen group options")


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
