"""Local training at a site: a fixed number of mini-batch steps, optionally with a FedProx term."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class LocalTrainingResult:
    mean_loss: float
    steps: int
    num_examples: int


def make_optimizer(model: nn.Module, *, optimizer_name: str, learning_rate: float) -> torch.optim.Optimizer:
    if optimizer_name == "adam":
        return torch.optim.Adam(model.parameters(), lr=learning_rate)
    return torch.optim.SGD(model.parameters(), lr=learning_rate)


def cycling_batches(num_examples: int, *, batch_size: int, seed: int):
    """Endless shuffled mini-batch indices: the loader cycles, as in FLamby's federated recipe."""
    generator = np.random.default_rng(seed)
    while True:
        order = generator.permutation(num_examples)
        for start in range(0, num_examples, batch_size):
            yield order[start : start + batch_size]


def proximal_term(model: nn.Module, global_parameters: list[torch.Tensor], *, proximal_mu: float) -> torch.Tensor:
    squared = sum(((local - anchor) ** 2).sum() for local, anchor in zip(model.parameters(), global_parameters))
    return 0.5 * proximal_mu * squared


def train_locally(
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
) -> LocalTrainingResult:
    """Train `model` in place for `local_steps` mini-batch steps; FedProx when `proximal_mu` > 0."""
    model.train()
    optimizer = make_optimizer(model, optimizer_name=optimizer_name, learning_rate=learning_rate)
    global_parameters = [parameter.detach().clone() for parameter in model.parameters()]
    features = torch.from_numpy(x_train)
    targets = torch.from_numpy(y_train)
    batches = cycling_batches(len(x_train), batch_size=batch_size, seed=seed)
    total_loss = 0.0
    for _ in range(local_steps):
        index = torch.from_numpy(next(batches))
        optimizer.zero_grad()
        output = model(features[index]).reshape(-1)
        loss = loss_fn(output, targets[index])
        if proximal_mu > 0:
            loss = loss + proximal_term(model, global_parameters, proximal_mu=proximal_mu)
        loss.backward()
        optimizer.step()
        total_loss += float(loss.detach())
    return LocalTrainingResult(mean_loss=total_loss / local_steps, steps=local_steps, num_examples=len(x_train))


def train_epochs(
    model: nn.Module,
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    loss_fn: nn.Module,
    epochs: int,
    batch_size: int,
    optimizer_name: str,
    learning_rate: float,
    seed: int,
) -> LocalTrainingResult:
    """Centralised-style training (local and pooled baselines): whole epochs over the data."""
    steps_per_epoch = -(-len(x_train) // batch_size)
    return train_locally(
        model,
        x_train,
        y_train,
        loss_fn=loss_fn,
        local_steps=epochs * steps_per_epoch,
        batch_size=batch_size,
        optimizer_name=optimizer_name,
        learning_rate=learning_rate,
        seed=seed,
    )
