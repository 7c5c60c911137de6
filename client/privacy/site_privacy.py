"""Per-round privacy decisions for the ClientApp: plan (a cheap check), reserve (check + spend), train.

    plan = plan_round(policy=policy, ledger=ledger, run_id=run_id, round=server_round,
                      privacy_cfg=config.privacy, num_train=n, batch_size=b, local_steps=k, num_rounds=r)
    if not plan.allowed:            # or ensure_allowed(plan) to raise the typed error
        reply "refused", plan.reason
    try:
        epsilon = reserve_round(ledger=ledger, plan=plan)   # under the ledger lock, fsync'd BEFORE training
    except PrivacyError as refused:                          # replay, budget, damaged/rolled-back ledger
        reply "refused", str(refused)
    result = train_locally_dp(..., noise_multiplier=plan.noise_multiplier,
                              max_grad_norm=plan.max_grad_norm, ...)

`plan_round` reads the ledger without the lock, so two concurrent requests can both pass it;
`reserve_round` re-checks replay and both budgets under the lock, so only one of them trains.
The per-run limit caps the run's whole spend at this site: its training epsilon plus the epsilons
of its DP metric releases (`BudgetLedger.reserve_release`) — a run that releases metrics has that
much less left for training.
Both (and `BudgetLedger(...)` itself) raise a `LedgerCorruptedError` subclass when the ledger is
damaged, missing or rolled back: the site stops until an operator restores it.

The noise multiplier is calibrated for the site's WHOLE planned participation (num_rounds *
local_steps steps at its own sample rate), so every round of a run uses the same value, and a
site that trains in every round ends at (target_epsilon, target_delta).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from medtwin.core.config.privacy import PrivacyConfig
from medtwin.core.privacy_math import HistoryEntry, planned_total_steps, sample_rate_for

from .accounting import calibrate_noise_multiplier_stored, epsilon_after
from .errors import BudgetExceededError, PolicyRefusedError, RoundAlreadyTrainedError, RoundRefusedError
from .ledger import BudgetLedger
from .policy import PrivacyRequest, SitePolicy, check_request

__all__ = ["RoundPrivacyPlan", "ensure_allowed", "plan_round", "reserve_round"]

CALIBRATIONS_FILE = "noise-calibrations.json"  # beside the ledger: noise multipliers already calibrated here

_REFUSAL_ERRORS = {
    "policy": PolicyRefusedError,
    "budget": BudgetExceededError,
    "replay": RoundAlreadyTrainedError,
    "ledger": RoundRefusedError,
}


@dataclass(frozen=True)
class RoundPrivacyPlan:
    run_id: str
    round: int
    allowed: bool
    reason: str  # human-readable, for the log and the reply to the coordinator
    refusal: str  # "" when allowed, else "policy" | "budget" | "replay" | "ledger"
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    target_delta: float
    accountant: str
    epsilon_spent_before: float  # this run, at this site
    epsilon_after_round: float  # this run, once the planned steps are trained (as the ledger stood at planning)
    max_epsilon: float  # the per-run limit: the smaller of the site's max_epsilon and the run's target
    max_epsilon_name: str  # which of the two it is, for refusal messages
    max_total_epsilon: float  # the site's lifetime limit over all runs and releases
    uses_dp: bool = True  # False only for a run without DP at a site with require_dp=False


def plan_round(
    *,
    policy: SitePolicy,
    ledger: BudgetLedger,
    run_id: str,
    round: int,  # noqa: A002 - Flower's word
    privacy_cfg: PrivacyConfig,
    num_train: int,
    batch_size: int,
    local_steps: int,
    num_rounds: int,
) -> RoundPrivacyPlan:
    """Decide, before any training, whether this round may run and with which noise."""
    sample_rate = sample_rate_for(batch_size=batch_size, num_train=num_train)
    spent = ledger.spent(run_id)
    if privacy_cfg.target_epsilon < policy.max_epsilon:
        max_epsilon, max_epsilon_name = privacy_cfg.target_epsilon, "the run's privacy.target_epsilon"
    else:
        max_epsilon, max_epsilon_name = policy.max_epsilon, "max_epsilon"

    def plan(
        *, allowed: bool, reason: str, refusal: str = "", noise: float, epsilon: float, uses_dp: bool = True
    ) -> RoundPrivacyPlan:
        return RoundPrivacyPlan(
            run_id=run_id,
            round=int(round),
            allowed=allowed,
            reason=reason,
            refusal=refusal,
            noise_multiplier=noise,
            max_grad_norm=privacy_cfg.max_grad_norm,
            sample_rate=sample_rate,
            steps=local_steps,
            target_delta=privacy_cfg.target_delta,
            accountant=privacy_cfg.accountant,
            epsilon_spent_before=spent,
            epsilon_after_round=epsilon,
            max_epsilon=max_epsilon,
            max_epsilon_name=max_epsilon_name,
            max_total_epsilon=policy.max_total_epsilon,
            uses_dp=uses_dp,
        )

    if privacy_cfg.name != "dp":
        if not policy.require_dp:
            reason = f"the run asks for no DP (privacy.name={privacy_cfg.name!r}); this site allows it (require_dp)"
            return plan(allowed=True, reason=reason, noise=0.0, epsilon=math.inf, uses_dp=False)
        reason = (
            f"the run asks for no differential privacy (privacy.name={privacy_cfg.name!r}); "
            f"this site requires DP (require_dp) with max_epsilon {float(policy.max_epsilon)}"
        )
        return plan(allowed=False, reason=reason, refusal="policy", noise=0.0, epsilon=math.inf)

    noise_multiplier = calibrate_noise_multiplier_stored(
        ledger.path.with_name(CALIBRATIONS_FILE),
        target_epsilon=privacy_cfg.target_epsilon,
        target_delta=privacy_cfg.target_delta,
        sample_rate=sample_rate,
        total_steps=planned_total_steps(num_rounds=num_rounds, local_steps=local_steps),
        accountant=privacy_cfg.accountant,
        epsilon_tolerance=privacy_cfg.epsilon_tolerance,
    )
    request = PrivacyRequest(
        target_epsilon=privacy_cfg.target_epsilon,
        target_delta=privacy_cfg.target_delta,
        max_grad_norm=privacy_cfg.max_grad_norm,
        noise_multiplier=noise_multiplier,
    )
    decision = check_request(policy, request)
    if not decision.allowed:
        return plan(allowed=False, reason=decision.reason, refusal="policy", noise=noise_multiplier, epsilon=math.nan)
    if ledger.has_round(run_id, round):
        reason = (
            f"round {round} of run {run_id!r} is already in this site's ledger; training it again would spend "
            "privacy budget a second time (resend the update already produced instead)"
        )
        return plan(allowed=False, reason=reason, refusal="replay", noise=noise_multiplier, epsilon=spent)
    run = ledger.run(run_id)
    if run is not None and (run.accountant, run.delta) != (privacy_cfg.accountant, privacy_cfg.target_delta):
        reason = (
            f"run {run_id!r} was accounted with accountant {run.accountant!r} at delta {run.delta} at this site; "
            f"this round asks {privacy_cfg.accountant!r} at delta {privacy_cfg.target_delta} (a run cannot change them)"
        )
        return plan(allowed=False, reason=reason, refusal="ledger", noise=noise_multiplier, epsilon=spent)
    projected = epsilon_after(
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=local_steps,
        target_delta=privacy_cfg.target_delta,
        accountant=privacy_cfg.accountant,
        history=ledger.history(run_id),
    )
    refusal = ledger.budget_refusal(
        run_id,
        projected_epsilon=projected,
        max_epsilon=max_epsilon,
        max_total_epsilon=policy.max_total_epsilon,
        max_epsilon_name=max_epsilon_name,
    )
    if refusal is not None:
        return plan(allowed=False, reason=refusal, refusal="budget", noise=noise_multiplier, epsilon=projected)
    released = ledger.released(run_id)
    reason = f"{decision.reason}; run epsilon {spent:.4f} -> {projected:.4f} after this round"
    if released:
        reason += f" (+ {released:.4f} already spent on metric releases: {projected + released:.4f} of {max_epsilon:g})"
    return plan(allowed=True, reason=reason, noise=noise_multiplier, epsilon=projected)


def ensure_allowed(plan: RoundPrivacyPlan) -> None:
    """Raise the typed refusal (`BudgetExceededError`, `PolicyRefusedError`, ...) if not allowed."""
    if not plan.allowed:
        raise _REFUSAL_ERRORS.get(plan.refusal, RoundRefusedError)(plan.reason)


def reserve_round(*, ledger: BudgetLedger, plan: RoundPrivacyPlan) -> float:
    """Spend the round's privacy budget BEFORE training; returns the run's epsilon at this site afterwards.

    Under the ledger's exclusive lock it re-reads the ledger, refuses a round already recorded
    (`RoundAlreadyTrainedError`), recomputes epsilon from the run's history as it stands now,
    re-checks the per-run and lifetime limits (`BudgetExceededError`) and records the planned steps
    fsync'd. The spend counts even if training then crashes or is cut short (conservative).
    Any `PrivacyError` means: do not train, reply with its message. A run without DP at a site that
    allows it (plan.uses_dp False) records nothing and returns inf.
    """
    ensure_allowed(plan)
    if not plan.uses_dp:
        return math.inf
    steps = plan.steps

    def epsilon_for(history: Sequence[HistoryEntry]) -> float:
        return epsilon_after(
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=steps,
            target_delta=plan.target_delta,
            accountant=plan.accountant,
            history=history,
        )

    return ledger.reserve_round(
        plan.run_id,
        round=plan.round,
        steps=steps,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        delta=plan.target_delta,
        epsilon=epsilon_for,
        accountant=plan.accountant,
        max_epsilon=plan.max_epsilon,
        max_total_epsilon=plan.max_total_epsilon,
        max_epsilon_name=plan.max_epsilon_name,
    )
