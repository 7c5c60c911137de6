"""Schema of the `privacy/` config group (differential privacy at sites), and its checks.

These are the coordinator's *requested* DP settings for a run. Each site still checks them against
its own policy (from its SuperNode `node_config`), which always wins.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["ACCOUNTANTS", "GRAD_SAMPLE_MODES", "PRIVACY_MODES", "PrivacyConfig", "validate_privacy_config"]

PRIVACY_MODES = ("none", "dp")
ACCOUNTANTS = ("rdp", "prv")
GRAD_SAMPLE_MODES = ("bookkeeping", "ew", "hooks", "functorch")
MAX_UNIT_ROWS = 256  # rows one patient may put in one DP step (bounds the step's memory)


@dataclass
class PrivacyConfig:
    name: str = "none"  # none | dp
    # (epsilon, delta) for a site's WHOLE participation in the run (num_rounds * local_steps steps);
    # the noise multiplier is calibrated once for that total, not per round.
    target_epsilon: float = 1.0
    target_delta: float = 1e-5  # keep well below 1 / (examples at the smallest site)
    max_grad_norm: float = 1.0  # per-example L2 clipping norm C; noise std = noise_multiplier * C
    accountant: str = "rdp"  # rdp | prv (prv is tighter, needs Opacus at the site)
    # How each unit's gradient is clipped: bookkeeping (closed-form per-unit norms and one matmul per layer,
    # no per-example gradients; Linear and Conv1d models; fastest, experiments/bench_dp_step.py) | Opacus's
    # per-example gradients: ew (PyTorch ExpandedWeights) | hooks (supports more layer types) | functorch
    grad_sample_mode: str = "bookkeeping"
    secure_mode: bool = False  # Opacus noise robust to floating-point attacks (4 Gaussian draws per value)
    epsilon_tolerance: float = 0.01  # calibration stops within this much below target_epsilon
    # The privacy unit is the patient. When a patient owns many rows (the vitals twin's windows), a
    # sampled patient contributes up to unit_rows of them, averaged into ONE clipped gradient; a step
    # then samples strategy.batch_size / unit_rows patients on average. Utility only: the guarantee is
    # per patient whatever this is.
    unit_rows: int = 8


def validate_privacy_config(config: PrivacyConfig) -> None:
    """Check every field; raise one `ConfigError` naming the first bad `privacy.<key>`."""
    if config.name not in PRIVACY_MODES:
        raise ConfigError("privacy.name", f"unknown privacy mode {config.name!r}", f"use one of {PRIVACY_MODES}")
    if config.accountant not in ACCOUNTANTS:
        raise ConfigError(
            "privacy.accountant", f"unknown accountant {config.accountant!r}", f"use one of {ACCOUNTANTS}"
        )
    if config.grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ConfigError(
            "privacy.grad_sample_mode",
            f"unknown grad_sample_mode {config.grad_sample_mode!r}",
            f"use one of {GRAD_SAMPLE_MODES}",
        )
    if not config.target_epsilon > 0:
        raise ConfigError("privacy.target_epsilon", f"must be > 0, got {config.target_epsilon}")
    if not 0 < config.target_delta < 1:
        raise ConfigError(
            "privacy.target_delta", f"must be in (0, 1), got {config.target_delta}", "typical: 1e-5 (< 1/num_examples)"
        )
    if config.target_delta > 1e-3:
        raise ConfigError(
            "privacy.target_delta",
            f"{config.target_delta} is too large to be meaningful: delta bounds the chance of a total leak",
            "use <= 1e-3, typically 1e-5 (well below 1/num_examples at the smallest site)",
        )
    if not config.max_grad_norm > 0:
        raise ConfigError("privacy.max_grad_norm", f"must be > 0, got {config.max_grad_norm}")
    if config.epsilon_tolerance == PrivacyConfig.epsilon_tolerance and config.target_epsilon <= config.epsilon_tolerance:
        raise ConfigError(
            "privacy.target_epsilon",
            f"{config.target_epsilon:g} is below the calibration tolerance {config.epsilon_tolerance:g}: no noise level can be tuned to it",
            "use a target_epsilon of at least 0.1 (typical 1-10), or lower privacy.epsilon_tolerance below it",
        )
    if not 1 <= config.unit_rows <= MAX_UNIT_ROWS:
        raise ConfigError("privacy.unit_rows", f"must be in [1, {MAX_UNIT_ROWS}], got {config.unit_rows}")
    if not 0 < config.epsilon_tolerance < config.target_epsilon:
        raise ConfigError(
            "privacy.epsilon_tolerance",
            f"must be in (0, target_epsilon={config.target_epsilon}), got {config.epsilon_tolerance}",
        )
