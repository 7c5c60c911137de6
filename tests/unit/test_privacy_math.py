"""The torch-free accounting maths against Opacus's own accountant, and the calibration contract."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
from opacus.accountants import RDPAccountant

from medtwin.core.errors import ConfigError
from medtwin.core.privacy_math import (
    PrivacyBudgetUnreachableError,
    calibrate_noise_multiplier,
    epsilon_after,
    merge_history,
    planned_total_steps,
    rdp_epsilon,
    sample_rate_for,
)


def opacus_rdp_epsilon(history, delta):
    accountant = RDPAccountant()
    accountant.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return accountant.get_epsilon(delta=delta)


@pytest.mark.parametrize("noise_multiplier", [0.5, 1.1, 6.0])
@pytest.mark.parametrize("sample_rate", [0.004, 0.02, 0.3, 1.0])
@pytest.mark.parametrize("steps", [1, 1500])
def test_rdp_epsilon_equals_opacus_rdp_accountant(noise_multiplier, sample_rate, steps):
    ours = epsilon_after(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, target_delta=1e-5)
    theirs = opacus_rdp_epsilon([(noise_multiplier, sample_rate, steps)], 1e-5)
    assert ours == pytest.approx(theirs, rel=1e-9)


def test_epsilon_after_composes_the_history_like_opacus():
    history = [(1.2, 0.02, 100), (0.9, 0.05, 30), (1.2, 0.02, 100)]
    ours = epsilon_after(noise_multiplier=2.0, sample_rate=0.01, steps=50, target_delta=1e-6, history=history)
    theirs = opacus_rdp_epsilon(history + [(2.0, 0.01, 50)], 1e-6)
    assert ours == pytest.approx(theirs, rel=1e-9)
    alone = epsilon_after(noise_multiplier=2.0, sample_rate=0.01, steps=50, target_delta=1e-6)
    assert ours > alone  # earlier rounds are not forgotten


def test_merge_history_sums_equal_mechanisms_and_keeps_epsilon():
    history = [(1.0, 0.1, 5), (2.0, 0.1, 3), (1.0, 0.1, 7), (1.0, 0.1, 0)]
    assert sorted(merge_history(history)) == [(1.0, 0.1, 12), (2.0, 0.1, 3)]
    assert rdp_epsilon(history=history, target_delta=1e-5) == pytest.approx(opacus_rdp_epsilon(history, 1e-5), rel=1e-9)


def test_empty_history_spends_nothing():
    assert rdp_epsilon(history=[], target_delta=1e-5) == 0.0


@pytest.mark.parametrize("target_epsilon", [0.5, 1.0, 3.0, 8.0])
def test_calibration_hits_target_over_all_planned_steps(target_epsilon):
    sample_rate = sample_rate_for(batch_size=4, num_train=199)
    total_steps = planned_total_steps(num_rounds=15, local_steps=100)
    sigma = calibrate_noise_multiplier(
        target_epsilon=target_epsilon, target_delta=1e-5, sample_rate=sample_rate, total_steps=total_steps
    )
    spent = opacus_rdp_epsilon([(sigma, sample_rate, total_steps)], 1e-5)
    assert target_epsilon - 0.01 <= spent <= target_epsilon


def test_calibration_is_for_the_whole_run_not_one_round():
    per_round = calibrate_noise_multiplier(target_epsilon=1.0, target_delta=1e-5, sample_rate=0.02, total_steps=100)
    whole_run = calibrate_noise_multiplier(target_epsilon=1.0, target_delta=1e-5, sample_rate=0.02, total_steps=1500)
    assert whole_run > per_round
    # noise calibrated per round would blow the run's budget after 15 rounds
    assert opacus_rdp_epsilon([(per_round, 0.02, 1500)], 1e-5) > 2.0


def test_unreachable_target_says_what_to_change():
    with pytest.raises(PrivacyBudgetUnreachableError, match="target_epsilon"):
        calibrate_noise_multiplier(target_epsilon=0.01, target_delta=1e-5, sample_rate=0.5, total_steps=10)


def test_prv_is_refused_by_the_torch_free_module_with_a_pointer():
    with pytest.raises(ConfigError, match=r"privacy\.accountant.*medtwin\.client\.privacy"):
        epsilon_after(noise_multiplier=1.0, sample_rate=0.1, steps=1, target_delta=1e-5, accountant="prv")
    with pytest.raises(ConfigError, match="unknown accountant"):
        calibrate_noise_multiplier(
            target_epsilon=1.0, target_delta=1e-5, sample_rate=0.1, total_steps=1, accountant="gdp"
        )


def test_sample_rate_is_capped_at_one():
    assert sample_rate_for(batch_size=64, num_train=32) == 1.0
    assert sample_rate_for(batch_size=4, num_train=200) == 0.02


def test_privacy_math_does_not_import_torch():
    code = "import sys, medtwin.core.privacy_math; assert 'torch' not in sys.modules, sorted(sys.modules)"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
