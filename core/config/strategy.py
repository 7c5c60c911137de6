"""Schema of the `strategy/` config group: aggregation rule and local training recipe."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StrategyConfig:
    name: str = "fedavg"  # fedavg | fedprox
    proximal_mu: float = 0.0  # FedProx mu; 0 = FedAvg
    local_steps: int = 100  # local mini-batch steps per round (the loader cycles)
    batch_size: int = 4
    optimizer: str = "sgd"  # sgd | adam
    learning_rate: float = 0.001
