"""The hospital site's Flower ClientApp: train on local data, evaluate the shared model locally."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from medtwin.core.config import MedtwinConfig, config_to_yaml, config_from_yaml
from medtwin.core.model_vector import model_to_vector, vector_to_model
from medtwin.core.protocol import (
    AGGREGATE,
    INSTRUCTION,
    METRICS,
    SITE,
    UPDATE,
    average_from_sum,
    pack_plain_update,
    unpack_plain,
)
from medtwin.core.runconfig import config_from_run_config
from medtwin.core.tasks import SiteSplit, TwinTask, get_task

from .training import train_locally

logger = logging.getLogger("medtwin.site")


@dataclass(frozen=True)
class Site:
    """Everything a site needs for one run: its config, task and its own data split."""

    config: MedtwinConfig
    task: TwinTask
    index: int
    data: SiteSplit

    @property
    def site_id(self) -> str:
        return self.data.site_id


def site_index_from_node_config(node_config: dict) -> int:
    for key in ("site-index", "partition-id"):
        if key in node_config:
            return int(node_config[key])
    raise KeyError("node_config needs `site-index` (deployment) or `partition-id` (simulation)")


@lru_cache(maxsize=4)
def _load_site(config_yaml: str, index: int) -> Site:
    config = config_from_yaml(config_yaml)
    task = get_task(config.task)
    return Site(config=config, task=task, index=index, data=task.load_site(index))


def initial_model(task: TwinTask, *, seed: int) -> torch.nn.Module:
    """Round 1 starts from a public, seeded model that every site builds identically."""
    torch.manual_seed(seed)
    return task.build_model()


def model_from_aggregate(task: TwinTask, aggregate: ArrayRecord | None, *, seed: int) -> torch.nn.Module:
    model = initial_model(task, seed=seed)
    if aggregate is not None:
        average, _ = average_from_sum(unpack_plain(aggregate))
        vector_to_model(model, average)
    return model


def build_client_app(config: MedtwinConfig | None = None) -> ClientApp:
    """A ClientApp bound to `config`, or (None) to the config carried in the run's run_config."""
    config_yaml = config_to_yaml(config) if config is not None else None
    app = ClientApp()

    def site_for(context: Context) -> Site:
        torch.set_num_threads(1)
        yaml_text = config_yaml or config_to_yaml(config_from_run_config(context.run_config))
        return _load_site(yaml_text, site_index_from_node_config(dict(context.node_config)))

    @app.train()
    def train(message: Message, context: Context) -> Message:
        site = site_for(context)
        order = message.content[INSTRUCTION]
        server_round = int(order["round"])
        settings = site.config.strategy
        model = model_from_aggregate(site.task, message.content.get(AGGREGATE), seed=site.config.seed)
        result = train_locally(
            model,
            site.data.x_train,
            site.data.y_train,
            loss_fn=site.task.loss_fn(),
            local_steps=settings.local_steps,
            batch_size=settings.batch_size,
            optimizer_name=settings.optimizer,
            learning_rate=settings.learning_rate,
            proximal_mu=settings.proximal_mu if settings.name == "fedprox" else 0.0,
            seed=_step_seed(site.config.seed, server_round, site.index),
        )
        logger.info("site %s trained round %d: %d steps, loss %.4f", site.site_id, server_round, result.steps, result.mean_loss)
        content = RecordDict(
            {
                UPDATE: pack_plain_update(model_to_vector(model), num_examples=result.num_examples),
                SITE: ConfigRecord({"site_id": site.site_id, "status": "trained"}),
                METRICS: MetricRecord({"train_loss": result.mean_loss}),
            }
        )
        return Message(content=content, reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        site = site_for(context)
        model = model_from_aggregate(site.task, message.content.get(AGGREGATE), seed=site.config.seed)
        metrics = site.task.evaluate(model, site.data.x_test, site.data.y_test)
        content = RecordDict(
            {
                SITE: ConfigRecord({"site_id": site.site_id, "status": "evaluated"}),
                METRICS: MetricRecord({key: float(value) for key, value in metrics.items()}),
            }
        )
        return Message(content=content, reply_to=message)

    return app


def _step_seed(seed: int, server_round: int, site_index: int) -> int:
    return int(np.random.SeedSequence([seed, server_round, site_index]).generate_state(1)[0])


app = build_client_app()
