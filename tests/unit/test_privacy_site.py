"""plan_round / reserve_round: the per-round privacy decision a site makes, and spends, before training."""

from __future__ import annotations

import dataclasses
import math

import pytest

from medtwin.client.privacy import (
    BudgetExceededError,
    BudgetLedger,
    PolicyRefusedError,
    RoundAlreadyTrainedError,
    SitePolicy,
    ensure_allowed,
    epsilon_after,
    plan_round,
    reserve_round,
)
from medtwin.core.config.privacy import PrivacyConfig

DP = PrivacyConfig(name="dp", target_epsilon=1.0, target_delta=1e-5, max_grad_norm=1.0, accountant="rdp")
POLICY = SitePolicy(max_epsilon=3.0, max_delta=1e-5, min_noise_multiplier=0.3)
SHAPE = {"num_train": 199, "batch_size": 4, "local_steps": 50, "num_rounds": 4}


@pytest.fixture
def ledger(tmp_path):
    return BudgetLedger(tmp_path / "ledger.json", "hosp0", mark_path=tmp_path / "kit" / "ledger.mark")


def plan(ledger, round_number, *, policy=POLICY, privacy_cfg=DP, run_id="run-a", **shape):
    return plan_round(
        policy=policy, ledger=ledger, run_id=run_id, round=round_number, privacy_cfg=privacy_cfg, **{**SHAPE, **shape}
    )


def test_a_compliant_round_is_planned_with_noise_calibrated_for_the_whole_run(ledger):
    first = plan(ledger, 1)
    assert first.allowed and first.refusal == ""
    assert first.sample_rate == 4 / 199 and first.steps == 50
    assert first.epsilon_after_round == pytest.approx(
        epsilon_after(noise_multiplier=first.noise_multiplier, sample_rate=4 / 199, steps=50, target_delta=1e-5)
    )
    total = epsilon_after(noise_multiplier=first.noise_multiplier, sample_rate=4 / 199, steps=200, target_delta=1e-5)
    assert 0.99 <= total <= 1.0  # 4 rounds x 50 steps land on the run's target


def test_a_full_run_spends_its_target_and_the_next_round_is_refused(ledger):
    for round_number in (1, 2, 3, 4):
        round_plan = plan(ledger, round_number)
        assert round_plan.allowed, round_plan.reason
        assert reserve_round(ledger=ledger, plan=round_plan) == pytest.approx(round_plan.epsilon_after_round)
    assert 0.99 <= ledger.spent("run-a") <= 1.0
    assert ledger.run("run-a").rounds_done == 4
    extra = plan(ledger, 5)  # a run extended past its plan would exceed its epsilon
    assert not extra.allowed and extra.refusal == "budget"
    assert "budget exceeded: per-run limit the run's privacy.target_epsilon 1 would be exceeded by" in extra.reason
    with pytest.raises(BudgetExceededError):
        ensure_allowed(extra)
    with pytest.raises(BudgetExceededError):
        reserve_round(ledger=ledger, plan=extra)
    assert ledger.run("run-a").rounds_done == 4


def test_spend_survives_a_restart_and_a_retrained_round_is_refused(ledger):
    reserve_round(ledger=ledger, plan=plan(ledger, 1))
    reopened = BudgetLedger(ledger.path, "hosp0", mark_path=ledger.mark_path)
    again = plan(reopened, 1)
    assert not again.allowed and again.refusal == "replay"
    with pytest.raises(RoundAlreadyTrainedError, match="already in this site's ledger"):
        ensure_allowed(again)
    assert plan(reopened, 2).epsilon_spent_before == ledger.spent("run-a") > 0


def test_the_sites_policy_wins_over_the_coordinators_request(ledger):
    greedy = dataclasses.replace(DP, target_epsilon=8.0)
    refused = plan(ledger, 1, privacy_cfg=greedy)
    assert not refused.allowed and refused.refusal == "policy"
    assert "requested epsilon 8.0 exceeds this site's max_epsilon 3.0 by 5" in refused.reason
    with pytest.raises(PolicyRefusedError):
        ensure_allowed(refused)
    noisy_enough = SitePolicy(max_epsilon=3.0, max_delta=1e-5, min_noise_multiplier=5.0)
    assert "below this site's min_noise_multiplier" in plan(ledger, 1, policy=noisy_enough).reason
    assert not ledger.path.exists()  # nothing was spent


def test_a_run_without_dp_is_refused_by_a_site_that_requires_dp(ledger):
    refused = plan(ledger, 1, privacy_cfg=PrivacyConfig(name="none"))
    assert not refused.allowed and refused.refusal == "policy"
    assert "no differential privacy" in refused.reason and "require_dp" in refused.reason
    assert math.isinf(refused.epsilon_after_round)
    with pytest.raises(PolicyRefusedError):
        reserve_round(ledger=ledger, plan=refused)


def test_a_site_that_waives_require_dp_trains_a_run_without_dp_outside_the_ledger(ledger):
    waived = dataclasses.replace(POLICY, require_dp=False)
    allowed = plan(ledger, 1, policy=waived, privacy_cfg=PrivacyConfig(name="none"))
    assert allowed.allowed and not allowed.uses_dp
    assert math.isinf(reserve_round(ledger=ledger, plan=allowed))
    assert ledger.total_epsilon() == 0.0 and not ledger.path.exists()


def test_the_lifetime_budget_stops_a_new_run(ledger):
    for round_number in (1, 2, 3, 4):
        reserve_round(ledger=ledger, plan=plan(ledger, round_number))
    for round_number in (1, 2):
        reserve_round(ledger=ledger, plan=plan(ledger, round_number, run_id="run-b"))
    spent_so_far = ledger.total_epsilon()  # run-a's 1.0 plus two rounds of run-b
    roomy = dataclasses.replace(POLICY, max_total_epsilon=spent_so_far + 1.0)
    tight = dataclasses.replace(POLICY, max_total_epsilon=spent_so_far + 0.01)
    assert plan(ledger, 3, run_id="run-b", policy=roomy).allowed
    refused = plan(ledger, 3, run_id="run-b", policy=tight)
    assert not refused.allowed and refused.refusal == "budget"
    assert f"lifetime limit max_total_epsilon {spent_so_far + 0.01:g} would be exceeded by" in refused.reason
    with pytest.raises(BudgetExceededError, match="max_total_epsilon"):
        reserve_round(ledger=ledger, plan=refused)


def test_reserve_rechecks_under_the_lock_what_plan_checked_without_it(ledger):
    first, second = plan(ledger, 1), plan(ledger, 1)  # two requests for the same round, both planned
    assert first.allowed and second.allowed
    reserve_round(ledger=ledger, plan=first)
    with pytest.raises(RoundAlreadyTrainedError):
        reserve_round(ledger=ledger, plan=second)
    # a plan made before another run spent budget is refused by the lifetime cap at reserve time
    round_one = first.epsilon_after_round
    capped = dataclasses.replace(POLICY, max_total_epsilon=2 * round_one + 0.01)
    late = plan(ledger, 1, run_id="run-b", policy=capped)
    assert late.allowed, late.reason
    reserve_round(ledger=ledger, plan=plan(ledger, 1, run_id="run-c"))  # default cap 10
    with pytest.raises(BudgetExceededError, match="lifetime limit max_total_epsilon"):
        reserve_round(ledger=ledger, plan=late)
    assert ledger.run("run-b") is None and ledger.run("run-a").rounds_done == 1


def test_reserve_counts_a_round_another_process_recorded_since_planning(ledger):
    stale = plan(ledger, 2)
    reserve_round(ledger=ledger, plan=plan(ledger, 1))  # recorded after round 2 was planned
    epsilon = reserve_round(ledger=ledger, plan=stale)
    assert epsilon > stale.epsilon_after_round  # epsilon recomputed over both rounds, not the stale one
    assert ledger.spent("run-a") == pytest.approx(epsilon)


def test_prv_accounting_plans_a_round(ledger):
    prv = dataclasses.replace(DP, accountant="prv")
    round_plan = plan(ledger, 1, privacy_cfg=prv)
    assert round_plan.allowed and round_plan.accountant == "prv"
    rdp_plan = plan(ledger, 1)
    assert round_plan.noise_multiplier < rdp_plan.noise_multiplier  # tighter accounting, less noise
