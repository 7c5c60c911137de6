"""The budget ledger: durable, idempotent, refuses over-budget rounds, never trusts a damaged file."""

from __future__ import annotations

import json
import stat

import pytest

from medtwin.client.privacy import BudgetExceededError, BudgetLedger, LedgerConflictError, LedgerCorruptedError

ROUND = {"steps": 100, "noise_multiplier": 1.2, "sample_rate": 0.02, "delta": 1e-5}


@pytest.fixture
def ledger(tmp_path):
    return BudgetLedger(tmp_path / "site" / "privacy-ledger.json", "hosp0")


def record(ledger, run_id, round_number, epsilon, **change):
    return ledger.record_round(run_id, round=round_number, epsilon=epsilon, **{**ROUND, **change})


def test_a_new_ledger_has_spent_nothing(ledger):
    assert ledger.spent("run-a") == 0.0
    assert ledger.history("run-a") == []
    assert not ledger.path.exists()  # nothing is written before the first round


def test_rounds_are_recorded_with_their_history_and_survive_a_new_instance(ledger):
    assert record(ledger, "run-a", 1, 0.31)
    assert record(ledger, "run-a", 2, 0.44)
    reopened = BudgetLedger(ledger.path, "hosp0")
    run = reopened.run("run-a")
    assert reopened.spent("run-a") == 0.44
    assert run.rounds_done == 2 and run.steps == 200 and run.delta == 1e-5 and run.accountant == "rdp"
    assert reopened.history("run-a") == [(1.2, 0.02, 100), (1.2, 0.02, 100)]
    assert reopened.has_round("run-a", 2) and not reopened.has_round("run-a", 3)


def test_the_file_is_private_and_no_temporary_file_is_left(ledger):
    record(ledger, "run-a", 1, 0.31)
    assert stat.S_IMODE(ledger.path.stat().st_mode) == 0o600
    assert sorted(p.name for p in ledger.path.parent.iterdir()) == ["privacy-ledger.json", "privacy-ledger.json.lock"]


def test_recording_the_same_round_twice_does_not_double_count(ledger):
    assert record(ledger, "run-a", 1, 0.31)
    assert not record(ledger, "run-a", 1, 0.31)
    run = ledger.run("run-a")
    assert run.rounds_done == 1 and run.steps == 100 and ledger.spent("run-a") == 0.31


def test_a_round_recorded_again_with_other_values_is_a_conflict(ledger):
    record(ledger, "run-a", 1, 0.31)
    with pytest.raises(LedgerConflictError, match="refusing to overwrite"):
        record(ledger, "run-a", 1, 0.5, steps=200)
    with pytest.raises(LedgerConflictError, match="one accountant and delta"):
        record(ledger, "run-a", 2, 0.5, delta=1e-6)
    assert ledger.spent("run-a") == 0.31


def test_totals_add_up_across_runs(ledger):
    record(ledger, "run-a", 1, 0.5)
    record(ledger, "run-b", 1, 0.7)
    assert ledger.total_epsilon() == pytest.approx(1.2)
    assert ledger.total_delta() == pytest.approx(2e-5)
    assert [run.run_id for run in ledger.runs()] == ["run-a", "run-b"]


def test_a_round_that_would_exceed_the_budget_is_refused_before_training(ledger):
    record(ledger, "run-a", 1, 2.5)
    assert ledger.can_afford("run-a", 2.9, 3.0)
    assert not ledger.can_afford("run-a", 3.2, 3.0)
    expected = r"epsilon 3\.2000 \(spent so far 2\.5000\), above this site's max_epsilon 3"
    with pytest.raises(BudgetExceededError, match=expected):
        ledger.ensure_affordable("run-a", projected_epsilon=3.2, max_epsilon=3.0)


def test_the_lifetime_budget_counts_other_runs(ledger):
    record(ledger, "run-a", 1, 4.0)
    assert ledger.can_afford("run-b", 1.5, 3.0)
    assert not ledger.can_afford("run-b", 1.5, 3.0, max_total_epsilon=5.0)
    with pytest.raises(BudgetExceededError, match="total over all runs to epsilon 5.5000"):
        ledger.ensure_affordable("run-b", projected_epsilon=1.5, max_epsilon=3.0, max_total_epsilon=5.0)


def damage_and_expect_refusal(ledger, damage):
    record(ledger, "run-a", 1, 0.31)
    record(ledger, "run-a", 2, 0.44)
    damage(ledger.path)
    with pytest.raises(LedgerCorruptedError) as raised:
        BudgetLedger(ledger.path, "hosp0")
    message = str(raised.value)
    assert str(ledger.path) in message
    assert "refusing to train; restore the ledger from backup" in message.lower()
    with pytest.raises(LedgerCorruptedError):  # an open ledger re-reads, so it refuses too
        ledger.spent("run-a")
    with pytest.raises(LedgerCorruptedError):
        record(ledger, "run-a", 3, 0.6)


def flip_a_digit(path):
    data = bytearray(path.read_bytes())
    position = data.index(b'"epsilon": 0.44') + len(b'"epsilon": 0.4')
    data[position] = ord("1")  # 0.44 -> 0.41: still valid JSON, wrong checksum
    path.write_bytes(bytes(data))


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        flip_a_digit,
        flip_a_byte,
        lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),  # truncated
        lambda path: path.write_bytes(b""),  # emptied
        lambda path: path.write_text(json.dumps({"ledger": {}, "checksum": "sha256:0"})),
    ],
    ids=["edited-value", "flipped-byte", "truncated", "empty", "forged"],
)
def test_a_damaged_ledger_is_never_mistaken_for_a_fresh_one(ledger, damage):
    damage_and_expect_refusal(ledger, damage)


def test_a_ledger_with_a_valid_checksum_but_bad_structure_is_corrupted(ledger):
    from medtwin.client.privacy.ledger import _checksum

    ledger_content = {"format": 1, "site_id": "hosp0", "runs": {"run-a": {"rounds": {"1": {"steps": "many"}}}}}
    ledger.path.parent.mkdir(parents=True)
    ledger.path.write_text(json.dumps({"checksum": _checksum(ledger_content), "ledger": ledger_content}))
    with pytest.raises(LedgerCorruptedError, match="malformed"):
        BudgetLedger(ledger.path, "hosp0")


def test_another_sites_ledger_is_refused(ledger):
    record(ledger, "run-a", 1, 0.31)
    with pytest.raises(LedgerConflictError, match="belongs to site 'hosp0', not 'hosp1'"):
        BudgetLedger(ledger.path, "hosp1")


def test_a_temp_file_left_by_a_killed_writer_is_cleaned_up_and_ignored(ledger):
    record(ledger, "run-a", 1, 0.31)
    stale = ledger.path.parent / f".{ledger.path.name}.abc123.tmp"
    stale.write_text('{"half": ')
    assert ledger.spent("run-a") == 0.31  # never read as the ledger
    record(ledger, "run-a", 2, 0.44)
    assert not stale.exists()
