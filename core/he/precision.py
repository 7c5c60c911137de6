"""CKKS precision from the DP noise: under DP-SGD the HE error only has to hide under the noise.

The quantity both errors land on is the *averaged update* a site decrypts, sum_i n_i w_i / sum_i n_i.
With plain SGD (no momentum) and a loss with no learning signal, site i's update after K local steps
carries exactly the noise Opacus adds (dp_training.py: N(0, (sigma_i C)^2) per coordinate, divided by
the expected batch E[B_i], times the learning rate lr), propagated through the FedProx pull
(1 - lr mu) per step:

    s_i = lr * sigma_i * C / E[B_i] * sqrt(sum_{j<K} (1 - lr mu)^(2j))          (mu = 0: sqrt(K))

and the average carries sum_i (n_i / N) xi_i with independent xi_i, whose std
sqrt(sum_i (n_i/N)^2 s_i^2) >= min_i s_i * sqrt(sum_i (n_i/N)^2) >= min_i s_i / sqrt(k) for k sites
(Cauchy-Schwarz: the weights sum to 1). A LOWER bound on min_i s_i that holds for every site the
run admits:

* E[B_i] <= units per step u (a site smaller than u trains on all its units, so E[B_i] < u);
* sigma_i is calibrated by each site for the whole run (num_rounds * K steps) at its own sample rate
  q_i = u / units_i; the sigma that (epsilon, delta) needs grows with q, and units_i <= rows_i <=
  crypto.max_total_examples, so sigma_i >= the exact sigma at q = u / max_total_examples, which the
  RDP accountant brackets from below (`noise_multiplier_floor`).

The bound is of the noise the DP mechanism injects; a loss's own curvature can damp it like the
FedProx term does (slightly, at the small learning rates DP recipes use). Where the update is not
linear in the noise — Adam divides by its running noise estimate — or the accountant is not the
torch-free RDP one (PRV needs less noise than RDP certifies, so an RDP-derived sigma could
overestimate it), no bound is claimed and the configured target stays (`derived_from` "config",
with the reason). The HE error target is then HE_ERROR_TO_NOISE (1 %) of that std, relative to
`crypto.max_abs_weight_bound` as `crypto.max_relative_error` is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..privacy_math import bracket_noise_multiplier, planned_total_steps, rdp_epsilon, sample_rate_for, units_per_step
from .params import DEFAULT_MAX_RELATIVE_ERROR, CkksParameters, ckks_parameters_from_config

if TYPE_CHECKING:
    from ..config import MedtwinConfig
    from ..config.privacy import PrivacyConfig
    from ..config.strategy import StrategyConfig

__all__ = [
    "DEFAULT_MAX_RELATIVE_ERROR",
    "HE_ERROR_TO_NOISE",
    "DpNoiseFloor",
    "HePrecision",
    "averaged_update_noise_std",
    "he_precision_for",
    "he_precision_of_run",
    "noise_accumulation",
    "noise_multiplier_floor",
    "per_site_noise_std",
    "run_ckks_parameters",
    "site_precision_problem",
]

HE_ERROR_TO_NOISE = 0.01  # the HE error bound on the average may be at most this fraction of the DP noise std
# From round 2 a site checks the rounding at the run's real totals. Full scale is set from the sites'
# declared rows (crypto.max_total_examples: 0 = twice them) and sites drop out, so an honest run's real
# totals sit below full scale: a site refuses only rounding this many times its full-scale allowance,
# which catches an inflated max_total_examples (measured 26x the noise for 2e6x) and not a missing site.
REAL_TOTALS_SLACK = 10.0
MAX_DERIVED_RELATIVE_ERROR = 1e-2  # very noisy runs: no coarser (the smallest prime the chooser takes, 20 bits, is reached first)
_SIGMA_RELATIVE_PRECISION = 1e-3  # bracket width of the sigma floor


@dataclass(frozen=True)
class DpNoiseFloor:
    """Lower bound on the per-coordinate std of the DP noise on the averaged update, or why there is none."""

    std: float | None
    reason: str


@dataclass(frozen=True)
class HePrecision:
    """The run's CKKS precision target and where it comes from (recorded in summary.json and on the chain)."""

    derived_from: str  # "dp": 1 % of the DP noise floor; "config": crypto.max_relative_error (or its default)
    max_relative_error: float
    dp_noise_std: float | None  # the floor, in weight units; None without DP or without a sound bound
    reason: str

    def record(self, params: CkksParameters) -> dict[str, Any]:
        """What the chosen parameters deliver against the target: absolute bound on an averaged weight at
        full scale (sum n_i = crypto.max_total_examples) and its ratio to the DP noise floor."""
        bound_abs = params.predicted_error_bound * params.max_abs_weight_bound
        return {
            "derived_from": self.derived_from,
            "dp_noise_std": self.dp_noise_std,
            "max_relative_error": self.max_relative_error,
            "bound_abs": bound_abs,
            "ratio_to_noise": bound_abs / self.dp_noise_std if self.dp_noise_std else None,
            "reason": self.reason,
        }


def noise_accumulation(*, local_steps: int, learning_rate: float, proximal_mu: float) -> float:
    """Variance multiplier of K steps' independent noises under the FedProx pull: sum_{j<K} (1 - lr mu)^(2j)."""
    contraction = (1.0 - learning_rate * proximal_mu) ** 2
    return float(local_steps) if contraction == 1.0 else (1.0 - contraction**local_steps) / (1.0 - contraction)


def noise_multiplier_floor(*, target_epsilon: float, target_delta: float, sample_rate: float, total_steps: int) -> float:
    """A sigma whose RDP epsilon still EXCEEDS the target: every sigma meeting (epsilon, delta) is larger.

    Sites calibrate by bisection and keep the upper end (epsilon <= target); this keeps the lower end
    of a tighter bracket, so it never overestimates what any site uses at this sample rate. An
    unreachable target raises `PrivacyBudgetUnreachableError`, as a site's calibration would.
    """

    def epsilon_for(sigma: float) -> float:
        return rdp_epsilon(history=[(sigma, sample_rate, total_steps)], target_delta=target_delta)

    low, high, _ = bracket_noise_multiplier(epsilon_for, target_epsilon=target_epsilon)
    while high - low > _SIGMA_RELATIVE_PRECISION * high:
        middle = 0.5 * (low + high)
        if epsilon_for(middle) > target_epsilon:
            low = middle
        else:
            high = middle
    return low


def per_site_noise_std(
    *, learning_rate: float, noise_multiplier: float, max_grad_norm: float, units_per_step: int, local_steps: int, proximal_mu: float
) -> float:
    """Std of the DP noise per coordinate of one site's update: lr sigma C / E[B] per step, K steps under the FedProx pull."""
    accumulated = noise_accumulation(local_steps=local_steps, learning_rate=learning_rate, proximal_mu=proximal_mu)
    return learning_rate * noise_multiplier * max_grad_norm / units_per_step * math.sqrt(accumulated)


def averaged_update_noise_std(
    *,
    privacy: PrivacyConfig,
    strategy: StrategyConfig,
    num_rounds: int,
    max_total_examples: int,
    num_sites: int,
    grouped_by_patient: bool,
) -> DpNoiseFloor:
    """Lower bound on the DP noise std per coordinate of the averaged update, for every site the run admits."""
    if privacy.name != "dp":
        return DpNoiseFloor(None, f"privacy.name={privacy.name!r}: no DP noise")
    if strategy.optimizer != "sgd":
        return DpNoiseFloor(
            None, f"strategy.optimizer={strategy.optimizer!r}: its step is not linear in the noise, no sound bound"
        )
    if privacy.accountant != "rdp":
        return DpNoiseFloor(
            None, f"privacy.accountant={privacy.accountant!r}: sites may need less noise than RDP certifies, no sound bound"
        )
    units = units_per_step(batch_size=strategy.batch_size, unit_rows=privacy.unit_rows, grouped=grouped_by_patient)
    sigma = noise_multiplier_floor(
        target_epsilon=privacy.target_epsilon,
        target_delta=privacy.target_delta,
        sample_rate=sample_rate_for(batch_size=units, num_train=max_total_examples),
        total_steps=planned_total_steps(num_rounds=num_rounds, local_steps=strategy.local_steps),
    )
    mu = strategy.proximal_mu if strategy.name == "fedprox" else 0.0
    steps = strategy.local_steps
    per_site = per_site_noise_std(
        learning_rate=strategy.learning_rate, noise_multiplier=sigma, max_grad_norm=privacy.max_grad_norm,
        units_per_step=units, local_steps=steps, proximal_mu=mu,
    )  # fmt: skip
    std = per_site / math.sqrt(num_sites)
    accumulated = noise_accumulation(local_steps=steps, learning_rate=strategy.learning_rate, proximal_mu=mu)
    reason = (
        f"plain SGD: lr {strategy.learning_rate:g} x sigma >= {sigma:.4g} (RDP, sample rate {units}/{max_total_examples}, "
        f"{num_rounds}x{steps} steps) x C {privacy.max_grad_norm:g} / {units} units per step x sqrt({accumulated:.4g}) "
        f"/ sqrt({num_sites} sites)"
    )
    return DpNoiseFloor(std, reason)


def he_precision_for(
    *,
    configured_max_relative_error: float,
    max_abs_weight_bound: float,
    noise: DpNoiseFloor,
) -> HePrecision:
    """The run's precision target. `configured_max_relative_error` 0 = automatic (the shipped default).

    With a noise floor, 1 % of it replaces the automatic default in either direction (coarser when the
    noise is large: fewer bits; finer when it is small); an explicit target wins only where it is
    finer than that. min(configured, derived) could never loosen the default, which is the point.
    """
    explicit = configured_max_relative_error > 0
    configured = configured_max_relative_error if explicit else DEFAULT_MAX_RELATIVE_ERROR
    source = "crypto.max_relative_error" if explicit else f"default {DEFAULT_MAX_RELATIVE_ERROR:g}"
    if noise.std is None:
        return HePrecision("config", configured, None, f"{source}; {noise.reason}")
    derived = min(HE_ERROR_TO_NOISE * noise.std / max_abs_weight_bound, MAX_DERIVED_RELATIVE_ERROR)
    if explicit and configured < derived:
        return HePrecision("config", configured, noise.std, f"{source} is finer than 1% of the DP noise ({derived:.3g})")
    return HePrecision("dp", derived, noise.std, f"1% of the DP noise floor: {noise.reason}")


def he_precision_of_run(
    config: MedtwinConfig, *, num_sites: int, max_total_examples: int, grouped_by_patient: bool
) -> HePrecision:
    """`he_precision_for` of a composed run config: what key generation, validation and the summary share."""
    noise = averaged_update_noise_std(
        privacy=config.privacy,
        strategy=config.strategy,
        num_rounds=config.federation.num_rounds,
        max_total_examples=max_total_examples,
        num_sites=num_sites,
        grouped_by_patient=grouped_by_patient,
    )
    return he_precision_for(
        configured_max_relative_error=config.crypto.max_relative_error,
        max_abs_weight_bound=config.crypto.max_abs_weight_bound,
        noise=noise,
    )


def run_ckks_parameters(
    config: MedtwinConfig, *, num_parameters: int, num_sites: int, max_total_examples: int, grouped_by_patient: bool
) -> tuple[CkksParameters, HePrecision]:
    """The CKKS parameters of a run — `crypto` with its full scale `max_total_examples`, at the run's precision
    target — and that target (`he_precision_of_run`): what config validation, the simulation and `site keygen` choose."""
    crypto = replace(config.crypto, max_total_examples=max_total_examples)
    precision = he_precision_of_run(
        config, num_sites=num_sites, max_total_examples=max_total_examples, grouped_by_patient=grouped_by_patient
    )
    parameters = ckks_parameters_from_config(
        crypto, num_parameters=num_parameters, num_sites=num_sites, max_relative_error=precision.max_relative_error
    )
    return parameters, precision


def site_precision_problem(
    params: CkksParameters,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    learning_rate: float,
    local_steps: int,
    proximal_mu: float,
    observed: tuple[float, int] | None = None,
) -> str:
    """A site's own check of the key set's precision against ITS noise (plain SGD only); "" when fine.

    The site's noise on the average is at least s_i / sqrt(k) for k participants (its weight n_i / N is
    unknown to it; the run-wide floor is the same expression with the smallest sigma any site can have).
    The rounding may be at most 1 % of that, or the shipped default (1e-5 of full scale) — finer is
    harmless; coarser than both would let a coordinator spend the run's utility on rounding. Without
    `observed` the rounding is the key set's at its full scale (crypto.max_total_examples, num_sites);
    with `observed` = (error bound on the average at the run's real totals, real participants) — what a
    site knows from round 2 — it is that, allowed REAL_TOTALS_SLACK times more: full scale is the
    coordinator's claim, the totals are signed, and honest totals sit below full scale.
    """
    per_site = per_site_noise_std(
        learning_rate=learning_rate, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        units_per_step=expected_batch_size, local_steps=local_steps, proximal_mu=proximal_mu,
    )  # fmt: skip
    bound_abs, sites = observed if observed is not None else (params.predicted_error_bound * params.max_abs_weight_bound, 0)
    own_floor = per_site / math.sqrt(max(params.num_sites, sites))
    allowed = max(HE_ERROR_TO_NOISE * own_floor, DEFAULT_MAX_RELATIVE_ERROR * params.max_abs_weight_bound)
    if observed is not None:
        allowed *= REAL_TOTALS_SLACK
    if bound_abs <= allowed:
        return ""
    where = "at the run's real totals" if observed is not None else "at the key set's full scale"
    return (
        f"the run's CKKS key set rounds an averaged weight by up to {bound_abs:.3g} {where}, over 1% of this site's DP noise "
        f"on the average ({own_floor:.3g}) and over the default precision ({DEFAULT_MAX_RELATIVE_ERROR:g} x "
        f"{params.max_abs_weight_bound:g}): the coordinator should generate keys for crypto.max_relative_error "
        f"<= {HE_ERROR_TO_NOISE * own_floor / params.max_abs_weight_bound:.3g} (or 0 to derive it)"
    )
