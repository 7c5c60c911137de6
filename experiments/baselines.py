"""Non-federated baselines in the same run: each site alone (local) and all data in one place (pooled)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from medtwin.client.normalization import PLAIN_TOLERANCE
from medtwin.client.training import train_epochs
from medtwin.core.config import MedtwinConfig
from medtwin.core.tasks import SiteSplit, TwinTask, get_task
from medtwin.core.tasks.federated_statistics import (
    STATISTICS_PER_FEATURE,
    standardise_with,
    standardiser_from_average,
    statistics_vector,
)
from medtwin.core.tasks.preprocessing import pool_raw_splits


def score_everywhere(task: TwinTask, model: nn.Module, sites: list[SiteSplit], pooled: SiteSplit) -> dict[str, float]:
    """A model's primary metric on every site's test split, the pooled test set, and the mean of sites."""
    metric = task.primary_metric
    row = {site.site_id: task.evaluate(model, site.x_test, site.y_test)[metric] for site in sites}
    row["mean_of_sites"] = float(np.mean([row[site.site_id] for site in sites]))
    row["pooled_test"] = task.evaluate(model, pooled.x_test, pooled.y_test)[metric]
    return row


def _train_baseline(task: TwinTask, config: MedtwinConfig, split: SiteSplit) -> nn.Module:
    recipe = config.baselines
    torch.manual_seed(config.seed)
    model = task.build_model()
    train_epochs(
        model,
        split.x_train,
        split.y_train,
        loss_fn=task.loss_fn(),
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        optimizer_name=recipe.optimizer,
        learning_rate=recipe.learning_rate,
        seed=config.seed,
    )
    return model


def compute_baselines(config: MedtwinConfig) -> dict[str, Any]:
    """Each site alone and the pooled model: the primary metric everywhere (`rows`), and every metric
    on the pooled test set (`pooled_test_metrics`: exact there, the harness holds every row)."""
    task = get_task(config.task)
    sites = task.load_all_sites()
    pooled = task.load_pooled()
    models = {f"local:{site.site_id}": _train_baseline(task, config, site) for site in sites}
    models["pooled"] = _train_baseline(task, config, pooled)
    rows = {name: score_everywhere(task, model, sites, pooled) for name, model in models.items()}
    pooled_test_metrics = {name: task.evaluate(model, pooled.x_test, pooled.y_test) for name, model in models.items()}
    columns = [site.site_id for site in sites] + ["pooled_test", "mean_of_sites"]
    return {"metric": task.primary_metric, "columns": columns, "rows": rows, "pooled_test_metrics": pooled_test_metrics}


def final_model_evaluator(config: MedtwinConfig) -> Callable[[np.ndarray], tuple[dict[str, float], dict[str, float]]]:
    """Scores the federated model's plaintext weights like the baselines (simulation only): its row of
    the baseline table, and every metric on the pooled test set."""
    task = get_task(config.task)
    sites = task.load_all_sites()
    pooled = task.load_pooled()
    if config.task.normalization == "federated":
        sites, pooled = federated_views(task)

    def evaluate(weights: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
        model = task.model_with_weights(weights, seed=config.seed)
        return score_everywhere(task, model, sites, pooled), task.evaluate(model, pooled.x_test, pooled.y_test)

    return evaluate


def federated_views(task: TwinTask) -> tuple[list[SiteSplit], SiteSplit]:
    """Every site's rows and the pooled rows z-scored as the sites did under `task.normalization=federated`:
    with the global statistics of every site's training rows, derived by the sites' own encoding and
    checks (client/normalization.py), here from the plain sum of all sites' statistics."""
    raw = [task.load_site_unnormalised(index) for index in range(len(task.site_ids()))]
    reference = task.feature_reference()
    length = STATISTICS_PER_FEATURE * reference.num_features
    total_rows = sum(split.num_train for split in raw)
    average = sum(statistics_vector(split.x_train, reference, length=length) * split.num_train for split in raw) / total_rows
    standardiser = standardiser_from_average(average, total_rows=total_rows, reference=reference, tolerance=PLAIN_TOLERANCE)
    return [standardise_with(split, standardiser) for split in raw], standardise_with(pool_raw_splits(raw), standardiser)
