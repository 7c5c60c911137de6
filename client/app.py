"""The hospital site's Flower ClientApp: train on local data, evaluate the shared model locally."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from medtwin.core.config import MedtwinConfig, config_to_yaml
from medtwin.core.model_vector import model_to_vector, vector_to_model
from medtwin.core.protocol import AGGREGATE, INSTRUCTION, METRICS, SITE, UPDATE
from medtwin.core.provenance import RunApprovalCheck
from medtwin.core.runconfig import config_from_run_config
from medtwin.core.tasks import TwinTask

from .privacy import commit_round, plan_round, train_locally_dp
from .site import Site, SiteLocal, dataset_manifest_hash, load_site, site_index_from_node_config
from .training import LocalTrainingResult, train_locally

logger = logging.getLogger("medtwin.site")

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


def refusal(message: Message, site: Site, *, status: str, reason: str) -> Message:
    """A reply without an update: the coordinator logs the reason, the round goes on without this site."""
    logger.warning("site %s refused round: %s", site.site_id, reason)
    content = RecordDict({SITE: ConfigRecord({"site_id": site.site_id, "status": status, "reason": reason})})
    return Message(content=content, reply_to=message)


def train_round(site: Site, model: torch.nn.Module, *, server_round: int, run_id: str) -> tuple[LocalTrainingResult, dict]:
    """Local training, DP-SGD under the site's own policy and budget when privacy=dp.

    Returns the result and the metrics the site shares. Raises `RoundRefused` when the site says no.
    """
    settings = site.config.strategy
    common = dict(
        loss_fn=site.task.loss_fn(),
        local_steps=settings.local_steps,
        batch_size=settings.batch_size,
        optimizer_name=settings.optimizer,
        learning_rate=settings.learning_rate,
        proximal_mu=settings.proximal_mu if settings.name == "fedprox" else 0.0,
        seed=_step_seed(site.config.seed, server_round, site.index),
    )
    if site.config.privacy.name != "dp":
        result = train_locally(model, site.data.x_train, site.data.y_train, **common)
        return result, {"train_loss": result.mean_loss}
    ledger = site.ledger()
    plan = plan_round(
        policy=site.policy(),
        ledger=ledger,
        run_id=run_id,
        round=server_round,
        privacy_cfg=site.config.privacy,
        num_train=site.data.num_train,
        batch_size=settings.batch_size,
        local_steps=settings.local_steps,
        num_rounds=site.config.federation.num_rounds,
    )
    if not plan.allowed:
        raise RoundRefused(plan.refusal or "refused", plan.reason)
    result = train_locally_dp(
        model,
        site.data.x_train,
        site.data.y_train,
        **common,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        grad_sample_mode=site.config.privacy.grad_sample_mode,
        secure_mode=site.config.privacy.secure_mode,
    )
    epsilon = commit_round(ledger=ledger, plan=plan, steps_taken=result.steps)
    # the training loss is not DP-protected: it stays at the site
    return result, {"epsilon": epsilon, "delta": plan.target_delta, "noise_multiplier": plan.noise_multiplier}


class RoundRefused(Exception):
    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def build_client_app(
    config: MedtwinConfig | None = None,
    sites: Mapping[int, SiteLocal] | None = None,
    approval_check: RunApprovalCheck | None = None,
) -> ClientApp:
    """A ClientApp bound to `config` (or the run's run_config); in simulation, `sites` gives each site index
    its own local settings (kit, state folder, policy); `approval_check` reads the site's run approval."""
    config_yaml = config_to_yaml(config) if config is not None else None
    site_settings = dict(sites or {})
    app = ClientApp()

    def site_for(context: Context) -> Site:
        torch.set_num_threads(1)
        yaml_text = config_yaml or config_to_yaml(config_from_run_config(context.run_config))
        index = site_index_from_node_config(context.node_config)
        local = SiteLocal.from_node_config(context.node_config, site_settings.get(index))
        return load_site(yaml_text, index, local)

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
        model, _ = current_model(site, message.content.get(AGGREGATE))
        try:
            result, shared_metrics = train_round(site, model, server_round=server_round, run_id=run_id)
        except RoundRefused as refused:
            return refusal(message, site, status=refused.status, reason=refused.reason)
        logger.info("site %s trained round %d: %d steps", site.site_id, server_round, result.steps)
        update, proof = site.codec.pack(
            model_to_vector(model), num_examples=result.num_examples, run_id=run_id, server_round=server_round
        )
        content = RecordDict(
            {
                UPDATE: update,
                SITE: ConfigRecord(
                    {"site_id": site.site_id, "status": "trained", "dataset_manifest": dataset_manifest_hash(site), **proof}
                ),
                METRICS: MetricRecord(shared_metrics),
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
