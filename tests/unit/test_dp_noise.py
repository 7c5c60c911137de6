"""DP-SGD's Gaussian noise (`GaussianNoise`: AES-256-CTR + Box–Muller): the distribution the accountant
assumes, independent draws, keys from the OS, and the optimizer drawing through it (Opacus's noise in
secure mode)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy import stats
from torch import nn

import medtwin.client.privacy.dp_training as dp_training
from medtwin.client.privacy import train_locally_dp
from medtwin.client.privacy.flat_optimizer import FlatDPOptimizer
from medtwin.client.privacy.noise import GaussianNoise

KEY = bytes(range(32))
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


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


def reference(key: bytes, sizes: list[int], std: float) -> list[np.ndarray]:
    """Box–Muller in float64 over ONE continuous AES-256-CTR keystream, 8 * ceil(n / 2) fresh bytes per fill."""
    total = sum(8 * ((n + 1) // 2) for n in sizes)
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(total))
    outs, at = [], 0
    for n in sizes:
        half = (n + 1) // 2
        words = np.frombuffer(stream[at : at + 8 * half], dtype=np.uint32)
        at += 8 * half
        u = ((words[:half] >> 1).astype(np.float64) + 0.5) * 2.0**-31
        theta = words[half:].view(np.int32).astype(np.float64) * math.pi * 2.0**-31
        radius = std * np.sqrt(-2 * np.log(u))
        outs.append(np.concatenate([radius * np.cos(theta), (radius * np.sin(theta))[: n - half]]))
    return outs


def test_every_fill_takes_fresh_keystream_bytes_across_odd_sizes_and_size_changes() -> None:
    sizes = [7, 7, 1, 2, 33, 4096, 3, 3, 74_001, 7]
    noise = GaussianNoise(KEY)
    got = [noise.fill_(torch.empty(n), 1.7).numpy().astype(np.float64) for n in sizes]
    for n, values, want in zip(sizes, got, reference(KEY, sizes, 1.7), strict=True):
        np.testing.assert_allclose(values, want, rtol=2e-5, atol=3e-4, err_msg=f"size {n}")


def test_the_extreme_words_stay_finite_and_the_tail_reaches_6_66_sigma() -> None:
    class Fixed:  # a keystream of chosen words: the smallest and largest radius and angle words
        def update_into(self, data: bytes, buffer: bytearray) -> None:
            half = len(data) // 8
            words = np.frombuffer(buffer, dtype=np.uint32, count=2 * half)
            words[:half] = [0, 1, 0xFFFFFFFF, 0xFFFFFF80]
            words[half:] = np.array([-(2**31), 2**31 - 1, 0, 2**30], dtype=np.int32).view(np.uint32)

    noise = GaussianNoise(KEY)
    noise._stream = Fixed()
    out = noise.fill_(torch.empty(8), 1.0).numpy()
    assert np.isfinite(out).all()
    assert abs(out[0]) == pytest.approx(math.sqrt(64 * math.log(2)), rel=1e-6)  # u = 2^-32: not torch's 24-bit 5.77
    assert out[2] == 0.0 and out[6] == 0.0  # u rounds to 1 only for the top 2^-25 of words: an atom at 0, harmless


@pytest.mark.parametrize("std", [1e-23, 1e-30, 1e19])
def test_a_std_whose_square_leaves_float32_is_still_right(std: float) -> None:
    values = GaussianNoise(KEY).fill_(torch.empty(10_001), std).double()
    assert torch.isfinite(values).all()
    assert float(values.std()) / std == pytest.approx(1.0, rel=0.05)


def test_what_it_refuses() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        GaussianNoise(b"short")
    for std in (0.0, -1.0, float("nan"), float("inf"), 1e-40):
        with pytest.raises(ValueError, match="outside"):
            GaussianNoise(KEY).fill_(torch.empty(10), std)
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


def test_the_opacus_path_draws_through_it_too() -> None:
    weight = nn.Parameter(torch.zeros(11, 3))
    optimizer = FlatDPOptimizer(
        torch.optim.SGD([weight], lr=1.0), noise_multiplier=1.5, max_grad_norm=2.0, expected_batch_size=4,
        loss_reduction="mean", generator=torch.Generator().manual_seed(0), noise=GaussianNoise(KEY),
    )  # fmt: skip
    weight.grad_sample = torch.zeros(0, 11, 3)  # an empty Poisson batch: the gradient is the noise alone
    optimizer.pre_step()
    torch.testing.assert_close(weight.grad.reshape(-1), GaussianNoise(KEY).fill_(torch.empty(33), 1.5 * 2.0) / 4)


@pytest.mark.parametrize("mode", ["bookkeeping", "ew"])
@pytest.mark.parametrize("secure_mode", [False, True])
def test_training_keys_it_from_the_os_never_from_the_config_seed(monkeypatch: pytest.MonkeyPatch, mode: str, secure_mode: bool) -> None:
    """The config seed is the coordinator's: noise keyed from it could be subtracted from the update."""
    keys, fills = [], []

    class Spy(GaussianNoise):
        def __init__(self, key: bytes | None = None) -> None:
            keys.append(key)
            super().__init__(key)

        def fill_(self, out: torch.Tensor, std: float) -> torch.Tensor:
            fills.append(std)
            return super().fill_(out, std)

    monkeypatch.setattr(dp_training, "GaussianNoise", Spy)
    x, y = np.zeros((20, 5), np.float32), np.zeros(20, np.float32)
    for _ in range(2):
        train_locally_dp(
            nn.Linear(5, 1), x, y, loss_fn=nn.MSELoss(), local_steps=3, batch_size=4, optimizer_name="sgd",
            learning_rate=0.1, seed=5, noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode, secure_mode=secure_mode,
        )  # fmt: skip
    assert keys == [None, None]  # a fresh os.urandom key every local round, whatever the seed
    assert len(fills) == (0 if secure_mode else 6)  # every step draws through it; secure mode keeps Opacus's noise
