"""Config-load check of `task.normalization`: the task must support it, and federated statistics
must fit one update and stay out of differentially private runs.

Why `federated` is refused with `privacy=dp`: the statistics phase sends each site's exact
per-feature sums (count, sum x, sum x^2 of its training rows) with no noise. Under `crypto=ckks`
the coordinator sees only their encrypted total, but every key-holding site can decrypt each
certified update it sums, and under `crypto=plain` the coordinator reads them too. Those sums are
not covered by a site's DP-SGD accounting (its ledger charges only the training steps), so a run
that promises DP must not release them; it keeps per-site normalisation, which releases nothing.
"""

from __future__ import annotations

from ..errors import ConfigError
from .root import MedtwinConfig

__all__ = ["NORMALIZATION_MODES", "STATISTICS_PER_FEATURE", "check_normalization"]

NORMALIZATION_MODES = ("site", "federated")
STATISTICS_PER_FEATURE = 3  # observed share, first and second moment (core/tasks/federated_statistics.py)


def check_normalization(config: MedtwinConfig) -> None:
    """Raise `ConfigError` naming `task.normalization` (or the schema key) when it cannot run.
    Shared by config load (validate.py) and by a site reading a proposal (client/proposal.py)."""
    mode = config.task.normalization
    if mode not in NORMALIZATION_MODES:
        raise ConfigError("task.normalization", f"unknown normalisation {mode!r}", f"use one of {NORMALIZATION_MODES}")
    if mode == "site":
        return
    from ..tasks import get_task

    task = get_task(config.task)
    if mode not in task.normalization_modes:
        raise ConfigError(
            "task.normalization", f"task {task.name!r} supports only {task.normalization_modes}, got {mode!r}",
            "set task.normalization=site (fed_heart_disease keeps FLamby's per-centre protocol; vitals forecasts "
            "on fixed reference scales)",
        )  # fmt: skip
    if config.privacy.name == "dp":
        raise ConfigError(
            "task.normalization", "federated normalisation releases each site's exact feature sums, which no site's "
            "DP accounting covers, and this run asks for privacy=dp",
            "set task.normalization=site for a differentially private run (or run without DP)",
        )  # fmt: skip
    num_features = task.feature_reference().num_features  # csv: raises naming the column without min/max
    num_parameters = sum(parameter.numel() for parameter in task.build_model().state_dict().values())
    if STATISTICS_PER_FEATURE * num_features > num_parameters:
        raise ConfigError(
            "task.normalization", f"the statistics of {num_features} features take {STATISTICS_PER_FEATURE * num_features} "
            f"values, more than the {num_parameters} parameters one update of this model holds",
            "use a model with a hidden layer (e.g. task.csv.hidden_units >= 1) or task.normalization=site",
        )  # fmt: skip
