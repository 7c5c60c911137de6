"""Site-side accounting (Opacus RDP and PRV) equals Opacus's accountants stepped directly."""

from __future__ import annotations

import warnings

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from medtwin.client.privacy import calibrate_noise_multiplier, epsilon_after, history_epsilon
from medtwin.core import privacy_math


def stepped(accountant, steps):
    """Opacus's own way: one accountant.step per optimizer step, across rounds."""
    for noise_multiplier, sample_rate, count in steps:
        for _ in range(count):
            accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return accountant.get_epsilon(delta=1e-5)


@pytest.mark.parametrize(("name", "make"), [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_epsilon_after_k_steps_equals_opacus_accountant(name, make):
    rounds = [(1.3, 0.02, 40), (1.3, 0.02, 40), (1.3, 0.02, 40)]
    expected = stepped(make(), rounds)
    ours = epsilon_after(
        noise_multiplier=1.3, sample_rate=0.02, steps=40, target_delta=1e-5, accountant=name, history=rounds[:2]
    )
    assert ours == pytest.approx(expected, rel=1e-9)


def test_site_rdp_equals_torch_free_rdp():
    history = [(0.8, 0.05, 70), (1.5, 0.01, 300)]
    assert history_epsilon(history=history, target_delta=1e-6, accountant="rdp") == pytest.approx(
        privacy_math.rdp_epsilon(history=history, target_delta=1e-6), rel=1e-9
    )


def test_prv_is_tighter_than_rdp():
    history = [(1.0, 0.02, 1500)]
    prv = history_epsilon(history=history, target_delta=1e-5, accountant="prv")
    rdp = history_epsilon(history=history, target_delta=1e-5, accountant="rdp")
    assert prv < rdp


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibration_hits_target_over_the_whole_run(accountant):
    sample_rate, total_steps = 4 / 150, 10 * 50
    sigma = calibrate_noise_multiplier(
        target_epsilon=2.0, target_delta=1e-5, sample_rate=sample_rate, total_steps=total_steps, accountant=accountant
    )
    make = RDPAccountant if accountant == "rdp" else PRVAccountant
    opacus_accountant = make()
    opacus_accountant.history = [(sigma, sample_rate, total_steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        spent = opacus_accountant.get_epsilon(delta=1e-5)
    assert 2.0 - 0.01 <= spent <= 2.0


def test_empty_history_is_zero():
    assert history_epsilon(history=[], target_delta=1e-5, accountant="prv") == 0.0


def test_a_stored_noise_calibration_is_reused_only_if_it_still_meets_the_target(tmp_path, monkeypatch) -> None:
    """Deployed, each message is a fresh process: the site remembers calibrations beside its ledger.
    A stored noise multiplier is re-checked; one that misses the target (tampered) is recomputed."""
    import json

    from medtwin.client.privacy import accounting

    parameters = dict(target_epsilon=2.0, target_delta=1e-5, sample_rate=0.05, total_steps=60, accountant="rdp", epsilon_tolerance=0.01)
    path = tmp_path / "noise-calibrations.json"
    monkeypatch.setattr(accounting, "_CALIBRATED", {})
    sigma = accounting.calibrate_noise_multiplier_stored(path, **parameters)
    assert sigma == accounting.calibrate_noise_multiplier(**parameters)
    assert json.loads(path.read_text()) == {json.dumps(parameters, sort_keys=True): sigma}

    def no_bisection(**_: object) -> float:
        raise AssertionError("the stored calibration should have been used")

    monkeypatch.setattr(accounting, "_CALIBRATED", {})  # a new process
    monkeypatch.setattr(accounting, "calibrate_noise_multiplier", no_bisection)
    assert accounting.calibrate_noise_multiplier_stored(path, **parameters) == sigma

    path.write_text(json.dumps({json.dumps(parameters, sort_keys=True): sigma / 3}))  # less noise than the target allows
    monkeypatch.setattr(accounting, "_CALIBRATED", {})
    monkeypatch.undo()
    monkeypatch.setattr(accounting, "_CALIBRATED", {})
    assert accounting.calibrate_noise_multiplier_stored(path, **parameters) == sigma
    assert json.loads(path.read_text())[json.dumps(parameters, sort_keys=True)] == sigma  # repaired


def test_a_stored_noise_calibration_the_accountant_cannot_evaluate_is_recomputed(tmp_path, monkeypatch) -> None:
    import json

    from medtwin.client.privacy import accounting

    parameters = dict(target_epsilon=2.0, target_delta=1e-5, sample_rate=0.05, total_steps=60, accountant="rdp", epsilon_tolerance=0.01)
    path = tmp_path / "noise-calibrations.json"
    expected = accounting.calibrate_noise_multiplier(**parameters)
    for damaged in (1e-320, 1e300, float("nan"), "abc"):
        path.write_text(json.dumps({json.dumps(parameters, sort_keys=True): damaged}))
        monkeypatch.setattr(accounting, "_CALIBRATED", {})
        assert accounting.calibrate_noise_multiplier_stored(path, **parameters) == expected, damaged


@pytest.mark.parametrize(
    "history",
    [[(1.1, 0.02, 100)] * 4, [(0.7, 0.05, 30), (1.3, 0.01, 200), (0.7, 0.05, 5)], [(2.0, 0.5, 1)], [(0.9, 0.003, 10_000)]],
)
def test_history_epsilon_is_exactly_opacus_rdp_accountant(history):
    """The per-(noise, rate) RDP memo must give Opacus's RDPAccountant's epsilon bit for bit."""
    reference = RDPAccountant()
    reference.history = privacy_math.merge_history(history)
    assert history_epsilon(history=history, target_delta=1e-5) == float(reference.get_epsilon(delta=1e-5))
