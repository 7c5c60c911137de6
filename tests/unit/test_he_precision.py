"""Under DP-SGD the CKKS precision target is 1 % of a lower bound on the DP noise of the averaged update."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from torch import nn

from medtwin.client.privacy import dp_units_per_step, train_locally_dp
from medtwin.core.config import compose_config
from medtwin.core.config.privacy import PrivacyConfig
from medtwin.core.config.strategy import StrategyConfig
from medtwin.core.he import (
    CkksParameters,
    averaged_update_noise_std,
    ckks_parameters_from_config,
    create_secret_context,
    estimated_update_bytes,
    he_precision_for,
    he_precision_of_run,
    serialize_public_context,
    site_precision_problem,
)
from medtwin.core.he.context import load_context
from medtwin.core.he.precision import DEFAULT_MAX_RELATIVE_ERROR
from medtwin.core.privacy_math import units_per_step
from medtwin.core.privacy_math import calibrate_noise_multiplier, sample_rate_for
from medtwin.server.aggregation import CkksAggregator, PlainAggregator
from medtwin.server.app import build_summary, he_precision_record
from medtwin.server.loop import LoopResult

PRIVACY = PrivacyConfig(name="dp", target_epsilon=3.0, target_delta=1e-5, max_grad_norm=1.0)


def _site_sigma(*, num_units: int, units_per_step: int, num_rounds: int, local_steps: int) -> float:
    """The noise multiplier a site calibrates (site_privacy.plan_round, RDP accountant)."""
    return calibrate_noise_multiplier(
        target_epsilon=PRIVACY.target_epsilon,
        target_delta=PRIVACY.target_delta,
        sample_rate=sample_rate_for(batch_size=units_per_step, num_train=num_units),
        total_steps=num_rounds * local_steps,
        epsilon_tolerance=PRIVACY.epsilon_tolerance,
    )


@pytest.mark.parametrize(("name", "proximal_mu"), [("fedavg", 0.0), ("fedprox", 5.0)])
def test_the_derived_std_is_a_tight_lower_bound_of_the_noise_train_locally_dp_adds(name: str, proximal_mu: float) -> None:
    num_rows, features, local_steps, batch_size, learning_rate = 40, 300, 12, 4, 0.1
    strategy = StrategyConfig(
        name=name, proximal_mu=proximal_mu, local_steps=local_steps, batch_size=batch_size, learning_rate=learning_rate
    )
    sigma = _site_sigma(num_units=num_rows, units_per_step=batch_size, num_rounds=1, local_steps=local_steps)
    x_train, y_train = np.zeros((num_rows, features), np.float32), np.zeros(num_rows, np.float32)  # no learning signal
    deltas = []
    for repetition in range(8):
        model = nn.Linear(features, 1, bias=False)
        before = model.weight.detach().clone()
        train_locally_dp(
            model, x_train, y_train, loss_fn=nn.MSELoss(), local_steps=local_steps, batch_size=batch_size,
            optimizer_name="sgd", learning_rate=learning_rate, proximal_mu=proximal_mu, seed=17 * repetition,
            noise_multiplier=sigma, max_grad_norm=PRIVACY.max_grad_norm, deterministic_for_tests=True,
        )  # fmt: skip
        deltas.append((model.weight.detach() - before).numpy().ravel())
    empirical = float(np.std(np.concatenate(deltas)))
    floor = averaged_update_noise_std(
        privacy=PRIVACY, strategy=strategy, num_rounds=1, max_total_examples=num_rows, num_sites=1, grouped_by_patient=False
    )
    assert floor.std is not None
    assert empirical >= 0.95 * floor.std  # a lower bound ...
    assert empirical <= 1.08 * floor.std  # ... and not a vacuous one (2400 draws: ~1.5 % standard error)


@pytest.mark.parametrize("counts", [(40, 900, 60), (999, 1)])
def test_the_floor_holds_for_every_split_of_the_total_the_run_admits(counts: tuple[int, ...]) -> None:
    strategy = StrategyConfig(local_steps=5, batch_size=8, learning_rate=0.05)
    max_total_examples, num_rounds = 1000, 2
    per_site = []
    for count in counts:  # what each site really adds (sigma from its own rate, noise / its E[B])
        units = dp_units_per_step(batch_size=strategy.batch_size, unit_rows=PRIVACY.unit_rows, grouped=False)
        sigma = _site_sigma(num_units=count, units_per_step=units, num_rounds=num_rounds, local_steps=strategy.local_steps)
        expected_batch = max(1, round(sample_rate_for(batch_size=units, num_train=count) * count))
        per_site.append(strategy.learning_rate * sigma * PRIVACY.max_grad_norm / expected_batch * math.sqrt(strategy.local_steps))
    weights = np.array(counts) / sum(counts)
    average_std = float(np.sqrt(np.sum((weights * np.array(per_site)) ** 2)))
    floor = averaged_update_noise_std(
        privacy=PRIVACY, strategy=strategy, num_rounds=num_rounds, max_total_examples=max_total_examples,
        num_sites=len(counts), grouped_by_patient=False,
    )  # fmt: skip
    assert floor.std is not None and floor.std <= average_std


def test_units_per_step_follow_the_sites_rule() -> None:
    assert dp_units_per_step is units_per_step  # the site trains and the floor is derived with one rule
    got = {(batch, rows, grouped): units_per_step(batch_size=batch, unit_rows=rows, grouped=grouped)
           for batch, rows in [(4, 8), (64, 8), (16, 3), (1, 1)] for grouped in (False, True)}  # fmt: skip
    assert got == {
        (4, 8, False): 4, (4, 8, True): 1, (64, 8, False): 64, (64, 8, True): 8,
        (16, 3, False): 16, (16, 3, True): 5, (1, 1, False): 1, (1, 1, True): 1,
    }  # fmt: skip


def test_a_dp_run_chooses_parameters_whose_bound_is_within_one_percent_of_the_noise() -> None:
    config = compose_config(
        ["privacy=dp", "privacy.target_epsilon=1", "strategy.learning_rate=0.05", "crypto=ckks", "crypto.max_total_examples=1000"]
    )
    precision = he_precision_of_run(config, num_sites=4, max_total_examples=1000, grouped_by_patient=False)
    assert precision.derived_from == "dp" and precision.dp_noise_std > 0
    parameters = ckks_parameters_from_config(
        config.crypto, num_parameters=5000, num_sites=4, max_relative_error=precision.max_relative_error
    )
    record = precision.record(parameters)
    assert record["bound_abs"] <= 0.01 * precision.dp_noise_std and record["ratio_to_noise"] <= 0.01
    default = ckks_parameters_from_config(replace(config.crypto, max_relative_error=1e-5), num_parameters=5000, num_sites=4)
    assert estimated_update_bytes(parameters) < estimated_update_bytes(default)  # the noise pays for fewer bits here


def test_without_a_sound_bound_the_configured_target_stays() -> None:
    no_dp = compose_config(["crypto=ckks"])
    precision = he_precision_of_run(no_dp, num_sites=4, max_total_examples=1000, grouped_by_patient=False)
    assert (precision.derived_from, precision.max_relative_error, precision.dp_noise_std) == ("config", DEFAULT_MAX_RELATIVE_ERROR, None)
    explicit = compose_config(["crypto=ckks", "crypto.max_relative_error=3e-4"])
    assert he_precision_of_run(explicit, num_sites=4, max_total_examples=1000, grouped_by_patient=False).max_relative_error == 3e-4
    adam = compose_config(["privacy=dp", "crypto=ckks", "strategy.optimizer=adam"])
    with_adam = he_precision_of_run(adam, num_sites=4, max_total_examples=1000, grouped_by_patient=False)
    assert with_adam.derived_from == "config" and "adam" in with_adam.reason
    prv = compose_config(["privacy=dp", "privacy.accountant=prv", "crypto=ckks"])
    assert he_precision_of_run(prv, num_sites=4, max_total_examples=1000, grouped_by_patient=False).derived_from == "config"


def test_an_explicit_target_wins_only_where_it_is_finer_than_the_derived_one() -> None:
    noise = averaged_update_noise_std(
        privacy=PRIVACY, strategy=StrategyConfig(), num_rounds=15, max_total_examples=1000, num_sites=4, grouped_by_patient=False
    )
    derived = he_precision_for(configured_max_relative_error=0.0, max_abs_weight_bound=4.0, noise=noise)
    finer = he_precision_for(configured_max_relative_error=derived.max_relative_error / 10, max_abs_weight_bound=4.0, noise=noise)
    coarser = he_precision_for(configured_max_relative_error=derived.max_relative_error * 10, max_abs_weight_bound=4.0, noise=noise)
    assert derived.derived_from == "dp" and derived.max_relative_error == pytest.approx(0.01 * noise.std / 4.0)
    assert (finer.derived_from, finer.max_relative_error) == ("config", derived.max_relative_error / 10)
    assert (coarser.derived_from, coarser.max_relative_error) == ("dp", derived.max_relative_error)


def _site_check(parameters: CkksParameters, *, sigma: float) -> str:
    return site_precision_problem(
        parameters, noise_multiplier=sigma, max_grad_norm=1.0, expected_batch_size=4, learning_rate=0.01, local_steps=100, proximal_mu=0.0
    )


def test_a_site_refuses_a_key_set_coarser_than_its_own_noise_and_accepts_finer() -> None:
    common = {"num_parameters": 14, "num_sites": 4, "max_abs_weight_bound": 4.0, "max_total_examples": 1000}
    honest = ckks_parameters_from_config(
        replace(compose_config(["crypto=ckks"]).crypto, max_total_examples=1000), num_parameters=14, num_sites=4,
        max_relative_error=0.01 * (0.01 * 0.5 / 4 * 10 / 2) / 4.0,  # 1 % of this site's own floor, sigma 0.5
    )  # fmt: skip
    assert all(getattr(honest, key) == value for key, value in common.items())
    assert _site_check(honest, sigma=0.5) == ""
    coarse = replace(honest, predicted_error_bound=0.02)  # a hostile coordinator's 2 %-of-full-scale rounding
    problem = _site_check(coarse, sigma=0.5)
    assert "crypto.max_relative_error" in problem and "1% of this site's DP noise" in problem
    assert _site_check(coarse, sigma=5000.0) == ""  # under enough noise the same rounding is harmless


def test_the_summary_records_the_precision_the_run_used(tmp_path) -> None:
    config = compose_config(["privacy=dp", "privacy.target_epsilon=3", "crypto=ckks"])
    precision = he_precision_of_run(config, num_sites=4, max_total_examples=1000, grouped_by_patient=False)
    parameters = ckks_parameters_from_config(
        replace(config.crypto, max_total_examples=1000), num_parameters=14, num_sites=4, max_relative_error=precision.max_relative_error
    )
    public = load_context(serialize_public_context(create_secret_context(parameters)))
    aggregator = CkksAggregator(public_context=public)
    record = he_precision_record(config, aggregator, grouped_by_patient=False)
    assert record is not None and record["derived_from"] == "dp" and record["parameters_meet_target"]
    assert record["ratio_to_noise"] <= 0.01 and record["dp_noise_std"] == pytest.approx(precision.dp_noise_std)
    result = LoopResult(he_error_bounds=[record["bound_abs"] * 2])
    summary = build_summary(config, "run-x", "accuracy", result, aggregator, wall_time_s=1.0, he_precision=record)
    assert summary["he_precision"] == record  # exactly what run registration commits with the HE parameters
    assert summary["he_precision_at_run_totals"]["ratio_to_noise"] == pytest.approx(2 * record["ratio_to_noise"])
    assert he_precision_record(compose_config(["privacy=dp"]), PlainAggregator(), grouped_by_patient=False) is None


def test_an_unreachable_epsilon_is_refused_by_name_not_an_overflow() -> None:
    """The floor's bracket is the sites' calibration bracket: a target below what RDP can certify stops at
    MAX_NOISE_MULTIPLIER with the sites' error instead of doubling sigma until the arithmetic overflows."""
    from medtwin.core.he.precision import noise_multiplier_floor
    from medtwin.core.privacy_math import PrivacyBudgetUnreachableError

    with pytest.raises(PrivacyBudgetUnreachableError, match="privacy.target_epsilon"):
        noise_multiplier_floor(target_epsilon=0.1, target_delta=1e-5, sample_rate=0.01, total_steps=100)
