"""Schema of the `strategy/` config group: aggregation rule, server optimiser and local training recipe.

The server optimiser (`server_optimizer`) follows Flower's `flwr.serverapp.strategy` FedAdam, FedYogi
and FedAvgM (Reddi et al. 2021, "Adaptive Federated Optimization"; Hsu et al. 2019): the coordinator
still only sums, and every site applies the step to the decrypted average (client/server_optimizer.py).
Defaults are Flower's: FedAvgM server_learning_rate 1.0 and server_momentum 0.0; FedAdam/FedYogi
beta_1 0.9, beta_2 0.99, tau 1e-3 (their eta, 0.1 and 0.01, is set in fedadam.yaml / fedyogi.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StrategyConfig:
    name: str = "fedavg"  # fedavg | fedprox
    proximal_mu: float = 0.0  # FedProx mu; 0 = FedAvg
    local_steps: int = 100  # local mini-batch steps per round (the loader cycles)
    batch_size: int = 4
    optimizer: str = "sgd"  # sgd | adam (each site's local optimiser)
    learning_rate: float = 0.001
    server_optimizer: str = "none"  # none | adam | yogi | avgm: the step sites apply to the average
    server_learning_rate: float = 1.0  # Flower's eta (FedAdam/FedYogi) or server_learning_rate (FedAvgM)
    server_momentum: float = 0.0  # avgm: momentum of the pseudo-gradient (Flower's server_momentum)
    beta_1: float = 0.9  # adam, yogi: first-moment decay
    beta_2: float = 0.99  # adam, yogi: second-moment decay
    tau: float = 0.001  # adam, yogi: adaptivity floor added to sqrt(v)
