"""The server optimiser's step, applied by every site to the decrypted average (numpy only).

The math is Flower's (`flwr.serverapp.strategy`, 1.41), written for one flat float64 vector:

    FedOpt (FedAdam, FedYogi; Reddi et al. 2021, Algorithm 2):
        delta = average - x                          (pseudo-gradient, pointing downhill)
        m     = beta_1 * m + (1 - beta_1) * delta
        adam: v = beta_2 * v + (1 - beta_2) * delta**2
              eta_t = eta * sqrt(1 - beta_2**(t + 1)) / (1 - beta_1**(t + 1))   (Flower's bias correction, t = round)
        yogi: v = v - (1 - beta_2) * delta**2 * sign(v - delta**2)
              eta_t = eta
        x     = x + eta_t * m / (sqrt(v) + tau)
    FedAvgM (Hsu et al. 2019; PyTorch SGD's momentum convention):
        g = x - average;  m = momentum * m + g  (m = g in round 1);  x = x - eta * m
    none (FedAvg): x = average

Moments start at zero, as in Flower. `x` is the previous global model, which every site holds
(client/global_state.py keeps it with the moments); the coordinator never sees either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medtwin.core.config import StrategyConfig

__all__ = ["OptimizerMoments", "ServerOptimizerSettings", "server_step"]


@dataclass(frozen=True)
class ServerOptimizerSettings:
    """The proposal's server-optimiser knobs (validated at config load and by each site's proposal reader)."""

    name: str = "none"  # none | adam | yogi | avgm
    learning_rate: float = 1.0
    momentum: float = 0.0
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3

    @classmethod
    def from_strategy(cls, strategy: StrategyConfig) -> ServerOptimizerSettings:
        return cls(
            name=strategy.server_optimizer,
            learning_rate=float(strategy.server_learning_rate),
            momentum=float(strategy.server_momentum),
            beta_1=float(strategy.beta_1),
            beta_2=float(strategy.beta_2),
            tau=float(strategy.tau),
        )

    @property
    def stateful(self) -> bool:
        """Whether a round's step depends on the rounds before it (beyond the previous model)."""
        return self.name != "none"


@dataclass(frozen=True)
class OptimizerMoments:
    """The optimiser's memory: `first` is m (adam, yogi) or the momentum buffer (avgm); `second` is v."""

    first: np.ndarray
    second: np.ndarray

    @classmethod
    def zeros(cls, size: int) -> OptimizerMoments:
        return cls(first=np.zeros(size), second=np.zeros(size))


def server_step(
    settings: ServerOptimizerSettings, *, weights: np.ndarray, moments: OptimizerMoments, average: np.ndarray, server_round: int
) -> tuple[np.ndarray, OptimizerMoments]:
    """The new global model and moments after round `server_round`'s average (inputs are not modified)."""
    weights = np.asarray(weights, dtype=np.float64)
    average = np.asarray(average, dtype=np.float64)
    if average.shape != weights.shape:
        raise ValueError(f"the average holds {average.size} weights, the global model {weights.size}")
    if settings.name == "none":
        return average.copy(), moments
    if settings.name == "avgm":
        pseudo_gradient = weights - average
        momentum_buffer = settings.momentum * moments.first + pseudo_gradient
        return weights - settings.learning_rate * momentum_buffer, OptimizerMoments(momentum_buffer, moments.second)
    delta = average - weights
    first = settings.beta_1 * moments.first + (1.0 - settings.beta_1) * delta
    if settings.name == "adam":
        second = settings.beta_2 * moments.second + (1.0 - settings.beta_2) * delta**2
        step_size = (
            settings.learning_rate
            * np.sqrt(1.0 - np.power(settings.beta_2, server_round + 1.0))
            / (1.0 - np.power(settings.beta_1, server_round + 1.0))
        )
    elif settings.name == "yogi":
        second = moments.second - (1.0 - settings.beta_2) * delta**2 * np.sign(moments.second - delta**2)
        step_size = settings.learning_rate
    else:
        raise ValueError(f"unknown server optimiser {settings.name!r}: use none, adam, yogi or avgm")
    return weights + step_size * first / (np.sqrt(second) + settings.tau), OptimizerMoments(first, second)
