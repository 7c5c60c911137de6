"""The workloads `bench_he_round` times: what every site trains and evaluates, the same under both schemes.

`mlp_workload`: a ~100k-parameter MLP on synthetic data (a random linear rule), SGD at 0.01;
`task_workload`: a shipped task with the recipe its configs/task/<name>.yaml chooses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from medtwin.core.config import compose_config


@dataclass(frozen=True)
class Workload:
    """What every site trains and evaluates, the same under both schemes."""

    name: str
    build_model: Callable[[], nn.Module]
    loss_fn: Callable[[], nn.Module]
    evaluate: Callable[[nn.Module, np.ndarray, np.ndarray], object]
    train: list[tuple[np.ndarray, np.ndarray]]  # per site
    test: list[tuple[np.ndarray, np.ndarray]]  # per site
    local_steps: int
    batch_size: int
    optimizer: str
    learning_rate: float

    @property
    def sites(self) -> int:
        return len(self.train)

    @property
    def max_total_examples(self) -> int:  # as a simulation bounds it: 2 x the sites' training rows
        return 2 * sum(len(y) for _, y in self.train)


def build_model(*, features: int, hidden: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = []
    width = features
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def _site_data(index: int, *, rows: int, features: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([7, index])
    x = rng.normal(0.0, 1.0, (rows, features)).astype(np.float32)
    rule = np.random.default_rng(7).normal(0.0, 1.0, features)
    y = (x @ rule + rng.normal(0.0, 0.5, rows) > 0).astype(np.float32)
    return x, y


def _mlp_loss(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).squeeze(-1)
        return float(nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(y)))


def mlp_workload(*, sites: int, features: int, hidden: tuple[int, ...], local_steps: int, batch_size: int) -> Workload:
    rows = local_steps * batch_size
    data = [_site_data(index, rows=rows + rows // 4, features=features) for index in range(sites)]
    return Workload(
        name=f"MLP {features}-{'-'.join(map(str, hidden))}-1, {local_steps} SGD steps of {batch_size}",
        build_model=lambda: build_model(features=features, hidden=hidden),
        loss_fn=nn.BCEWithLogitsLoss,
        evaluate=_mlp_loss,
        train=[(x[:rows], y[:rows]) for x, y in data],
        test=[(x[rows:], y[rows:]) for x, y in data],
        local_steps=local_steps, batch_size=batch_size, optimizer="sgd", learning_rate=0.01,
    )  # fmt: skip


def task_workload(task_name: str) -> Workload:
    """A shipped task with its default recipe (the strategy its configs/task/<name>.yaml chooses)."""
    from medtwin.core.tasks import get_task

    config = compose_config([f"task={task_name}"])
    task = get_task(config.task)
    splits = task.load_all_sites()
    recipe = config.strategy
    return Workload(
        name=f"{task_name}, {recipe.local_steps} {recipe.optimizer} steps of {recipe.batch_size} at {recipe.learning_rate:g}",
        build_model=task.build_model, loss_fn=task.loss_fn, evaluate=task.evaluate,
        train=[(split.x_train, split.y_train) for split in splits],
        test=[(split.x_test, split.y_test) for split in splits],
        local_steps=recipe.local_steps, batch_size=recipe.batch_size, optimizer=recipe.optimizer,
        learning_rate=recipe.learning_rate,
    )  # fmt: skip
