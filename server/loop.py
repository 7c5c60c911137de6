"""The coordinator's round loop over Flower's Grid: train, sum, evaluate — with a deadline per phase."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from medtwin.core.config import MedtwinConfig
from medtwin.core.errors import RoundFailedError
from medtwin.core.artifacts import ArtifactStore
from medtwin.core.protocol import AGGREGATE, INSTRUCTION, METRICS, SITE, UPDATE, instruction, record_bytes
from medtwin.core.provenance import AccessDecision, ProvenanceRecorder

from .aggregation import Aggregator, Rejection, SiteUpdate

logger = logging.getLogger("medtwin.coordinator")

RoundCallback = Callable[[dict], None]


@dataclass
class LoopResult:
    rounds_completed: int = 0
    sites: dict[int, str] = field(default_factory=dict)  # node id -> site id
    final_site_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    final_pooled_metrics: dict[str, float] = field(default_factory=dict)
    aggregate: ArrayRecord | None = None
    rejections: list[Rejection] = field(default_factory=list)
    update_bytes: int = 0  # bytes of accepted update payloads, summed over the run
    accepted_updates: int = 0
    round_times_s: list[float] = field(default_factory=list)
    aggregate_digests: list[str] = field(default_factory=list)  # sha256 of each round's aggregate artifact
    num_parameters: int = 0  # model size the sites report (not their sample counts)
    he_error_bounds: list[float] = field(default_factory=list)  # per evaluation: max bound sites reported
    privacy: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> latest (epsilon, delta) it reported


def wait_for_nodes(grid: Grid, *, expected: int, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= expected or time.monotonic() > deadline:
            return node_ids
        time.sleep(0.5)


def site_error_reason(reason: str) -> str:
    """The useful line of a site's error (Ray wraps it in pages of traceback)."""
    marker = "Message: "
    if marker in reason:
        reason = reason.rsplit(marker, 1)[1]
    reason = reason.replace("\\n", "\n").strip().strip("'\"<>")
    return reason.splitlines()[0][:300] if reason else "unknown error"


def pooled_metrics(site_metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """Example-weighted mean of every metric over sites: the metric on the union of their test sets."""
    total = sum(metrics.get("n", 0.0) for metrics in site_metrics.values())
    if total <= 0:
        return {}
    names = {name for metrics in site_metrics.values() for name in metrics if name != "n"}
    pooled = {
        name: sum(metrics[name] * metrics["n"] for metrics in site_metrics.values() if name in metrics) / total
        for name in sorted(names)
    }
    pooled["n"] = total
    return pooled


class RoundLoop:
    """Runs `num_rounds` rounds; each phase waits at most `round_timeout_s` and closes with whoever replied."""

    def __init__(
        self,
        *,
        grid: Grid,
        config: MedtwinConfig,
        run_id: str,
        aggregator: Aggregator,
        artifacts: ArtifactStore,
        on_record: RoundCallback,
        provenance: ProvenanceRecorder | None = None,
    ) -> None:
        self.grid = grid
        self.config = config
        self.run_id = run_id
        self.aggregator = aggregator
        self.artifacts = artifacts
        self.provenance = provenance
        self.on_record = on_record
        self.result = LoopResult()

    def run(self) -> LoopResult:
        federation = self.config.federation
        node_ids = wait_for_nodes(self.grid, expected=self.config.task.num_sites, timeout_s=federation.round_timeout_s)
        logger.info("federation of %d site(s) connected; %d round(s) ahead", len(node_ids), federation.num_rounds)
        for server_round in range(1, federation.num_rounds + 1):
            started = time.monotonic()
            self.train_round(server_round, node_ids)
            last = server_round == federation.num_rounds
            if last or server_round % federation.evaluate_every == 0:
                self.evaluate_round(server_round, node_ids)
            self.result.rounds_completed = server_round
            self.result.round_times_s.append(time.monotonic() - started)
        return self.result

    def _send(self, node_ids: list[int], *, phase: str, server_round: int) -> list[Message]:
        messages = []
        for node_id in node_ids:
            content = RecordDict({INSTRUCTION: instruction(run_id=self.run_id, server_round=server_round, phase=phase)})
            if self.result.aggregate is not None:
                content[AGGREGATE] = self.result.aggregate
            messages.append(Message(content=content, message_type=phase, dst_node_id=node_id))
        return list(self.grid.send_and_receive(messages, timeout=self.config.federation.round_timeout_s))

    def _site_of(self, reply: Message) -> str:
        node_id = reply.metadata.src_node_id
        if reply.has_content() and SITE in reply.content:
            self.result.sites[node_id] = str(reply.content[SITE]["site_id"])
        return self.result.sites.get(node_id, f"node-{node_id}")

    def train_round(self, server_round: int, node_ids: list[int]) -> None:
        started = time.monotonic()
        replies = self._send(node_ids, phase="train", server_round=server_round)
        accepted: list[SiteUpdate] = []
        site_metrics: dict[str, dict[str, float]] = {}
        rejected: list[Rejection] = []
        manifests: dict[str, str] = {}
        for reply in replies:
            site_id = self._site_of(reply)
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                rejected.append(Rejection(site_id, node_id, f"site error: {site_error_reason(reply.error.reason)}", server_round, "site_error"))
                continue
            site_record = reply.content[SITE] if SITE in reply.content else {}
            if UPDATE not in reply.content:
                reason = str(site_record.get("reason", "no update"))
                code = str(site_record.get("status", "no_update"))
                rejected.append(Rejection(site_id, node_id, reason, server_round, code))
                continue
            update = SiteUpdate(
                site_id=site_id,
                node_id=node_id,
                server_round=server_round,
                record=reply.content[UPDATE],
                signature=bytes(site_record.get("signature", b"")),
            )
            problem = self.admission_problem(site_id) or self.aggregator.check(update, run_id=self.run_id)
            if problem:
                code, reason = problem
                rejected.append(Rejection(site_id, node_id, reason, server_round, code))
                continue
            manifests[site_id] = str(site_record.get("dataset_manifest", ""))
            accepted.append(update)
            self.result.accepted_updates += 1
            self.result.update_bytes += sum(len(array.data) for array in update.record.values())
            if METRICS in reply.content:
                site_metrics[site_id] = {key: float(value) for key, value in reply.content[METRICS].items()}
        missing = len(node_ids) - len(replies)
        for rejection in rejected:
            logger.warning("round %d: update from %s not used: %s", server_round, rejection.site_id, rejection.reason)
        if missing:
            logger.warning("round %d: %d site(s) missed the %.0f s deadline", server_round, missing, self.config.federation.round_timeout_s)
        self.result.rejections.extend(rejected)
        if len(accepted) < self.config.federation.min_sites:
            raise RoundFailedError(
                f"round {server_round}: {len(accepted)} usable update(s), federation.min_sites is "
                f"{self.config.federation.min_sites}; rejected: "
                + "; ".join(f"{r.site_id}: {r.reason}" for r in rejected)
            )
        accepted.sort(key=lambda update: update.site_id)
        update_digests = {update.site_id: self.artifacts.put(record_bytes(update.record), kind="update") for update in accepted}
        self.result.aggregate = self.aggregator.aggregate(accepted)
        aggregate_digest = self.artifacts.put(record_bytes(self.result.aggregate), kind="aggregate")
        self.result.aggregate_digests.append(aggregate_digest)
        for site, metrics in site_metrics.items():
            if "epsilon" in metrics and site in update_digests:
                self.result.privacy[site] = {"epsilon": metrics["epsilon"], "delta": metrics.get("delta", 0.0)}
        chain = self.close_round_on_chain(server_round, accepted, rejected, update_digests, aggregate_digest, manifests, site_metrics)
        self.on_record(
            {
                "round": server_round,
                "phase": "train",
                "participants": sorted(update.site_id for update in accepted),
                "rejected": {rejection.site_id: rejection.reason for rejection in rejected},
                "missed_deadline": missing,
                "update_sha256": update_digests,
                "aggregate_sha256": aggregate_digest,
                "chain": chain,
                "sites": site_metrics,
                "time_s": time.monotonic() - started,
            }
        )

    def admission_problem(self, site_id: str) -> tuple[str, str] | None:
        if self.provenance is None:
            return None
        problem = self.provenance.admission_problem(site_id=site_id, run_id=self.run_id)
        return ("not_admitted", problem) if problem else None

    def close_round_on_chain(
        self,
        server_round: int,
        accepted: list[SiteUpdate],
        rejected: list[Rejection],
        update_digests: dict[str, str],
        aggregate_digest: str,
        manifests: dict[str, str],
        site_metrics: dict[str, dict[str, float]],
    ) -> dict:
        if self.provenance is None:
            return {}
        decisions = [
            AccessDecision(update.site_id, True, "ok", update_digests[update.site_id]) for update in accepted
        ] + [AccessDecision(rejection.site_id, False, rejection.code) for rejection in rejected]
        epsilon = {site: metrics["epsilon"] for site, metrics in site_metrics.items() if "epsilon" in metrics and site in update_digests}
        return self.provenance.close_round(
            run_id=self.run_id,
            server_round=server_round,
            decisions=decisions,
            update_digests=update_digests,
            aggregate_digest=aggregate_digest,
            dataset_manifests={site: digest for site, digest in manifests.items() if digest},
            epsilon_by_site=epsilon,
            he_error_bound=self.aggregator.sum_error_bound(len(accepted)),
        )

    def evaluate_round(self, server_round: int, node_ids: list[int]) -> None:
        started = time.monotonic()
        replies = self._send(node_ids, phase="evaluate", server_round=server_round)
        site_metrics: dict[str, dict[str, float]] = {}
        error_bounds: list[float] = []
        for reply in replies:
            site_id = self._site_of(reply)
            if reply.has_error():
                logger.warning("round %d: evaluation failed at %s: %s", server_round, site_id, site_error_reason(reply.error.reason))
                continue
            metrics = {key: float(value) for key, value in reply.content[METRICS].items()}
            self.result.num_parameters = int(metrics.pop("num_parameters", self.result.num_parameters))
            bound = metrics.pop("he_error_bound", None)
            if bound is not None:
                error_bounds.append(bound)
            site_metrics[site_id] = metrics
        pooled = pooled_metrics(site_metrics)
        if error_bounds:
            self.result.he_error_bounds.append(max(error_bounds))
        self.result.final_site_metrics = dict(sorted(site_metrics.items()))
        self.result.final_pooled_metrics = pooled
        self.on_record(
            {
                "round": server_round,
                "phase": "evaluate",
                "sites": dict(sorted(site_metrics.items())),
                "pooled": pooled,
                "he_error_bound": max(error_bounds, default=None),
                "time_s": time.monotonic() - started,
            }
        )
