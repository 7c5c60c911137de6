"""`FlatDPOptimizer`: Opacus's DPOptimizer with clip / noise / scale done once on all parameters.

Opacus's `DPOptimizer` loops over parameters for every operation (and re-derives the flat
per-sample gradient list and the accumulation count inside those loops). For the small twin
models that loop *is* the DP step's cost. This subclass keeps Opacus's control flow, per-sample
gradients (from `GradSampleModule`), noise generator (`_generate_noise`, including secure mode),
skip-step and processed-flag checks, and only changes how the same maths is laid out:

    per-example gradients [B, P] = concat of every parameter's grad_sample, flattened
    clip factor_i = min(1, C / (||g_i||_2 + 1e-6))            (Opacus's formula, all layers jointly)
    summed       = factor @ G                                  [P]
    grad         = (summed + N(0, (sigma C)^2 I_P)) / expected_batch_size

The noise comes from `noise` (a `GaussianNoise`: AES-256-CTR + Box–Muller, float32) when one is given,
else — and always in `secure_mode` — from Opacus's `_generate_noise` with the torch `generator`.
`p.summed_grad` and `p.grad` are views into the flat vectors. A unit test checks it gives the same
gradients as the stock `DPOptimizer`.
"""

from __future__ import annotations

import torch
from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _generate_noise, _mark_as_processed

from .noise import GaussianNoise

__all__ = ["FlatDPOptimizer"]


class FlatDPOptimizer(DPOptimizer):
    """Drop-in `DPOptimizer` (flat-clipping, non-distributed) for small models."""

    def __init__(self, *args, noise: GaussianNoise | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._noise = noise
        self._flat_summed: torch.Tensor | None = None
        self._flat_grad: torch.Tensor | None = None
        self._noised_grad: torch.Tensor | None = None  # book-keeping's flat gradient (`draw_noise_into_grads`)

    def _split(self, flat: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        sizes = [p.numel() for p in params]
        return [piece.view_as(p) for piece, p in zip(torch.split(flat, sizes), params, strict=True)]

    def clip_and_accumulate(self) -> None:
        params = self.params
        per_sample = []
        for p in params:
            _check_processed_flag(p.grad_sample)
            grad_sample = p.grad_sample
            per_sample.append(grad_sample if isinstance(grad_sample, torch.Tensor) else self._get_flat_grad_sample(p))
        batch = per_sample[0].shape[0]
        if batch == 0:  # empty Poisson batch: the clipped sum is zero, noise is still added
            summed = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        else:
            flat = torch.cat([g.reshape(batch, -1) for g in per_sample], dim=1).to(params[0].dtype)
            clip_factor = torch.clamp_max(self.max_grad_norm / (torch.linalg.vector_norm(flat, dim=1) + 1e-6), 1.0)
            summed = clip_factor @ flat
        self._flat_summed = summed if self._flat_summed is None else self._flat_summed + summed
        for p, view in zip(params, self._split(self._flat_summed, params), strict=True):
            p.summed_grad = view
            _mark_as_processed(p.grad_sample)

    def _fast_noise(self, std: float, like: torch.Tensor) -> bool:
        """Whether `GaussianNoise` draws this step's noise (not in secure mode, std in its range, float32 gradients)."""
        return self._noise is not None and not self.secure_mode and GaussianNoise.STD_RANGE[0] <= std <= GaussianNoise.STD_RANGE[1] and like.dtype == torch.float32

    def add_noise(self) -> None:
        params = self.params
        _check_processed_flag(self._flat_summed)
        std = self.noise_multiplier * self.max_grad_norm
        if self._fast_noise(std, self._flat_summed):
            self._flat_grad = self._noise.fill_(torch.empty_like(self._flat_summed), std).add_(self._flat_summed)
        elif self.secure_mode or std == 0:
            noise = _generate_noise(
                std=std, reference=self._flat_summed, generator=self.generator, secure_mode=self.secure_mode
            )
            self._flat_grad = self._flat_summed + noise
        else:  # one draw: N(summed, std^2), the same distribution as summed + _generate_noise(std)
            self._flat_grad = torch.normal(self._flat_summed, std, generator=self.generator)
        for p, view in zip(params, self._split(self._flat_grad, params), strict=True):
            p.grad = view
        _mark_as_processed(self._flat_summed)

    @property
    def grad_scale(self) -> float:
        """What `pre_step` divides the noised sum by: 1 / expected_batch_size for a mean loss, else 1."""
        return 1.0 / self.expected_batch_size if self.loss_reduction == "mean" else 1.0

    def draw_noise_into_grads(self) -> torch.Tensor:
        """Book-keeping's step (one batch, no per-example gradients, no virtual steps): every parameter's `.grad`
        is a view of one flat vector, refilled here with N(0, (noise_multiplier * max_grad_norm)^2) * grad_scale;
        the caller then adds the clipped per-unit sum times `grad_scale` into it, in place. The same distribution
        as `pre_step` on that sum (noise, then scale), from the same generator; only the scale moves onto the
        std. The views persist across steps, so the loop does not call `zero_grad` between them."""
        if self._noised_grad is None or self.param_groups[0]["params"][0].grad is None:  # first step, or after zero_grad
            params = self.params
            self._noised_grad = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
            for p, view in zip(params, self._split(self._noised_grad, params), strict=True):
                p.grad = view
        std = self.noise_multiplier * self.max_grad_norm * self.grad_scale
        if self._fast_noise(std, self._noised_grad):
            self._noise.fill_(self._noised_grad, std)
        elif self.secure_mode or std == 0:
            self._noised_grad.copy_(_generate_noise(std=std, reference=self._noised_grad, generator=self.generator, secure_mode=self.secure_mode))
        else:
            self._noised_grad.normal_(0.0, std, generator=self.generator)
        return self._noised_grad

    def scale_grad(self) -> None:
        if self.loss_reduction == "mean":
            self._flat_grad /= self.expected_batch_size * self.accumulated_iterations  # views follow

    def zero_grad(self, set_to_none: bool = False) -> None:
        super().zero_grad(set_to_none)
        if not self._is_last_step_skipped:
            self._flat_summed = None
        self._flat_grad = None
