"""The `privacy/` config group composes, and its validation names the bad key."""

from __future__ import annotations

import dataclasses

import pytest

from medtwin.core.config import compose_config
from medtwin.core.config.privacy import PrivacyConfig, validate_privacy_config
from medtwin.core.errors import ConfigError


def test_dp_group_composes_to_a_typed_valid_config():
    privacy = compose_config(["privacy=dp"]).privacy
    assert isinstance(privacy, PrivacyConfig)
    assert (privacy.name, privacy.target_epsilon, privacy.target_delta) == ("dp", 1.0, 1e-5)
    assert privacy.accountant in ("rdp", "prv") and privacy.max_grad_norm == 1.0
    validate_privacy_config(privacy)


def test_none_group_is_the_default():
    assert compose_config([]).privacy.name == "none"


def test_overrides_reach_the_dataclass():
    privacy = compose_config(["privacy=dp", "privacy.target_epsilon=3.5", "privacy.accountant=prv"]).privacy
    assert (privacy.target_epsilon, privacy.accountant) == (3.5, "prv")


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"name": "ldp"}, "privacy.name"),
        ({"target_epsilon": 0.0}, "privacy.target_epsilon"),
        ({"target_delta": 0.0}, "privacy.target_delta"),
        ({"target_delta": 0.01}, "privacy.target_delta"),
        ({"max_grad_norm": -1.0}, "privacy.max_grad_norm"),
        ({"accountant": "gdp"}, "privacy.accountant"),
        ({"grad_sample_mode": "ghost"}, "privacy.grad_sample_mode"),
        ({"epsilon_tolerance": 2.0}, "privacy.epsilon_tolerance"),
    ],
)
def test_each_bad_value_names_its_key(change, key):
    config = dataclasses.replace(PrivacyConfig(name="dp"), **change)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as raised:
        validate_privacy_config(config)
    assert raised.value.key == key


def test_a_tiny_epsilon_names_epsilon_not_the_tolerance():
    with pytest.raises(ConfigError) as raised:
        validate_privacy_config(dataclasses.replace(PrivacyConfig(name="dp"), target_epsilon=1e-6))
    assert raised.value.key == "privacy.target_epsilon"
