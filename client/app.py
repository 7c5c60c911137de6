"""The hospital site's Flower ClientApp: train on local data, evaluate the shared model locally."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from medtwin.core.config import MedtwinConfig, config_from_yaml, config_to_yaml
from medtwin.core.model_vector import model_to_vector, vector_to_model
from medtwin.core.protocol import AGGREGATE, INSTRUCTION, METRICS, SITE, UPDATE
from medtwin.core.provenance import RunApprovalCheck
from medtwin.core.runconfig import config_from_run_config
from medtwin.core.tasks import SiteSplit, TwinTask, get_task

from .codec import CkksSiteCodec, PlainSiteCodec
from .training import train_locally

logger = logging.getLogger("medtwin.site")

SiteCodec = PlainSiteCodec | CkksSiteCodec


@dataclass(frozen=True)
class Site:
    """Everything a site needs for one run: its config, task, own data split and codec."""

    config: MedtwinConfig
    task: TwinTask
    index: int
    data: SiteSplit
    codec: SiteCodec

    @property
    def site_id(self) -> str:
        return self.data.site_id


def site_index_from_node_config(node_config: Mapping) -> int:
    for key in ("site-index", "partition-id"):
        if key in node_config:
            return int(node_config[key])
    raise KeyError("node_config needs `site-index` (deployment) or `partition-id` (simulation)")


@lru_cache(maxsize=4)
def _load_site(config_yaml: str, index: int, kit_dir: str) -> Site:
    config = config_from_yaml(config_yaml)
    task = get_task(config.task)
    codec: SiteCodec = PlainSiteCodec()
    if config.crypto.name == "ckks":
        if not kit_dir:
            raise KeyError("crypto=ckks needs this site's kit: set node_config `kit-dir` (from `medtwin provision`)")
        codec = CkksSiteCodec.from_kit(kit_dir)
    site = Site(config=config, task=task, index=index, data=task.load_site(index), codec=codec)
    if isinstance(codec, CkksSiteCodec) and codec.kit.site_id != site.site_id:
        raise KeyError(f"kit {kit_dir} belongs to {codec.kit.site_id!r}, but site index {index} holds {site.site_id!r}")
    return site


def initial_model(task: TwinTask, *, seed: int) -> torch.nn.Module:
    """Round 1 starts from a public, seeded model that every site builds identically."""
    torch.manual_seed(seed)
    return task.build_model()


def current_model(site: Site, aggregate: ArrayRecord | None) -> tuple[torch.nn.Module, float]:
    """The shared model (initial, or the decoded aggregate) and the decoding error bound."""
    model = initial_model(site.task, seed=site.config.seed)
    if aggregate is None:
        return model, 0.0
    average, total_examples = site.codec.average(aggregate)
    vector_to_model(model, average)
    return model, site.codec.error_bound(total_examples=total_examples)


def dataset_manifest_hash(site: Site) -> str:
    """sha256 of a manifest of the site's data (shapes + digests of its arrays): a commitment, never the data."""
    digest = hashlib.sha256(f"medtwin/dataset/v1\x00{site.config.task.name}\x00{site.site_id}".encode())
    for array in (site.data.x_train, site.data.y_train, site.data.x_test, site.data.y_test):
        digest.update(repr(array.shape).encode())
        digest.update(hashlib.sha256(np.ascontiguousarray(array).tobytes()).digest())
    return digest.hexdigest()


def refusal(message: Message, site: Site, *, status: str, reason: str) -> Message:
    """A reply without an update: the coordinator logs the reason, the round goes on without this site."""
    logger.warning("site %s refused round: %s", site.site_id, reason)
    content = RecordDict({SITE: ConfigRecord({"site_id": site.site_id, "status": status, "reason": reason})})
    return Message(content=content, reply_to=message)


def build_client_app(
    config: MedtwinConfig | None = None,
    site_kits: Mapping[int, str] | None = None,
    approval_check: RunApprovalCheck | None = None,
) -> ClientApp:
    """A ClientApp bound to `config` (or the run's run_config), in simulation to kit folders by site index,
    and to a check of the site's own run approval on the authorization chain."""
    config_yaml = config_to_yaml(config) if config is not None else None
    kits = dict(site_kits or {})
    app = ClientApp()

    def site_for(context: Context) -> Site:
        torch.set_num_threads(1)
        yaml_text = config_yaml or config_to_yaml(config_from_run_config(context.run_config))
        index = site_index_from_node_config(context.node_config)
        kit_dir = str(context.node_config.get("kit-dir", kits.get(index, "")))
        return _load_site(yaml_text, index, kit_dir)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        site = site_for(context)
        order = message.content[INSTRUCTION]
        server_round = int(order["round"])
        run_id = str(order["run_id"])
        if approval_check is not None:
            problem = approval_check.problem(site_id=site.site_id, run_id=run_id)
            if problem:
                return refusal(message, site, status="not_approved", reason=problem)
        settings = site.config.strategy
        model, _ = current_model(site, message.content.get(AGGREGATE))
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
        update, proof = site.codec.pack(
            model_to_vector(model), num_examples=result.num_examples, run_id=run_id, server_round=server_round
        )
        content = RecordDict(
            {
                UPDATE: update,
                SITE: ConfigRecord(
                    {"site_id": site.site_id, "status": "trained", "dataset_manifest": dataset_manifest_hash(site), **proof}
                ),
                METRICS: MetricRecord({"train_loss": result.mean_loss}),
            }
        )
        return Message(content=content, reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        site = site_for(context)
        model, error_bound = current_model(site, message.content.get(AGGREGATE))
        metrics = site.task.evaluate(model, site.data.x_test, site.data.y_test)
        metrics["num_parameters"] = float(model_to_vector(model).size)
        if site.codec.scheme != "plain":
            metrics["he_error_bound"] = error_bound
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
