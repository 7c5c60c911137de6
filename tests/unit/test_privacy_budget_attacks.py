"""A hostile coordinator (or a careless admin) against the site's privacy budget.

Fresh run ids, concurrent requests for one round, a deleted or rolled-back ledger, and metric
releases must never let the site's data spend more than its lifetime cap.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
import time

import pytest

from medtwin.client.privacy import (
    BudgetExceededError,
    BudgetLedger,
    LedgerMissingError,
    LedgerRolledBackError,
    RoundAlreadyTrainedError,
    SitePolicy,
    plan_round,
    reserve_round,
)
from medtwin.client.privacy.ledger import _checksum
from medtwin.core.config.privacy import PrivacyConfig

POLICY = SitePolicy(max_epsilon=3.0, max_delta=1e-5)  # lifetime cap: the default 10
WHOLE_RUN = PrivacyConfig(name="dp", target_epsilon=3.0, target_delta=1e-5, max_grad_norm=1.0, accountant="rdp")
SHAPE = {"num_train": 199, "batch_size": 4, "local_steps": 50, "num_rounds": 1}
ROUND = {"steps": 100, "noise_multiplier": 1.2, "sample_rate": 0.02, "delta": 1e-5}


@pytest.fixture
def ledger(tmp_path):
    return BudgetLedger(tmp_path / "state" / "privacy-ledger.json", "hosp0", mark_path=tmp_path / "kit" / "ledger.mark")


def reopen(ledger):
    return BudgetLedger(ledger.path, "hosp0", mark_path=ledger.mark_path)


def plan(ledger, run_id, round_number=1, privacy_cfg=WHOLE_RUN, **shape):
    return plan_round(
        policy=POLICY, ledger=ledger, run_id=run_id, round=round_number, privacy_cfg=privacy_cfg, **{**SHAPE, **shape}
    )


# ---------------------------------------------------------------- fresh run ids


def test_fresh_run_ids_do_not_escape_the_lifetime_cap(ledger):
    outcomes = []
    for index in range(20):
        round_plan = plan(ledger, f"fresh-{index}")
        if not round_plan.allowed:
            outcomes.append(round_plan.reason)
            continue
        outcomes.append(reserve_round(ledger=ledger, plan=round_plan))
    trained = [outcome for outcome in outcomes if isinstance(outcome, float)]
    assert len(trained) == 3 and all(2.9 <= epsilon <= 3.0 for epsilon in trained)
    fourth = outcomes[3]
    assert isinstance(fourth, str) and "max_total_epsilon 10 would be exceeded by" in fourth
    assert ledger.total_epsilon() <= 10.0 and len(ledger.runs()) == 3


def test_plans_made_up_front_for_fresh_run_ids_are_still_capped_at_reserve_time(ledger):
    plans = [plan(ledger, f"fresh-{index}") for index in range(20)]  # all pass the lock-free pre-check
    assert all(round_plan.allowed for round_plan in plans)
    refusals = []
    for round_plan in plans:
        try:
            reserve_round(ledger=ledger, plan=round_plan)
        except BudgetExceededError as refused:
            refusals.append(str(refused))
    assert len(refusals) == 17 and all("max_total_epsilon" in reason for reason in refusals)
    assert ledger.total_epsilon() <= 10.0


def test_metric_releases_under_fresh_run_ids_are_capped_too(ledger):
    reserve_round(ledger=ledger, plan=plan(ledger, "trained"))
    released = 0
    for index in range(50):
        try:
            ledger.reserve_release(f"fresh-{index}", round=1, epsilon=1.0, max_total_epsilon=POLICY.max_total_epsilon)
        except BudgetExceededError as refused:
            assert "lifetime limit max_total_epsilon 10" in str(refused)
        else:
            released += 1
    assert released == 7 and ledger.total_epsilon() <= 10.0
    refused = plan(ledger, "after-releases")
    assert not refused.allowed and "7 metric release(s)" in refused.reason


def test_a_run_that_releases_metrics_every_round_stays_within_its_per_run_limit(ledger):
    """12 rounds, each trained then released at epsilon 0.5, for a run whose target is 1.0 (a3_release_overspend)."""
    refusals = []
    for round_number in range(1, 13):
        round_plan = plan(ledger, "run-a", round_number, privacy_cfg=first_cfg(1.0), num_rounds=12)
        if round_plan.allowed:
            reserve_round(ledger=ledger, plan=round_plan)
        else:
            refusals.append(round_plan.reason)
        try:
            ledger.reserve_release(
                "run-a", round=round_number, epsilon=0.5, max_total_epsilon=10.0, max_epsilon=round_plan.max_epsilon
            )
        except BudgetExceededError as refused:
            refusals.append(str(refused))
        assert ledger.spent("run-a") + ledger.released("run-a") <= 1.0
    assert ledger.released("run-a") == 0.5 and ledger.total_epsilon() <= 1.0
    per_run = [reason for reason in refusals if "per-run limit the run's privacy.target_epsilon 1" in reason]
    assert any("1 metric release(s)" in reason for reason in per_run)


def first_cfg(target_epsilon):
    return PrivacyConfig(**{**WHOLE_RUN.__dict__, "target_epsilon": target_epsilon})


# ---------------------------------------------------------------- concurrent requests for one round


def _slow_epsilon(history):
    time.sleep(0.3)  # computed under the lock: a racer that skipped the lock would overlap here
    return 0.5


def _reserve_in_a_process(ledger_path, mark_path, barrier, outcomes):
    ledger = BudgetLedger(ledger_path, "hosp0", mark_path=mark_path)
    barrier.wait(timeout=120)
    try:
        ledger.reserve_round(
            "run-a", round=1, epsilon=_slow_epsilon, **ROUND, max_epsilon=3.0, max_total_epsilon=10.0
        )
    except RoundAlreadyTrainedError:
        outcomes.put("replay")
    except BaseException as error:  # reported to the test, not swallowed
        outcomes.put(f"error: {error!r}")
    else:
        outcomes.put("reserved")


def test_two_processes_racing_for_one_round_train_it_once(ledger):
    context = multiprocessing.get_context("fork")  # the racers need no torch: fork starts them fast
    barrier = context.Barrier(2)
    outcomes = context.Queue()
    racers = [
        context.Process(target=_reserve_in_a_process, args=(ledger.path, ledger.mark_path, barrier, outcomes))
        for _ in range(2)
    ]
    for racer in racers:
        racer.start()
    try:
        results = sorted(outcomes.get(timeout=180) for _ in racers)
    finally:
        for racer in racers:
            racer.join(timeout=60)
            if racer.is_alive():
                racer.kill()
    assert results == ["replay", "reserved"]
    assert ledger.run("run-a").rounds_done == 1 and ledger.total_epsilon() == 0.5
    assert ledger.sequence() == 1  # one write


def test_threads_racing_for_one_round_train_it_once(ledger):
    round_plan = plan(ledger, "run-a", privacy_cfg=WHOLE_RUN)
    barrier = threading.Barrier(8)
    outcomes = []

    def race():
        barrier.wait(timeout=60)
        try:
            reserve_round(ledger=reopen(ledger), plan=round_plan)
        except RoundAlreadyTrainedError:
            outcomes.append("replay")
        else:
            outcomes.append("reserved")

    racers = [threading.Thread(target=race) for _ in range(8)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(timeout=120)
    assert sorted(outcomes) == ["replay"] * 7 + ["reserved"]
    assert ledger.run("run-a").rounds_done == 1
    assert ledger.total_epsilon() == pytest.approx(round_plan.epsilon_after_round)


# ---------------------------------------------------------------- deleted or rolled-back ledger


def spend_two_rounds(ledger):
    four_rounds = {"num_rounds": 4}
    reserve_round(ledger=ledger, plan=plan(ledger, "run-a", 1, **four_rounds))
    backup = ledger.path.read_bytes()
    reserve_round(ledger=ledger, plan=plan(ledger, "run-a", 2, **four_rounds))
    return backup


def test_a_deleted_ledger_stops_the_site_and_is_never_reset(ledger):
    spend_two_rounds(ledger)
    latest, spent, mark = ledger.path.read_bytes(), ledger.total_epsilon(), ledger.mark_path.read_bytes()
    ledger.path.unlink()
    with pytest.raises(LedgerMissingError) as raised:
        reopen(ledger)
    message = str(raised.value)
    assert str(ledger.path) in message and "records 2 spend(s)" in message and f"epsilon={spent:.4g}" in message
    assert "will not train: restore the ledger from backup" in message
    with pytest.raises(LedgerMissingError):  # the open ledger refuses too: no plan, no spend
        plan(ledger, "run-a", 3, num_rounds=4)
    with pytest.raises(LedgerMissingError):
        ledger.reserve_release("run-a", round=1, epsilon=0.1, max_total_epsilon=10.0)
    assert not ledger.path.exists() and ledger.mark_path.read_bytes() == mark  # nothing reset, nothing re-marked
    ledger.path.write_bytes(latest)  # restored from backup
    assert reopen(ledger).total_epsilon() == spent


def test_a_rolled_back_ledger_stops_the_site(ledger):
    older = spend_two_rounds(ledger)
    latest, spent, mark = ledger.path.read_bytes(), ledger.total_epsilon(), ledger.mark_path.read_bytes()
    ledger.path.write_bytes(older)  # an older copy restored: round 2 forgotten
    with pytest.raises(LedgerRolledBackError, match="sequence 1 .* but the kit's mark records sequence 2"):
        reopen(ledger)
    with pytest.raises(LedgerRolledBackError):
        reserve_round(ledger=ledger, plan=plan(ledger, "run-b"))
    assert ledger.path.read_bytes() == older and ledger.mark_path.read_bytes() == mark
    ledger.path.write_bytes(latest)
    assert reopen(ledger).total_epsilon() == spent


def test_a_ledger_edited_and_re_checksummed_at_the_same_sequence_stops_the_site(ledger):
    spend_two_rounds(ledger)
    content = json.loads(ledger.path.read_text())["ledger"]
    content["runs"] = {}  # forget the spend, keep the sequence, fix the checksum
    ledger.path.write_text(json.dumps({"checksum": _checksum(content), "ledger": content}))
    with pytest.raises(LedgerRolledBackError, match="another checksum"):
        reopen(ledger)

