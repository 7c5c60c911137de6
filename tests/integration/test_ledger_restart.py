"""The budget ledger across real processes: a SIGKILLed site keeps its spend (even a round killed
mid-training counts: it was reserved first), and a kill in the middle of a stream of writes never
leaves a damaged or partial ledger, nor a mark the ledger cannot be read against."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.slow

SITE_ROUNDS = textwrap.dedent(
    """
    import json, os, signal, sys
    from medtwin.client.privacy import BudgetLedger, SitePolicy, plan_round, reserve_round
    from medtwin.core.config.privacy import PrivacyConfig

    path, mark, first, last, then = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    ledger = BudgetLedger(path, "hosp0", mark_path=mark)
    policy = SitePolicy(max_epsilon=3.0, max_delta=1e-5)
    config = PrivacyConfig(name="dp", target_epsilon=1.0, target_delta=1e-5)
    shape = dict(num_train=199, batch_size=4, local_steps=50, num_rounds=4)
    report = {"spent_at_start": ledger.spent("run-a"), "refused": {}}
    for round_number in range(first, last + 1):
        plan = plan_round(policy=policy, ledger=ledger, run_id="run-a", round=round_number, privacy_cfg=config, **shape)
        if not plan.allowed:
            report["refused"][round_number] = plan.refusal
            continue
        reserve_round(ledger=ledger, plan=plan)  # spent before training
        if then == "sigkill-while-training" and round_number == last:
            print(json.dumps({**report, "spent": ledger.spent("run-a")}), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    report["spent"] = ledger.spent("run-a")
    report["noise_multiplier"] = plan.noise_multiplier
    print(json.dumps(report), flush=True)
    if then == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    """
)

WRITE_FOREVER = textwrap.dedent(
    """
    import sys
    from medtwin.client.privacy import BudgetLedger

    ledger = BudgetLedger(sys.argv[1], "hosp0", mark_path=sys.argv[2])
    print("ready", flush=True)
    for round_number in range(1, 1_000_000):
        ledger.record_round("run-a", round=round_number, steps=10, noise_multiplier=1.0, sample_rate=0.02,
                            delta=1e-5, epsilon=0.001 * round_number)
    """
)


def run_site(script, *args):
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_a_killed_site_restarts_with_its_spend_and_continues(tmp_path):
    from medtwin.client.privacy import BudgetLedger, epsilon_after

    path, mark = tmp_path / "hosp0" / "privacy-ledger.json", tmp_path / "kit" / "ledger.mark"
    first = run_site(SITE_ROUNDS, path, mark, 1, 2, "sigkill")
    assert first.returncode == -signal.SIGKILL, first.stderr
    before_kill = json.loads(first.stdout)
    assert before_kill["spent_at_start"] == 0.0 and before_kill["refused"] == {}

    # killed while training round 3: its spend was reserved first, so it counts
    second = run_site(SITE_ROUNDS, path, mark, 3, 3, "sigkill-while-training")
    assert second.returncode == -signal.SIGKILL, second.stderr
    assert json.loads(second.stdout)["spent_at_start"] == before_kill["spent"] > 0

    third = run_site(SITE_ROUNDS, path, mark, 3, 5, "exit")
    assert third.returncode == 0, third.stderr
    after_restart = json.loads(third.stdout)
    assert after_restart["spent_at_start"] > before_kill["spent"]  # the restart remembers round 3 too
    # round 3 was reserved before the kill; round 5 would exceed the run's epsilon
    assert after_restart["refused"] == {"3": "replay", "5": "budget"}

    ledger = BudgetLedger(path, "hosp0", mark_path=mark)
    run = ledger.run("run-a")
    assert [spend.round for spend in run.rounds] == [1, 2, 3, 4]
    sigma = after_restart["noise_multiplier"]
    expected = epsilon_after(noise_multiplier=sigma, sample_rate=4 / 199, steps=200, target_delta=1e-5)
    assert ledger.spent("run-a") == pytest.approx(expected, rel=1e-9)
    assert 0.99 <= ledger.spent("run-a") <= 1.0
    assert json.loads(mark.read_text())["sequence"] == ledger.sequence() == 4


def test_sigkill_during_a_stream_of_writes_leaves_a_valid_prefix(tmp_path):
    from medtwin.client.privacy import BudgetLedger

    path, mark = tmp_path / "privacy-ledger.json", tmp_path / "kit" / "ledger.mark"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITE_FOREVER, str(path), str(mark)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if path.exists() and len(BudgetLedger(path, "hosp0").history("run-a")) >= 25:
                break
            time.sleep(0.01)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(timeout=30)
    assert writer.returncode == -signal.SIGKILL

    ledger = BudgetLedger(path, "hosp0", mark_path=mark)  # loads against its mark: a kill is no rollback
    run = ledger.run("run-a")  # never corrupted by the kill
    rounds = [spend.round for spend in run.rounds]
    assert len(rounds) >= 25
    assert rounds == list(range(1, len(rounds) + 1))  # a prefix: nothing lost in the middle
    assert run.epsilon == pytest.approx(0.001 * len(rounds))
    assert json.loads(mark.read_text())["sequence"] == ledger.sequence() == len(rounds)
    # the next write (under the lock) removes any temp file the killed writer left behind
    ledger.record_round("run-a", round=len(rounds) + 1, steps=10, noise_multiplier=1.0, sample_rate=0.02,
                        delta=1e-5, epsilon=0.5)
    assert sorted(p.name for p in path.parent.iterdir()) == ["kit", "privacy-ledger.json", "privacy-ledger.json.lock"]
    assert sorted(p.name for p in mark.parent.iterdir()) == ["ledger.mark"]
