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
gives every g_t. Then, per layer:

    rows as units, Linear on [B, d]:  ||∇W_i||² + ||∇b_i||² = ||g_i||² (||a_i||² + 1)   two row norms
    ghost:        ||∇W_u||² = Σ_{t,t'∈u} (a_t·a_t')(g_t·g_t') w_t w_t'     T_u² (d_in + d_out) per unit
    materialised: ||(w ⊙ G_u)^T A_u||²_F                                  T_u d_in d_out per unit

ghost only where it saves ~1M multiply-adds over the batch (its float64 Grams cost ~8 more small ops; at
these sizes a DP step's cost is mostly per-op overhead, so ops are counted like flops). The clip factor
over all layers jointly is c_u = min(1, C / (||∇_u|| + 1e-6)) — Opacus's formula — and the clipped sum

    Σ_u c_u ∇W_u = (c w ⊙ G)^T A      one matmul: the plain step's weight-gradient cost.

When every row weighs the same (rows as units; patients who each put the same number of rows in the
batch, the twin's usual batch) w is one scale, folded into the clip factors. The result is the flat
vector Opacus's per-example clipping sums to (tested equal). In training it is added in place onto the
noise already drawn into the parameters' flat gradient, both times 1 / expected batch
(`add_clipped_sum`, `FlatDPOptimizer.draw_noise_into_grads`): the same noise distribution from the same
generator, the same scaling, the same accountant. Only `nn.Linear` and
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
        self._leading = [parameter.shape[0] for parameter in params]
        self._flat: torch.Tensor | None = None  # the last flat sum written to, and its `_pieces`
        self._flat_pieces: tuple[tuple[torch.Tensor, ...], list[torch.Tensor]] = ((), [])
        self._layer_ids = sorted(id(layer) for layer in self._layers)
        self.size = sum(self._sizes)
        self._bias_columns: dict[tuple[bool, ...], torch.Tensor] = {}  # which stacked row layers have a bias, as a [layers, 1] column
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
        flat = torch.empty(self.size, dtype=loss.dtype)
        self._clip_and_sum(loss, flat, accumulate=False, scale=1.0, rows=rows, owner=owner, max_grad_norm=max_grad_norm, loss_scale=loss_scale)
        return flat

    def add_clipped_sum(self, loss: torch.Tensor, into: torch.Tensor, *, scale: float, rows: int, owner: np.ndarray | None, max_grad_norm: float, loss_scale: float) -> None:
        """into += scale * Σ_u min(1, C/||∇_u||) ∇_u, in place (the DP step adds it to the noise already drawn
        into the flat gradient): the scale rides on the clip factors, the sum on the weight-gradient matmuls."""
        self._clip_and_sum(loss, into, accumulate=True, scale=scale, rows=rows, owner=owner, max_grad_norm=max_grad_norm, loss_scale=loss_scale)

    def _clip_and_sum(self, loss: torch.Tensor, flat: torch.Tensor, *, accumulate: bool, scale: float, rows: int, owner: np.ndarray | None, max_grad_norm: float, loss_scale: float) -> None:
        records, self._records = self._records, []
        self._check(records, rows)
        grads = torch.autograd.grad(loss, [record.output for record in records], allow_unused=True)
        units = _Units(rows, owner, loss_scale)
        row_layers, unit_layers = [], []
        for record, grad in zip(records, grads, strict=True):
            slots = self._slots[id(record.layer)]
            grad = torch.zeros_like(record.output) if grad is None else grad
            if units.owner is None and record.inputs.dim() == 2 and isinstance(record.layer, nn.Linear) and slots[0] is not None:
                row_layers.append(_RowLinear(record.inputs, grad, slots))
            else:
                unit_layers.append(_LayerGradient(record, grad, rows, units, slots))
        norm = self._unit_norms(row_layers, unit_layers)
        factor = _clip_factor(norm, scale=units.scale, max_grad_norm=max_grad_norm, times=scale)
        pieces, matrices = self._pieces(flat)
        column = factor[:, None]
        for layer in row_layers:
            layer.clipped_sum_into(factor, column, pieces, matrices, accumulate=accumulate)
        for layer in unit_layers:
            layer.clipped_sum_into(factor, units, pieces, matrices, accumulate=accumulate)

    def _pieces(self, flat: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
        """`flat`'s slice per parameter, and each as a [first dimension, rest] matrix; kept for the training loop's
        flat gradient, which is the same tensor every step."""
        if flat is not self._flat:
            pieces = flat.split(self._sizes)
            self._flat, self._flat_pieces = flat, (pieces, [piece.view(rows, -1) for piece, rows in zip(pieces, self._leading, strict=True)])
        return self._flat_pieces

    def _unit_norms(self, row_layers: list[_RowLinear], unit_layers: list[_LayerGradient]) -> torch.Tensor:
        """||∇_u|| / scale over all layers jointly, [units]: the norm of every part's per-unit norm. A row layer's
        part is ||g|| sqrt(||a||² + [it has a bias]); row layers are stacked, so they take four ops however many."""
        parts = [norm for layer in unit_layers for norm in layer.norms]
        if row_layers:
            has_bias = tuple(layer.bias_slot is not None for layer in row_layers)
            if has_bias not in self._bias_columns:
                self._bias_columns[has_bias] = torch.tensor(has_bias, dtype=row_layers[0].grad.dtype)[:, None]
            per_layer = torch.stack([layer.grad_norm for layer in row_layers])
            per_layer = per_layer.mul_(torch.hypot(torch.stack([layer.input_norm for layer in row_layers]), self._bias_columns[has_bias]))
            if not parts:
                return torch.linalg.vector_norm(per_layer, dim=0)
            parts.extend(per_layer)
        return torch.linalg.vector_norm(torch.stack(parts), dim=0)

    def _check(self, records: list[_Record], rows: int) -> None:
        seen = [id(record.layer) for record in records]
        if sorted(seen) != self._layer_ids:
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
    """Which rows form each privacy unit, and the weight of a row's gradient in its unit's: `scale` when
    every row weighs the same (rows as units; patients who each put the same number of rows in the batch),
    else a weight per row."""

    def __init__(self, rows: int, owner: np.ndarray | None, loss_scale: float) -> None:
        self.owner, self.weight, self.index = owner, None, None
        if owner is None:  # every row is its own unit
            self.count, self.scale = rows, float(loss_scale)
            return
        counts = np.bincount(owner)
        self.count = len(counts)
        if (counts == counts[0]).all() and (np.diff(owner) >= 0).all():  # equal runs in unit order (as `_Units.draw` gives them): a view
            self.run, self.scale = int(counts[0]), float(loss_scale) / int(counts[0])
            return
        self.run, self.scale = None, 1.0
        self.weight = torch.from_numpy(loss_scale / counts[owner]).to(torch.float32)  # [rows]
        self.owner_index = torch.from_numpy(owner)
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
        if self.owner is None:
            return per_unit
        return per_unit.repeat_interleave(self.run) if self.index is None else per_unit[self.owner_index]


def _clip_factor(norm: torch.Tensor, *, scale: float, max_grad_norm: float, times: float) -> torch.Tensor:
    """Each unit's weight in the clipped sum: min(1, C / (||∇_u|| + 1e-6)) (Opacus's formula) times `scale`
    (its gradient is `scale` times what the layers hold, so ||∇_u|| = scale * norm_u) times `times`, as
    min(scale * times, C * times / (norm_u + 1e-6 / scale)): four in-place ops on one short vector."""
    return norm.add_(1e-6 / scale).reciprocal_().mul_(max_grad_norm * times).clamp_max_(scale * times)


class _RowLinear:
    """A Linear on [rows, d_in] whose every row is its own unit (the tabular models): the row's weight
    gradient g a^T has norm ||g|| ||a||, its bias gradient g — two row norms, and no [rows, d_out, d_in] tensor."""

    def __init__(self, inputs: torch.Tensor, grad: torch.Tensor, slots: list[int | None]) -> None:
        self.weight_slot, self.bias_slot = slots  # the weight is trainable (else: `_LayerGradient`)
        self.inputs, self.grad = inputs, grad
        self.grad_norm = torch.linalg.vector_norm(grad, dim=1)
        self.input_norm = torch.linalg.vector_norm(inputs, dim=1)

    def clipped_sum_into(self, factor: torch.Tensor, column: torch.Tensor, pieces: tuple[torch.Tensor, ...], matrices: list[torch.Tensor], *, accumulate: bool) -> None:
        """(c g)^T a into the weight, g^T c into the bias; `column` is `factor` as [rows, 1]."""
        grad_t = self.grad.T
        if self.inputs.shape[1] <= self.grad.shape[1]:  # scale the narrower side by each row's factor
            left, right = grad_t, self.inputs * column
        else:
            left, right = (self.grad * column).T, self.inputs
        _matmul_into(matrices[self.weight_slot], left, right, accumulate=accumulate)  # [d_out, d_in]
        if self.bias_slot is not None:
            _matmul_into(pieces[self.bias_slot], grad_t, factor, accumulate=accumulate)


# Ghost norms save T_u (d_in d_out - T_u (d_in + d_out)) multiply-adds per unit over materialising each unit's
# gradient, but take ~8 more small ops (float64 Grams); below this saving over the batch, materialise.
_GHOST_MIN_SAVING = 1_000_000


class _LayerGradient:
    """One layer's per-unit gradient norms, and its clipped sum once the clip factors are known."""

    def __init__(self, record: _Record, grad: torch.Tensor, rows: int, units: _Units, slots: list[int | None]) -> None:
        self.weight_slot, self.bias_slot = slots
        inputs, outputs = _tokens(record, grad, rows)  # [rows, T, d_in], [rows, T, d_out] (views where they can be)
        self.inputs, self.outputs = inputs, units.weighted(outputs)
        unit_in, unit_out = units.side_by_side(self.inputs), units.side_by_side(self.outputs)
        tokens, d_in, d_out = unit_in.shape[1], unit_in.shape[2], unit_out.shape[2]
        self.per_unit_bias = unit_out[:, 0] if tokens == 1 else unit_out.sum(dim=1)  # [units, d_out]
        self.norms = [torch.linalg.vector_norm(self.per_unit_bias, dim=1)] if self.bias_slot is not None else []
        self.per_unit_weight = None
        if self.weight_slot is None:
            return
        if units.count * tokens * (d_in * d_out - tokens * (d_in + d_out)) > _GHOST_MIN_SAVING:  # ghost: Gram matrices of each unit's tokens
            # in float64: the Gram sum cancels (its rounding error in float32 is ~1e-7 of sum_t |a_t||g_t| squared,
            # enough to make a unit's norm small, zero or negative — unclipped — with large activations)
            wide_in, wide_out = unit_in.double(), unit_out.double()
            ghost = (wide_in @ wide_in.transpose(1, 2) * (wide_out @ wide_out.transpose(1, 2))).sum(dim=(1, 2))
            self.norms.append(ghost.clamp_min_(0.0).sqrt_().to(unit_out.dtype))
        else:  # materialised: kept, the clipped sum is then a weighted sum of these
            self.per_unit_weight = torch.bmm(unit_out.transpose(1, 2), unit_in).flatten(1)  # [units, d_out * d_in]
            self.norms.append(torch.linalg.vector_norm(self.per_unit_weight, dim=1))

    def clipped_sum_into(self, factor: torch.Tensor, units: _Units, pieces: tuple[torch.Tensor, ...], matrices: list[torch.Tensor], *, accumulate: bool) -> None:
        if self.weight_slot is not None:
            if self.per_unit_weight is not None:
                _matmul_into(pieces[self.weight_slot], self.per_unit_weight.T, factor, accumulate=accumulate)
            else:
                scaled = (self.outputs * units.per_row(factor)[:, None, None]).flatten(0, 1)
                _matmul_into(matrices[self.weight_slot], scaled.T, self.inputs.flatten(0, 1), accumulate=accumulate)
        if self.bias_slot is not None:
            _matmul_into(pieces[self.bias_slot], self.per_unit_bias.T, factor, accumulate=accumulate)


def _matmul_into(target: torch.Tensor, left: torch.Tensor, right: torch.Tensor, *, accumulate: bool) -> None:
    """target = left @ right, or target += left @ right; `right` a matrix or a vector (then `target` is one)."""
    if right.dim() == 1:
        if accumulate:
            target.addmv_(left, right)
        else:
            torch.mv(left, right, out=target)
    elif accumulate:
        target.addmm_(left, right)
    else:
        torch.mm(left, right, out=target)


def _tokens(record: _Record, grad: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's tokens as ([rows, T, d_in], [rows, T, d_out])."""
    layer, inputs = record.layer, record.inputs
    if isinstance(layer, nn.Linear):
        return inputs.reshape(rows, -1, inputs.shape[-1]), grad.reshape(rows, -1, grad.shape[-1])
    (kernel,), (stride,), (padding,), (dilation,) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    padded = F.pad(inputs, (padding, padding))
    patches = padded.unfold(2, dilation * (kernel - 1) + 1, stride)[..., ::dilation]  # [B, C_in, L_out, k]
    patches = patches.permute(0, 2, 1, 3).reshape(rows, patches.shape[2], -1)  # C_in-major, like weight.view(C_out, -1)
    return patches, grad.transpose(1, 2)
