"""Epsilon and noise calibration with Opacus's own accountants (RDP or PRV).

`medtwin.core.privacy_math` holds the torch-free RDP maths; this module is the site-side wrapper
that also offers the tighter PRV accountant (Gopi et al. 2021), which lives inside Opacus and so
imports torch. Accountant state never lives in an Opacus object across rounds — a new
PrivacyEngine per round would forget it — it is rebuilt here from the ledger's history.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from medtwin.core.errors import ConfigError
from medtwin.core.privacy_math import (
    ACCOUNTANTS,
    MAX_NOISE_MULTIPLIER,
    PrivacyBudgetUnreachableError,
    bisect_noise_multiplier,
    merge_history,
    rdp_epsilon_floor,
)
from medtwin.core.rundir import atomic_write_text
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis

__all__ = ["calibrate_noise_multiplier", "calibrate_noise_multiplier_stored", "epsilon_after", "history_epsilon"]


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ConfigError("privacy.accountant", f"unknown accountant {accountant!r}", f"use one of {ACCOUNTANTS}")


@lru_cache(maxsize=1024)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Opacus's RDP of one step at each of its default orders. `compute_rdp(steps=k)` is exactly this
    times k, so one evaluation serves every history with this (noise, rate): a round's calibration
    check, its reservation and its receipt. Each costs ~0.2-0.5 s of pure Python (the fractional orders)."""
    rdp = np.asarray(
        rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS),
        dtype=np.float64,
    )  # fmt: skip
    rdp.setflags(write=False)
    return rdp


def history_epsilon(*, history: Iterable[Sequence[float]], target_delta: float, accountant: str = "rdp") -> float:
    """Epsilon at `target_delta` of a history of `(noise_multiplier, sample_rate, steps)` entries."""
    _check_accountant(accountant)
    merged = merge_history(history)
    if not merged:
        return 0.0
    if accountant == "rdp":  # RDPAccountant.get_privacy_spent's sum, with each (noise, rate)'s RDP computed once
        rdp = sum([_rdp_of_one_step(float(sigma), float(rate)) * steps for sigma, rate, steps in merged])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            epsilon, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=target_delta)
        return float(epsilon)
    opacus_accountant = create_accountant(mechanism=accountant)
    opacus_accountant.history = merged
    with warnings.catch_warnings():
        # RDP warns when the best order is the largest one: harmless (the bound is still valid).
        warnings.simplefilter("ignore", UserWarning)
        return float(opacus_accountant.get_epsilon(delta=target_delta))


def epsilon_after(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    target_delta: float,
    accountant: str = "rdp",
    history: Iterable[Sequence[float]] = (),
) -> float:
    """Epsilon once `steps` more steps at (noise_multiplier, sample_rate) follow `history`."""
    return history_epsilon(
        history=[*history, (noise_multiplier, sample_rate, steps)], target_delta=target_delta, accountant=accountant
    )


@lru_cache(maxsize=256)
def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """Noise multiplier so the run's ALL planned steps (num_rounds * local_steps at `sample_rate`)
    spend at most `target_epsilon` at `target_delta`. Deterministic, so every round of a run (and
    every restart) gets the same value."""
    _check_accountant(accountant)
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if accountant == "rdp" and target_epsilon <= rdp_epsilon_floor(target_delta=target_delta) + epsilon_tolerance:
        raise PrivacyBudgetUnreachableError(
            f"epsilon {target_epsilon} at delta {target_delta} is below what RDP accounting can certify even with "
            "infinite noise; raise privacy.target_epsilon or privacy.target_delta, or use privacy.accountant=prv"
        )

    def epsilon_for(sigma: float) -> float:
        return history_epsilon(
            history=[(sigma, sample_rate, total_steps)], target_delta=target_delta, accountant=accountant
        )

    return bisect_noise_multiplier(epsilon_for, target_epsilon=target_epsilon, epsilon_tolerance=epsilon_tolerance)


_CALIBRATED: dict[str, float] = {}
MIN_STORED_NOISE = 0.05  # below this no useful epsilon exists; a stored value this small is damage


def calibrate_noise_multiplier_stored(path: Path, **parameters: object) -> float:
    """`calibrate_noise_multiplier`, remembered in a JSON file at the site (e.g. beside its ledger).

    Deployed, every message runs in a fresh process, so the in-process cache is empty each time and the
    bisection (~10 RDP evaluations, seconds on a busy machine) would run every round. A stored value is
    re-checked with one evaluation before use: a damaged or tampered file can cost accuracy, never privacy
    (a noise multiplier that misses the target is recomputed and replaced).
    """
    key = json.dumps(parameters, sort_keys=True)
    if key in _CALIBRATED:  # computed or checked in this process already
        return _CALIBRATED[key]
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        sigma = float(stored[key]) if isinstance(stored, dict) and key in stored else None
    except (OSError, ValueError, TypeError):
        stored, sigma = {}, None
    if sigma is not None and math.isfinite(sigma) and MIN_STORED_NOISE <= sigma <= MAX_NOISE_MULTIPLIER:
        try:
            epsilon = history_epsilon(
                history=[(sigma, parameters["sample_rate"], parameters["total_steps"])],
                target_delta=float(parameters["target_delta"]),  # type: ignore[arg-type]
                accountant=str(parameters.get("accountant", "rdp")),
            )
        except (ArithmeticError, ValueError, MemoryError):
            epsilon = math.inf  # not a value the accountant can check: recompute it
        if epsilon <= float(parameters["target_epsilon"]):  # type: ignore[arg-type]
            _CALIBRATED[key] = sigma
            return sigma
    sigma = _CALIBRATED[key] = calibrate_noise_multiplier(**parameters)  # type: ignore[arg-type]
    stored = stored if isinstance(stored, dict) else {}
    stored[key] = sigma
    try:
        atomic_write_text(path, json.dumps(stored, sort_keys=True, indent=1) + "\n", mode=0o600)
    except OSError:
        pass  # a read-only state folder only costs the next round the bisection again
    return sigma
