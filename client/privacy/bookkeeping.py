"""Book-keeping DP clipping: each privacy unit's gradient norm in closed form, the clipped sum in one
matmul per layer, and no per-example gradient ever materialised (Bu et al. 2023, "Differentially
private optimization on large model at small cost"; the norms are ghost clipping's: Goodfellow 2015,
Li et al. 2022).

A layer z = a W^T + b is applied to *tokens*: a row's input for `nn.Linear` on [B, d] (more for
[B, ..., d]), every output position's receptive-field patch for `nn.Conv1d`. With g_t = dℓ/dz_t of the
token's row and w_t = 1 / (rows its unit put in the batch) (the per-unit average of user-level DP;
1 when every row is its own unit), unit u's gradient is

    ∇W_u = Σ_{t∈u} w_t g_t a_t^T        ∇b_u = Σ_{t∈u} w_t g_t

One backward pass to the layers' OUTPUTS (`torch.autograd.grad`: autograd computes no weight gradient)
gives every g_t. Then, per layer, whichever is cheaper:

    ghost:        ||∇W_u||² = Σ_{t,t'∈u} (a_t·a_t')(g_t·g_t') w_t w_t'     T_u² (d_in + d_out) per unit
    materialised: ||(w ⊙ G_u)^T A_u||²_F                                  T_u d_in d_out per unit

(a Linear layer on one token per unit is ||a||² ||g||²), the clip factor over all layers jointly
c_u = min(1, C / (||∇_u|| + 1e-6)) — Opacus's formula — and the clipped sum

    Σ_u c_u ∇W_u = (c w ⊙ G)^T A      one matmul: the plain step's weight-gradient cost.

The result is the flat vector Opacus's per-example clipping sums to (tested equal); noise, scaling
and the accountant are unchanged (`FlatDPOptimizer.noise_clipped_sum`). Only `nn.Linear` and
`nn.Conv1d` (groups 1, zero padding) carry trainable parameters in the shipped models; a model with
any other trainable layer (subclasses included, or extra parameters on a layer) is refused with
`IncompatibleModelError` (use grad_sample_mode=ew), as are a parameter tied between layers, an in-place
operation on a layer's output, a layer called twice (or under torch.no_grad) in one forward pass, and a
layer whose input does not lead with the batch dimension. Ghost Gram sums are taken in float64 (they
cancel; float32 rounding could make a unit's norm vanish and leave it unclipped).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import IncompatibleModelError

__all__ = ["BookkeepingClipper", "bookkeeping_problems"]

_LAYERS = (nn.Linear, nn.Conv1d)


def bookkeeping_problems(model: nn.Module) -> list[str]:
    """Why book-keeping clipping cannot train `model` (empty: it can)."""
    problems = []
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        trainable = {key: parameter for key, parameter in own.items() if parameter.requires_grad}
        if not trainable:
            continue
        # exactly nn.Linear / nn.Conv1d: a subclass may override forward (the closed form would be another
        # layer's), and a parameter besides weight and bias would get no clipped gradient at all
        if type(module) not in _LAYERS:
            problems.append(f"{name or 'model'} ({type(module).__name__}) has trainable parameters; book-keeping clips nn.Linear and nn.Conv1d only")
        elif set(own) - {"weight", "bias"}:
            problems.append(f"{name} ({type(module).__name__}) has parameters other than weight and bias: {sorted(set(own) - {'weight', 'bias'})}")
        elif isinstance(module, nn.Conv1d) and (module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)):
            problems.append(f"{name} (Conv1d): book-keeping needs groups=1 and integer zero padding")
        for key, parameter in trainable.items():
            owners.setdefault(id(parameter), []).append(f"{name}.{key}" if name else key)
    # a tied parameter's gradient is the sum over its layers: per-layer norms would not bound it
    problems.extend(f"parameter {' = '.join(names)} is shared between modules" for names in owners.values() if len(names) > 1)
    return problems


@dataclass
class _Record:
    layer: nn.Module
    inputs: torch.Tensor  # detached
    output: torch.Tensor  # in the graph: differentiated against
    version: int  # the output's version counter when recorded (an in-place op would change it)


class BookkeepingClipper:
    """Records every trainable layer's input and output during a forward pass, then turns one loss into
    the flat clipped per-unit gradient sum, laid out like `params` (the DP optimizer's order)."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter]) -> None:
        problems = bookkeeping_problems(model)
        if problems:
            raise IncompatibleModelError(problems)
        self._layers = [
            module for module in model.modules()
            if isinstance(module, _LAYERS) and any(parameter.requires_grad for parameter in module.parameters(recurse=False))
        ]
        position = {id(parameter): index for index, parameter in enumerate(params)}
        if len(position) != len(params) or any(id(parameter) not in position for layer in self._layers for parameter in layer.parameters(recurse=False) if parameter.requires_grad):
            raise IncompatibleModelError(["the optimizer's parameters must be the model's trainable parameters, each once"])
        self._slots = {
            id(layer): [position[id(parameter)] if parameter is not None and parameter.requires_grad else None for parameter in (layer.weight, layer.bias)]
            for layer in self._layers
        }
        filled = sorted(slot for slots in self._slots.values() for slot in slots if slot is not None)
        if filled != list(range(len(params))):  # every slice of the flat sum is written exactly once (it starts uninitialised)
            raise IncompatibleModelError(["every optimizer parameter must be the weight or bias of exactly one Linear/Conv1d layer"])
        self._sizes = [parameter.numel() for parameter in params]  # the flat sum's layout, one slice per parameter
        self.size = sum(self._sizes)
        self._records: list[_Record] = []
        self._handles = [layer.register_forward_hook(self._record) for layer in self._layers]

    def _record(self, layer: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._records.append(_Record(layer, inputs[0].detach(), output, output._version))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._records = []

    def discard(self) -> None:
        """Forget what the last forward pass recorded (an empty batch: nothing to clip)."""
        self._records = []

    def clipped_sum(self, loss: torch.Tensor, *, rows: int, owner: np.ndarray | None, max_grad_norm: float, loss_scale: float) -> torch.Tensor:
        """Σ_u min(1, C/||∇_u||) ∇_u as one flat vector. `loss_scale` turns dloss/dz into a row's own
        gradient (the batch size for a mean-reduced loss, 1 for a sum); `owner[i]` is row i's unit."""
        records, self._records = self._records, []
        self._check(records, rows)
        grads = torch.autograd.grad(loss, [record.output for record in records], allow_unused=True)
        units = _Units(rows, owner, loss_scale)
        layers = [_LayerGradient(record, grad, rows, units, self._slots[id(record.layer)]) for record, grad in zip(records, grads, strict=True)]
        squared = sum(layer.squared for layer in layers)
        clip = torch.clamp_max(max_grad_norm / (squared.sqrt() + 1e-6), 1.0)
        flat = torch.empty(self.size, dtype=loss.dtype)
        pieces = torch.split(flat, self._sizes)
        for layer in layers:
            layer.clipped_sum_into(clip, units, pieces)
        return flat

    def _check(self, records: list[_Record], rows: int) -> None:
        seen = [id(record.layer) for record in records]
        if sorted(seen) != sorted(id(layer) for layer in self._layers):
            raise IncompatibleModelError(["every trainable layer must run exactly once per forward pass for book-keeping clipping"])
        for record in records:
            if not record.output.requires_grad:
                raise IncompatibleModelError([f"{type(record.layer).__name__} ran without gradients (torch.no_grad): nothing to clip"])
            # tokens are grouped by the leading dimension: a layer applied along another one (sequence-first,
            # a flattened batch) would mix several units' tokens into one clipped group (sensitivity above C)
            if record.inputs.dim() < 2 or record.inputs.shape[0] != rows or record.output.shape[0] != rows:
                raise IncompatibleModelError(
                    [f"{type(record.layer).__name__} runs on a tensor of shape {tuple(record.inputs.shape)}: book-keeping needs "
                     f"the batch ({rows} rows) as its leading dimension (batch_first)"]
                )
            if record.output._version != record.version:
                raise IncompatibleModelError(
                    [f"{type(record.layer).__name__}'s output is modified in place (e.g. ReLU(inplace=True)); use inplace=False"]
                )


class _Units:
    """Which rows form each privacy unit, and the weight of a row's gradient in its unit's."""

    def __init__(self, rows: int, owner: np.ndarray | None, loss_scale: float) -> None:
        self.owner = owner
        if owner is None:  # every row is its own unit: one scalar weight
            self.count, self.scale, self.weight = rows, float(loss_scale), None
            return
        counts = np.bincount(owner)
        self.count, self.scale = len(counts), 1.0
        self.weight = torch.from_numpy(loss_scale / counts[owner]).to(torch.float32)  # [rows]
        self.owner_index = torch.from_numpy(owner)
        if (counts == counts[0]).all() and (np.diff(owner) >= 0).all():  # units of equal size, rows in unit order (as `_Units.draw` gives them): a view
            self.index = None
            return
        order = np.argsort(owner, kind="stable")
        slot = np.arange(rows) - np.repeat(np.cumsum(counts) - counts, counts)  # each (sorted) row's place in its unit
        index = np.full((self.count, int(counts.max())), rows, dtype=np.int64)  # `rows` = a zero padding row
        index[owner[order], slot] = order
        self.index = torch.from_numpy(index)

    def weighted(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens if self.weight is None else tokens * self.weight[:, None, None]

    def side_by_side(self, tokens: torch.Tensor) -> torch.Tensor:
        """[rows, T, d] -> [units, rows of the widest unit * T, d], padded with zero rows."""
        if self.owner is None:
            return tokens
        if self.index is None:  # equal runs
            return tokens.reshape(self.count, -1, tokens.shape[-1])
        padded = torch.cat([tokens, tokens.new_zeros(1, *tokens.shape[1:])])
        return padded[self.index].flatten(1, 2)

    def per_row(self, per_unit: torch.Tensor) -> torch.Tensor:
        return per_unit if self.owner is None else per_unit[self.owner_index]


class _LayerGradient:
    """One layer's per-unit squared norms, and its clipped sum once the clip factors are known."""

    def __init__(self, record: _Record, grad: torch.Tensor | None, rows: int, units: _Units, slots: list[int | None]) -> None:
        self.weight_slot, self.bias_slot = slots
        inputs, outputs = _tokens(record, grad, rows)  # [rows, T, d_in], [rows, T, d_out]
        self.inputs, self.outputs = inputs, units.weighted(outputs)
        unit_in, unit_out = units.side_by_side(self.inputs), units.side_by_side(self.outputs)
        tokens, d_in, d_out = unit_in.shape[1], unit_in.shape[2], unit_out.shape[2]
        self.per_unit_bias = unit_out[:, 0] if tokens == 1 else unit_out.sum(dim=1)  # [units, d_out]
        bias_squared = self.per_unit_bias.square().sum(dim=1)
        squared = bias_squared if self.bias_slot is not None else unit_out.new_zeros(units.count)
        self.per_unit_weight = None
        if self.weight_slot is not None:
            if tokens == 1:  # ||a g^T||^2 = ||a||^2 ||g||^2, and ||g||^2 is the bias's
                squared = squared + unit_in[:, 0].square().sum(dim=1) * bias_squared
            elif tokens * (d_in + d_out) < d_in * d_out:  # ghost: Gram matrices of each unit's tokens
                # in float64: the Gram sum cancels (its rounding error in float32 is ~1e-7 of sum_t |a_t||g_t| squared,
                # enough to make a unit's norm small, zero or negative — unclipped — with large activations)
                wide_in, wide_out = unit_in.double(), unit_out.double()
                ghost = (wide_in @ wide_in.transpose(1, 2) * (wide_out @ wide_out.transpose(1, 2))).sum(dim=(1, 2))
                squared = squared + ghost.clamp_min(0.0).to(squared.dtype)
            else:  # materialised: kept, the clipped sum is then a weighted sum of these
                self.per_unit_weight = unit_out.transpose(1, 2) @ unit_in  # [units, d_out, d_in]
                squared = squared + self.per_unit_weight.square().sum(dim=(1, 2))
        self.squared = squared * units.scale**2

    def clipped_sum_into(self, clip: torch.Tensor, units: _Units, pieces: tuple[torch.Tensor, ...]) -> None:
        factor = clip * units.scale
        if self.weight_slot is not None:
            target = pieces[self.weight_slot].view(-1, self.inputs.shape[-1])
            if self.per_unit_weight is not None:
                torch.mm(factor[None], self.per_unit_weight.flatten(1), out=target.view(1, -1))
            else:
                scaled = (self.outputs * units.per_row(factor)[:, None, None]).flatten(0, 1)
                torch.mm(scaled.T, self.inputs.flatten(0, 1), out=target)
        if self.bias_slot is not None:
            torch.mv(self.per_unit_bias.T, factor, out=pieces[self.bias_slot])


def _tokens(record: _Record, grad: torch.Tensor | None, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's tokens as ([rows, T, d_in], [rows, T, d_out])."""
    layer, inputs, output = record.layer, record.inputs, record.output
    grad = torch.zeros_like(output) if grad is None else grad
    if isinstance(layer, nn.Linear):
        return inputs.reshape(rows, -1, inputs.shape[-1]), grad.reshape(rows, -1, grad.shape[-1])
    (kernel,), (stride,), (padding,), (dilation,) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    padded = F.pad(inputs, (padding, padding))
    patches = padded.unfold(2, dilation * (kernel - 1) + 1, stride)[..., ::dilation]  # [B, C_in, L_out, k]
    patches = patches.permute(0, 2, 1, 3).reshape(rows, patches.shape[2], -1)  # C_in-major, like weight.view(C_out, -1)
    return patches, grad.transpose(1, 2)
