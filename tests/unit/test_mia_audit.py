"""Membership-inference audit: the attacks on constructed scores, and on a deliberately overfit model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from medtwin.core.config import compose_config
from medtwin.core.errors import ConfigError
from medtwin.core.model_vector import model_to_vector
from medtwin.core.rundir import RunDirectory
from medtwin.core.tasks import SiteSplit, get_task
from medtwin.experiments.mia_attacks import (
    attack_auc,
    balanced_membership_rows,
    lira_offline_scores,
    loss_threshold_scores,
    mann_whitney_auc,
    reference_keep_matrix,
)
from medtwin.experiments.mia_audit import (
    MembershipPool,
    add_utility_lost,
    aim_verdict,
    audit_model,
    auditable_task,
    fedavg_reference_trainer,
    final_utility,
    recorded_noise_multipliers,
    signed_logits,
)


def test_perfectly_separated_scores_give_auc_one():
    is_member = np.array([True] * 50 + [False] * 50)
    result = attack_auc(np.where(is_member, 1.0, 0.0) + np.linspace(0, 0.5, 100), is_member, bootstrap=50)
    assert result.auc == 1.0 and result.ci_low == pytest.approx(1.0)
    assert (result.members, result.non_members) == (50, 50)


def test_identical_distributions_give_auc_near_half():
    generator = np.random.default_rng(1)
    is_member = np.repeat([True, False], 5000)
    result = attack_auc(generator.normal(size=10_000), is_member, bootstrap=50)
    assert abs(result.auc - 0.5) < 0.02
    assert result.ci_low < 0.5 < result.ci_high


def test_bootstrap_statistic_is_scikit_learns_auc_with_ties():
    generator = np.random.default_rng(5)
    scores = np.round(generator.normal(size=(3, 40)), 1)  # rounded: many ties
    labels = np.arange(40) < 15
    expected = [roc_auc_score(labels, row) for row in scores]
    assert mann_whitney_auc(scores, num_members=15) == pytest.approx(expected)


def test_attack_auc_refuses_one_sided_or_non_finite_input():
    with pytest.raises(ValueError, match="members and non-members"):
        attack_auc(np.zeros(4), np.ones(4, dtype=bool))
    with pytest.raises(ValueError, match="finite"):
        attack_auc(np.array([0.0, np.nan]), np.array([True, False]))


def test_loss_threshold_calls_low_loss_members():
    losses = np.array([0.01, 0.02, 2.0, 3.0])
    assert attack_auc(loss_threshold_scores(losses), np.array([True, True, False, False]), bootstrap=0).auc == 1.0


def test_lira_calibrates_difficulty_the_loss_attack_cannot():
    """Rows differ widely in difficulty; membership shifts each row's phi by 1 above its own OUT mean.
    The loss attack sees mostly difficulty; LiRA subtracts it."""
    generator = np.random.default_rng(2)
    rows, references = 2000, 8
    difficulty = generator.normal(0.0, 4.0, size=rows)
    is_member = np.arange(rows) < rows // 2
    keep = reference_keep_matrix(rows, reference_models=references, seed=3)
    reference_phi = difficulty + generator.normal(0.0, 0.3, size=(references, rows)) + keep * 1.0
    target_phi = difficulty + generator.normal(0.0, 0.3, size=rows) + is_member * 1.0
    lira = attack_auc(lira_offline_scores(target_phi, reference_phi, keep), is_member, bootstrap=0).auc
    loss = attack_auc(loss_threshold_scores(np.logaddexp(0.0, -target_phi)), is_member, bootstrap=0).auc
    assert lira > 0.95
    assert loss < 0.65


def test_lira_needs_an_out_model_for_every_row():
    keep = np.array([[True, False], [True, True]])
    with pytest.raises(ValueError, match="no reference model"):
        lira_offline_scores(np.zeros(2), np.zeros((2, 2)), keep)


def test_reference_halves_are_balanced():
    keep = reference_keep_matrix(101, reference_models=6, seed=0)
    assert keep.shape == (6, 101)
    assert np.all(keep.sum(axis=0) == 3)
    with pytest.raises(ValueError, match="even"):
        reference_keep_matrix(10, reference_models=3, seed=0)


def test_balanced_membership_rows():
    rows = balanced_membership_rows(66, 34, seed=0)
    assert len(rows) == len(np.unique(rows)) == 34 and rows.max() < 66
    assert len(balanced_membership_rows(10, 34, seed=0)) == 10


@pytest.fixture
def one_torch_thread():
    """Tiny models train faster on one thread, and the machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _memorisation_sites(num_sites: int = 2, rows: int = 30, features: int = 20) -> list[SiteSplit]:
    """Random features and random labels: nothing to learn, everything to memorise."""
    generator = np.random.default_rng(4)

    def block() -> tuple[np.ndarray, np.ndarray]:
        return generator.normal(size=(rows, features)).astype(np.float32), generator.integers(0, 2, rows).astype(np.float32)

    return [SiteSplit(f"site{index}", *block(), *block()) for index in range(num_sites)]


def _overfit(site_rows: list[tuple[np.ndarray, np.ndarray]], seed: int) -> nn.Module:
    """A wide MLP, full-batch Adam for many epochs on few rows."""
    torch.manual_seed(seed)
    features = torch.from_numpy(np.concatenate([x for x, _ in site_rows]))
    labels = torch.from_numpy(np.concatenate([y for _, y in site_rows]))
    model = nn.Sequential(nn.Linear(features.shape[1], 128), nn.ReLU(), nn.Linear(128, 1), nn.Sigmoid())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.binary_cross_entropy(model(features).reshape(-1), labels).backward()
        optimizer.step()
    return model


def test_overfit_model_is_caught_by_both_attacks(one_torch_thread):
    sites = _memorisation_sites()
    target = _overfit([(site.x_train, site.y_train) for site in sites], seed=0)
    pool = MembershipPool.from_sites(sites, seed=0)
    assert np.array_equal(pool.features[pool.is_member], np.concatenate([site.x_train for site in sites]))
    attacks = audit_model(target, sites, train_reference=_overfit, reference_models=4, seed=0)
    assert attacks["loss_threshold"]["members"] == attacks["loss_threshold"]["non_members"] == 60
    assert attacks["loss_threshold"]["auc"] > 0.8
    assert attacks["lira_offline"]["auc"] > 0.8
    assert attacks["lira_offline"]["reference_models"] == 4


def test_an_untrained_model_gives_nothing_away(one_torch_thread):
    sites = _memorisation_sites()

    def untrained(site_rows: list[tuple[np.ndarray, np.ndarray]], seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 1), nn.Sigmoid())

    attacks = audit_model(untrained([], 0), sites, train_reference=untrained, reference_models=2, seed=0)
    assert attacks["loss_threshold"]["ci_low"] < 0.5 < attacks["loss_threshold"]["ci_high"]


def test_signed_logits_are_exact_where_the_probability_saturates():
    model = nn.Sequential(nn.Linear(1, 1), nn.Sigmoid())
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.fill_(0.0)
    phi = signed_logits(model, np.array([[40.0], [40.0], [-2.0]], dtype=np.float32), np.array([1.0, 0.0, 0.0]))
    assert phi == pytest.approx([40.0, -40.0, 2.0])


def test_reference_federation_replays_the_recipe_from_the_public_initial_model():
    config = compose_config(["task=fed_heart_disease", "federation.num_rounds=2", "strategy.local_steps=3"])
    task = get_task(config.task)
    sites = [(site.x_train, site.y_train) for site in task.load_all_sites()]
    train = fedavg_reference_trainer(task, config, noise_multipliers=None)
    first, again = model_to_vector(train(sites, 7)), model_to_vector(train(sites, 7))
    torch.manual_seed(config.seed)
    initial = model_to_vector(task.build_model())
    assert np.array_equal(first, again) and not np.allclose(first, initial)
    noisy = fedavg_reference_trainer(task, config, noise_multipliers=[50.0] * 4)
    assert np.abs(model_to_vector(noisy(sites, 7)) - initial).max() > np.abs(first - initial).max()


def test_audit_refuses_a_regression_task():
    config = compose_config(["task=diabetes_progression"])
    with pytest.raises(ConfigError, match="task.name"):
        auditable_task(config)


def test_noise_multipliers_come_from_the_sites_reports(tmp_path):
    run_dir = RunDirectory(tmp_path, "run-1")
    run_dir.append_metrics({"phase": "train", "round": 1, "sites": {"a": {"unsigned.noise_multiplier": 1.5}}})
    run_dir.append_metrics({"phase": "train", "round": 2, "sites": {"b": {"unsigned.noise_multiplier": 2.5}}})
    assert recorded_noise_multipliers(run_dir, ["a", "b"]) == [1.5, 2.5]
    with pytest.raises(ValueError, match="no noise multiplier"):
        recorded_noise_multipliers(run_dir, ["a", "c"])


def _row(epsilon: float | None, accuracy: float, auc: float, *, sites_accuracy: float | None = None) -> dict:
    attack = {"auc": auc}
    utility = {
        "pooled_test": {"accuracy": accuracy, "auroc": 0.9},
        "sites_test": {"accuracy": accuracy if sites_accuracy is None else sites_accuracy, "auroc": 0.9},
    }
    return {"task": "t", "seed": 1, "target_epsilon": epsilon, "utility": utility,
            "attacks": {"loss_threshold": attack, "lira_offline": attack}}  # fmt: skip


def test_utility_lost_and_the_aim():
    rows = [_row(None, 0.80, 0.60), _row(3.0, 0.79, 0.52), _row(8.0, 0.70, 0.60)]
    add_utility_lost(rows)
    assert rows[1]["utility_lost_points"]["pooled_test"]["accuracy"] == pytest.approx(1.0)
    assert rows[0]["utility_lost_points"]["sites_test"]["auroc"] == 0.0
    assert aim_verdict(rows)["met"] and aim_verdict(rows)["settings_checked"] == 1
    rows.append(_row(1.0, 0.79, 0.52, sites_accuracy=0.75))  # the sites' own view lost 5 points
    add_utility_lost(rows)
    verdict = aim_verdict(rows)
    assert not verdict["met"] and verdict["failures"][0]["target_epsilon"] == 1.0
    assert verdict["failures"][0]["accuracy_lost_points"] == pytest.approx(5.0)
    rows.append(_row(3.0, 0.80, 0.58))  # no utility lost, but the attack beats 0.55
    add_utility_lost(rows)
    assert [failure["attack_auc"] for failure in aim_verdict(rows)["failures"]] == [0.52, 0.58]


def test_final_utility_scores_both_test_views():
    config = compose_config(["task=fed_heart_disease"])
    task = get_task(config.task)
    sites = task.load_all_sites()
    torch.manual_seed(0)
    utility = final_utility(task, task.build_model(), sites)
    total_test = sum(site.num_test for site in sites)
    assert utility["pooled_test"]["n"] == utility["sites_test"]["n"] == total_test
    assert 0.0 <= utility["pooled_test"]["accuracy"] <= 1.0
