"""Per-round privacy decisions for the ClientApp: plan before training, commit after.

    plan = plan_round(policy=policy, ledger=ledger, run_id=run_id, round=server_round,
                      privacy_cfg=config.privacy, num_train=n, batch_size=b, local_steps=k, num_rounds=r)
    if not plan.allowed:            # or ensure_allowed(plan) to raise the typed error
        reply "refused", plan.reason
    result = train_locally_dp(..., noise_multiplier=plan.noise_multiplier,
                              max_grad_norm=plan.max_grad_norm, ...)
    commit_round(ledger=ledger, plan=plan, steps_taken=result.steps)   # fsync'd BEFORE replying

The noise multiplier is calibrated for the site's WHOLE planned participation (num_rounds *
local_steps steps at its own sample rate), so every round of a run uses the same value, and a
site that trains in every round ends at (target_epsilon, target_delta).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from medtwin.core.config.privacy import PrivacyConfig
from medtwin.core.privacy_math import planned_total_steps, sample_rate_for

from .accounting import calibrate_noise_multiplier, epsilon_after
from .errors import BudgetExceededError, PolicyRefusedError, RoundAlreadyTrainedError, RoundRefusedError
from .ledger import BudgetLedger
from .policy import PrivacyRequest, SitePolicy, check_request

__all__ = ["RoundPrivacyPlan", "commit_round", "ensure_allowed", "plan_round"]

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
    epsilon_after_round: float  # this run, once the planned steps are trained


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

    def plan(*, allowed: bool, reason: str, refusal: str = "", noise: float, epsilon: float) -> RoundPrivacyPlan:
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
        )

    if privacy_cfg.name != "dp":
        reason = (
            f"the run asks for no differential privacy (privacy.name={privacy_cfg.name!r}); "
            f"this site requires DP with max_epsilon {float(policy.max_epsilon)}"
        )
        return plan(allowed=False, reason=reason, refusal="policy", noise=0.0, epsilon=math.inf)

    noise_multiplier = calibrate_noise_multiplier(
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
        max_epsilon=min(policy.max_epsilon, privacy_cfg.target_epsilon),
        max_total_epsilon=policy.max_total_epsilon,
    )
    if refusal is not None:
        return plan(allowed=False, reason=refusal, refusal="budget", noise=noise_multiplier, epsilon=projected)
    reason = f"{decision.reason}; run epsilon {spent:.4f} -> {projected:.4f} after this round"
    return plan(allowed=True, reason=reason, noise=noise_multiplier, epsilon=projected)


def ensure_allowed(plan: RoundPrivacyPlan) -> None:
    """Raise the typed refusal (`BudgetExceededError`, `PolicyRefusedError`, ...) if not allowed."""
    if not plan.allowed:
        raise _REFUSAL_ERRORS.get(plan.refusal, RoundRefusedError)(plan.reason)


def commit_round(*, ledger: BudgetLedger, plan: RoundPrivacyPlan, steps_taken: int | None = None) -> float:
    """Record the round's spend durably; returns the run's epsilon at this site afterwards.

    Call it after training and before the update leaves the site. `steps_taken` (default: the
    planned steps) lets a round cut short record only what was really spent.
    """
    ensure_allowed(plan)
    steps = plan.steps if steps_taken is None else int(steps_taken)
    epsilon = plan.epsilon_after_round
    if steps != plan.steps:
        epsilon = epsilon_after(
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=steps,
            target_delta=plan.target_delta,
            accountant=plan.accountant,
            history=ledger.history(plan.run_id),
        )
    ledger.record_round(
        plan.run_id,
        round=plan.round,
        steps=steps,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        delta=plan.target_delta,
        epsilon=epsilon,
        accountant=plan.accountant,
    )
    return epsilon
