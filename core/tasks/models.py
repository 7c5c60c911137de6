"""Small twin models and losses. No BatchNorm anywhere, so every model is Opacus-compatible."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FlatBCELoss", "FlatMSELoss", "logistic_regression", "mlp"]


def logistic_regression(num_features: int) -> nn.Sequential:
    """One linear layer and a sigmoid: FLamby's Fed-Heart-Disease baseline model."""
    return nn.Sequential(nn.Linear(num_features, 1), nn.Sigmoid())


def mlp(num_features: int, *, hidden_units: int, sigmoid_output: bool) -> nn.Sequential:
    """`num_features -> hidden_units -> 1` with ReLU; a sigmoid head for binary tasks.

    `hidden_units = 0` gives a linear model (logistic regression when `sigmoid_output`).
    """
    layers: list[nn.Module] = []
    if hidden_units > 0:
        layers += [nn.Linear(num_features, hidden_units), nn.ReLU(), nn.Linear(hidden_units, 1)]
    else:
        layers.append(nn.Linear(num_features, 1))
    if sigmoid_output:
        layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


class FlatBCELoss(nn.BCELoss):
    """`BCELoss` that flattens output [B, 1] and target [B] (or [B, 1]) to [B] first.

    The models end in one unit, the site splits hold labels as [n]; flattening both here avoids
    a silent broadcast or a shape error in every trainer.
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002
        return super().forward(input.reshape(-1), target.reshape(-1).to(input.dtype))


class FlatMSELoss(nn.MSELoss):
    """`MSELoss` that flattens output and target to [B]; a [B, 1] vs [B] broadcast would be wrong."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002
        return super().forward(input.reshape(-1), target.reshape(-1).to(input.dtype))
