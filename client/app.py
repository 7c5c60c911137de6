"""The hospital site's Flower ClientApp: the site's own file decides; the coordinator only proposes.

Every message is checked in the same order, in simulation as in deployment:

1. the site file (node_config `site-file`; a simulation harness names one file per virtual node);
2. the run proposal (run_config `medtwin-config-yaml`), parsed as plain data within the file's bounds;
3. the site's approval of (run id, config hash, code hash) — on the auth chain, or in its own state;
4. the aggregate's round certificate (signed claims of its participants, enough of them, its hash);
5. privacy: the site's policy and budget ledger (reserved under one lock before training);
6. every reply — update, evaluation or refusal — is a claim signed with the site's own key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from medtwin.core.errors import MedtwinError
from medtwin.core.hashing import code_hash
from medtwin.core.he import site_precision_problem
from medtwin.core.identity import ReplyClaim, SiteKit, load_site_kit, sign_claim
from medtwin.core.ids import check_id
from medtwin.core.model_vector import model_to_vector, vector_to_model
from medtwin.core.privacy_math import expected_units_per_step
from medtwin.core.protocol import (
    AGGREGATE,
    CERTIFICATE,
    INSTRUCTION,
    METRICS,
    ROUND_INPUTS,
    SCORE_HISTOGRAM,
    SITE,
    STATISTICS_ROUND,
    STATISTICS_STATUS,
    UPDATE,
    certified_records,
    evaluation_sha256,
    payload_sha256,
    site_reply_record,
)
from medtwin.core.provenance import RunApprovalCheck
from medtwin.core.runconfig import CONFIG_YAML_KEY
from medtwin.core.tasks.federated_statistics import ImplausibleStatisticsError
from medtwin.core.tasks.vitals.ingest import VitalsInputError

from .aggregate_check import AggregateRefused, VerifiedAggregate, decode_certified, shared_payloads, verify_certificate
from .codec import CkksSiteCodec
from .normalization import normalised_site, pack_statistics, uses_federated_statistics
from .global_state import GlobalState, GlobalStateStore, SharedStateRefused, advance_global_state, initial_global_state
from .privacy import (
    BudgetLedger,
    PrivacyError,
    RoundAlreadyTrainedError,
    RoundPrivacyPlan,
    dp_units_per_step,
    plan_round,
    reserve_round,
    train_locally_dp,
)
from .proposal import ProposalRefused
from .release import release_metrics, release_score_histogram
from .reply_store import ReplyStore
from .server_optimizer import ServerOptimizerSettings
from .site import Site, dataset_manifest_hash, load_site
from .site_file import SiteFile, load_site_file
from .site_state import EvaluationRegister, SiteApprovals
from .training import LocalTrainingResult, train_locally

logger = logging.getLogger("medtwin.site")

SITE_FILE_KEY = "site-file"  # node_config: the only thing a SuperNode tells its ClientApp
SITES_DIR_ENV = "MEDTWIN_SITES_DIR"  # simulation engine: a folder of site files + index.json by partition id


class RoundRefused(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def initial_model(task, *, seed: int) -> torch.nn.Module:
    """Round 1 starts from a public, seeded model that every site builds identically."""
    torch.manual_seed(seed)
    return task.build_model()


def site_file_for(node_config: Mapping[str, object], site_files: Mapping[int, str]) -> str:
    """This node's site file: node_config `site-file`, the harness's file for its partition, or the sites folder."""
    if SITE_FILE_KEY in node_config:
        return str(node_config[SITE_FILE_KEY])
    partition = node_config.get("partition-id")
    if partition is not None and int(partition) in site_files:
        return site_files[int(partition)]
    sites_dir = os.environ.get(SITES_DIR_ENV, "")
    if partition is not None and sites_dir:
        index = json.loads((Path(sites_dir) / "index.json").read_text(encoding="utf-8"))
        return str(Path(sites_dir) / index[str(int(partition))])
    raise KeyError(f"this node has no site file: start the SuperNode with --node-config '{SITE_FILE_KEY}=\"/path/site.yaml\"'")


def current_model(site: Site, message: Message, *, certificate_round: int) -> tuple[torch.nn.Module, VerifiedAggregate | None]:
    """The shared model: initial in round 1, else the site's own sum of the verified, certified updates."""
    model = initial_model(site.task, seed=site.config.seed)
    inputs = shared_payloads(message.content, ROUND_INPUTS)
    aggregate = inputs.get(AGGREGATE)
    if aggregate is None:
        if certificate_round >= 1:
            raise AggregateRefused(f"this phase needs round {certificate_round}'s aggregate and its certified updates")
        return model, None
    verified = verify_certificate(
        message.content.config_records.get(CERTIFICATE),
        aggregate,
        certified_records(inputs),
        manifest=site.kit.manifest,
        run_id=site.proposal.run_id,
        server_round=certificate_round,
        min_participants=max(site.file.evaluation.min_participants, site.config.federation.min_sites),
        max_site_examples=site.config.federation.max_site_examples,
    )
    average, _ = decode_certified(site.codec, verified, unusable="the certified updates do not sum to a usable model")
    if average.size != model_to_vector(model).size:
        raise AggregateRefused(f"the certified sum holds {average.size} weights, this task's model {model_to_vector(model).size}")
    try:  # the server optimiser's step (identity for FedAvg), from state this site derived itself
        state = advance_global_state(
            GlobalStateStore(site.file.state_dir, site.proposal.run_id), initial=initial_state(site, model),
            server_round=certificate_round, average=average, inputs_sha256=starting_point(verified),
            started_from=verified.started_from,
        )  # fmt: skip
    except SharedStateRefused as refused:
        raise RoundRefused(f"refused:{refused.code}", refused.reason) from None
    vector_to_model(model, state.weights)
    return model, replace(verified, global_state_sha256=state.sha256)


def initial_state(site: Site, model: torch.nn.Module) -> GlobalState:
    """S_0 of the run's server optimiser: `model` must be the fresh `initial_model`."""
    settings = ServerOptimizerSettings.from_strategy(site.config.strategy)
    return initial_global_state(run_id=site.proposal.run_id, settings=settings, weights=model_to_vector(model))


def _erased_ledger_problem(site: Site, ledger: BudgetLedger, approval_check: RunApprovalCheck | None) -> str | None:
    """A ledger without a single spend is either a new site's or one deleted together with its mark; where
    the site reads a data chain, that chain's record of the site's earlier DP runs tells them apart."""
    witness = getattr(approval_check, "erased_ledger_problem", None)
    if witness is None or ledger.runs() or ledger.releases():
        return None
    return witness(site_id=site.site_id, ledger_path=str(ledger.path))


def train_round(
    site: Site,
    model: torch.nn.Module,
    *,
    server_round: int,
    approval_check: RunApprovalCheck | None = None,
    last_aggregate: VerifiedAggregate | None = None,
) -> tuple[LocalTrainingResult, float, float, dict]:
    """Local training under the site's own policy and budget. Returns (result, ε, δ, shared metrics).
    `last_aggregate`: the verified aggregate this round starts from (None in round 1).

    Raises `RoundRefused` when the site says no.
    """
    settings = site.config.strategy
    run_id = site.proposal.run_id
    common = dict(
        loss_fn=site.task.loss_fn(),
        local_steps=settings.local_steps,
        batch_size=settings.batch_size,
        optimizer_name=settings.optimizer,
        learning_rate=settings.learning_rate,
        proximal_mu=settings.proximal_mu if settings.name == "fedprox" else 0.0,
        seed=_step_seed(site.config.seed, server_round, site.seed_index),
    )
    policy = site.policy()
    if site.config.privacy.name != "dp":
        if policy.require_dp:
            raise RoundRefused(
                "refused:policy",
                f"the run asks for no differential privacy (privacy.name={site.config.privacy.name!r}); "
                f"this site requires DP (its site file: privacy.require_dp, max_epsilon {policy.max_epsilon:g})",
            )
        result = train_locally(model, site.data.x_train, site.data.y_train, **common)
        return result, 0.0, 0.0, {"train_loss": result.mean_loss}
    try:
        ledger = site.ledger()
    except PrivacyError as error:  # missing, rolled back or damaged: the site stops training, and says why
        raise RoundRefused("refused:ledger", str(error)) from None
    erased = _erased_ledger_problem(site, ledger, approval_check)
    if erased:
        raise RoundRefused("refused:ledger", erased)
    plan = plan_round(
        policy=policy,
        ledger=ledger,
        run_id=run_id,
        round=server_round,
        privacy_cfg=site.config.privacy,
        num_train=site.data.num_train_units,  # the privacy unit is the patient
        batch_size=dp_units_per_step(
            batch_size=settings.batch_size, unit_rows=site.config.privacy.unit_rows, grouped=site.data.train_units is not None
        ),
        local_steps=settings.local_steps,
        num_rounds=site.config.federation.num_rounds,
    )
    if not plan.allowed:
        raise RoundRefused(f"refused:{plan.refusal or 'policy'}", plan.reason)
    precision_problem = _he_precision_problem(site, plan, proximal_mu=common["proximal_mu"], last_aggregate=last_aggregate)
    if precision_problem:  # before any budget is spent
        raise RoundRefused("refused:he_precision", precision_problem)
    try:
        epsilon = reserve_round(ledger=ledger, plan=plan)  # check and spend under one lock, before training
    except RoundAlreadyTrainedError as error:
        raise RoundRefused("refused:replay", str(error)) from None
    except PrivacyError as error:
        raise RoundRefused("refused:budget", str(error)) from None
    result = train_locally_dp(
        model,
        site.data.x_train,
        site.data.y_train,
        **common,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        grad_sample_mode=site.config.privacy.grad_sample_mode,
        secure_mode=site.config.privacy.secure_mode,
        units=site.data.train_units,
        unit_rows=site.config.privacy.unit_rows,
    )
    if result.sample_rate != plan.sample_rate:  # the ledger must record the rate actually trained with
        raise RuntimeError(f"trained at sample rate {result.sample_rate}, planned {plan.sample_rate}")
    # the training loss is not DP-protected: it stays at the site
    return result, epsilon, plan.target_delta, {"noise_multiplier": plan.noise_multiplier}


def _he_precision_problem(
    site: Site, plan: RoundPrivacyPlan, *, proximal_mu: float, last_aggregate: VerifiedAggregate | None
) -> str:
    """Does the run's CKKS key set round the average finer than 1 % of this site's own DP noise (or the
    default precision)? Only checked where that noise is linear in the update (plain SGD).

    Round 1 checks the key set's own full scale. From round 2 the site knows the run's real totals — the
    signed example counts and participants of the aggregate it starts from — and checks the error at
    those: a key set made for an inflated crypto.max_total_examples, or for fewer sites than take part,
    rounds the real average far more coarsely than at its full scale."""
    if not isinstance(site.codec, CkksSiteCodec) or site.config.strategy.optimizer != "sgd":
        return ""
    parameters = site.codec.context.parameters
    observed = None
    if last_aggregate is not None and last_aggregate.claimed_examples > 0:
        sites = len(last_aggregate.participants)
        observed = (site.codec.error_bound(total_examples=last_aggregate.claimed_examples, num_sites=sites), sites)
    return site_precision_problem(
        parameters,
        observed=observed,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=expected_units_per_step(sample_rate=plan.sample_rate, num_units=site.data.num_train_units),
        learning_rate=site.config.strategy.learning_rate,
        local_steps=plan.steps,
        proximal_mu=proximal_mu,
    )


def build_client_app(
    *,
    proposal_text: str | None = None,
    site_files: Mapping[int, str] | None = None,
    approval_check_for: Callable[[SiteFile], RunApprovalCheck | None] | None = None,
) -> ClientApp:
    """The ClientApp. Deployed, it reads the proposal from the run_config and the site file from node_config;
    a simulation harness passes the same proposal text and one site file per virtual node.
    `approval_check_for(site_file)` gives a site with `approvals: chain` its reader of the chains
    (built by the wiring layer from the site's own file)."""
    bound_files = dict(site_files or {})
    app = ClientApp()

    def open_site(context: Context) -> Site:
        torch.set_num_threads(1)
        text = proposal_text if proposal_text is not None else context.run_config.get(CONFIG_YAML_KEY, "")
        return load_site(site_file_for(context.node_config, bound_files), str(text))

    def handle(message: Message, context: Context, phase) -> Message:
        try:
            site = open_site(context)
        except VitalsInputError as error:  # the hospital's own file is broken: say so, without its contents
            site_file = load_site_file(site_file_for(context.node_config, bound_files))
            logger.error("site %s: %d problem(s) in its data file %s; `medtwin site start` lists them", site_file.site_id, len(error.problems), error.path)
            return signed_refusal(
                message, site_id=site_file.site_id, kit=load_site_kit(site_file.kit_dir), run_id=_instructed_run_id(message),
                server_round=_safe_round(message), status="refused:data",
                reason=f"this site's data file failed validation ({len(error.problems)} problem(s)); its operator has the list",
            )  # fmt: skip
        except ProposalRefused as refused:
            # nothing of the proposal was used: the site signs its refusal with its own file's kit
            site_file = load_site_file(site_file_for(context.node_config, bound_files))
            run_id = _instructed_run_id(message)
            return signed_refusal(
                message, site_id=site_file.site_id, kit=load_site_kit(site_file.kit_dir), run_id=run_id,
                server_round=_safe_round(message), status=f"refused:{refused.code}", reason=refused.reason,
            )  # fmt: skip
        try:
            first_round = STATISTICS_ROUND if phase is statistics_phase else 1
            server_round = _instructed_round(message, site, first_round=first_round)
            approval_check = approval_check_for(site.file) if approval_check_for is not None else None
            approval_problem = _approval_problem(site, approval_check)
            if approval_problem:
                raise RoundRefused("refused:not_approved", approval_problem)
            return phase(site, message, server_round, approval_check)
        except (RoundRefused, AggregateRefused, ProposalRefused) as refused:
            code = getattr(refused, "code", "refused:unverified_aggregate")
            if isinstance(refused, ProposalRefused):
                code = f"refused:{refused.code}"
            return refusal(message, site, server_round=_safe_round(message), status=code, reason=refused.reason)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return handle(message, context, train_phase)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return handle(message, context, evaluate_phase)

    @app.query()
    def statistics(message: Message, context: Context) -> Message:
        return handle(message, context, statistics_phase)

    return app


def starting_point(verified: VerifiedAggregate | None) -> str:
    """What a phase starts from, for the reply store: the aggregate's digest AND the certified updates the
    site summed itself (the model it used), so a reply is resent only for exactly the same inputs."""
    if verified is None:
        return "initial"
    digest = hashlib.sha256(f"medtwin/start/v1\x00{verified.aggregate_sha256}".encode())
    for update in verified.updates:
        digest.update(bytes.fromhex(payload_sha256(update)))
    return digest.hexdigest()


def train_phase(site: Site, message: Message, server_round: int, approval_check: RunApprovalCheck | None) -> Message:
    site = normalised_site(site, message)  # federated normalisation: the certified global statistics, else as loaded
    model, verified = current_model(site, message, certificate_round=server_round - 1)
    started_from = starting_point(verified)
    trained_from_state = verified.global_state_sha256 if verified is not None else initial_state(site, model).sha256
    replies = ReplyStore(site.file.state_dir)
    if (sent := replies.load(site.proposal.run_id, "train", server_round, started_from=started_from)) is not None:
        logger.info("site %s: round %d from this aggregate was trained already; resending that reply", site.site_id, server_round)
        return Message(content=sent, reply_to=message)
    result, epsilon, delta, shared_metrics = train_round(
        site, model, server_round=server_round, approval_check=approval_check, last_aggregate=verified
    )
    logger.info("site %s trained round %d: %d steps", site.site_id, server_round, result.steps)
    update = site.codec.pack(model_to_vector(model), num_examples=result.num_examples, run_id=site.proposal.run_id)
    claim = ReplyClaim(
        kind="update",
        run_id=site.proposal.run_id,
        server_round=server_round,
        site_id=site.site_id,
        payload_sha256=payload_sha256(update),
        num_examples=int(result.num_examples),
        epsilon=float(epsilon),
        delta=float(delta),
        dataset_manifest=dataset_manifest_hash(site),
        status="trained",
        aggregate_sha256=trained_from_state,  # an update names the shared state it was trained from
    )
    content = RecordDict(
        {
            UPDATE: update,
            SITE: site_reply_record(claim, sign_claim(site.kit.signing_key, claim)),
            METRICS: MetricRecord({key: float(value) for key, value in shared_metrics.items()}),
        }
    )
    replies.save(site.proposal.run_id, "train", server_round, started_from=started_from, content=content)
    return Message(content=content, reply_to=message)


def evaluate_phase(site: Site, message: Message, server_round: int, approval_check: RunApprovalCheck | None) -> Message:
    if ROUND_INPUTS not in message.content:
        raise RoundRefused("refused:no_aggregate", "an evaluation needs the round's aggregate")
    site = normalised_site(site, message)
    model, verified = current_model(site, message, certificate_round=server_round)
    assert verified is not None
    # computed, not released: the round's anchor lands meanwhile (the coordinator sends it in the background);
    # nothing is recorded, spent or released before the check below
    metrics = site.task.evaluate(model, site.data.x_test, site.data.y_test)
    if site.file.approvals == "chain" and approval_check is not None:
        problem = approval_check.aggregate_problem(
            run_id=site.proposal.run_id, server_round=server_round, aggregate_sha256=verified.aggregate_sha256
        )
        if problem:
            raise RoundRefused("refused:unanchored", problem)
    replies = ReplyStore(site.file.state_dir)
    started_from = starting_point(verified)
    if (sent := replies.load(site.proposal.run_id, "evaluate", server_round, started_from=started_from)) is not None:
        return Message(content=sent, reply_to=message)  # released already: the same metrics again, nothing new
    problem = EvaluationRegister(site.file.state_dir).record_once(
        run_id=site.proposal.run_id, server_round=server_round, aggregate_sha256=verified.aggregate_sha256
    )
    if problem:
        raise RoundRefused("refused:already_evaluated", problem)
    policy = site.file.evaluation
    if policy.release == "dp":
        try:
            run_limit = site.policy().max_epsilon
            if site.config.privacy.name == "dp":
                run_limit = min(run_limit, site.config.privacy.target_epsilon)
            site.ledger().reserve_release(
                site.proposal.run_id,
                round=server_round,
                epsilon=policy.epsilon_per_release,
                max_total_epsilon=site.policy().max_total_epsilon,
                max_epsilon=run_limit,  # a run's metric releases count in its per-run budget too
            )
        except PrivacyError as error:
            raise RoundRefused("refused:budget", str(error)) from None
    released = release_metrics({key: float(value) for key, value in metrics.items()}, policy)
    histogram = release_score_histogram(site.task.score_histogram(model, site.data.x_test, site.data.y_test), policy)
    histogram_values = histogram.to_values() if histogram is not None else None
    released["num_parameters"] = float(model_to_vector(model).size)
    if site.codec.scheme != "plain":
        released["he_error_bound"] = site.codec.error_bound(total_examples=verified.claimed_examples, num_sites=len(verified.participants))
    claim = ReplyClaim(
        kind="evaluate",
        run_id=site.proposal.run_id,
        server_round=server_round,
        site_id=site.site_id,
        payload_sha256=evaluation_sha256(released, histogram_values),  # the histogram is signed with the metrics
        epsilon=policy.epsilon_per_release if policy.release == "dp" else 0.0,
        status="evaluated",
        aggregate_sha256=verified.aggregate_sha256,
    )
    content = RecordDict(
        {SITE: site_reply_record(claim, sign_claim(site.kit.signing_key, claim)), METRICS: MetricRecord(released)}
    )
    if histogram_values is not None:
        content[SCORE_HISTOGRAM] = MetricRecord(histogram_values)
    replies.save(site.proposal.run_id, "evaluate", server_round, started_from=started_from, content=content)
    return Message(content=content, reply_to=message)


def statistics_phase(site: Site, message: Message, server_round: int, approval_check: RunApprovalCheck | None) -> Message:
    """Round 0 of `task.normalization=federated`: the site's signed statistics update (client/normalization.py)."""
    if not uses_federated_statistics(site):
        raise RoundRefused("refused:bad_instruction", "this run normalises per site (task.normalization=site): it has no statistics phase")
    if site.config.privacy.name == "dp" or site.policy().require_dp:
        raise RoundRefused(
            "refused:policy", "federated statistics are exact feature sums that no DP ledger charges, and this site "
            "requires DP (its site file: privacy.require_dp) — run with task.normalization=site",
        )  # fmt: skip
    replies = ReplyStore(site.file.state_dir)
    run_id = site.proposal.run_id
    if (sent := replies.load(run_id, "statistics", STATISTICS_ROUND, started_from="initial")) is not None:
        return Message(content=sent, reply_to=message)  # the same statistics again: a resumed run cannot change them
    try:
        update, num_rows = pack_statistics(site)
    except (ImplausibleStatisticsError, MedtwinError, ValueError) as error:
        raise RoundRefused("refused:data", f"this site cannot encode its statistics: {str(error)[:200]}") from None
    claim = ReplyClaim(
        kind="update",
        run_id=run_id,
        server_round=STATISTICS_ROUND,
        site_id=site.site_id,
        payload_sha256=payload_sha256(update),
        num_examples=int(num_rows),
        dataset_manifest=dataset_manifest_hash(site),
        status=STATISTICS_STATUS,
    )
    content = RecordDict({UPDATE: update, SITE: site_reply_record(claim, sign_claim(site.kit.signing_key, claim))})
    replies.save(run_id, "statistics", STATISTICS_ROUND, started_from="initial", content=content)
    logger.info("site %s sent its feature statistics", site.site_id)
    return Message(content=content, reply_to=message)


def refusal(message: Message, site: Site, *, server_round: int, status: str, reason: str) -> Message:
    """A signed reply without an update: the coordinator logs the reason, the round goes on without this site."""
    return signed_refusal(
        message, site_id=site.site_id, kit=site.kit, run_id=site.proposal.run_id, server_round=server_round,
        status=status, reason=reason,
    )  # fmt: skip


def signed_refusal(
    message: Message, *, site_id: str, kit: SiteKit, run_id: str, server_round: int, status: str, reason: str
) -> Message:
    logger.warning("site %s refused round %d: %s", site_id, server_round, reason)
    claim = ReplyClaim(
        kind="evaluate" if message.metadata.message_type == "evaluate" else "update",  # train, or the statistics query
        run_id=run_id,
        server_round=server_round,
        site_id=site_id,
        payload_sha256="",
        status=status[:64],
    )
    content = RecordDict({SITE: site_reply_record(claim, sign_claim(kit.signing_key, claim), reason=reason)})
    return Message(content=content, reply_to=message)


def _instructed_run_id(message: Message) -> str:
    """The instruction's run id if it is a safe id, else "" (a refusal must not echo a hostile string)."""
    try:
        value = message.content.config_records[INSTRUCTION]["run_id"]
    except (KeyError, TypeError):
        return ""
    return value if isinstance(value, str) and not check_id(value) else ""


def _approval_problem(site: Site, approval_check: RunApprovalCheck | None) -> str | None:
    binding = dict(site_id=site.site_id, run_id=site.proposal.run_id, config_hash=site.proposal.config_hash, code_hash=code_hash())
    if site.file.approvals == "chain":
        if approval_check is None:
            return "this site approves runs on the authorization chain, but no chain is connected to its ClientApp"
        return approval_check.problem(**binding)
    return SiteApprovals(site.file.state_dir).problem(**binding)


def _instructed_round(message: Message, site: Site, *, first_round: int = 1) -> int:
    order = message.content.config_records.get(INSTRUCTION) if INSTRUCTION in message.content else None
    if order is None:
        raise RoundRefused("refused:bad_instruction", "the message carries no instruction")
    run_id, server_round = order.get("run_id"), order.get("round")
    if run_id != site.proposal.run_id:
        raise RoundRefused("refused:run_mismatch", f"the instruction's run id differs from the proposal's {site.proposal.run_id!r}")
    last_round = STATISTICS_ROUND if first_round == STATISTICS_ROUND else site.config.federation.num_rounds
    if isinstance(server_round, bool) or not isinstance(server_round, int) or not first_round <= server_round <= last_round:
        raise RoundRefused("refused:bad_instruction", f"round {server_round!r} is outside this phase's {first_round}..{last_round}")
    return server_round


def _safe_round(message: Message) -> int:
    try:
        value = message.content.config_records[INSTRUCTION]["round"]
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
    except (KeyError, TypeError):
        return 0


def _step_seed(seed: int, server_round: int, site_index: int) -> int:
    return int(np.random.SeedSequence([seed, server_round, site_index]).generate_state(1)[0])


app = build_client_app()
