"""A model's parameters as one flat float64 vector: what sites pack, sum and unpack."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def model_to_vector(model: nn.Module) -> np.ndarray:
    return np.concatenate([tensor.detach().cpu().numpy().astype(np.float64).ravel() for tensor in _tensors(model)])


def vector_to_model(model: nn.Module, vector: np.ndarray) -> None:
    """Load `vector` into `model` in place; raises ValueError if the sizes disagree."""
    tensors = _tensors(model)
    expected = sum(tensor.numel() for tensor in tensors)
    if vector.size != expected:
        raise ValueError(f"model vector has {vector.size} values, the model has {expected} parameters")
    offset = 0
    with torch.no_grad():
        for tensor in tensors:
            count = tensor.numel()
            chunk = vector[offset : offset + count].reshape(tensor.shape)
            tensor.copy_(torch.from_numpy(chunk).to(tensor.dtype))
            offset += count


def count_parameters(model: nn.Module) -> int:
    return sum(tensor.numel() for tensor in _tensors(model))


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    # state_dict order is stable across processes; buffers are included so normalisation layers travel too
    return list(model.state_dict(keep_vars=True).values())
