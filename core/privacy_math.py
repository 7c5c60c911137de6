"""Privacy accounting maths for DP-SGD, pure numpy/scipy (no torch): RDP of the sampled Gaussian.

DP-SGD with Poisson sampling is the *sampled Gaussian mechanism* (SGM) repeated once per optimizer
step: each example joins a batch with probability `sample_rate`, per-example gradients are clipped to
norm C and Gaussian noise of std `noise_multiplier * C` is added. Its Rényi-DP at order alpha follows
Mironov, Talwar & Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism" (2019, §3.3);
RDP composes by addition over steps, and converts to (epsilon, delta)-DP with Balle et al. (2020,
Thm. 21). With the same orders this matches Opacus's `RDPAccountant` (a unit test checks it).

Why a torch-free copy exists: importing anything under `opacus` imports torch, and the coordinator,
planning tools and tests want epsilon in milliseconds. The PRV accountant (tighter) is available at
sites through `medtwin.client.privacy.accounting`, which wraps Opacus.

An accountant *history* is Opacus's format: a sequence of `(noise_multiplier, sample_rate, steps)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from scipy import special

from .errors import ConfigError, MedtwinError

__all__ = [
    "ACCOUNTANTS",
    "RDP_ORDERS",
    "HistoryEntry",
    "PrivacyBudgetUnreachableError",
    "bisect_noise_multiplier",
    "bracket_noise_multiplier",
    "calibrate_noise_multiplier",
    "epsilon_after",
    "expected_units_per_step",
    "merge_history",
    "planned_total_steps",
    "rdp_epsilon",
    "rdp_epsilon_floor",
    "rdp_sampled_gaussian",
    "rdp_to_epsilon",
    "sample_rate_for",
    "units_per_step",
]

ACCOUNTANTS = ("rdp", "prv")
# Opacus's default orders, so both implementations pick the same optimum.
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)])
MAX_NOISE_MULTIPLIER = 1e4  # std 10^4 * C per step: no useful training is that noisy
_SERIES_CUTOFF_LOG = -30.0  # stop the fractional-order series once both terms fall below e^-30

_UNREACHABLE_FIX = (
    "raise privacy.target_epsilon or privacy.target_delta, or train fewer steps "
    "(federation.num_rounds, strategy.local_steps) or smaller batches (strategy.batch_size)"
)

HistoryEntry = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)


class PrivacyBudgetUnreachableError(MedtwinError):
    """No noise multiplier reaches the requested (epsilon, delta) with these steps."""


def sample_rate_for(*, batch_size: int, num_train: int) -> float:
    """Poisson sampling rate q = expected batch size / dataset size (capped at 1)."""
    if num_train < 1:
        raise ValueError(f"num_train must be >= 1, got {num_train}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return min(1.0, batch_size / num_train)


def units_per_step(*, batch_size: int, unit_rows: int, grouped: bool) -> int:
    """Expected privacy units per DP step: `batch_size` rows, or for rows grouped by patient,
    `batch_size / unit_rows` patients (each contributing up to `unit_rows` rows). A site's plan, its
    training and the coordinator's noise floor (`medtwin.core.he.precision`) all use this rule."""
    if unit_rows < 1:
        raise ValueError(f"unit_rows must be >= 1, got {unit_rows}")
    return max(1, round(batch_size / unit_rows)) if grouped else batch_size


def expected_units_per_step(*, sample_rate: float, num_units: int) -> int:
    """E[units in a Poisson batch], as DP-SGD divides the noised sum by it (at least 1)."""
    return max(1, round(sample_rate * num_units))


def planned_total_steps(*, num_rounds: int, local_steps: int) -> int:
    """Every optimizer step a site takes if it trains in every round of the run."""
    return int(num_rounds) * int(local_steps)


def merge_history(history: Iterable[Sequence[float]]) -> list[HistoryEntry]:
    """Sum the steps of entries with the same (noise_multiplier, sample_rate); drop zero-step ones.

    Composition is commutative, so the merged history has exactly the same epsilon and is much
    cheaper for the PRV accountant (one discretised PRV per distinct pair, not per round).
    """
    totals: dict[tuple[float, float], int] = {}
    for noise_multiplier, sample_rate, steps in history:
        if int(steps) <= 0:
            continue
        key = (float(noise_multiplier), float(sample_rate))
        totals[key] = totals.get(key, 0) + int(steps)
    return [(sigma, q, steps) for (sigma, q), steps in totals.items()]


# ---------------------------------------------------------------- RDP of the sampled Gaussian


def _log_add(log_x: float, log_y: float) -> float:
    """log(e^x + e^y) without overflow."""
    if log_x == -math.inf:
        return log_y
    if log_y == -math.inf:
        return log_x
    high, low = max(log_x, log_y), min(log_x, log_y)
    return high + math.log1p(math.exp(low - high))


def _log_sub(log_x: float, log_y: float) -> float:
    """log(e^x - e^y) for x >= y (the series' partial sums stay positive)."""
    if log_y == -math.inf:
        return log_x
    if log_x <= log_y:
        return -math.inf
    try:
        return log_x + math.log(-math.expm1(log_y - log_x))
    except ValueError:  # e^(y - x) rounds to 1
        return -math.inf


def _log_erfc(x: float) -> float:
    return math.log(2.0) + float(special.log_ndtr(-x * math.sqrt(2.0)))


def _log_moment_integer(sample_rate: float, sigma: float, alpha: int) -> float:
    """log A_alpha for integer alpha: a binomial expansion, summed in log space."""
    i = np.arange(alpha + 1, dtype=np.float64)
    log_binomial = special.gammaln(alpha + 1) - special.gammaln(i + 1) - special.gammaln(alpha - i + 1)
    terms = (
        log_binomial
        + i * math.log(sample_rate)
        + (alpha - i) * math.log1p(-sample_rate)
        + (i * i - i) / (2.0 * sigma**2)
    )
    return float(special.logsumexp(terms))


def _log_moment_fractional(sample_rate: float, sigma: float, alpha: float) -> float:
    """log A_alpha for fractional alpha: the two erfc-weighted series split at z0 (MTZ19 §3.3)."""
    log_lower, log_upper = -math.inf, -math.inf
    z0 = sigma**2 * math.log(1.0 / sample_rate - 1.0) + 0.5
    log_q, log_1mq = math.log(sample_rate), math.log1p(-sample_rate)
    i = 0
    while True:
        coefficient = special.binom(alpha, i)
        log_coefficient = math.log(abs(coefficient))
        j = alpha - i
        lower = (
            log_coefficient
            + i * log_q
            + j * log_1mq
            + (i * i - i) / (2.0 * sigma**2)
            + math.log(0.5)
            + _log_erfc((i - z0) / (math.sqrt(2.0) * sigma))
        )
        upper = (
            log_coefficient
            + j * log_q
            + i * log_1mq
            + (j * j - j) / (2.0 * sigma**2)
            + math.log(0.5)
            + _log_erfc((z0 - j) / (math.sqrt(2.0) * sigma))
        )
        if coefficient > 0:
            log_lower, log_upper = _log_add(log_lower, lower), _log_add(log_upper, upper)
        else:
            log_lower, log_upper = _log_sub(log_lower, lower), _log_sub(log_upper, upper)
        i += 1
        if max(lower, upper) < _SERIES_CUTOFF_LOG:
            return _log_add(log_lower, log_upper)


def _rdp_one_step(sample_rate: float, sigma: float, alpha: float) -> float:
    if sample_rate == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    if sample_rate == 1.0:
        return alpha / (2.0 * sigma**2)
    if float(alpha).is_integer():
        return _log_moment_integer(sample_rate, sigma, int(alpha)) / (alpha - 1)
    return _log_moment_fractional(sample_rate, sigma, alpha) / (alpha - 1)


def rdp_sampled_gaussian(
    *, noise_multiplier: float, sample_rate: float, steps: int, orders: Sequence[float] = RDP_ORDERS
) -> np.ndarray:
    """RDP (one value per order) of `steps` compositions of the sampled Gaussian mechanism."""
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if not 0 <= sample_rate <= 1:
        raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate}")
    per_step = np.array([_rdp_one_step(sample_rate, noise_multiplier, alpha) for alpha in orders], dtype=np.float64)
    return per_step * steps


def rdp_to_epsilon(*, rdp: np.ndarray, orders: Sequence[float], target_delta: float) -> tuple[float, float]:
    """Best (epsilon, order) for `target_delta` (Balle et al. 2020, Thm. 21)."""
    alphas = np.asarray(orders, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        epsilons = rdp - (math.log(target_delta) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)
    if np.isnan(epsilons).all():
        return math.inf, math.nan
    best = int(np.nanargmin(epsilons))
    return float(epsilons[best]), float(alphas[best])


def rdp_epsilon(
    *, history: Iterable[Sequence[float]], target_delta: float, orders: Sequence[float] = RDP_ORDERS
) -> float:
    """Epsilon at `target_delta` of a whole accountant history, composed with RDP."""
    merged = merge_history(history)
    if not merged:
        return 0.0
    total = sum(
        rdp_sampled_gaussian(noise_multiplier=sigma, sample_rate=q, steps=steps, orders=orders)
        for sigma, q, steps in merged
    )
    return rdp_to_epsilon(rdp=total, orders=orders, target_delta=target_delta)[0]


def rdp_epsilon_floor(*, target_delta: float, orders: Sequence[float] = RDP_ORDERS) -> float:
    """The smallest epsilon the RDP conversion can certify at `target_delta`, even with infinite noise."""
    return rdp_to_epsilon(rdp=np.zeros(len(orders)), orders=orders, target_delta=target_delta)[0]


# ---------------------------------------------------------------- epsilon and calibration


def _require_pure_accountant(accountant: str) -> None:
    if accountant == "rdp":
        return
    if accountant == "prv":
        raise ConfigError(
            "privacy.accountant",
            "the PRV accountant needs Opacus (and so torch); medtwin.core.privacy_math is torch-free",
            "call medtwin.client.privacy.epsilon_after / calibrate_noise_multiplier, which support 'prv'",
        )
    raise ConfigError("privacy.accountant", f"unknown accountant {accountant!r}", f"use one of {ACCOUNTANTS}")


def epsilon_after(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    target_delta: float,
    accountant: str = "rdp",
    history: Iterable[Sequence[float]] = (),
) -> float:
    """Epsilon spent after `history` plus `steps` more steps at (noise_multiplier, sample_rate)."""
    _require_pure_accountant(accountant)
    return rdp_epsilon(history=[*history, (noise_multiplier, sample_rate, steps)], target_delta=target_delta)


def bracket_noise_multiplier(epsilon_for: Callable[[float], float], *, target_epsilon: float) -> tuple[float, float, float]:
    """(sigma_low, sigma_high, epsilon_for(sigma_high)): epsilon_for(sigma_low) > target_epsilon >=
    epsilon_for(sigma_high), by doubling from 1 (sigma_low is 0 when 1 already meets the target).
    Raises `PrivacyBudgetUnreachableError` past MAX_NOISE_MULTIPLIER."""
    if target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    sigma_low, sigma_high = 0.0, 1.0
    epsilon_high = epsilon_for(sigma_high)
    while epsilon_high > target_epsilon:
        sigma_low, sigma_high = sigma_high, 2.0 * sigma_high
        if sigma_high > MAX_NOISE_MULTIPLIER:
            raise PrivacyBudgetUnreachableError(
                f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} reaches epsilon {target_epsilon}; "
                + _UNREACHABLE_FIX
            )
        epsilon_high = epsilon_for(sigma_high)
    return sigma_low, sigma_high, epsilon_high


def bisect_noise_multiplier(
    epsilon_for: Callable[[float], float], *, target_epsilon: float, epsilon_tolerance: float = 0.01
) -> float:
    """Smallest noise multiplier (to `epsilon_tolerance`) whose epsilon is <= `target_epsilon`.

    `epsilon_for(sigma)` must decrease with sigma. The result always satisfies the target; it
    overshoots the privacy (undershoots epsilon) by at most `epsilon_tolerance`.
    """
    sigma_low, sigma_high, epsilon_high = bracket_noise_multiplier(epsilon_for, target_epsilon=target_epsilon)
    for _ in range(200):
        if target_epsilon - epsilon_high <= epsilon_tolerance:
            break
        sigma_mid = 0.5 * (sigma_low + sigma_high)
        epsilon_mid = epsilon_for(sigma_mid)
        if epsilon_mid <= target_epsilon:
            sigma_high, epsilon_high = sigma_mid, epsilon_mid
        else:
            sigma_low = sigma_mid
    return sigma_high


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """Noise multiplier so that ALL planned steps of the run (num_rounds * local_steps) stay within
    (target_epsilon, target_delta) — calibrated for the whole participation, not per round."""
    _require_pure_accountant(accountant)
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    floor = rdp_epsilon_floor(target_delta=target_delta)
    if target_epsilon <= floor + epsilon_tolerance:
        raise PrivacyBudgetUnreachableError(
            f"epsilon {target_epsilon} at delta {target_delta} is below what RDP accounting can certify "
            f"(about {floor:.3f} even with infinite noise); {_UNREACHABLE_FIX}"
        )

    def epsilon_for(sigma: float) -> float:
        return rdp_epsilon(history=[(sigma, sample_rate, total_steps)], target_delta=target_delta)

    return bisect_noise_multiplier(epsilon_for, target_epsilon=target_epsilon, epsilon_tolerance=epsilon_tolerance)
