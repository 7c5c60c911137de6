"""DP-SGD's Gaussian noise: an AES-256-CTR keystream turned into normals by Box–Muller.

Every DP step draws one Gaussian per trainable parameter. torch's CPU `normal_` takes each uniform from
MT19937 one value at a time (~3.4 ns each here): for the 74k-parameter MLP that is 0.34 of a whole plain
step. This generator takes its bits from AES-256-CTR (the `cryptography` package, AES-NI: ~0.5 ns per 32
bits) and transforms them with numpy's SIMD float32 log / sqrt / cos / sin in preallocated buffers: 0.25
of that step, ~0.75x torch's time (`experiments/bench_noise.py`, BENCHMARKS.md). It is also a CSPRNG keyed from the OS (`os.urandom`), where
MT19937's state follows from its outputs.

The transform is Box–Muller, as in torch's `normal_`: from two independent 32-bit words w, v of the
keystream,

    u = ((w >> 1) + 1/2) 2^-31  in (0, 1)     θ = v π 2^-31  in [-π, π] (float32)     (v a signed int32)
    z1, z2 = σ sqrt(-2 ln u) (cos θ, sin θ)

u's smallest value is 2^-32, so the radius reaches 6.66 σ (torch's 24-bit uniforms stop at 5.77 σ).
The first half of the output takes the cosines, the second the sines of the same pairs. float32 only
(the models train in float32); `secure_mode` keeps Opacus's floating-point-attack-resistant noise instead.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["GaussianNoise"]

_SQUARE_RANGE = (1e-37, 1e37)  # where 2σ² itself is a float32 normal


class GaussianNoise:
    """Fills float32 tensors with independent N(0, std²) draws from one AES-256-CTR stream. One per training
    loop: it is not thread-safe (two threads filling at once could read the same keystream buffer)."""

    STD_RANGE = (1e-37, 1e37)  # the draws are float32 normals, with room for the 6.66 σ tail

    def __init__(self, key: bytes | None = None) -> None:
        """`key`: 32 bytes; None draws a fresh one from the OS (always, outside tests)."""
        key = os.urandom(32) if key is None else key
        if len(key) != 32:
            raise ValueError(f"the noise key must be 32 bytes, got {len(key)}")
        self._stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self._size = -1

    def _buffers(self, size: int) -> None:
        self._size, self._half = size, (size + 1) // 2
        self._zeros = bytes(8 * self._half)
        self._keystream = bytearray(8 * self._half + 15)  # update_into wants a block of slack
        words = np.frombuffer(self._keystream, dtype=np.uint32, count=2 * self._half)
        self._radius_bits, self._angle_bits = words[: self._half], words[self._half :].view(np.int32)
        self._radius = np.empty(self._half, dtype=np.float32)  # the angles live in `out` (a small working set)

    def fill_(self, out: torch.Tensor, std: float) -> torch.Tensor:
        """`out` (float32, contiguous, on the CPU) refilled with N(0, std²) draws; returns `out`."""
        if out.dtype != torch.float32 or not out.is_contiguous() or out.device.type != "cpu":
            raise TypeError(f"GaussianNoise fills contiguous float32 CPU tensors, got {out.dtype} on {out.device}")
        low, high = self.STD_RANGE
        if not low <= std <= high:  # also NaN; 0 would be no noise at all
            raise ValueError(f"noise std {std!r} is outside [{low:g}, {high:g}] (float32 draws)")
        size = out.numel()
        if size != self._size:
            self._buffers(size)
        target = out.detach().view(-1).numpy()
        first, second, radius = target[: self._half], target[self._half :], self._radius
        self._stream.update_into(self._zeros, self._keystream)
        np.right_shift(self._radius_bits, 1, out=self._radius_bits)  # [0, 2^31): exact as an int32
        np.copyto(radius, self._radius_bits.view(np.int32), casting="unsafe")
        radius += np.float32(0.5)
        radius *= np.float32(2.0**-31)  # (0, 1): the log never sees 0
        np.log(radius, out=radius)
        if _SQUARE_RANGE[0] <= 2.0 * std * std <= _SQUARE_RANGE[1]:  # σ² as a float32: one multiply
            radius *= np.float32(-2.0 * std * std)
            np.sqrt(radius, out=radius)
        else:  # σ² would underflow or overflow float32 (σ far from any DP run's): σ after the root
            radius *= np.float32(-2.0)
            np.sqrt(radius, out=radius)
            radius *= np.float32(std)
        np.copyto(first, self._angle_bits, casting="unsafe")
        first *= np.float32(math.pi * 2.0**-31)  # the angles, in [-π, π]
        np.sin(first[: len(second)], out=second)
        second *= radius[: len(second)]
        np.cos(first, out=first)
        first *= radius
        return out
