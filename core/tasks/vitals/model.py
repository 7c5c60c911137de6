"""The vital-signs forecaster: a small temporal convolutional network with an uncertainty band.

Input: one flattened window (`WindowShape.input_width`: standardised values and masks of every
signal per grid cell). Output: for each forecast cell and vital, a mean and a log-variance — a
Gaussian forecast whose ±1.645 σ is the twin's 90 % band. Conv1d, ReLU and Linear only: Opacus
computes per-sample gradients for all of them, so the twin trains with DP-SGD like every task.

The mean is a correction to persistence: the model adds its forecast to each vital's last observed
reading in the window (the naive forecast), and the head's mean outputs start at zero. An
untrained — or heavily DP-noised — twin therefore starts at the naive forecast and learns only the
departures from it, which is what per-patient DP on a few hundred patients can afford to learn.

The loss is the Gaussian negative log-likelihood over the observed targets only (missing future
readings carry no error), so the model learns both the trajectory and how sure it can be.
"""

from __future__ import annotations

import torch
from torch import nn

from .generator import SIGNALS
from .windows import FORECAST_INDEX, WindowShape

__all__ = ["LOG_VARIANCE_RANGE", "GaussianForecastLoss", "VitalsForecaster", "persistence_forecast", "split_output"]

LOG_VARIANCE_RANGE = (-6.0, 3.0)  # σ from 0.05 to 4.5 reference scales
HIDDEN_CHANNELS = 32


def split_output(output: torch.Tensor, target_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, log-variance), each [B, target_width], from the model's output (any shape with B * 2 * width values)."""
    paired = output.reshape(-1, 2, target_width)
    low, high = LOG_VARIANCE_RANGE
    log_variance = low + (high - low) * torch.sigmoid(paired[:, 1])
    return paired[:, 0], log_variance


class VitalsForecaster(nn.Module):
    """Two dilated causal-style convolutions over the window, then a linear head on the last cells."""

    def __init__(self, shape: WindowShape) -> None:
        super().__init__()
        self.shape = shape
        channels = 2 * len(SIGNALS)
        self.features = nn.Sequential(
            nn.Conv1d(channels, HIDDEN_CHANNELS, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv1d(HIDDEN_CHANNELS, HIDDEN_CHANNELS, kernel_size=3, padding=2, dilation=2),
            nn.ReLU(),
        )
        self.head = nn.Linear(HIDDEN_CHANNELS * 2 + channels, 2 * shape.target_width)
        with torch.no_grad():  # the mean starts as persistence exactly
            self.head.weight[: shape.target_width].zero_()
            self.head.bias[: shape.target_width].zero_()

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        cells = window.reshape(-1, self.shape.window_steps, 2 * len(SIGNALS))
        hidden = self.features(cells.transpose(1, 2))  # [B, C, window_steps]
        summary = torch.cat([hidden[:, :, -1], hidden.mean(dim=2), cells[:, -1, :]], dim=1)  # last cell, trend, last reading
        output = self.head(summary)
        persistence = persistence_forecast(window, self.shape)  # [B, target_width]
        return torch.cat([output[:, : self.shape.target_width] + persistence, output[:, self.shape.target_width :]], dim=1)


def persistence_forecast(window: torch.Tensor, shape: WindowShape) -> torch.Tensor:
    """The naive forecast, [B, target_width]: each vital's last observed value in the window (0, the
    reference centre, if never seen), repeated over the horizon. The twin's mean is a correction to it."""
    cells = window.reshape(-1, shape.window_steps, 2, len(SIGNALS))  # per cell: values, then masks
    index = torch.as_tensor(FORECAST_INDEX)
    values, seen = cells[:, :, 0].index_select(2, index), cells[:, :, 1].index_select(2, index) > 0.5
    last = torch.zeros_like(values[:, 0])
    for step in range(shape.window_steps):  # later readings overwrite earlier ones
        last = torch.where(seen[:, step], values[:, step], last)
    return last.repeat(1, shape.horizon_steps)


class GaussianForecastLoss(nn.Module):
    """Gaussian negative log-likelihood over each window's observed targets, averaged over windows;
    target = [values | masks]."""

    def __init__(self, target_width: int) -> None:
        super().__init__()
        self.target_width = target_width

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mean, log_variance = split_output(output, self.target_width)
        target = target.reshape(-1, 2 * self.target_width).to(mean.dtype)
        values, mask = target[:, : self.target_width], target[:, self.target_width :]
        nll = 0.5 * (log_variance + (values - mean) ** 2 * torch.exp(-log_variance))
        per_window = (nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # each window weighs the same (DP-SGD's unit)
        return per_window.mean()
