"""Differential privacy at a hospital site: DP-SGD (Opacus), the site's policy, its budget ledger."""

from __future__ import annotations

from .accounting import calibrate_noise_multiplier, epsilon_after, history_epsilon
from .dp_training import DpTrainingResult, check_model_compatible, dp_units_per_step, train_locally_dp
from .errors import (
    BudgetExceededError,
    IncompatibleModelError,
    LedgerConflictError,
    LedgerCorruptedError,
    LedgerMissingError,
    LedgerRolledBackError,
    PolicyRefusedError,
    PrivacyError,
    ReleaseAlreadyMadeError,
    RoundAlreadyTrainedError,
    RoundRefusedError,
    SitePolicyError,
)
from .ledger import BudgetLedger, LedgerMark, ReleaseSpend, RoundSpend, RunSpend
from .policy import PolicyDecision, PrivacyRequest, SitePolicy, check_request, load_site_policy, policy_from_mapping
from .site_privacy import RoundPrivacyPlan, ensure_allowed, plan_round, reserve_round

__all__ = [
    "BudgetExceededError",
    "BudgetLedger",
    "DpTrainingResult",
    "IncompatibleModelError",
    "LedgerConflictError",
    "LedgerCorruptedError",
    "LedgerMark",
    "LedgerMissingError",
    "LedgerRolledBackError",
    "PolicyDecision",
    "PolicyRefusedError",
    "PrivacyError",
    "PrivacyRequest",
    "ReleaseAlreadyMadeError",
    "ReleaseSpend",
    "RoundAlreadyTrainedError",
    "RoundPrivacyPlan",
    "RoundRefusedError",
    "RoundSpend",
    "RunSpend",
    "SitePolicy",
    "SitePolicyError",
    "calibrate_noise_multiplier",
    "check_model_compatible",
    "check_request",
    "dp_units_per_step",
    "ensure_allowed",
    "epsilon_after",
    "history_epsilon",
    "load_site_policy",
    "plan_round",
    "policy_from_mapping",
    "reserve_round",
    "train_locally_dp",
]
