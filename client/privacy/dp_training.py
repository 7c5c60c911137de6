"""DP-SGD local training with Opacus: Poisson sampling, per-example clipping, Gaussian noise.

Same contract as `medtwin.client.training.train_locally` (a fixed number of optimizer steps per
round, FedProx optional) plus the DP knobs. Each step:

1. Poisson sampling: every privacy unit joins the batch independently with probability
   `sample_rate = units per step / units` (so the batch size varies, and may be 0);
2. each unit's gradient is clipped to L2 norm `max_grad_norm` and the clipped gradients summed —
   by default in closed form without per-example gradients (`grad_sample_mode=bookkeeping`,
   `bookkeeping.BookkeepingClipper`), else from Opacus's per-row gradients (`ew`, `hooks`,
   `functorch`) clipped by `FlatDPOptimizer` (Opacus's `DPOptimizer`, vectorised over parameters);
   the same sum either way (tested). `FlatDPOptimizer` adds N(0, (noise_multiplier * max_grad_norm)^2)
   and divides by the expected number of units per step;
3. the FedProx gradient mu * (w - w_global) is added *after* noising: it depends on no example
   (only on weights that are already DP outputs), so it needs neither clipping nor noise;
4. the wrapped torch optimizer steps.

The privacy unit is the PATIENT. For tabular tasks a row is a patient. When a patient owns many
rows (`units`: the vital-signs twin's windows of one stay), a sampled patient contributes up to
`unit_rows` of their rows, drawn at random, and their row gradients are AVERAGED into one gradient
before clipping (user-level DP-SGD, as in McMahan et al. 2018, "Learning differentially private
recurrent language models"): however many rows a patient has, one clipped gradient of norm <= C
per step is all that depends on them, so the accountant's (epsilon, delta) protects a whole
patient, not one window of them.

No accountant lives here: a fresh Opacus accountant per round would forget earlier rounds, so the
spend is recorded in the site's `BudgetLedger` by the caller (see `site_privacy`).

Sampling and noise are seeded from the OS CSPRNG (`secrets`, `os.urandom`), never from the run's
config seed: a seed the coordinator knows would let it replay the sampling and subtract the noise.
`seed` is used only with `deterministic_for_tests=True`. The noise is `GaussianNoise` (AES-256-CTR keyed from
`os.urandom`, Box–Muller); `secure_mode` instead uses Opacus's floating-point-attack-resistant noise and
reseeds its torch generator from `secrets` every step.
"""

from __future__ import annotations

import hashlib
import secrets
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from opacus.grad_sample.utils import prepare_module
from opacus.validators import ModuleValidator
from torch import nn

from medtwin.client.training import make_optimizer
from medtwin.core.config.privacy import GRAD_SAMPLE_MODES
from medtwin.core.privacy_math import expected_units_per_step, sample_rate_for
from medtwin.core.privacy_math import units_per_step as dp_units_per_step  # the client's name for the shared rule

from .bookkeeping import BookkeepingClipper
from .errors import IncompatibleModelError
from .flat_optimizer import FlatDPOptimizer
from .noise import GaussianNoise

__all__ = ["DpTrainingResult", "check_model_compatible", "dp_units_per_step", "train_locally_dp"]

@dataclass(frozen=True)
class DpTrainingResult:
    mean_loss: float  # over the non-empty Poisson batches (NOT DP-protected: keep it at the site)
    steps: int  # optimizer steps taken (= local_steps; empty batches still add noise and count)
    num_examples: int  # rows
    num_units: int  # privacy units (patients) the rows belong to
    sample_rate: float  # of units
    noise_multiplier: float
    max_grad_norm: float
    empty_batches: int


def check_model_compatible(model: nn.Module) -> None:
    """Raise `IncompatibleModelError` listing every Opacus validation problem (e.g. BatchNorm)."""
    was_training = model.training
    model.train()
    try:
        problems = ModuleValidator.validate(model, strict=False)
    finally:
        model.train(was_training)
    if problems:
        raise IncompatibleModelError([str(problem) for problem in problems])


def _loss_reduction(loss_fn: nn.Module) -> str:
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise IncompatibleModelError(
            [f"loss reduction {reduction!r} of {type(loss_fn).__name__}: DP-SGD needs 'mean' or 'sum'"]
        )
    return reduction


class _Units:
    """Rows grouped by privacy unit; draws a Poisson batch of units and up to `unit_rows` rows of each."""

    def __init__(self, units: np.ndarray | None, num_rows: int, unit_rows: int) -> None:
        if units is None:
            self.rows = None
            self.count = num_rows
        else:
            if len(units) != num_rows:
                raise ValueError(f"units has {len(units)} entries for {num_rows} rows")
            order = np.argsort(units, kind="stable")
            boundaries = np.flatnonzero(np.diff(units[order])) + 1
            self.rows = np.split(order, boundaries) if len(units) else []
            self.count = len(self.rows)
            self.order = order  # rows unit by unit; unit k's are order[start[k] : start[k] + length[k]]
            self.length = np.array([len(rows) for rows in self.rows], dtype=np.int64)
            self.start = np.cumsum(self.length) - self.length
        self.unit_rows = unit_rows

    def draw(self, sampling: np.random.Generator, sample_rate: float) -> tuple[np.ndarray, np.ndarray | None]:
        """(row index, owner position of each row or None when every row is its own unit). A unit with more than
        `unit_rows` rows gives a uniform random subset of them: the rows of its `unit_rows` smallest uniform keys
        (all units at once; rows come unit by unit, in the order the units were chosen)."""
        chosen = np.flatnonzero(sampling.random(self.count) < sample_rate)
        if self.rows is None:
            return chosen, None
        length = self.length[chosen]
        first = np.cumsum(length) - length  # each chosen unit's first place among the candidates
        owner = np.repeat(np.arange(len(chosen)), length)
        candidates = self.order[np.repeat(self.start[chosen] - first, length) + np.arange(len(owner))]
        by_unit_then_key = np.lexsort((sampling.random(len(owner)), owner))
        keep = by_unit_then_key[np.arange(len(owner)) - np.repeat(first, length) < self.unit_rows]
        return candidates[keep], owner[keep]


def average_per_unit(trainable: list, owner: np.ndarray) -> None:
    """Replace each parameter's per-row `grad_sample` by the mean over each unit's rows (one row per unit)."""
    owner_index = torch.from_numpy(owner)
    units = int(owner.max()) + 1
    counts = torch.bincount(owner_index, minlength=units).clamp(min=1)
    for parameter in trainable:
        per_row = parameter.grad_sample.reshape(len(owner), -1)
        summed = torch.zeros((units, per_row.shape[1]), dtype=per_row.dtype).index_add_(0, owner_index, per_row)
        parameter.grad_sample = (summed / counts[:, None].to(per_row.dtype)).reshape(units, *parameter.shape)


def _secret_or_test_seed(seed: int, *, deterministic: bool) -> int:
    return seed if deterministic else secrets.randbits(63)


class _OpacusStep:
    """Per-example gradients from Opacus's `GradSampleModule`; `FlatDPOptimizer.pre_step` clips them."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, dp_optimizer: FlatDPOptimizer, *, reduction: str, grad_sample_mode: str) -> None:
        self.wrapped = prepare_module(model, grad_sample_mode, batch_first=True, loss_reduction=reduction)
        self.loss_fn, self.dp_optimizer = loss_fn, dp_optimizer
        self.trainable = dp_optimizer.params

    def noisy_gradients(self, features: torch.Tensor, targets: torch.Tensor, owner: np.ndarray | None) -> float | None:
        """Leave each parameter's clipped, noised, scaled gradient in `.grad`; the loss, None if the batch is empty."""
        loss = None
        if len(features) == 0:
            # Still a DP step: the clipped sum is zero and the optimizer adds noise, as the accountant assumes.
            for parameter in self.trainable:
                parameter.grad_sample = torch.zeros((0, *parameter.shape), dtype=parameter.dtype)
        else:
            value = self.loss_fn(self.wrapped(features).reshape(-1), targets)
            value.backward()
            if owner is not None:
                average_per_unit(self.trainable, owner)
            loss = float(value.detach())
        self.dp_optimizer.pre_step()  # clip per (unit-averaged) example, sum, add noise, scale
        return loss

    def finish_step(self) -> None:
        self.dp_optimizer.zero_grad(set_to_none=True)  # per-example gradients and flags

    def close(self) -> None:
        self.wrapped.to_standard_module()  # removes hooks and Opacus' per-parameter attributes


class _BookkeepingStep:
    """Clipped per-unit sums in closed form (`BookkeepingClipper`): no per-example gradient, no weight backward."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, dp_optimizer: FlatDPOptimizer, *, reduction: str, max_grad_norm: float) -> None:
        self.model, self.loss_fn, self.reduction, self.max_grad_norm = model, loss_fn, reduction, max_grad_norm
        self.dp_optimizer = dp_optimizer
        self.clipper = BookkeepingClipper(model, dp_optimizer.params)

    def noisy_gradients(self, features: torch.Tensor, targets: torch.Tensor, owner: np.ndarray | None) -> float | None:
        """Noise first, then the clipped sum added onto it in place (both times the optimizer's grad_scale)."""
        flat_grad = self.dp_optimizer.draw_noise_into_grads()
        if len(features) == 0:  # still a DP step: the clipped sum is zero, the gradient is the noise
            return None
        loss = self.loss_fn(self.model(features).reshape(-1), targets)
        self.clipper.add_clipped_sum(
            loss, flat_grad, scale=self.dp_optimizer.grad_scale, rows=len(features), owner=owner,
            max_grad_norm=self.max_grad_norm, loss_scale=len(features) if self.reduction == "mean" else 1.0,
        )
        return float(loss.detach())

    def finish_step(self) -> None:
        """Nothing to clear: the next step refills the gradients' flat vector."""

    def close(self) -> None:
        self.clipper.close()


def train_locally_dp(
    model: nn.Module,
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    loss_fn: nn.Module,
    local_steps: int,
    batch_size: int,
    optimizer_name: str,
    learning_rate: float,
    proximal_mu: float = 0.0,
    seed: int,
    noise_multiplier: float,
    max_grad_norm: float,
    grad_sample_mode: str = "bookkeeping",
    secure_mode: bool = False,
    units: np.ndarray | None = None,
    unit_rows: int = 8,
    deterministic_for_tests: bool = False,
) -> DpTrainingResult:
    """Train `model` in place with DP-SGD for `local_steps` steps; it comes back a plain nn.Module.
    `units[i]` is the patient of row i (None: every row is its own patient)."""
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}")
    if noise_multiplier < 0 or max_grad_norm <= 0:
        raise ValueError(f"need noise_multiplier >= 0 and max_grad_norm > 0, got {noise_multiplier}, {max_grad_norm}")
    check_model_compatible(model)
    reduction = _loss_reduction(loss_fn)
    num_examples = len(x_train)
    grouping = _Units(units, num_examples, unit_rows)
    units_per_step = dp_units_per_step(batch_size=batch_size, unit_rows=unit_rows, grouped=units is not None)
    sample_rate = sample_rate_for(batch_size=units_per_step, num_train=grouping.count)
    features, targets = torch.from_numpy(x_train), torch.from_numpy(y_train)
    sampling = np.random.default_rng(_secret_or_test_seed(seed, deterministic=deterministic_for_tests))
    noise = torch.Generator().manual_seed(_secret_or_test_seed(seed + 1, deterministic=deterministic_for_tests))  # secure_mode's
    gaussian = GaussianNoise(hashlib.sha256(f"medtwin dp noise {seed + 1}".encode()).digest() if deterministic_for_tests else None)

    model.train()
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    global_parameters = [parameter.detach().clone() for parameter in trainable]
    optimizer = make_optimizer(model, optimizer_name=optimizer_name, learning_rate=learning_rate)
    dp_optimizer = FlatDPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_units_per_step(sample_rate=sample_rate, num_units=grouping.count),
        loss_reduction=reduction,
        generator=noise,
        secure_mode=secure_mode,
        noise=gaussian,
    )
    if grad_sample_mode == "bookkeeping":
        step = _BookkeepingStep(model, loss_fn, dp_optimizer, reduction=reduction, max_grad_norm=max_grad_norm)
    else:
        step = _OpacusStep(model, loss_fn, dp_optimizer, reduction=reduction, grad_sample_mode=grad_sample_mode)
    losses: list[float] = []
    try:
        with warnings.catch_warnings():
            # Opacus' hooks warn that the first layer's input needs no gradient: expected, harmless.
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            for _ in range(local_steps):
                index, owner = grouping.draw(sampling, sample_rate)
                index = torch.from_numpy(index)
                if secure_mode:
                    noise.manual_seed(secrets.randbits(63))
                loss = step.noisy_gradients(features[index], targets[index], owner)
                if loss is not None:
                    losses.append(loss)
                if proximal_mu > 0:  # data-independent: added after the noise, needs no clipping
                    for parameter, anchor in zip(trainable, global_parameters, strict=True):
                        parameter.grad.add_(parameter.detach() - anchor, alpha=proximal_mu)
                optimizer.step()
                step.finish_step()
    finally:
        dp_optimizer.zero_grad(set_to_none=True)
        step.close()
        for parameter in model.parameters():  # the DP optimizer's per-parameter attributes
            for name in ("grad_sample", "summed_grad"):
                if hasattr(parameter, name):
                    delattr(parameter, name)
    return DpTrainingResult(
        mean_loss=float(np.mean(losses)) if losses else float("nan"),
        steps=local_steps,
        num_examples=num_examples,
        num_units=grouping.count,
        sample_rate=sample_rate,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        empty_batches=local_steps - len(losses),
    )
