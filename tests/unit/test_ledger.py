"""The budget ledger: durable, idempotent, refuses over-budget rounds, never trusts a damaged file,
and checks itself against the mark it keeps in the site's kit."""

from __future__ import annotations

import json
import logging
import stat

import pytest

from medtwin.client.privacy import (
    BudgetExceededError,
    BudgetLedger,
    LedgerConflictError,
    LedgerCorruptedError,
    LedgerMissingError,
    ReleaseAlreadyMadeError,
    RoundAlreadyTrainedError,
)
from medtwin.client.privacy.ledger import _checksum

ROUND = {"steps": 100, "noise_multiplier": 1.2, "sample_rate": 0.02, "delta": 1e-5}
LIMITS = {"max_epsilon": 3.0, "max_total_epsilon": 10.0}


@pytest.fixture
def ledger(tmp_path):
    return BudgetLedger(tmp_path / "site" / "privacy-ledger.json", "hosp0", mark_path=tmp_path / "kit" / "ledger.mark")


def record(ledger, run_id, round_number, epsilon, **change):
    return ledger.record_round(run_id, round=round_number, epsilon=epsilon, **{**ROUND, **change})


def reserve(ledger, run_id, round_number, epsilon, **limits):
    return ledger.reserve_round(run_id, round=round_number, epsilon=epsilon, **ROUND, **{**LIMITS, **limits})


def read_mark(ledger):
    return json.loads(ledger.mark_path.read_text())


def test_a_new_ledger_has_spent_nothing(ledger):
    assert ledger.spent("run-a") == 0.0
    assert ledger.history("run-a") == []
    assert ledger.total_epsilon() == 0.0 and ledger.sequence() == 0
    assert not ledger.path.exists() and not ledger.mark_path.exists()  # nothing is written before the first spend


def test_rounds_are_recorded_with_their_history_and_survive_a_new_instance(ledger):
    assert record(ledger, "run-a", 1, 0.31)
    assert record(ledger, "run-a", 2, 0.44)
    reopened = BudgetLedger(ledger.path, "hosp0", mark_path=ledger.mark_path)
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


def test_a_round_over_the_per_run_limit_is_refused_before_training_and_says_by_how_much(ledger):
    record(ledger, "run-a", 1, 2.5)
    assert ledger.budget_refusal("run-a", projected_epsilon=2.9, **LIMITS) is None
    expected = (
        "budget exceeded: per-run limit max_epsilon 3 would be exceeded by 0.2 "
        "(run 'run-a' has spent 2.5 training + 0 over 0 metric release(s); this round brings its training to 3.2, "
        "the run to 3.2)"
    )
    assert ledger.budget_refusal("run-a", projected_epsilon=3.2, **LIMITS) == expected
    with pytest.raises(BudgetExceededError) as refused:
        reserve(ledger, "run-a", 2, 3.2)
    assert str(refused.value) == expected
    assert ledger.run("run-a").rounds_done == 1 and ledger.sequence() == 1  # nothing recorded
    assert reserve(ledger, "run-a", 2, 2.9) == 2.9
    assert ledger.spent("run-a") == 2.9


def test_the_lifetime_budget_counts_other_runs_and_says_by_how_much(ledger):
    record(ledger, "run-a", 1, 4.0)
    assert ledger.budget_refusal("run-b", projected_epsilon=1.5, max_epsilon=3.0, max_total_epsilon=6.0) is None
    with pytest.raises(BudgetExceededError) as refused:
        reserve(ledger, "run-b", 1, 1.5, max_total_epsilon=5.0)
    assert str(refused.value).startswith(
        "budget exceeded: lifetime limit max_total_epsilon 5 would be exceeded by 0.5 "
        "(spent 4 over 1 other run(s) and 0 metric release(s) + this round brings run 'run-b' to 1.5)"
    )
    assert ledger.run("run-b") is None


def test_a_reserved_round_cannot_be_reserved_again(ledger):
    reserve(ledger, "run-a", 1, 0.3)
    with pytest.raises(RoundAlreadyTrainedError, match="already in this site's ledger"):
        reserve(ledger, "run-a", 1, 0.3)
    assert ledger.run("run-a").rounds_done == 1


def test_reserve_computes_epsilon_from_the_history_as_it_stands_under_the_lock(ledger):
    record(ledger, "run-a", 1, 0.3)
    seen = []

    def epsilon_for(history):
        seen.append(list(history))
        return 0.3 + 0.1 * len(history)

    assert reserve(ledger, "run-a", 2, epsilon_for) == pytest.approx(0.4)
    assert seen == [[(1.2, 0.02, 100)]]
    assert ledger.spent("run-a") == pytest.approx(0.4)


def test_a_run_keeps_its_accountant_and_delta_when_reserving(ledger):
    reserve(ledger, "run-a", 1, 0.3)
    with pytest.raises(LedgerConflictError, match="one accountant and delta"):
        ledger.reserve_round("run-a", round=2, epsilon=0.4, **{**ROUND, "delta": 1e-6}, **LIMITS)


def test_metric_releases_count_in_the_total_are_capped_and_made_once(ledger):
    reserve(ledger, "run-a", 1, 2.0)
    ledger.reserve_release("run-a", round=1, epsilon=0.5, max_total_epsilon=3.0)
    assert ledger.total_epsilon() == pytest.approx(2.5)
    assert ledger.spent("run-a") == 2.0  # the run's training spend alone
    assert ledger.has_release("run-a", 1) and not ledger.has_release("run-a", 2)
    assert [(r.run_id, r.round, r.epsilon) for r in ledger.releases()] == [("run-a", 1, 0.5)]
    with pytest.raises(ReleaseAlreadyMadeError, match="already released"):
        ledger.reserve_release("run-a", round=1, epsilon=0.5, max_total_epsilon=3.0)
    with pytest.raises(BudgetExceededError, match="max_total_epsilon 3 would be exceeded by 0.2"):
        ledger.reserve_release("run-a", round=2, epsilon=0.7, max_total_epsilon=3.0)
    assert ledger.total_epsilon() == pytest.approx(2.5)
    # a training round is capped by the releases too
    with pytest.raises(BudgetExceededError, match="1 metric release"):
        reserve(ledger, "run-b", 1, 0.6, max_total_epsilon=3.0)
    reopened = BudgetLedger(ledger.path, "hosp0", mark_path=ledger.mark_path)
    assert reopened.total_epsilon() == pytest.approx(2.5) and len(reopened.releases()) == 1


def test_a_runs_releases_count_against_its_per_run_limit_and_say_by_how_much(ledger):
    reserve(ledger, "run-a", 1, 0.6)
    ledger.reserve_release("run-a", round=1, epsilon=0.3, max_total_epsilon=10.0, max_epsilon=1.0)
    assert ledger.released("run-a") == pytest.approx(0.3) and ledger.released("run-b") == 0.0
    with pytest.raises(BudgetExceededError) as refused:
        ledger.reserve_release("run-a", round=2, epsilon=0.3, max_total_epsilon=10.0, max_epsilon=1.0)
    assert str(refused.value) == (
        "budget exceeded: per-run limit max_epsilon 1 would be exceeded by 0.2 (run 'run-a' has spent 0.6 training "
        "+ 0.3 over 1 metric release(s); this metric release of epsilon 0.3 for round 2 brings it to 1.2); "
        "the metrics stay at the site"
    )
    assert not ledger.has_release("run-a", 2) and ledger.total_epsilon() == pytest.approx(0.9)
    # another run's releases do not count against run-a, and the lifetime limit still holds
    ledger.reserve_release("run-b", round=1, epsilon=0.9, max_total_epsilon=10.0, max_epsilon=1.0)
    ledger.reserve_release("run-a", round=2, epsilon=0.1, max_total_epsilon=10.0, max_epsilon=1.0)
    assert ledger.total_epsilon() == pytest.approx(1.9)


def test_a_release_names_the_limit_it_was_given(ledger):
    with pytest.raises(BudgetExceededError, match="per-run limit the run's privacy.target_epsilon 0.5 would be exceeded by 0.25"):
        ledger.reserve_release(
            "run-a", round=1, epsilon=0.75, max_total_epsilon=10.0, max_epsilon=0.5,
            max_epsilon_name="the run's privacy.target_epsilon",
        )  # fmt: skip


def test_without_a_per_run_limit_a_release_is_capped_by_the_lifetime_limit_only(ledger):
    reserve(ledger, "run-a", 1, 2.9)
    ledger.reserve_release("run-a", round=1, epsilon=0.5, max_total_epsilon=10.0)  # the caller before max_epsilon
    assert ledger.total_epsilon() == pytest.approx(3.4)


def test_a_training_round_counts_the_runs_releases_against_the_per_run_limit(ledger):
    reserve(ledger, "run-a", 1, 1.0)
    ledger.reserve_release("run-a", round=1, epsilon=1.5, max_total_epsilon=10.0, max_epsilon=3.0)
    assert ledger.budget_refusal("run-a", projected_epsilon=1.5, **LIMITS) is None
    expected = (
        "budget exceeded: per-run limit max_epsilon 3 would be exceeded by 0.3 (run 'run-a' has spent 1 training "
        "+ 1.5 over 1 metric release(s); this round brings its training to 1.8, the run to 3.3)"
    )
    assert ledger.budget_refusal("run-a", projected_epsilon=1.8, **LIMITS) == expected
    with pytest.raises(BudgetExceededError) as refused:
        reserve(ledger, "run-a", 2, 1.8)
    assert str(refused.value) == expected
    assert ledger.run("run-a").rounds_done == 1
    assert ledger.budget_refusal("run-b", projected_epsilon=2.9, **LIMITS) is None  # only run-a's releases count


@pytest.mark.parametrize("max_epsilon", [-1.0, float("inf"), float("nan")])
def test_a_release_needs_a_finite_per_run_limit(ledger, max_epsilon):
    with pytest.raises(ValueError, match="max_epsilon"):
        ledger.reserve_release("run-a", round=1, epsilon=0.1, max_total_epsilon=3.0, max_epsilon=max_epsilon)


@pytest.mark.parametrize("epsilon", [0.0, -1.0, float("inf"), float("nan")])
def test_a_release_needs_a_finite_positive_epsilon(ledger, epsilon):
    with pytest.raises(ValueError, match="epsilon"):
        ledger.reserve_release("run-a", round=1, epsilon=epsilon, max_total_epsilon=3.0)


def test_every_write_bumps_the_sequence_and_rewrites_the_mark(ledger):
    record(ledger, "run-a", 1, 0.3)
    reserve(ledger, "run-a", 2, 0.4)
    ledger.reserve_release("run-a", round=2, epsilon=0.1, max_total_epsilon=10.0)
    assert not record(ledger, "run-a", 1, 0.3)  # an idempotent no-op writes nothing
    document = json.loads(ledger.path.read_text())
    mark = read_mark(ledger)
    assert document["ledger"]["format"] == 2 and document["ledger"]["sequence"] == 3 == ledger.sequence()
    assert mark == {
        "format": 1,
        "site_id": "hosp0",
        "sequence": 3,
        "spends": 3,
        "total_epsilon": pytest.approx(0.5),
        "checksum": document["checksum"],
    }
    assert stat.S_IMODE(ledger.mark_path.stat().st_mode) == 0o600
    assert sorted(p.name for p in ledger.mark_path.parent.iterdir()) == ["ledger.mark"]


def test_initialise_writes_an_empty_ledger_and_its_mark_once(ledger):
    assert ledger.initialise()
    assert ledger.path.exists() and ledger.sequence() == 0
    assert read_mark(ledger)["sequence"] == 0 and read_mark(ledger)["spends"] == 0
    record(ledger, "run-a", 1, 0.3)
    assert not ledger.initialise()  # never resets an existing ledger
    assert ledger.spent("run-a") == 0.3 and ledger.sequence() == 1


def test_a_missing_mark_is_re_created_from_the_ledger(ledger, caplog):
    record(ledger, "run-a", 1, 0.3)
    ledger.mark_path.unlink()
    with caplog.at_level(logging.WARNING, logger="medtwin.site.ledger"):
        reopened = BudgetLedger(ledger.path, "hosp0", mark_path=ledger.mark_path)
    assert "mark" in caplog.text and "missing" in caplog.text
    assert read_mark(reopened)["sequence"] == 1 and reopened.spent("run-a") == 0.3


def test_a_mark_behind_the_ledger_by_a_crash_between_the_two_writes_is_caught_up(ledger):
    record(ledger, "run-a", 1, 0.3)
    stale_mark = ledger.mark_path.read_bytes()
    record(ledger, "run-a", 2, 0.4)
    ledger.mark_path.write_bytes(stale_mark)  # as if killed after the ledger's os.replace
    assert ledger.spent("run-a") == 0.4
    assert read_mark(ledger)["sequence"] == 2


def test_a_damaged_mark_stops_the_site(ledger):
    record(ledger, "run-a", 1, 0.3)
    ledger.mark_path.write_text("{not json")
    with pytest.raises(LedgerCorruptedError, match="mark .* is damaged") as raised:
        ledger.spent("run-a")
    assert "delete the damaged mark" in str(raised.value)


def test_another_sites_mark_is_refused(ledger, tmp_path):
    record(ledger, "run-a", 1, 0.3)
    with pytest.raises(LedgerConflictError, match="mark .* belongs to site 'hosp0', not 'hosp1'"):
        BudgetLedger(tmp_path / "other" / "privacy-ledger.json", "hosp1", mark_path=ledger.mark_path)


def test_a_deleted_ledger_without_a_mark_looks_fresh_but_with_a_mark_is_missing(ledger, tmp_path):
    unmarked = BudgetLedger(tmp_path / "plain" / "privacy-ledger.json", "hosp0")
    record(unmarked, "run-a", 1, 0.3)
    unmarked.path.unlink()
    assert unmarked.spent("run-a") == 0.0  # no mark: nothing can tell (the reason sites get a mark)
    record(ledger, "run-a", 1, 0.3)
    ledger.path.unlink()
    with pytest.raises(LedgerMissingError, match="records 1 spend"):
        ledger.spent("run-a")


def test_a_format_1_ledger_is_read_and_written_back_as_format_2(ledger):
    content = {
        "format": 1,
        "site_id": "hosp0",
        "runs": {
            "run-a": {"accountant": "rdp", "delta": 1e-5, "epsilon": 0.3, "rounds": {"1": {**ROUND, "epsilon": 0.3}}}
        },
    }
    ledger.path.parent.mkdir(parents=True)
    ledger.path.write_text(json.dumps({"checksum": _checksum(content), "ledger": content}))
    reopened = BudgetLedger(ledger.path, "hosp0", mark_path=ledger.mark_path)
    assert reopened.spent("run-a") == 0.3 and reopened.sequence() == 0
    assert read_mark(reopened)["sequence"] == 0  # the mark vouches for the format-1 file as found
    record(reopened, "run-a", 2, 0.4)
    written = json.loads(ledger.path.read_text())["ledger"]
    assert (written["format"], written["sequence"], written["releases"]) == (2, 1, {})


def test_an_unknown_ledger_format_is_refused(ledger):
    content = {"format": 3, "site_id": "hosp0", "sequence": 0, "runs": {}, "releases": {}}
    ledger.path.parent.mkdir(parents=True)
    ledger.path.write_text(json.dumps({"checksum": _checksum(content), "ledger": content}))
    with pytest.raises(LedgerCorruptedError, match="unknown ledger format 3"):
        BudgetLedger(ledger.path, "hosp0")


def damage_and_expect_refusal(ledger, damage):
    record(ledger, "run-a", 1, 0.31)
    record(ledger, "run-a", 2, 0.44)
    damage(ledger.path)
    with pytest.raises(LedgerCorruptedError) as raised:
        BudgetLedger(ledger.path, "hosp0", mark_path=ledger.mark_path)
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
    stale_mark = ledger.mark_path.parent / f".{ledger.mark_path.name}.abc123.tmp"
    stale_mark.write_text('{"half": ')
    assert ledger.spent("run-a") == 0.31  # never read as the ledger
    record(ledger, "run-a", 2, 0.44)
    assert not stale.exists() and not stale_mark.exists()
