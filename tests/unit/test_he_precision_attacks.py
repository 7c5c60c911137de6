"""A hostile coordinator against the DP-derived CKKS precision (review of c29b989 / df3a90f).

Round 1 a site can only check the key set at its own full scale (the coordinator's crypto.max_total_examples
and num_sites); from round 2 it knows the run's real totals — the signed counts and participants of the
aggregate it starts from — and checks the rounding at those (`client/app.py` `_he_precision_problem`)."""

from __future__ import annotations

import math
from dataclasses import replace


from medtwin.core.config import compose_config
from medtwin.client.codec import CkksSiteCodec
from medtwin.core.he import ckks_parameters_from_config, create_secret_context, he_precision_of_run, site_precision_problem
from medtwin.core.he.params import average_error_bound
from medtwin.core.privacy_math import calibrate_noise_multiplier, sample_rate_for

ROWS, SITES, BATCH, LR, STEPS, ROUNDS = 500, 4, 32, 0.05, 5, 15  # four equal sites: T = 2000 examples a round
TOTAL = ROWS * SITES


def _run(max_total_examples: int, num_sites: int = SITES, observed_sites: int | None = None, tmp_path=None):
    """(precision, parameters, the site's round-1 check, its round-2 check at the real totals, DP noise on the average)."""
    config = compose_config(
        ["privacy=dp", "privacy.target_epsilon=1", "crypto=ckks", f"strategy.learning_rate={LR}", f"strategy.local_steps={STEPS}",
         f"strategy.batch_size={BATCH}", f"federation.num_rounds={ROUNDS}"]
    )  # fmt: skip
    crypto = replace(config.crypto, max_total_examples=max_total_examples)
    precision = he_precision_of_run(
        replace(config, crypto=crypto), num_sites=num_sites, max_total_examples=max_total_examples, grouped_by_patient=False
    )
    parameters = ckks_parameters_from_config(
        crypto, num_parameters=5000, num_sites=num_sites, max_relative_error=precision.max_relative_error
    )
    sigma = calibrate_noise_multiplier(
        target_epsilon=1.0, target_delta=1e-5, sample_rate=sample_rate_for(batch_size=BATCH, num_train=ROWS),
        total_steps=ROUNDS * STEPS, epsilon_tolerance=0.01,
    )  # fmt: skip
    check = dict(noise_multiplier=sigma, max_grad_norm=1.0, expected_batch_size=BATCH, learning_rate=LR, local_steps=STEPS, proximal_mu=0.0)
    round_one = site_precision_problem(parameters, **check)
    codec = CkksSiteCodec(create_secret_context(parameters), kit_dir=tmp_path)
    participants = observed_sites or SITES
    observed = (codec.error_bound(total_examples=TOTAL, num_sites=participants), participants)  # what the site decoded
    later = site_precision_problem(parameters, **check, observed=observed)
    noise_on_average = LR * sigma / BATCH * math.sqrt(STEPS) / math.sqrt(SITES)  # equal sites, plain SGD
    return precision, parameters, round_one, later, noise_on_average


def test_honest_full_scale_keeps_the_error_at_run_totals_near_one_percent_of_the_noise(tmp_path):
    _, parameters, round_one, later, noise = _run(2 * TOTAL, tmp_path=tmp_path)  # the documented default: twice the rows
    assert round_one == "" and later == ""
    assert average_error_bound(parameters, num_sites=SITES, total_examples=TOTAL) < 0.02 * noise


def test_an_inflated_max_total_examples_is_refused_once_the_site_sees_the_runs_real_totals(tmp_path):
    precision, parameters, round_one, later, noise = _run(2_000_000 * TOTAL, tmp_path=tmp_path)
    real_error = average_error_bound(parameters, num_sites=SITES, total_examples=TOTAL)
    assert real_error > noise  # 26x the DP noise on the average, not 1 %
    assert precision.record(parameters)["ratio_to_noise"] < 1e-3  # the registered record is at the claimed full scale
    assert round_one == ""  # round 1: the site has only the coordinator's full scale to go by (the residual)
    assert "at the run's real totals" in later and "crypto.max_relative_error" in later  # round 2 on: refused


def test_a_key_set_made_for_fewer_sites_than_participate_is_bounded_at_the_real_participants(tmp_path):
    _, parameters, _, later, _ = _run(2 * TOTAL, num_sites=1, tmp_path=tmp_path)
    assert parameters.num_sites == 1
    codec = CkksSiteCodec(create_secret_context(parameters), kit_dir=tmp_path)
    real = average_error_bound(parameters, num_sites=SITES, total_examples=TOTAL)
    assert codec.error_bound(total_examples=TOTAL, num_sites=SITES) == real  # reported as he_error_bound, checked above
    assert codec.error_bound(total_examples=TOTAL, num_sites=SITES) > codec.error_bound(total_examples=TOTAL)
    assert codec.count_error_bound(num_sites=SITES) > codec.count_error_bound()


def test_a_site_checks_the_key_set_at_the_totals_of_the_aggregate_it_starts_from(tmp_path):
    """The wiring in client/app.py: round 1 at full scale, later rounds at the verified aggregate's signed totals."""
    from types import SimpleNamespace

    from medtwin.client.aggregate_check import VerifiedAggregate
    from medtwin.client.app import _he_precision_problem

    _, parameters, _, _, _ = _run(2_000_000 * TOTAL, tmp_path=tmp_path)
    sigma = calibrate_noise_multiplier(
        target_epsilon=1.0, target_delta=1e-5, sample_rate=BATCH / ROWS, total_steps=ROUNDS * STEPS, epsilon_tolerance=0.01
    )
    site = SimpleNamespace(
        codec=CkksSiteCodec(create_secret_context(parameters), kit_dir=tmp_path),
        config=SimpleNamespace(strategy=SimpleNamespace(optimizer="sgd", learning_rate=LR)),
        data=SimpleNamespace(num_train_units=ROWS),
    )
    plan = SimpleNamespace(noise_multiplier=sigma, max_grad_norm=1.0, sample_rate=BATCH / ROWS, steps=STEPS)
    aggregate = VerifiedAggregate(server_round=1, aggregate_sha256="0" * 64, participants=("a", "b", "c", "d"), claimed_examples=TOTAL)
    assert _he_precision_problem(site, plan, proximal_mu=0.0, last_aggregate=None) == ""
    assert "at the run's real totals" in _he_precision_problem(site, plan, proximal_mu=0.0, last_aggregate=aggregate)
    honest = _run(2 * TOTAL, tmp_path=tmp_path)[1]
    site.codec = CkksSiteCodec(create_secret_context(honest), kit_dir=tmp_path)
    assert _he_precision_problem(site, plan, proximal_mu=0.0, last_aggregate=aggregate) == ""
