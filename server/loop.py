"""The coordinator's round loop over Flower's Grid: train, sum, evaluate — with a deadline per phase.

Each phase goes to the nodes `grid.get_node_ids()` lists when it starts and closes when every one of
them replied or `federation.round_timeout_s` passed; it goes on with whoever replied if that is at
least `federation.min_sites`, else the run stops with a `RoundFailedError` naming who replied,
refused and missed. A node that missed a deadline or answered with a Flower error (a dead SuperNode
comes back as a NODE_UNAVAILABLE error reply) is skipped for the rest of that round and, while the
SuperLink keeps listing it, for the next `SIT_OUT_ROUNDS` rounds too: Flower notices a SIGKILLed
SuperNode only after its heartbeat patience (~45-60 s), and a dead node must not cost every later
round a deadline. It rejoins at once when it is listed again after the SuperLink dropped it (a
restarted SuperNode), is asked again after its sit-out (a slow one), and is asked early whenever
the round would otherwise have fewer than `min_sites` nodes.

After every round (and after its training, when an evaluation follows) the loop writes a
`RoundCheckpoint`; `RoundLoop(resume_from=checkpoint)` continues with the round after it, remembering
which nodes missed a deadline (a resumed coordinator does not wait for a dead node again).

Nothing a site sends stops the loop: each reply is read inside a guard, and whatever is wrong with
it — a bad signature, a malformed record, an exception while reading it — becomes a `Rejection`
with a short code that goes on the auth chain. What the loop records about a site (its id, ε, δ,
dataset manifest, example count) comes only from the site's verified, signed claim.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from medtwin.core.artifacts import ArtifactStore
from medtwin.core.config import MedtwinConfig
from medtwin.core.errors import RoundFailedError
from medtwin.core.identity import FederationManifest
from medtwin.core.protocol import (
    AGGREGATE,
    CERTIFICATE,
    INSTRUCTION,
    METRICS,
    ROUND_INPUTS,
    SCORE_HISTOGRAM,
    SITE,
    STATISTICS_AGGREGATE,
    STATISTICS_CERTIFICATE,
    STATISTICS_CERTIFIED_PREFIX,
    STATISTICS_INPUTS,
    STATISTICS_ROUND,
    STATISTICS_STATUS,
    UPDATE,
    RoundCertificate,
    certified_record_name,
    claim_from_site_record,
    evaluation_sha256,
    instruction,
    pack_payloads,
    payload_sha256,
    record_bytes,
    record_from_bytes,
)
from medtwin.core.pooled_metrics import histogram_pooled_metrics, pool_site_metrics
from medtwin.core.provenance import AccessDecision, ProvenanceRecorder
from medtwin.core.score_histogram import ScoreHistogram, ScoreHistogramError
from medtwin.core.tasks import get_task

from .aggregation import Aggregator, Rejection, SiteUpdate
from .checkpoint import CheckpointError, RoundCheckpoint, save_checkpoint
from .verifier import ReplyRejected, ReplyVerifier, VerifiedClaim, safe_code, safe_text

logger = logging.getLogger("medtwin.coordinator")

RoundCallback = Callable[[dict], None]
NODE_POLL_S = 0.5  # how often the node list is re-read while waiting for nodes
NON_NEGATIVE_METRICS = ("n", "num_parameters", "he_error_bound")


@dataclass
class LoopResult:
    rounds_completed: int = 0
    sites: dict[int, str] = field(default_factory=dict)  # node id -> verified site id
    final_site_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    final_pooled_metrics: dict[str, float] = field(default_factory=dict)
    final_score_histogram: ScoreHistogram | None = None  # the sites' score histograms summed (last evaluation)
    aggregate: ArrayRecord | None = None
    certificate: RoundCertificate | None = None  # the signed claims behind `aggregate`
    rejections: list[Rejection] = field(default_factory=list)
    update_bytes: int = 0  # bytes of accepted update payloads, summed over the run
    accepted_updates: int = 0
    round_times_s: list[float] = field(default_factory=list)
    aggregate_digests: list[str] = field(default_factory=list)  # sha256 of each round's aggregate artifact
    num_parameters: int = 0  # model size the sites report (not their sample counts)
    he_error_bounds: list[float] = field(default_factory=list)  # per evaluation: max bound sites reported
    privacy: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> latest signed (epsilon, delta)
    stopped: str = ""  # why the run stopped before its last round (e.g. a chain outage past its timeout)
    # task.normalization=federated: the sum of the sites' statistics updates (round 0) and its certificate
    statistics_aggregate: ArrayRecord | None = None
    statistics_certificate: RoundCertificate | None = None


SIT_OUT_ROUNDS = 2  # rounds a node that missed a deadline skips while the SuperLink still lists it


def wait_for_nodes(grid: Grid, *, expected: int, timeout_s: float, exclude: frozenset[int] = frozenset()) -> list[int]:
    """The nodes the SuperLink lists (but `exclude`), as soon as there are `expected`, else after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        node_ids = sorted(set(grid.get_node_ids()) - exclude)
        if len(node_ids) >= expected or time.monotonic() >= deadline:
            return node_ids
        time.sleep(min(NODE_POLL_S, max(0.0, deadline - time.monotonic())))


def site_error_reason(reason: str) -> str:
    """The useful line of a site's error (Ray wraps it in pages of traceback)."""
    marker = "Message: "
    if marker in reason:
        reason = reason.rsplit(marker, 1)[1]
    reason = reason.replace("\\n", "\n").strip().strip("'\"<>")
    return reason.splitlines()[0][:300] if reason else "unknown error"


def pooled_metrics(site_metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """One figure per metric over all sites, named for what it is (see `core/pooled_metrics.py`)."""
    return pool_site_metrics(site_metrics)


def shared_metrics(record: object) -> dict[str, float]:
    """A train reply's optional, unsigned metrics, for the log only: finite numbers, the rest dropped."""
    if record is None or not hasattr(record, "items"):
        return {}
    kept = {}
    for name, value in record.items():
        if isinstance(name, str) and isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            kept[safe_text(name, limit=64)] = float(value)
    return kept


def evaluation_metrics(metrics: dict[str, object], *, site_id: str) -> dict[str, float]:
    """A signed evaluation's metrics as floats; raises `ReplyRejected` on anything that is not a sane number."""
    values = {}
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ReplyRejected("malformed_metrics", f"metric {name!r:.40} is {value!r:.40}, not a finite number", site_id=site_id)
        if name in NON_NEGATIVE_METRICS and value < 0:
            raise ReplyRejected("malformed_metrics", f"metric {name!r} is {value!r}, must be >= 0", site_id=site_id)
        values[name] = float(value)
    return values


SITE_REFUSAL_PREFIX = "refused:"


def site_refusal_code(status: str, default: str) -> str:
    """The on-chain label of a site's own refusal: always `refused:<its code>`, so a site can never
    make its refusal read like one of the coordinator's verdicts (`ok`, `bad_signature`, …)."""
    code = status.removeprefix(SITE_REFUSAL_PREFIX) if status else default
    return safe_code(SITE_REFUSAL_PREFIX + code)


def sum_and_certify(
    artifacts: ArtifactStore, aggregator: Aggregator, server_round: int, accepted: list[SiteUpdate]
) -> tuple[dict[str, str], ArrayRecord, RoundCertificate]:
    """Store each accepted update (sorted by site), their sum and the certificate of their signed claims:
    (update digests by site, the sum, its certificate) — the same for a training round and round 0's statistics."""
    accepted.sort(key=lambda update: update.site_id)
    update_digests = {update.site_id: artifacts.put(record_bytes(update.record), kind="update") for update in accepted}
    aggregate = aggregator.aggregate(accepted)
    certificate = RoundCertificate(
        server_round=server_round,
        aggregate_sha256=artifacts.put(record_bytes(aggregate), kind="aggregate"),
        claims=tuple((update.claim, update.signature) for update in accepted),
    )
    return update_digests, aggregate, certificate


class RoundLoop:
    """Runs rounds up to `federation.num_rounds`; each phase waits at most `round_timeout_s` and closes with
    whoever replied. With `checkpoints` (a folder) it writes a `RoundCheckpoint` after every round; with
    `resume_from` it continues with the round after that checkpoint, its aggregate and its certificate.
    """

    def __init__(
        self,
        *,
        grid: Grid,
        config: MedtwinConfig,
        run_id: str,
        aggregator: Aggregator,
        manifest: FederationManifest,
        artifacts: ArtifactStore,
        on_record: RoundCallback,
        provenance: ProvenanceRecorder | None = None,
        checkpoints: Path | None = None,
        config_sha256: str = "",
        resume_from: RoundCheckpoint | None = None,
        node_sites: Mapping[int, str] | None = None,
        task_kind: str | None = None,
    ) -> None:
        self.grid = grid
        self.task_kind = task_kind  # the run's `TwinTask.kind`; None: learnt from `config.task` when first needed
        self.node_sites = dict(node_sites or {})  # the coordinator's own registry of SuperNode keys (deployment)
        self.config = config
        self.run_id = run_id
        self.aggregator = aggregator
        self.verifier = ReplyVerifier(manifest, run_id=run_id)
        self.artifacts = artifacts
        self.provenance = provenance
        self.on_record = on_record
        self.checkpoints = checkpoints
        self.config_sha256 = config_sha256
        self.result = LoopResult()
        self.unresponsive: dict[int, int] = {}  # node id -> last round in which it missed a deadline or errored
        self._dropped: set[int] = set()  # unresponsive nodes the SuperLink stopped listing since: listed again = back
        self._sent_to: dict[str, int] = {}  # message id of an instruction -> its destination node
        self._certified: list[ArrayRecord] = []  # the current certificate's updates (sent with the aggregate)
        self._certified_round = -1
        self._certified_statistics: list[ArrayRecord] | None = None  # the statistics certificate's updates
        self.resumed_from = resume_from
        if resume_from is not None:
            self._restore(resume_from)

    @cached_property
    def binary_task(self) -> bool:
        """Whether the run's task is binary: only then may an evaluation carry a score histogram."""
        return (self.task_kind or get_task(self.config.task).kind) == "binary"

    # --- checkpoints ----------------------------------------------------------------------------------

    def _restore(self, checkpoint: RoundCheckpoint) -> None:
        if checkpoint.run_id != self.run_id:
            raise CheckpointError(
                f"the checkpoint of round {checkpoint.server_round} belongs to run {checkpoint.run_id!r}, not {self.run_id!r} — "
                "resume with the checkpoint folder of this run"
            )
        if self.config_sha256 and checkpoint.config_sha256 != self.config_sha256:
            raise CheckpointError(
                f"the checkpoint of run {self.run_id} round {checkpoint.server_round} was written under config "
                f"{checkpoint.config_sha256[:16]}..., this coordinator runs config {self.config_sha256[:16]}... — "
                "resume with the run's own config.yaml, unchanged"
            )
        result = self.result
        result.aggregate = record_from_bytes(self.artifacts.get(checkpoint.aggregate_sha256))
        result.certificate = checkpoint.certificate
        result.rounds_completed = checkpoint.rounds_completed
        result.sites = dict(checkpoint.sites)
        result.final_site_metrics = {site: dict(metrics) for site, metrics in checkpoint.final_site_metrics.items()}
        result.final_pooled_metrics = dict(checkpoint.final_pooled_metrics)
        if checkpoint.final_score_histogram is not None:
            result.final_score_histogram = ScoreHistogram(**checkpoint.final_score_histogram)
        result.rejections = [Rejection(**rejection) for rejection in checkpoint.rejections]
        result.update_bytes = checkpoint.update_bytes
        result.accepted_updates = checkpoint.accepted_updates
        result.round_times_s = list(checkpoint.round_times_s)
        result.aggregate_digests = list(checkpoint.aggregate_digests)
        result.num_parameters = checkpoint.num_parameters
        result.he_error_bounds = list(checkpoint.he_error_bounds)
        result.privacy = {site: dict(spent) for site, spent in checkpoint.privacy.items()}
        self.verifier.site_of_node.update(checkpoint.sites)
        self.verifier.payloads.update(checkpoint.accepted_payloads)  # a replayed earlier update stays refused
        self.unresponsive.update(checkpoint.unresponsive)  # a node that missed a deadline still sits out after a restart
        self._dropped.update(checkpoint.dropped)
        if checkpoint.statistics_certificate is not None:  # the statistics every site normalised with, unchanged
            result.statistics_aggregate = record_from_bytes(self.artifacts.get(checkpoint.statistics_aggregate_sha256))
            result.statistics_certificate = checkpoint.statistics_certificate

    def checkpoint(self, server_round: int, *, phase: str, evaluation_pending: bool = False, open_round_time_s: float = 0.0) -> RoundCheckpoint:
        """The loop's state after `phase` of `server_round` (nothing is written)."""
        result = self.result
        assert result.certificate is not None, "a checkpoint follows a closed training phase"
        return RoundCheckpoint(
            run_id=self.run_id,
            config_sha256=self.config_sha256,
            server_round=server_round,
            phase=phase,
            aggregate_sha256=result.aggregate_digests[-1],
            certificate=result.certificate,
            evaluation_pending=evaluation_pending,
            rounds_completed=result.rounds_completed,
            rejections=tuple(
                {"site_id": r.site_id, "node_id": r.node_id, "reason": r.reason, "server_round": r.server_round, "code": r.code}
                for r in result.rejections
            ),
            update_bytes=result.update_bytes,
            accepted_updates=result.accepted_updates,
            round_times_s=tuple(result.round_times_s),
            open_round_time_s=open_round_time_s,
            aggregate_digests=tuple(result.aggregate_digests),
            he_error_bounds=tuple(result.he_error_bounds),
            num_parameters=result.num_parameters,
            privacy={site: dict(spent) for site, spent in result.privacy.items()},
            final_site_metrics={site: dict(metrics) for site, metrics in result.final_site_metrics.items()},
            final_pooled_metrics=dict(result.final_pooled_metrics),
            final_score_histogram=result.final_score_histogram.to_values() if result.final_score_histogram else None,
            sites=dict(result.sites),
            accepted_payloads=dict(self.verifier.payloads),
            statistics_aggregate_sha256=result.statistics_certificate.aggregate_sha256 if result.statistics_certificate else "",
            statistics_certificate=result.statistics_certificate,
            unresponsive=dict(self.unresponsive),
            dropped=tuple(sorted(self._dropped)),
        )

    def save_checkpoint(self, server_round: int, *, phase: str, evaluation_pending: bool = False, open_round_time_s: float = 0.0) -> None:
        """Write the state after `phase` of `server_round` into the checkpoint folder (if the loop has one)."""
        if self.checkpoints is not None:
            state = self.checkpoint(server_round, phase=phase, evaluation_pending=evaluation_pending, open_round_time_s=open_round_time_s)
            save_checkpoint(self.checkpoints, state)

    # --- rounds ---------------------------------------------------------------------------------------

    def run(self) -> LoopResult:
        federation = self.config.federation
        first_round = 1
        resumed = self.resumed_from
        if resumed is not None:
            first_round = resumed.next_round
            logger.info("run %s resumes after round %d (%s phase)", self.run_id, resumed.server_round, resumed.phase)
        node_ids = self.wait_for_federation()
        logger.info("%d node(s) connected; rounds %d..%d ahead", len(node_ids), first_round, federation.num_rounds)
        if self.config.task.normalization == "federated" and self.result.statistics_certificate is None:
            self.statistics_phase(self.phase_nodes(STATISTICS_ROUND, phase="train"))
        if resumed is not None and resumed.evaluation_pending:
            started = time.monotonic() - resumed.open_round_time_s
            self.evaluate_round(resumed.server_round, self.phase_nodes(resumed.server_round, phase="evaluate"))
            self._close_round(resumed.server_round, started=started, evaluated=True)
        for server_round in range(first_round, federation.num_rounds + 1):
            started = time.monotonic()
            self.train_round(server_round, self.phase_nodes(server_round, phase="train"))
            evaluate = server_round == federation.num_rounds or server_round % federation.evaluate_every == 0
            if evaluate:
                self.save_checkpoint(
                    server_round, phase="train", evaluation_pending=True, open_round_time_s=time.monotonic() - started
                )
                self.evaluate_round(server_round, self.phase_nodes(server_round, phase="evaluate"))
            self._close_round(server_round, started=started, evaluated=evaluate)
            stop = self.chain_outage_problem()
            if stop and server_round < federation.num_rounds:
                logger.error("run %s stops after round %d: %s", self.run_id, server_round, stop)
                self.result.stopped = f"stopped after round {server_round} of {federation.num_rounds}: {stop}"
                break
        return self.result

    def chain_outage_problem(self) -> str | None:
        """The recorder's reason to stop now (a chain down past chain.outage_timeout_s); optional method."""
        outage_problem = getattr(self.provenance, "outage_problem", None)
        return outage_problem() if outage_problem is not None else None

    def _close_round(self, server_round: int, *, started: float, evaluated: bool) -> None:
        self.result.rounds_completed = server_round
        self.result.round_times_s.append(time.monotonic() - started)
        self.save_checkpoint(server_round, phase="evaluate" if evaluated else "train")

    def wait_for_federation(self) -> list[int]:
        """Wait for `task.num_sites` nodes, or `round_timeout_s` and at least `min_sites`; else `RoundFailedError`."""
        federation, expected = self.config.federation, self.config.task.num_sites
        node_ids = wait_for_nodes(self.grid, expected=expected, timeout_s=federation.round_timeout_s)
        if len(node_ids) >= expected:
            return node_ids
        known_absent = sorted({site for node, site in self.result.sites.items() if node not in node_ids})
        absent = f"; sites not connected: {', '.join(known_absent)}" if known_absent else ""
        if len(node_ids) < federation.min_sites:
            raise RoundFailedError(
                f"run {self.run_id}: after {federation.round_timeout_s:g} s only {len(node_ids)} node(s) are connected "
                f"({self._labels(node_ids) or 'none'}), federation.min_sites is {federation.min_sites}{absent} — start the "
                "missing sites' SuperNodes (or lower federation.min_sites) and resume the run"
            )
        logger.warning(
            "starting with %d of %d site(s) after %.0f s: %d missing%s",
            len(node_ids), expected, federation.round_timeout_s, expected - len(node_ids), absent,
        )
        return node_ids

    def phase_nodes(self, server_round: int, *, phase: str) -> list[int]:
        """The nodes a phase goes to: those listed now, but not those that missed or failed earlier in this round,
        nor those sitting out after a miss in the last `SIT_OUT_ROUNDS` rounds (see the module docstring).

        A training phase with fewer than `min_sites` nodes first asks the ones sitting out, then waits up to
        `round_timeout_s` for more (and then goes on, to fail with who is missing).
        """
        listed = set(self.grid.get_node_ids())
        self._dropped.update(node for node in self.unresponsive if node not in listed)
        this_round = frozenset(node for node, missed_in in self.unresponsive.items() if missed_in == server_round)
        sitting_out = frozenset(
            node for node, missed_in in self.unresponsive.items()
            if node not in self._dropped and server_round - missed_in <= SIT_OUT_ROUNDS
        )  # fmt: skip
        needed = self.config.federation.min_sites if phase == "train" else 0
        node_ids = sorted(listed - this_round - sitting_out)
        if len(node_ids) < needed:
            node_ids = sorted(listed - this_round)
        if len(node_ids) < needed:
            node_ids = wait_for_nodes(self.grid, expected=needed, timeout_s=self.config.federation.round_timeout_s, exclude=this_round)
        elif sitting_out - this_round:
            logger.info("round %d: %s sit(s) out after missing a deadline", server_round, self._labels(sorted(sitting_out - this_round)))
        for node_id in node_ids:
            if node_id in self.unresponsive:
                logger.info("round %d: %s is listed again and rejoins", server_round, self._label(node_id))
                del self.unresponsive[node_id]
                self._dropped.discard(node_id)
        return node_ids

    def _send(self, node_ids: list[int], *, phase: str, server_round: int) -> list[Message]:
        messages = []
        shared = self._shared_records()  # the same for every site: built once a phase, not once a message
        for node_id in node_ids:
            order = instruction(run_id=self.run_id, server_round=server_round, phase=phase)
            order["min_sites"] = self.config.federation.min_sites
            content = RecordDict({INSTRUCTION: order, **shared})
            message_type = "query" if phase == "statistics" else phase  # Flower routes a query to the ClientApp's @app.query()
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node_id))
        if not messages:
            return []
        replies = list(self.grid.send_and_receive(messages, timeout=self.config.federation.round_timeout_s))
        # the Grid names each instruction while pushing it; error replies the SuperLink writes for a dead node
        # come from the SuperLink itself, and only the instruction they answer tells which node they are about
        self._sent_to = {message.metadata.message_id: message.metadata.dst_node_id for message in messages if message.metadata.message_id}
        return replies

    def _shared_records(self) -> dict[str, ArrayRecord | ConfigRecord]:
        """What every site's message of a phase carries: the certified sums and their updates, packed as one
        array per certificate (each Flower object is a pull on every hop), and the certificates."""
        records: dict[str, ArrayRecord | ConfigRecord] = {}
        if self.result.statistics_aggregate is not None and self.result.statistics_certificate is not None:
            statistics = {STATISTICS_AGGREGATE: self.result.statistics_aggregate}
            for index, record in enumerate(self.certified_statistics()):
                statistics[certified_record_name(index, prefix=STATISTICS_CERTIFIED_PREFIX)] = record
            records[STATISTICS_INPUTS] = pack_payloads(statistics)
            records[STATISTICS_CERTIFICATE] = self.result.statistics_certificate.to_record()
        if self.result.aggregate is not None and self.result.certificate is not None:
            inputs = {AGGREGATE: self.result.aggregate}
            for index, record in enumerate(self.certified_updates()):
                inputs[certified_record_name(index)] = record
            records[ROUND_INPUTS] = pack_payloads(inputs)
            records[CERTIFICATE] = self.result.certificate.to_record()
        return records

    def certified_updates(self) -> list[ArrayRecord]:
        """The updates behind the current aggregate, in certificate order: every site sums them itself, so a
        coordinator cannot pass off one site's update (or any other combination) as the aggregate."""
        certificate = self.result.certificate
        assert certificate is not None
        if self._certified_round != certificate.server_round:
            self._certified = [
                record_from_bytes(self.artifacts.get(claim.payload_sha256)) for claim, _ in certificate.claims
            ]
            self._certified_round = certificate.server_round
        return self._certified

    def certified_statistics(self) -> list[ArrayRecord]:
        """The statistics updates behind the statistics sum, in certificate order (each site sums them itself)."""
        certificate = self.result.statistics_certificate
        assert certificate is not None
        if self._certified_statistics is None:
            self._certified_statistics = [record_from_bytes(self.artifacts.get(claim.payload_sha256)) for claim, _ in certificate.claims]
        return self._certified_statistics

    def statistics_phase(self, node_ids: list[int]) -> None:
        """Round 0 of `task.normalization=federated`: every site's signed statistics update, summed like a
        round's updates (ciphertexts only under CKKS) and certified; the sum goes with every later message
        and each site derives the global mean and variance from it (client/normalization.py)."""
        started = time.monotonic()
        server_round = STATISTICS_ROUND
        replies = self._send(node_ids, phase="statistics", server_round=server_round)
        accepted: list[SiteUpdate] = []
        rejected: list[Rejection] = []
        admissions = self.round_admissions(replies)
        for reply in replies:
            try:
                verified, update, _ = self.read_update(reply, server_round, status=STATISTICS_STATUS)
            except Exception as error:  # noqa: BLE001 — nothing a site sends may stop the phase
                rejected.append(self._rejection(reply, server_round, error))
                continue
            self.verifier.accept(verified)
            self.result.sites[verified.node_id] = verified.site_id
            if isinstance(update, Rejection):
                rejected.append(update)
                continue
            problem = self.admission_problem(update.site_id, admissions)
            if problem:
                rejected.append(Rejection(update.site_id, update.node_id, safe_text(problem[1], limit=300), server_round, problem[0]))
                continue
            self.aggregator.accept(update)
            accepted.append(update)
        missed = self.close_phase(server_round, "statistics", node_ids, replies)
        for rejection in rejected:
            logger.warning("statistics: %s not used (%s): %s", rejection.site_id, rejection.code, rejection.reason)
        self.result.rejections.extend(rejected)
        if len(accepted) < self.config.federation.min_sites:
            raise RoundFailedError(self._failure(server_round, accepted, rejected, missed, sent=node_ids))
        update_digests, self.result.statistics_aggregate, self.result.statistics_certificate = sum_and_certify(
            self.artifacts, self.aggregator, server_round, accepted
        )
        aggregate_digest = self.result.statistics_certificate.aggregate_sha256
        self.on_record(
            {
                "round": server_round,
                "phase": "statistics",
                "participants": [update.site_id for update in accepted],
                "rejected": {rejection.site_id: f"{rejection.code}: {rejection.reason}" for rejection in rejected},
                "missed": [self._label(node_id) for node_id in missed],
                "update_sha256": update_digests,
                "aggregate_sha256": aggregate_digest,
                "time_s": time.monotonic() - started,
            }
        )

    def node_of(self, reply: Message) -> int:
        """The node a reply is about: its sender, or for an error reply, the node its instruction went to."""
        if reply.has_error():
            node_id = self._sent_to.get(reply.metadata.reply_to_message_id)
            if node_id is not None:
                return node_id
        return reply.metadata.src_node_id

    def close_phase(self, server_round: int, phase: str, node_ids: list[int], replies: list[Message]) -> list[int]:
        """Nodes that missed the deadline (sorted); they and nodes that answered with an error sit out the round."""
        answered = {self.node_of(reply) for reply in replies}
        failed = {self.node_of(reply) for reply in replies if reply.has_error()}
        missed = sorted(set(node_ids) - answered)
        for node_id in (*missed, *failed):
            self.unresponsive[node_id] = server_round
        if missed:
            logger.warning(
                "round %d: %s missed the %g s %s deadline",
                server_round, self._labels(missed), self.config.federation.round_timeout_s, phase,
            )
        return missed

    def _label(self, node_id: int, site_id: str = "") -> str:
        """Who a rejection is about: the verified site, else the site the node proved earlier, else the site whose
        key the coordinator registered for that node, else the node."""
        return (
            site_id or self.verifier.site_of(node_id) or self.result.sites.get(node_id) or self.node_sites.get(node_id) or f"node-{node_id}"
        )

    def _labels(self, node_ids: list[int]) -> str:
        return ", ".join(self._label(node_id) for node_id in node_ids)

    def _rejection(self, reply: Message, server_round: int, error: Exception) -> Rejection:
        node_id = self.node_of(reply)
        if isinstance(error, ReplyRejected):
            return Rejection(self._label(node_id, error.site_id), node_id, error.reason, server_round, error.code)
        reason = safe_text(f"{type(error).__name__}: {error}", limit=300)
        return Rejection(self._label(node_id), node_id, reason, server_round, "malformed_reply")

    def _site_record(self, reply: Message) -> object:
        if reply.has_error():
            raise ReplyRejected("site_error", f"site error: {site_error_reason(str(reply.error.reason))}")
        if SITE not in reply.content:
            raise ReplyRejected("malformed_reply", "the reply has no site record")
        return reply.content[SITE]

    def read_update(
        self, reply: Message, server_round: int, *, status: str = "trained"
    ) -> tuple[VerifiedClaim, SiteUpdate | Rejection, dict[str, float]]:
        """A train reply, verified and checked: its claim, then its update or its signed refusal, then its
        (unsigned) metrics. Raises `ReplyRejected` (or anything else) for a reply that must not count; stores nothing.
        """
        node_id = self.node_of(reply)
        site_record = self._site_record(reply)
        record = reply.content[UPDATE] if UPDATE in reply.content else None
        if record is not None and not isinstance(record, ArrayRecord):
            raise ReplyRejected("malformed_reply", f"the update is a {type(record).__name__}, not an ArrayRecord")
        verified = self.verifier.verify(
            site_record,
            node_id=node_id,
            kind="update",
            server_round=server_round,
            payload_sha256=payload_sha256(record) if record is not None else "",
        )
        claim = verified.claim
        if record is None:
            if claim.status == status:
                raise ReplyRejected("malformed_reply", f"claims status {status!r} but sent no update", site_id=claim.site_id)
            reason = safe_text(site_record.get("reason", ""), limit=300)  # type: ignore[attr-defined]
            return verified, Rejection(claim.site_id, node_id, reason, server_round, site_refusal_code(claim.status, "no_update")), {}
        if claim.status != status:
            raise ReplyRejected("malformed_reply", f"an update with status {claim.status!r:.40}", site_id=claim.site_id)
        limit = self.config.federation.max_site_examples
        if claim.num_examples > limit:  # a site claiming a huge count would own the weighted average
            raise ReplyRejected(
                "implausible_count",
                f"{claim.site_id} claims {claim.num_examples} training examples, above federation.max_site_examples {limit}",
                site_id=claim.site_id,
            )
        update = SiteUpdate(node_id=node_id, record=record, claim=claim, signature=verified.signature)
        problem = self.aggregator.check(update)
        if problem:
            code, reason = problem
            raise ReplyRejected(code, reason, site_id=claim.site_id)
        return verified, update, shared_metrics(reply.content[METRICS] if METRICS in reply.content else None)

    def train_round(self, server_round: int, node_ids: list[int]) -> None:
        started = time.monotonic()
        replies = self._send(node_ids, phase="train", server_round=server_round)
        accepted: list[SiteUpdate] = []
        site_metrics: dict[str, dict[str, float]] = {}
        rejected: list[Rejection] = []
        admissions = self.round_admissions(replies)
        for reply in replies:
            try:
                verified, update, metrics = self.read_update(reply, server_round)
            except Exception as error:  # noqa: BLE001 — nothing a site sends may stop the round
                rejected.append(self._rejection(reply, server_round, error))
                continue
            if isinstance(update, Rejection):  # a signed refusal is the site's answer for this round
                self.verifier.accept(verified)
                self.result.sites[verified.node_id] = verified.site_id
                rejected.append(update)
                continue
            problem = self.admission_problem(update.site_id, admissions)
            if problem:
                code, reason = problem
                rejected.append(Rejection(update.site_id, update.node_id, safe_text(reason, limit=300), server_round, code))
                continue
            self.verifier.accept(verified)
            self.aggregator.accept(update)
            accepted.append(update)
            self.result.sites[update.node_id] = update.site_id
            self.result.accepted_updates += 1
            self.result.update_bytes += sum(len(array.data) for array in update.record.values())
            claim = update.claim
            # unsigned training metrics are the site's own commentary: kept apart from anything recorded as fact
            metrics = {f"unsigned.{name}": value for name, value in metrics.items() if name not in ("epsilon", "delta")}
            if claim.epsilon > 0 or claim.delta > 0:  # what the site signed, never its unsigned metrics
                self.result.privacy[update.site_id] = {"epsilon": claim.epsilon, "delta": claim.delta}
                metrics |= self.result.privacy[update.site_id]
            site_metrics[update.site_id] = metrics
        missed = self.close_phase(server_round, "train", node_ids, replies)
        for update in self.off_state_updates(accepted):
            accepted.remove(update)
            site_metrics.pop(update.site_id, None)
            self.result.accepted_updates -= 1
            self.result.update_bytes -= sum(len(array.data) for array in update.record.values())
            reason = f"trained from state {update.claim.aggregate_sha256[:16]!r:.20}..., not the state most sites trained from"
            rejected.append(Rejection(update.site_id, update.node_id, reason, server_round, "state_mismatch"))
        for rejection in rejected:
            logger.warning(
                "round %d: update from %s not used (%s): %s", server_round, rejection.site_id, rejection.code, rejection.reason
            )
        self.result.rejections.extend(rejected)
        if len(accepted) < self.config.federation.min_sites:
            raise RoundFailedError(self._failure(server_round, accepted, rejected, missed, sent=node_ids))
        update_digests, self.result.aggregate, self.result.certificate = sum_and_certify(
            self.artifacts, self.aggregator, server_round, accepted
        )
        aggregate_digest = self.result.certificate.aggregate_sha256
        self.result.aggregate_digests.append(aggregate_digest)
        chain = self.close_round_on_chain(server_round, accepted, rejected, update_digests, aggregate_digest)
        self.on_record(
            {
                "round": server_round,
                "phase": "train",
                "participants": [update.site_id for update in accepted],
                "rejected": {rejection.site_id: f"{rejection.code}: {rejection.reason}" for rejection in rejected},
                "missed": [self._label(node_id) for node_id in missed],
                "update_sha256": update_digests,
                "aggregate_sha256": aggregate_digest,
                "chain": chain,
                "sites": dict(sorted(site_metrics.items())),
                "time_s": time.monotonic() - started,
            }
        )

    def off_state_updates(self, accepted: list[SiteUpdate]) -> list[SiteUpdate]:
        """Under a server optimiser every update names the optimiser state it was trained from, and sites
        step only a round whose certified updates all name theirs: one site naming another state would
        make every honest site refuse the round. Keep the largest group (ties: the smaller digest, so
        every coordinator decides alike); the others are returned to be refused as `state_mismatch`."""
        if self.config.strategy.server_optimizer == "none" or not accepted:
            return []
        groups: dict[str, list[SiteUpdate]] = {}
        for update in accepted:
            groups.setdefault(update.claim.aggregate_sha256, []).append(update)
        kept = min(groups, key=lambda state: (-len(groups[state]), state))
        return [update for update in accepted if update.claim.aggregate_sha256 != kept]

    def _failure(
        self, server_round: int, accepted: list[SiteUpdate], rejected: list[Rejection], missed: list[int], *, sent: list[int]
    ) -> str:
        federation = self.config.federation
        return (
            f"run {self.run_id} round {server_round}: {len(accepted)} usable update(s) from {len(sent)} node(s) asked, "
            f"federation.min_sites is {federation.min_sites} — "
            f"replied: {', '.join(update.site_id for update in accepted) or 'none'}; "
            f"refused: {'; '.join(f'{r.site_id} ({r.code}: {r.reason})' for r in rejected) or 'none'}; "
            f"missed the {federation.round_timeout_s:g} s deadline: {self._labels(missed) or 'none'}. "
            "Bring the missing sites back (their SuperNodes must be listed by the SuperLink) and resume the run "
            "from its last checkpoint, or lower federation.min_sites"
        )

    def admission_problem(self, site_id: str, answers: Mapping[str, str | None] | None = None) -> tuple[str, str] | None:
        """The chain's word on `site_id`: from `answers` (`round_admissions`, read this round) if it holds the
        site, else asked now."""
        if self.provenance is None:
            return None
        if answers is not None and site_id in answers:
            problem = answers[site_id]
        else:
            problem = self.provenance.admission_problem(site_id=site_id, run_id=self.run_id)
        return ("not_admitted", problem) if problem else None

    def round_admissions(self, replies: list[Message]) -> dict[str, str | None]:
        """The chain's admission answers for the federation's sites these replies claim to be, read together
        now (one JSON-RPC batch with a `ChainProvenance`); {} for a recorder without `admission_problems`.
        The claims are not verified yet: they only choose what to read. An answer is used only for an update
        verified as that site's, and any other verified site is asked on its own (`admission_problem`)."""
        read_all = getattr(self.provenance, "admission_problems", None)
        if read_all is None:
            return {}
        known = set(self.verifier.manifest.site_ids)
        claimed: dict[str, None] = {}
        for reply in replies:
            try:
                site_id = claim_from_site_record(reply.content[SITE])[0].site_id if not reply.has_error() else None
            except Exception:  # noqa: BLE001 — a malformed reply is refused when it is read; here it names no site
                continue
            if site_id in known:
                claimed[site_id] = None
        return dict(read_all(site_ids=list(claimed), run_id=self.run_id)) if claimed else {}

    def close_round_on_chain(
        self,
        server_round: int,
        accepted: list[SiteUpdate],
        rejected: list[Rejection],
        update_digests: dict[str, str],
        aggregate_digest: str,
    ) -> dict:
        """Every decision of the round goes on the auth chain; the anchor records only signed numbers."""
        if self.provenance is None:
            return {}
        decisions = [
            AccessDecision(update.site_id, True, "ok", update_digests[update.site_id]) for update in accepted
        ] + [AccessDecision(rejection.site_id, False, rejection.code) for rejection in rejected]
        return self.provenance.close_round(
            run_id=self.run_id,
            server_round=server_round,
            decisions=decisions,
            update_digests=update_digests,
            aggregate_digest=aggregate_digest,
            dataset_manifests={update.site_id: update.claim.dataset_manifest for update in accepted if update.claim.dataset_manifest},
            epsilon_by_site={site: values["epsilon"] for site, values in self.result.privacy.items() if site in update_digests},
            he_error_bound=self.aggregator.sum_error_bound(len(accepted)),
        )

    def read_evaluation(
        self, reply: Message, server_round: int, aggregate_sha256: str
    ) -> tuple[VerifiedClaim, dict[str, float] | Rejection, ScoreHistogram | None]:
        """An evaluation reply about `aggregate_sha256`, verified: its claim, then its metrics or its signed
        refusal, then its score histogram if it sent one. Raises `ReplyRejected` (or anything else) for a
        reply that must not count — a malformed histogram drops the site's whole evaluation, as a malformed
        metric does; stores nothing.
        """
        node_id = self.node_of(reply)
        site_record = self._site_record(reply)
        metrics = dict(reply.content[METRICS].items()) if METRICS in reply.content else None
        histogram = dict(reply.content[SCORE_HISTOGRAM].items()) if SCORE_HISTOGRAM in reply.content else None
        try:
            signed_digest = evaluation_sha256(metrics, histogram) if metrics is not None else ""
        except (TypeError, ValueError):  # not JSON numbers: only a record of another type carries bytes
            raise ReplyRejected("malformed_histogram", "the score histogram is not lists of numbers") from None
        verified = self.verifier.verify(
            site_record,
            node_id=node_id,
            kind="evaluate",
            server_round=server_round,
            payload_sha256=signed_digest,
            aggregate_sha256=aggregate_sha256,
        )
        claim = verified.claim
        if metrics is None:
            if claim.status == "evaluated":
                raise ReplyRejected("malformed_reply", "claims an evaluation but sent no metrics", site_id=claim.site_id)
            reason = safe_text(site_record.get("reason", ""), limit=300)  # type: ignore[attr-defined]
            refusal = Rejection(claim.site_id, node_id, reason, server_round, site_refusal_code(claim.status, "no_metrics"))
            return verified, refusal, None
        if claim.status != "evaluated":
            raise ReplyRejected("malformed_reply", f"an evaluation with status {claim.status!r:.40}", site_id=claim.site_id)
        values = evaluation_metrics(metrics, site_id=claim.site_id)
        if values.get("n", 0.0) > self.config.federation.max_site_examples:  # n weights every pooled figure
            problem = f"claims {values['n']:.3g} test rows, over federation.max_site_examples={self.config.federation.max_site_examples}"
            raise ReplyRejected("malformed_metrics", problem, site_id=claim.site_id)
        if histogram is None:
            return verified, values, None
        if not self.binary_task:
            problem = f"a {self.config.task.name} run is not binary: it has no label-0/label-1 score histogram"
            raise ReplyRejected("malformed_histogram", problem, site_id=claim.site_id)
        try:
            return verified, values, ScoreHistogram.checked(histogram, rows=values.get("n", -1.0))
        except ScoreHistogramError as error:
            raise ReplyRejected("malformed_histogram", str(error), site_id=claim.site_id) from None

    def evaluate_round(self, server_round: int, node_ids: list[int]) -> None:
        started = time.monotonic()
        replies = self._send(node_ids, phase="evaluate", server_round=server_round)
        missed = self.close_phase(server_round, "evaluate", node_ids, replies)
        aggregate_sha256 = self.result.aggregate_digests[-1] if self.result.aggregate_digests else ""
        site_metrics: dict[str, dict[str, float]] = {}
        histograms: dict[str, ScoreHistogram] = {}
        error_bounds: list[float] = []
        rejected: list[Rejection] = []
        for reply in replies:
            try:
                verified, metrics, histogram = self.read_evaluation(reply, server_round, aggregate_sha256)
            except Exception as error:  # noqa: BLE001 — nothing a site sends may stop the round
                rejected.append(self._rejection(reply, server_round, error))
                continue
            self.verifier.accept(verified)  # a site's answer for this round: metrics or a signed refusal
            site_id = self.result.sites[verified.node_id] = verified.site_id
            if isinstance(metrics, Rejection):
                rejected.append(metrics)
                continue
            self.result.num_parameters = int(metrics.pop("num_parameters", self.result.num_parameters))
            bound = metrics.pop("he_error_bound", None)
            if bound is not None:
                error_bounds.append(bound)
            site_metrics[site_id] = metrics
            if histogram is not None:
                histograms[site_id] = histogram
        for rejection in rejected:
            logger.warning(
                "round %d: evaluation from %s dropped (%s): %s", server_round, rejection.site_id, rejection.code, rejection.reason
            )
        histogram_figures, pooled_histogram = histogram_pooled_metrics(histograms)
        pooled = dict(sorted((pooled_metrics(site_metrics) | histogram_figures).items()))
        if error_bounds:
            self.result.he_error_bounds.append(max(error_bounds))
        self.result.final_site_metrics = dict(sorted(site_metrics.items()))
        self.result.final_pooled_metrics = pooled
        self.result.final_score_histogram = pooled_histogram
        self.on_record(
            {
                "round": server_round,
                "phase": "evaluate",
                "sites": dict(sorted(site_metrics.items())),
                "pooled": pooled,
                "rejected": {rejection.site_id: f"{rejection.code}: {rejection.reason}" for rejection in rejected},
                "he_error_bound": max(error_bounds, default=None),
                "missed": [self._label(node_id) for node_id in missed],
                "time_s": time.monotonic() - started,
            }
        )
