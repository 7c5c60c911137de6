"""Book-keeping DP clipping equals Opacus's per-example clipping on the same batch, trains the same
model step for step, leaves the accounting unchanged, and refuses the models it cannot clip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.grad_sample.utils import prepare_module
from torch import nn

from medtwin.client.privacy import IncompatibleModelError, train_locally_dp
from medtwin.client.privacy.bookkeeping import BookkeepingClipper
from medtwin.client.privacy.dp_training import average_per_unit
from medtwin.client.privacy.flat_optimizer import FlatDPOptimizer
from medtwin.core.tasks.models import FlatBCELoss, logistic_regression, mlp
from medtwin.core.tasks.vitals.model import GaussianForecastLoss, VitalsForecaster
from medtwin.core.tasks.vitals.windows import WindowShape

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")
SHAPE = WindowShape(window_steps=6, horizon_steps=2)


class TokenMlp(nn.Module):
    """A Linear applied to every position of a sequence ([B, T, d]), no bias on the first layer."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(5, 16, bias=False)
        self.outer = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.outer(torch.relu(self.inner(x.reshape(-1, 3, 5))).mean(dim=1)))


def vitals_model() -> nn.Module:
    model = VitalsForecaster(SHAPE)
    with torch.no_grad():  # the persistence head starts at zero: give it weights so every layer has gradients
        model.head.weight.normal_(0, 0.3)
    return model


CASES = {  # model, features, loss, target width, clipping norm
    "logistic regression": (lambda: logistic_regression(13), 13, lambda: FlatBCELoss(), 1, 1.0),
    "mlp 30-64-1": (lambda: mlp(30, hidden_units=64, sigmoid_output=True), 30, lambda: FlatBCELoss(), 1, 1.0),
    "mlp 30-256-256-1": (
        lambda: nn.Sequential(nn.Linear(30, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1), nn.Sigmoid()),
        30, lambda: FlatBCELoss(), 1, 1.0,
    ),
    "token mlp": (TokenMlp, 15, lambda: FlatBCELoss(), 1, 1.0),
    # the log-variance term alone gives every window a gradient of norm ~3
    "vitals twin": (vitals_model, SHAPE.input_width, lambda: GaussianForecastLoss(SHAPE.target_width), 2 * SHAPE.target_width, 8.0),
}


def batch(num_features: int, target_width: int, rows: int = 24, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-2, 1.5 if target_width == 1 else 0, rows)[:, None]  # some rows clip, some do not
    features = torch.randn(rows, num_features, generator=generator) * scale
    if target_width == 1:
        targets = (torch.rand(rows, generator=generator) < 0.5).float()
    else:
        half = target_width // 2
        targets = torch.cat([torch.randn(rows, half, generator=generator), (torch.rand(rows, half, generator=generator) < 0.7).float()], 1)
        targets = targets.reshape(-1)
    return features, targets


def reference_clipped_sum(model, loss_fn, features, targets, owner, clip):
    """Opacus: per-example gradients (hooks), averaged per unit, clipped and summed by the DP optimizer."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    wrapped = prepare_module(model, "hooks", batch_first=True, loss_reduction="mean")
    dp = FlatDPOptimizer(optimizer, noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=len(features), loss_reduction="mean")
    loss_fn(wrapped(features).reshape(-1), targets).backward()
    if owner is not None:
        average_per_unit(dp.params, owner)
    norms = torch.cat([p.grad_sample.reshape(p.grad_sample.shape[0], -1) for p in dp.params], 1).norm(dim=1)
    dp.clip_and_accumulate()
    summed = dp._flat_summed.clone()
    dp.zero_grad(set_to_none=True)
    wrapped.to_standard_module()
    return summed, norms


def bookkeeping_clipped_sum(model, loss_fn, features, targets, owner, clip):
    params = [p for p in model.parameters() if p.requires_grad]
    clipper = BookkeepingClipper(model, params)
    try:
        loss = loss_fn(model(features).reshape(-1), targets)
        return clipper.clipped_sum(loss, rows=len(features), owner=owner, max_grad_norm=clip, loss_scale=len(features))
    finally:
        clipper.close()


OWNERS = {
    "row units": None,
    "patients of 1-5 rows": np.repeat(np.arange(8), [1, 5, 2, 3, 1, 4, 3, 5]),
    "patients of 3 rows": np.repeat(np.arange(8), 3),
    "patients of 3 rows, shuffled": np.random.default_rng(1).permutation(np.repeat(np.arange(8), 3)),
}


@pytest.mark.parametrize("units", list(OWNERS))
@pytest.mark.parametrize("case", list(CASES))
def test_bookkeeping_sum_equals_opacus_per_example_clipping(case, units):
    build, num_features, make_loss, target_width, clip = CASES[case]
    features, targets = batch(num_features, target_width)
    owner = OWNERS[units]
    torch.manual_seed(0)
    model = build()
    expected, norms = reference_clipped_sum(model, make_loss(), features, targets, owner, clip)
    assert (norms > clip).any() and (norms < clip).any()  # the batch exercises both sides of the clip
    got = bookkeeping_clipped_sum(model, make_loss(), features, targets, owner, clip)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (got - expected).abs().max()
    assert all(not module._forward_hooks for module in model.modules())


@pytest.mark.parametrize("units", [None, np.arange(120) // 3], ids=["rows", "patients"])
def test_training_with_bookkeeping_takes_the_same_steps_as_opacus_and_spends_the_same(units):
    """Same sampling and noise draws (test seeds): the two clipping paths end at the same weights, and the
    result the ledger charges from (steps, sample rate, noise multiplier, units) is identical."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(120, 30)).astype(np.float32)
    labels = (features[:, 0] > 0).astype(np.float32)
    trained, results = [], []
    for mode in ("ew", "bookkeeping"):
        torch.manual_seed(3)
        model = mlp(30, hidden_units=32, sigmoid_output=True)
        results.append(
            train_locally_dp(
                model, features, labels, loss_fn=FlatBCELoss(), local_steps=40, batch_size=16, optimizer_name="adam",
                learning_rate=0.01, proximal_mu=0.1, seed=5, noise_multiplier=0.7, max_grad_norm=0.5, grad_sample_mode=mode,
                units=units, unit_rows=2, deterministic_for_tests=True,
            )
        )
        trained.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        assert all(not module._forward_hooks for module in model.modules())
        assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in model.parameters())
    assert torch.allclose(trained[0], trained[1], atol=1e-5), (trained[0] - trained[1]).abs().max()
    for field in ("steps", "num_examples", "num_units", "sample_rate", "noise_multiplier", "max_grad_norm", "empty_batches"):
        assert getattr(results[0], field) == getattr(results[1], field), field
    assert results[0].mean_loss == pytest.approx(results[1].mean_loss, rel=1e-4)


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.layer(x)).sum(dim=1)


@pytest.mark.parametrize(
    ("model", "problem"),
    [
        (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 1)), "LayerNorm"),
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 1)), "in place"),
        (Twice(), "exactly once"),
    ],
    ids=["layer norm", "in-place relu", "layer used twice"],
)
def test_bookkeeping_refuses_what_it_cannot_clip_exactly(model, problem):
    features, labels = np.ones((16, 4), np.float32), np.ones(16, np.float32)
    with pytest.raises(IncompatibleModelError, match=problem):
        train_locally_dp(
            model, features, labels, loss_fn=nn.MSELoss(), local_steps=2, batch_size=8, optimizer_name="sgd",
            learning_rate=0.1, seed=0, noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="bookkeeping",
        )
    assert all(not module._forward_hooks for module in model.modules())
