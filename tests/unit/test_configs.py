"""Every config group composes into typed dataclasses; bad values name their config key."""

from __future__ import annotations

from pathlib import Path

import pytest

from medtwin.core.config import MedtwinConfig, compose_config, config_from_yaml, config_to_yaml
from medtwin.core.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
GROUPS = ("task", "strategy", "federation", "privacy", "crypto", "chain")


def group_options() -> list[tuple[str, str]]:
    return [(group, path.stem) for group in GROUPS for path in sorted((CONFIGS / group).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), group_options())
def test_every_group_option_composes(group: str, option: str) -> None:
    config = compose_config([f"{group}={option}"])
    assert isinstance(config, MedtwinConfig)
    node = getattr(config, group)
    assert type(node).__module__.startswith("medtwin.core.config"), f"{group}={option} is not a typed dataclass"


def test_default_composition_is_fed_heart_disease_fedavg(default_config: MedtwinConfig) -> None:
    assert default_config.task.name == "fed_heart_disease"
    assert default_config.strategy.name == "fedavg"
    assert default_config.task.num_sites == 4


def test_overrides_reach_typed_fields() -> None:
    config = compose_config(["strategy=fedprox", "strategy.proximal_mu=0.1", "federation.num_rounds=2"])
    assert config.strategy.proximal_mu == pytest.approx(0.1)
    assert config.federation.num_rounds == 2


def test_yaml_round_trip_is_lossless() -> None:
    config = compose_config(["task=breast_cancer", "seed=7"])
    assert config_from_yaml(config_to_yaml(config)) == config


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("strategy.learning_rate=-1", "strategy.learning_rate"),
        ("strategy.name=fedsgd", "strategy.name"),
        ("federation.num_rounds=0", "federation.num_rounds"),
        ("task.partition.scheme=zipf", "task.partition.scheme"),
        ("task.test_fraction=1.5", "task.test_fraction"),
    ],
)
def test_invalid_values_name_their_config_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        compose_config([override])
    assert caught.value.key == key
    assert key in str(caught.value)


def test_unknown_key_is_refused() -> None:
    with pytest.raises(Exception, match="not_a_knob"):
        compose_config(["strategy.not_a_knob=1"])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["crypto=ckks", "crypto.poly_modulus_degree=4096", "crypto.coeff_mod_bit_sizes=[60,60]"], "crypto.coeff_mod_bit_sizes"),
        (["privacy=dp", "privacy.target_epsilon=-1"], "privacy.target_epsilon"),
        (["chain=anvil", "chain.data_chain_id=31338"], "chain.data_chain_id"),
    ],
)
def test_insecure_or_inconsistent_groups_are_rejected_at_load(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        compose_config(overrides)
    assert key in str(caught.value)


def test_ckks_with_automatic_parameters_composes() -> None:
    assert compose_config(["crypto=ckks"]).crypto.name == "ckks"


@pytest.mark.parametrize(
    ("overrides", "key", "hint"),
    [
        (["task=nosuch"], "task", "options: breast_cancer"),
        (["privacy=dpp"], "privacy", "did you mean 'dp'"),
        (["federation.num_round=3"], "federation.num_round", "did you mean 'federation.num_rounds'"),
        (["+federation.foo=3"], "federation.foo", "keys of federation"),
        (["federation.num_rounds=abc"], "federation.num_rounds", "could not be converted to Integer"),
        (["federation.evaluate_every=0"], "federation.evaluate_every", "must be >= 1"),
        (["federation.evaluate_every=-1"], "federation.evaluate_every", "must be >= 1"),
        (["federation.min_sites=9"], "federation.min_sites", "at most task.num_sites=4"),
        (["privacy=dp", "privacy.target_epsilon=1e-6"], "privacy.target_epsilon", "at least 0.1"),
    ],
)
def test_a_bad_override_is_one_config_error_naming_the_key_and_the_fix(overrides, key, hint) -> None:
    from medtwin.core.errors import ConfigError

    with pytest.raises(ConfigError) as raised:
        compose_config(overrides)
    assert raised.value.key == key and hint in str(raised.value)
    assert "\n" not in str(raised.value)


def test_the_cli_prints_one_line_not_a_hydra_traceback() -> None:
    from typer.testing import CliRunner

    from medtwin.experiments.cli import app

    result = CliRunner().invoke(app, ["run", "federation.num_round=3"])
    assert result.exit_code == 2
    assert "config key `federation.num_round`" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 3, result.output


def test_keys_of_list_items_and_sweeps_are_understood() -> None:
    from medtwin.core.config.compose import check_override

    check_override("task.csv.features.0.min=0")  # a list of column schemas, by index
    with pytest.raises(ConfigError, match="did you mean 'task.csv.features.0.name'"):
        check_override("task.csv.features.0.nme=age")
    with pytest.raises(ConfigError, match="multirun"):
        check_override("task=breast_cancer,fed_heart_disease")
