"""Cross-field checks Hydra's types cannot express; each error names its config key."""

from __future__ import annotations

import math

from ..errors import ConfigError
from ..ids import ensure_id
from .chain import validate_chain_config
from .normalization import check_normalization
from .privacy import validate_privacy_config
from .root import MedtwinConfig
from .strategy import StrategyConfig

STRATEGIES = ("fedavg", "fedprox")
OPTIMIZERS = ("sgd", "adam")
SERVER_OPTIMIZERS = ("none", "adam", "yogi", "avgm")
PARTITION_SCHEMES = ("iid", "dirichlet", "quantity")


def validate_config(config: MedtwinConfig) -> None:
    if config.run_id:
        ensure_id(config.run_id, key="run_id")
    strategy = config.strategy
    if strategy.name not in STRATEGIES:
        raise ConfigError("strategy.name", f"unknown strategy {strategy.name!r}", f"use one of {STRATEGIES}")
    if strategy.optimizer not in OPTIMIZERS:
        raise ConfigError("strategy.optimizer", f"unknown optimizer {strategy.optimizer!r}", f"use one of {OPTIMIZERS}")
    if strategy.learning_rate <= 0:
        raise ConfigError("strategy.learning_rate", f"must be > 0, got {strategy.learning_rate}")
    if strategy.local_steps < 1:
        raise ConfigError("strategy.local_steps", f"must be >= 1, got {strategy.local_steps}")
    if strategy.batch_size < 1:
        raise ConfigError("strategy.batch_size", f"must be >= 1, got {strategy.batch_size}")
    if strategy.proximal_mu < 0:
        raise ConfigError("strategy.proximal_mu", f"must be >= 0, got {strategy.proximal_mu}")
    problem = server_optimizer_problem(strategy)
    if problem:
        raise ConfigError(*problem)
    if config.task.partition.scheme not in PARTITION_SCHEMES:
        raise ConfigError(
            "task.partition.scheme", f"unknown scheme {config.task.partition.scheme!r}", f"use one of {PARTITION_SCHEMES}"
        )
    if config.task.num_sites < 1:
        raise ConfigError("task.num_sites", f"must be >= 1, got {config.task.num_sites}")
    if not 0 < config.task.test_fraction < 1:
        raise ConfigError("task.test_fraction", f"must be in (0, 1), got {config.task.test_fraction}")
    if not 0 < config.task.decision_threshold < 1:
        raise ConfigError(
            "task.decision_threshold", f"must be in (0, 1) (a probability cut-off), got {config.task.decision_threshold}",
            "set e.g. task.decision_threshold=0.5",
        )
    federation = config.federation
    if federation.num_rounds < 1:
        raise ConfigError("federation.num_rounds", f"must be >= 1, got {federation.num_rounds}")
    if federation.round_timeout_s <= 0:
        raise ConfigError("federation.round_timeout_s", f"must be > 0, got {federation.round_timeout_s}")
    if federation.max_site_examples < 1:
        raise ConfigError("federation.max_site_examples", f"must be >= 1, got {federation.max_site_examples}")
    if federation.min_sites < 1:
        raise ConfigError("federation.min_sites", f"must be >= 1, got {federation.min_sites}")
    if federation.min_sites > config.task.num_sites:
        raise ConfigError(
            "federation.min_sites", f"is {federation.min_sites}, but the task has {config.task.num_sites} site(s): no round could close",
            f"lower federation.min_sites to at most task.num_sites={config.task.num_sites}",
        )
    if federation.evaluate_every < 1:
        raise ConfigError("federation.evaluate_every", f"must be >= 1 (evaluate every k rounds, and after the last), got {federation.evaluate_every}")
    validate_privacy_config(config.privacy)
    validate_chain_config(config.chain)
    validate_crypto(config)
    check_normalization(config)


def server_optimizer_problem(strategy: StrategyConfig) -> tuple[str, str, str] | None:
    """(config key, what is wrong, how to fix it) of the first bad server-optimiser setting, else None.
    Shared by config load and by a site reading a proposal (client/proposal.py)."""
    if strategy.server_optimizer not in SERVER_OPTIMIZERS:
        return (
            "strategy.server_optimizer", f"unknown server optimiser {strategy.server_optimizer!r}",
            f"use one of {SERVER_OPTIMIZERS} (or strategy=fedadam / fedyogi / fedavgm)",
        )  # fmt: skip
    checks = (
        ("server_learning_rate", 0.0 < strategy.server_learning_rate <= 10.0, "in (0, 10]"),
        ("server_momentum", 0.0 <= strategy.server_momentum < 1.0, "in [0, 1)"),
        ("beta_1", 0.0 <= strategy.beta_1 < 1.0, "in [0, 1)"),
        ("beta_2", 0.0 <= strategy.beta_2 < 1.0, "in [0, 1)"),
        ("tau", 0.0 < strategy.tau <= 1.0, "in (0, 1]"),
    )
    for key, holds, bounds in checks:
        value = getattr(strategy, key)
        if not (math.isfinite(value) and holds):
            return f"strategy.{key}", f"must be {bounds}, got {value}", f"set strategy.{key} within {bounds}"
    return None


def validate_crypto(config: MedtwinConfig) -> None:
    """Insecure (over the HomomorphicEncryption.org 128-bit table) or too-imprecise CKKS settings fail here."""
    if config.crypto.name == "plain":
        return
    if config.crypto.name != "ckks":
        raise ConfigError("crypto.name", f"unknown scheme {config.crypto.name!r}", "use plain or ckks")
    from ..he.precision import run_ckks_parameters
    from ..tasks import get_task

    # 0 = decided from the sites' sizes at key generation; check a generous bound
    max_total_examples = config.crypto.max_total_examples if config.crypto.max_total_examples > 0 else 10_000
    task = get_task(config.task)
    num_parameters = sum(parameter.numel() for parameter in task.build_model().state_dict().values())
    run_ckks_parameters(
        config, num_parameters=num_parameters, num_sites=config.task.num_sites, max_total_examples=max_total_examples,
        grouped_by_patient=task.groups_rows_by_patient,
    )  # fmt: skip
