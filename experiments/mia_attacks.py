"""Membership-inference attacks on per-example scores: numpy and scikit-learn only, no torch.

Every attack here turns what a model says about a row into a membership score (higher = more likely
a training row); `attack_auc` rates it with scikit-learn's `roc_auc_score` (members = 1).

- Loss threshold (Yeom et al. 2018, "Privacy risk in machine learning"): the score is minus the
  row's loss; sweeping the threshold over all values gives the attack's ROC curve.
- Offline LiRA (Carlini et al. 2022, "Membership inference attacks from first principles", the
  offline variant with a fixed variance): reference models are trained like the target on random
  halves of the population; for each row, the reference models that did NOT train on it give the
  distribution of its logit-scaled confidence phi = log(p_true / (1 - p_true)) when it is out. The
  score is how far the target's phi sits above that: (phi - mean_out(row)) / sigma_out. With a few
  reference models a per-row variance is too noisy, so sigma_out is one pooled within-row standard
  deviation (the paper's recommendation for small reference sets); the row's own mean is what
  calibrates for difficulty: an atypical patient has a high loss in or out, and the plain loss
  attack mistakes that for non-membership.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

__all__ = [
    "AttackAuc",
    "attack_auc",
    "balanced_membership_rows",
    "lira_offline_scores",
    "loss_threshold_scores",
    "mann_whitney_auc",
    "reference_keep_matrix",
]


@dataclass(frozen=True)
class AttackAuc:
    auc: float
    ci_low: float  # 95% stratified bootstrap interval
    ci_high: float
    members: int
    non_members: int


def attack_auc(scores: np.ndarray, is_member: np.ndarray, *, bootstrap: int = 1000, seed: int = 0) -> AttackAuc:
    """ROC AUC of membership `scores` (higher = member), with a 95% bootstrap interval that resamples
    members and non-members separately (both counts stay fixed)."""
    scores = np.asarray(scores, dtype=np.float64)
    is_member = np.asarray(is_member, dtype=bool)
    if scores.shape != is_member.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and is_member {is_member.shape} must be equal-length vectors")
    members, non_members = np.flatnonzero(is_member), np.flatnonzero(~is_member)
    if len(members) == 0 or len(non_members) == 0:
        raise ValueError(f"need members and non-members, got {len(members)} and {len(non_members)}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("membership scores must be finite")
    auc = float(roc_auc_score(is_member, scores))
    generator = np.random.default_rng(seed)
    resampled = np.concatenate([
        generator.choice(members, (bootstrap, len(members))), generator.choice(non_members, (bootstrap, len(non_members)))
    ], axis=1)  # fmt: skip
    aucs = mann_whitney_auc(scores[resampled], num_members=len(members))
    low, high = np.percentile(aucs, [2.5, 97.5]) if bootstrap else (auc, auc)
    return AttackAuc(auc=auc, ci_low=float(low), ci_high=float(high), members=len(members), non_members=len(non_members))


def mann_whitney_auc(scores: np.ndarray, *, num_members: int) -> np.ndarray:
    """ROC AUC of each row of `scores` [b, m + n] whose first `num_members` columns are members: the
    Mann-Whitney statistic with tied scores counted half, i.e. `roc_auc_score`'s value, vectorised
    over the rows so a bootstrap costs one ranking."""
    num_non_members = scores.shape[1] - num_members
    member_rank_sum = rankdata(scores, axis=1)[:, :num_members].sum(axis=1)
    return (member_rank_sum - num_members * (num_members + 1) / 2) / (num_members * num_non_members)


def balanced_membership_rows(num_train: int, num_test: int, *, seed: int) -> np.ndarray:
    """Which training rows enter the audit: as many as there are held-out rows (all of them if fewer),
    drawn without replacement, so members and non-members are balanced (AUC 0.5 = guessing)."""
    count = min(num_train, num_test)
    return np.sort(np.random.default_rng(seed).choice(num_train, size=count, replace=False))


def loss_threshold_scores(losses: np.ndarray) -> np.ndarray:
    """Yeom et al.: a lower loss means more likely a member."""
    return -np.asarray(losses, dtype=np.float64)


def reference_keep_matrix(num_rows: int, *, reference_models: int, seed: int) -> np.ndarray:
    """bool [reference_models, num_rows]: which rows each reference model trains on. Every row is in
    exactly half the models (Carlini et al.'s balanced design), so each row has the same number of
    OUT models."""
    if reference_models < 2 or reference_models % 2:
        raise ValueError(f"reference_models must be an even number >= 2, got {reference_models}")
    ranks = np.argsort(np.random.default_rng(seed).random((reference_models, num_rows)), axis=0)
    return ranks < reference_models // 2


def lira_offline_scores(target_phi: np.ndarray, reference_phi: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Offline LiRA with a fixed variance: (phi_target - mean_out) / pooled std of the OUT phis.

    target_phi [n]: the target model's logit-scaled confidence on each row; reference_phi [k, n]: each
    reference model's; keep [k, n]: True where reference k trained on the row (those are ignored)."""
    target_phi = np.asarray(target_phi, dtype=np.float64)
    reference_phi = np.asarray(reference_phi, dtype=np.float64)
    keep = np.asarray(keep, dtype=bool)
    if reference_phi.shape != keep.shape or reference_phi.shape[1:] != target_phi.shape:
        raise ValueError(f"shapes disagree: target {target_phi.shape}, references {reference_phi.shape}, keep {keep.shape}")
    out = ~keep
    out_count = out.sum(axis=0)
    if np.any(out_count == 0):
        raise ValueError(f"{int(np.sum(out_count == 0))} rows have no reference model that left them out")
    mean_out = np.where(out, reference_phi, 0.0).sum(axis=0) / out_count
    residuals = np.where(out, reference_phi - mean_out, 0.0)
    degrees = max(int(out_count.sum() - len(out_count)), 1)
    sigma_out = max(float(np.sqrt((residuals**2).sum() / degrees)), 1e-6)
    return (target_phi - mean_out) / sigma_out
