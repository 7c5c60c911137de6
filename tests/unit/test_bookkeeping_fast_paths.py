"""The book-keeping DP step's shortcuts release what the plain formulation releases: the clipped sum added
onto noise already in the flat gradient (scaled, through cached slices), the noise drawn there from the
same generator with the same distribution, and ghost norms (still float64) where they are chosen."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medtwin.client.privacy.bookkeeping import BookkeepingClipper
from medtwin.client.privacy.flat_optimizer import FlatDPOptimizer


def twin_like() -> nn.Module:
    """A Conv1d feature stack and a Linear head, like the vitals twin (one layer without a bias)."""
    return nn.Sequential(
        nn.Conv1d(4, 6, kernel_size=3, padding=2, dilation=2), nn.ReLU(), nn.Conv1d(6, 5, kernel_size=3, padding=1, bias=False),
        nn.ReLU(), nn.Flatten(), nn.Linear(5 * 7, 3),
    )


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16, bias=False), nn.Tanh(), nn.Linear(16, 3))


OWNERS = {
    "rows": None,
    "equal patients": np.repeat(np.arange(6), 4),
    "unequal patients": np.repeat(np.arange(6), [1, 7, 3, 4, 5, 4]),
}


def loss_of(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    return (model(features).reshape(len(features), -1) ** 2).sum(dim=1).mean()


@pytest.mark.parametrize("owner", list(OWNERS))
@pytest.mark.parametrize("build", [mlp, twin_like], ids=["mlp", "conv"])
def test_adding_the_clipped_sum_onto_a_buffer_equals_buffer_plus_scaled_sum(build, owner):
    torch.manual_seed(0)
    model = build()
    params = [p for p in model.parameters() if p.requires_grad]
    clipper = BookkeepingClipper(model, params)
    shape = (24, 4, 7) if build is twin_like else (24, 6)
    try:
        for step in range(2):  # the second step reuses the cached slices of the same buffer
            features = torch.randn(*shape) * torch.logspace(-2, 1.5, 24).reshape(-1, *[1] * (len(shape) - 1))
            expected = clipper.clipped_sum(loss_of(model, features), rows=24, owner=OWNERS[owner], max_grad_norm=0.7, loss_scale=24)
            if step == 0:
                noise = torch.randn(clipper.size)
                buffer = noise.clone()
            else:
                noise = buffer.clone()
            clipper.add_clipped_sum(loss_of(model, features), buffer, scale=0.125, rows=24, owner=OWNERS[owner], max_grad_norm=0.7, loss_scale=24)
            torch.testing.assert_close(buffer, noise + 0.125 * expected, rtol=1e-5, atol=1e-6)
    finally:
        clipper.close()


def test_noise_drawn_into_the_gradients_is_the_scaled_noise_of_the_same_generator():
    model = mlp()
    params = list(model.parameters())
    draws = []
    for seed in (3, 3, 4):
        optimizer = FlatDPOptimizer(
            torch.optim.SGD(params, lr=0.1), noise_multiplier=1.3, max_grad_norm=0.7, expected_batch_size=16,
            loss_reduction="mean", generator=torch.Generator().manual_seed(seed),
        )
        flat = optimizer.draw_noise_into_grads()
        assert all(p.grad.data_ptr() == piece.data_ptr() for p, piece in zip(params, flat.split([p.numel() for p in params]), strict=True))
        draws.append(flat.clone())
        optimizer.draw_noise_into_grads()  # the next step refills the same vector with fresh noise
        assert optimizer.draw_noise_into_grads() is flat and not torch.equal(flat, draws[-1])
        optimizer.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in params)
    reference = torch.normal(0.0, 1.3 * 0.7, size=(sum(p.numel() for p in params),), generator=torch.Generator().manual_seed(3)) / 16
    torch.testing.assert_close(draws[0], reference, rtol=1e-5, atol=1e-7)  # the stock draw, divided as pre_step divides it
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert float(draws[2].std()) == pytest.approx(1.3 * 0.7 / 16, rel=0.1)


def test_ghost_norms_of_a_wide_layer_with_cancelling_tokens_still_clip():
    """A layer wide enough that ghost norms are chosen (the small case now materialises per-unit gradients):
    two rows of each patient with nearly the same large input and opposite output gradients; the Gram sum
    cancels, and float64 keeps every unit clipped."""
    torch.manual_seed(0)
    layer = nn.Linear(256, 256, bias=False)
    rows = 16
    anchors = torch.randn(rows // 2, 256) * 3e3
    features = torch.repeat_interleave(anchors, 2, 0) + torch.randn(rows, 256) * 1e-3
    owner = np.repeat(np.arange(rows // 2), 2)
    direction = torch.repeat_interleave(torch.randn(rows // 2, 256), 2, 0)
    grads = direction * torch.tensor([1.0, -1.0]).repeat(rows // 2)[:, None] + torch.randn(rows, 256) * 3e-5
    clipper = BookkeepingClipper(layer, [layer.weight])
    try:
        got = clipper.clipped_sum((layer(features) * grads).sum(), rows=rows, owner=owner, max_grad_norm=1.0, loss_scale=1.0)
    finally:
        clipper.close()
    x, g = features.double(), grads.double()
    per_unit = [0.5 * g[2 * u : 2 * u + 2].T @ x[2 * u : 2 * u + 2] for u in range(rows // 2)]
    norms = torch.stack([p.norm() for p in per_unit])
    assert (norms > 1.5).all()  # every unit must be clipped
    expected = sum(min(1.0, 1.0 / (n + 1e-6)) * p for n, p in zip(norms.tolist(), per_unit)).reshape(-1)
    assert torch.isfinite(got).all()
    assert float((got.double() - expected).norm()) < 0.01 * float(expected.norm())


def test_a_patients_rows_are_a_uniform_subset_without_replacement():
    """The vectorised draw: a sampled patient with more than unit_rows rows gives unit_rows distinct rows of
    their own, every one equally likely; a patient with fewer gives all of them; units come in draw order."""
    from medtwin.client.privacy.dp_training import _Units

    units = np.repeat([5, 2, 9], [6, 2, 3])  # 6, 2 and 3 rows
    grouping = _Units(units, len(units), unit_rows=3)
    sampling = np.random.default_rng(0)
    counts = np.zeros(len(units))
    for _ in range(3000):
        rows, owner = grouping.draw(sampling, sample_rate=1.0)
        assert (np.diff(owner) >= 0).all() and np.bincount(owner).tolist() == [2, 3, 3]  # units 2, 5, 9: sorted ids
        for position in range(3):
            mine = rows[owner == position]
            assert len(set(mine.tolist())) == len(mine) and len(set(units[mine].tolist())) == 1
        counts[rows] += 1
    assert (counts[units != 5] == 3000).all()
    np.testing.assert_allclose(counts[units == 5] / 3000, 0.5, atol=0.05)  # 3 of 6 rows: each with probability 1/2
