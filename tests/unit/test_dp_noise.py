"""DP-SGD's Gaussian noise (`GaussianNoise`: AES-256-CTR + Box–Muller): the distribution the accountant
assumes, independent draws, keys from the OS, and the optimizer drawing through it (Opacus's noise in
secure mode)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from medtwin.client.privacy.flat_optimizer import FlatDPOptimizer
from medtwin.client.privacy.noise import GaussianNoise

KEY = bytes(range(32))


def draws(size: int, std: float, key: bytes = KEY) -> np.ndarray:
    return GaussianNoise(key).fill_(torch.empty(size), std).numpy().astype(np.float64)


def test_the_draws_are_gaussian_with_the_asked_std() -> None:
    std, size = 2.0, 1_000_001  # odd: the last pair gives its cosine only
    values = draws(size, std)
    assert np.isfinite(values).all()
    assert abs(values.mean()) < 5 * std / np.sqrt(size)
    assert values.std() == pytest.approx(std, rel=3e-3)
    assert stats.kstest(values / std, "norm").pvalue > 1e-3  # the shape, not only two moments (fixed key: not flaky)
    assert abs(stats.kurtosis(values)) < 0.03 and abs(stats.skew(values)) < 0.02
    beyond = np.abs(values) > 3 * std
    assert beyond.mean() == pytest.approx(2 * stats.norm.sf(3), rel=0.1)  # the tails are there ...
    assert 4.5 * std < np.abs(values).max() <= 6.67 * std  # ... up to sqrt(-2 ln 2^-32) sigma, not beyond


def test_the_two_halves_and_successive_fills_are_independent() -> None:
    noise = GaussianNoise(KEY)
    size = 200_000
    first = noise.fill_(torch.empty(size), 1.0).numpy().copy()
    second = noise.fill_(torch.empty(size), 1.0).numpy().copy()
    bound = 5 / np.sqrt(size // 2)
    assert abs(np.corrcoef(first[: size // 2], first[size // 2 :])[0, 1]) < bound  # cosines vs sines of the same pairs
    assert abs(np.corrcoef(first[: size // 2] ** 2, first[size // 2 :] ** 2)[0, 1]) < bound  # not only uncorrelated
    assert abs(np.corrcoef(first, second)[0, 1]) < 5 / np.sqrt(size)
    assert not np.array_equal(first, second)  # the stream moves on
    spread = first.reshape(20, -1).std(axis=1)  # every stretch of the vector is equally noisy
    assert np.abs(spread - 1.0).max() < 0.03, spread


def test_the_std_scales_the_same_draws() -> None:
    np.testing.assert_allclose(draws(10_001, 3.0), 3.0 * draws(10_001, 1.0), rtol=1e-5, atol=1e-6)


def test_a_key_fixes_the_stream_and_no_key_means_a_fresh_one_from_the_os() -> None:
    assert np.array_equal(draws(1001, 1.0), draws(1001, 1.0))
    assert not np.array_equal(draws(1001, 1.0), draws(1001, 1.0, key=bytes(32)))
    fresh = [GaussianNoise().fill_(torch.empty(1001), 1.0).clone() for _ in range(2)]
    assert not torch.equal(*fresh)


@pytest.mark.parametrize("size", [1, 2, 3, 74_001])
def test_any_size_and_a_size_change(size: int) -> None:
    noise = GaussianNoise(KEY)
    for length in (size, size + 1, size):
        out = noise.fill_(torch.full((length,), float("nan")), 0.5)
        assert out.shape == (length,) and torch.isfinite(out).all()


def test_what_it_refuses() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        GaussianNoise(b"short")
    with pytest.raises(TypeError, match="float32"):
        GaussianNoise(KEY).fill_(torch.empty(10, dtype=torch.float64), 1.0)
    with pytest.raises(TypeError, match="contiguous"):
        GaussianNoise(KEY).fill_(torch.empty(10, 10).T, 1.0)


def _optimizer(*, secure_mode: bool, noise: GaussianNoise | None) -> tuple[FlatDPOptimizer, torch.Tensor]:
    weight = torch.nn.Parameter(torch.zeros(11, 3))
    optimizer = FlatDPOptimizer(
        torch.optim.SGD([weight], lr=1.0), noise_multiplier=1.5, max_grad_norm=2.0, expected_batch_size=4,
        loss_reduction="mean", generator=torch.Generator().manual_seed(0), secure_mode=secure_mode, noise=noise,
    )  # fmt: skip
    return optimizer, weight


def test_the_optimizer_draws_its_noise_through_it_except_in_secure_mode() -> None:
    optimizer, weight = _optimizer(secure_mode=False, noise=GaussianNoise(KEY))
    drawn = optimizer.draw_noise_into_grads()
    expected = GaussianNoise(KEY).fill_(torch.empty(33), 1.5 * 2.0 / 4)  # std sigma * C / expected batch
    assert torch.equal(drawn, expected) and torch.equal(weight.grad.reshape(-1), expected)
    secure, _ = _optimizer(secure_mode=True, noise=GaussianNoise(KEY))
    assert not torch.equal(secure.draw_noise_into_grads(), expected)  # Opacus's own noise
