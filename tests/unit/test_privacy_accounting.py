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
