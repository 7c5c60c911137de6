"""DP-SGD at a site with real Opacus: per-example clipping before noise, training, model hygiene."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import DPOptimizer
from torch import nn

from medtwin.client.privacy import IncompatibleModelError, check_model_compatible, train_locally_dp
from medtwin.client.privacy.flat_optimizer import FlatDPOptimizer
from medtwin.core.tasks.models import FlatBCELoss, logistic_regression, mlp

CLIP = 1.0
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def batch(num_examples=8, num_features=13, seed=0):
    generator = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.05, 0.1, 3.0, 10.0, 0.2, 30.0, 1.0, 0.01])[:num_examples, None]  # some norms < C, some > C
    features = torch.randn(num_examples, num_features, generator=generator) * scale
    labels = (torch.rand(num_examples, generator=generator) < 0.5).float()
    return features, labels


def per_example_gradients(model, features, labels):
    """Ground truth without Opacus: one backward per example, flattened over all parameters."""
    rows = []
    for index in range(len(features)):
        model.zero_grad()
        FlatBCELoss()(model(features[index : index + 1]), labels[index : index + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    model.zero_grad()
    return torch.stack(rows)


def clipped_sum(gradients):
    factors = (CLIP / (gradients.norm(dim=1) + 1e-6)).clamp(max=1.0)
    return (factors[:, None] * gradients).sum(dim=0)


def opacus_step(model, features, labels, *, mode, optimizer_class, noise_multiplier, seed=0):
    """One DP step with Opacus; returns (per-sample grads, summed clipped grad, final grad), flat."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    wrapped = prepare_module(model, mode, batch_first=True, loss_reduction="mean")
    dp_optimizer = optimizer_class(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=CLIP,
        expected_batch_size=len(features),
        loss_reduction="mean",
        generator=torch.Generator().manual_seed(seed),
    )
    dp_optimizer.zero_grad()
    FlatBCELoss()(wrapped(features), labels).backward()
    per_sample = torch.cat([p.grad_sample.reshape(len(features), -1) for p in model.parameters()], dim=1)
    dp_optimizer.pre_step()
    summed = torch.cat([p.summed_grad.reshape(-1) for p in model.parameters()])
    final = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()
    wrapped.to_standard_module()
    return per_sample, summed, final


@pytest.mark.parametrize("mode", ["hooks", "ew", "functorch"])
def test_per_example_gradients_are_clipped_to_max_grad_norm_before_summing(mode):
    torch.manual_seed(0)
    model = logistic_regression(13)
    features, labels = batch()
    truth = per_example_gradients(model, features, labels)
    assert (truth.norm(dim=1) > CLIP).any() and (truth.norm(dim=1) < CLIP).any()

    per_sample, summed, final = opacus_step(
        model, features, labels, mode=mode, optimizer_class=FlatDPOptimizer, noise_multiplier=0.0
    )
    torch.testing.assert_close(per_sample, truth, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(summed, clipped_sum(truth), rtol=1e-5, atol=1e-6)
    assert summed.norm() <= CLIP * len(features) + 1e-5
    torch.testing.assert_close(final, clipped_sum(truth) / len(features), rtol=1e-5, atol=1e-6)


def test_flat_optimizer_matches_stock_opacus_dp_optimizer():
    torch.manual_seed(1)
    model = mlp(13, hidden_units=16, sigmoid_output=True)
    features, labels = batch(seed=3)
    stock = opacus_step(model, features, labels, mode="hooks", optimizer_class=DPOptimizer, noise_multiplier=0.0)
    flat = opacus_step(model, features, labels, mode="hooks", optimizer_class=FlatDPOptimizer, noise_multiplier=0.0)
    for ours, theirs in zip(flat, stock, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_noise_is_added_after_clipping_with_std_sigma_times_clip():
    torch.manual_seed(0)
    model = mlp(13, hidden_units=64, sigmoid_output=True)  # ~960 parameters: enough draws for a std estimate
    features, labels = batch()
    truth = per_example_gradients(model, features, labels)
    _, summed, final = opacus_step(
        model, features, labels, mode="hooks", optimizer_class=FlatDPOptimizer, noise_multiplier=2.0
    )
    torch.testing.assert_close(summed, clipped_sum(truth), rtol=1e-5, atol=1e-6)  # noise never enters the clip
    noise = final * len(features) - summed
    assert noise.std().item() == pytest.approx(2.0 * CLIP, rel=0.1)
    assert abs(noise.mean().item()) < 0.2


def separable_data(num_examples=240, seed=0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(num_examples, 13)).astype(np.float32)
    labels = (features[:, 0] + 0.5 * features[:, 1] > 0).astype(np.float32)
    return features, labels


def train(model, features, labels, **change):
    settings = {
        "loss_fn": FlatBCELoss(),
        "local_steps": 150,
        "batch_size": 16,
        "optimizer_name": "sgd",
        "learning_rate": 0.5,
        "seed": 7,
        "noise_multiplier": 0.8,
        "max_grad_norm": 1.0,
        "grad_sample_mode": "ew",
    }
    return train_locally_dp(model, features, labels, **{**settings, **change})


def accuracy(model, features, labels):
    with torch.no_grad():
        predictions = model(torch.from_numpy(features)).reshape(-1).numpy() > 0.5
    return float((predictions == labels.astype(bool)).mean())


@pytest.mark.parametrize("mode", ["hooks", "ew"])
def test_dp_training_learns_and_hands_back_a_plain_module(mode):
    features, labels = separable_data()
    torch.manual_seed(0)
    model = logistic_regression(13)
    keys_before = list(model.state_dict())
    assert accuracy(model, features, labels) < 0.8
    result = train(model, features, labels, grad_sample_mode=mode)
    assert 0.85 <= accuracy(model, features, labels) <= 1.0
    assert (result.steps, result.num_examples, result.sample_rate) == (150, 240, 16 / 240)
    assert type(model) is nn.Sequential and list(model.state_dict()) == keys_before
    assert not any(key.startswith("_module") for key in model.state_dict())
    for parameter in model.parameters():
        assert not hasattr(parameter, "grad_sample") and not hasattr(parameter, "summed_grad")
    assert all(not module._forward_hooks and not module._backward_hooks for module in model.modules())


def test_noise_comes_from_secret_randomness_unless_a_test_asks_for_determinism():
    features, labels = separable_data()
    weights = []
    for deterministic in (True, True, False, False):
        torch.manual_seed(0)
        model = logistic_regression(13)
        train(model, features, labels, local_steps=5, deterministic_for_tests=deterministic)
        weights.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(weights[0], weights[1])  # same test seed, same run
    assert not torch.allclose(weights[2], weights[3])  # the config seed does not fix the noise


def test_fedprox_term_pulls_towards_the_global_model():
    features, labels = separable_data()
    distances = {}
    for proximal_mu in (0.0, 1.0):
        torch.manual_seed(0)
        model = logistic_regression(13)
        start = [p.detach().clone() for p in model.parameters()]
        train(model, features, labels, proximal_mu=proximal_mu, noise_multiplier=0.0, deterministic_for_tests=True)
        distances[proximal_mu] = sum(((p.detach() - s) ** 2).sum().item() for p, s in zip(model.parameters(), start))
    assert distances[1.0] < 0.5 * distances[0.0]


def test_empty_poisson_batches_are_noise_only_steps():
    features, labels = separable_data(num_examples=400)
    torch.manual_seed(0)
    model = logistic_regression(13)
    before = [p.detach().clone() for p in model.parameters()]
    result = train(
        model, features, labels, batch_size=1, local_steps=30, learning_rate=0.1, deterministic_for_tests=True
    )
    assert result.empty_batches > 10  # q = 1/400: most batches are empty
    assert any(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))  # noise still moved it


def test_batchnorm_model_is_rejected_with_a_clear_fix():
    model = nn.Sequential(nn.Linear(13, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1), nn.Sigmoid())
    features, labels = separable_data()
    with pytest.raises(IncompatibleModelError) as raised:
        train(model, features, labels)
    message = str(raised.value)
    assert "BatchNorm" in message and "GroupNorm or LayerNorm" in message
    assert raised.value.problems


def test_twin_models_are_compatible():
    check_model_compatible(logistic_regression(13))
    check_model_compatible(mlp(30, hidden_units=64, sigmoid_output=True))


def test_secure_mode_trains_too():
    features, labels = separable_data()
    torch.manual_seed(0)
    model = logistic_regression(13)
    result = train(model, features, labels, local_steps=20, secure_mode=True)
    assert result.steps == 20 and np.isfinite(result.mean_loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_accountant_and_mode_names_agree_between_config_and_maths():
    from medtwin.core import privacy_math
    from medtwin.core.config import privacy as privacy_config

    assert privacy_math.ACCOUNTANTS == privacy_config.ACCOUNTANTS


def one_step_update(features, labels, **change):
    """The weight change of one noiseless DP-SGD step at learning rate 1 from zero weights."""
    model = logistic_regression(features.shape[1])
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    settings = {"local_steps": 1, "learning_rate": 1.0, "noise_multiplier": 0.0, "deterministic_for_tests": True}
    result = train(model, features, labels, **{**settings, **change})
    return model[0].weight.detach().reshape(-1).numpy(), result


@pytest.mark.parametrize("mode", ["hooks", "ew"])
def test_a_patient_with_many_rows_moves_the_model_no_more_than_a_patient_with_one(mode):
    """Patient 0 owns 50 copies of a row along feature 0, patient 1 one row along feature 1: as one
    clipped gradient each, they pull the weights equally; as rows, patient 0 would pull 50 times harder."""
    features = np.zeros((51, 13), np.float32)
    features[:50, 0] = 10.0
    features[50, 1] = 10.0
    labels = np.ones(51, np.float32)
    units = np.array([0] * 50 + [1])
    per_patient, result = one_step_update(features, labels, units=units, unit_rows=64, batch_size=128, grad_sample_mode=mode)
    assert (result.num_examples, result.num_units, result.sample_rate) == (51, 2, 1.0)
    assert per_patient[0] == pytest.approx(per_patient[1], rel=1e-5) and per_patient[0] > 0
    per_row, result = one_step_update(features, labels, batch_size=128)
    assert result.num_units == 51
    assert per_row[0] == pytest.approx(50 * per_row[1], rel=1e-4)


def test_patients_are_sampled_at_units_per_step_over_patients():
    features, labels = separable_data(num_examples=240)
    units = np.arange(240) // 6  # 40 patients of 6 rows
    torch.manual_seed(0)
    model = logistic_regression(13)
    result = train(model, features, labels, units=units, unit_rows=4, batch_size=32, local_steps=200)
    assert (result.num_units, result.sample_rate) == (40, 8 / 40)  # 32 / 4 = 8 patients per step
    assert 0.85 <= accuracy(model, features, labels) <= 1.0  # still learns, from patient-level gradients


def test_a_sampled_patient_gives_at_most_unit_rows_rows_and_only_their_own():
    from medtwin.client.privacy.dp_training import _Units

    units = np.array([3, 3, 3, 3, 3, 3, 3, 3, 9, 7, 7])
    grouping = _Units(units, len(units), unit_rows=3)
    assert grouping.count == 3
    rows, owner = grouping.draw(np.random.default_rng(0), sample_rate=1.0)
    for position in np.unique(owner):
        mine = rows[owner == position]
        assert len(mine) <= 3 and len(set(units[mine])) == 1
    assert sorted(set(units[rows])) == [3, 7, 9]


def test_pooled_vitals_rows_never_merge_patients_of_two_sites():
    """A training patient with no window must leave no gap in `train_units`: otherwise pooling offsets
    by the patient count would put two hospitals' patients in one DP unit."""
    import dataclasses

    from medtwin.core.config import TaskConfig
    from medtwin.core.config.task import VitalsConfig
    from medtwin.core.tasks import get_task

    task = get_task(TaskConfig(name="vitals", num_sites=2, vitals=VitalsConfig(patients_per_site=8)))
    wards = task.wards()
    first = wards[0].train[0]
    too_short = dataclasses.replace(first, times_h=first.times_h[:2], values=first.values[:2], on_oxygen=first.on_oxygen[:2], alert=first.alert[:2])
    splits = [task._split("a", (too_short, *wards[0].train[1:]), wards[0].test), task._split("b", wards[1].train, wards[1].test)]
    task.load_all_sites = lambda: splits
    pooled = task.load_pooled()
    first_site_rows = splits[0].num_train
    shared = set(pooled.train_units[:first_site_rows].tolist()) & set(pooled.train_units[first_site_rows:].tolist())
    assert not shared, f"unit ids {sorted(shared)} hold patients of both sites"
    assert pooled.num_train_units == splits[0].num_train_units + splits[1].num_train_units
