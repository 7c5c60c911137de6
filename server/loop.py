"""The coordinator's round loop over Flower's Grid: train, sum, evaluate — with a deadline per phase.

Nothing a site sends stops the loop: each reply is read inside a guard, and whatever is wrong with
it — a bad signature, a malformed record, an exception while reading it — becomes a `Rejection`
with a short code that goes on the auth chain. What the loop records about a site (its id, ε, δ,
dataset manifest, example count) comes only from the site's verified, signed claim.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, Message, RecordDict
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
    SITE,
    UPDATE,
    RoundCertificate,
    instruction,
    metrics_sha256,
    payload_sha256,
    record_bytes,
)
from medtwin.core.provenance import AccessDecision, ProvenanceRecorder

from .aggregation import Aggregator, Rejection, SiteUpdate
from .verifier import ReplyRejected, ReplyVerifier, VerifiedClaim, safe_code, safe_text

logger = logging.getLogger("medtwin.coordinator")

RoundCallback = Callable[[dict], None]
NON_NEGATIVE_METRICS = ("n", "num_parameters", "he_error_bound")


@dataclass
class LoopResult:
    rounds_completed: int = 0
    sites: dict[int, str] = field(default_factory=dict)  # node id -> verified site id
    final_site_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    final_pooled_metrics: dict[str, float] = field(default_factory=dict)
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
    counted = {site: metrics for site, metrics in site_metrics.items() if metrics.get("n", 0.0) > 0}
    total = sum(metrics["n"] for metrics in counted.values())
    if total <= 0:
        return {}
    names = {name for metrics in counted.values() for name in metrics if name != "n"}
    pooled = {
        name: sum(metrics[name] * metrics["n"] for metrics in counted.values() if name in metrics) / total
        for name in sorted(names)
    }
    pooled["n"] = total
    return pooled


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


class RoundLoop:
    """Runs `num_rounds` rounds; each phase waits at most `round_timeout_s` and closes with whoever replied."""

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
    ) -> None:
        self.grid = grid
        self.config = config
        self.run_id = run_id
        self.aggregator = aggregator
        self.verifier = ReplyVerifier(manifest, run_id=run_id)
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
            order = instruction(run_id=self.run_id, server_round=server_round, phase=phase)
            order["min_sites"] = self.config.federation.min_sites
            content = RecordDict({INSTRUCTION: order})
            if self.result.aggregate is not None and self.result.certificate is not None:
                content[AGGREGATE] = self.result.aggregate
                content[CERTIFICATE] = self.result.certificate.to_record()
            messages.append(Message(content=content, message_type=phase, dst_node_id=node_id))
        return list(self.grid.send_and_receive(messages, timeout=self.config.federation.round_timeout_s))

    def _label(self, node_id: int, site_id: str = "") -> str:
        """Who a rejection is about: the verified site, else the site the node proved earlier, else the node."""
        return site_id or self.verifier.site_of(node_id) or f"node-{node_id}"

    def _rejection(self, reply: Message, server_round: int, error: Exception) -> Rejection:
        node_id = reply.metadata.src_node_id
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

    def read_update(self, reply: Message, server_round: int) -> tuple[VerifiedClaim, SiteUpdate | Rejection, dict[str, float]]:
        """A train reply, verified and checked: its claim, then its update or its signed refusal, then its
        (unsigned) metrics. Raises `ReplyRejected` (or anything else) for a reply that must not count; stores nothing.
        """
        node_id = reply.metadata.src_node_id
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
            if claim.status == "trained":
                raise ReplyRejected("malformed_reply", "claims to have trained but sent no update", site_id=claim.site_id)
            reason = safe_text(site_record.get("reason", ""), limit=300)  # type: ignore[attr-defined]
            return verified, Rejection(claim.site_id, node_id, reason, server_round, safe_code(claim.status or "no_update")), {}
        if claim.status != "trained":
            raise ReplyRejected("malformed_reply", f"an update with status {claim.status!r:.40}", site_id=claim.site_id)
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
            problem = self.admission_problem(update.site_id)
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
            metrics = {name: value for name, value in metrics.items() if name not in ("epsilon", "delta")}
            if claim.epsilon > 0 or claim.delta > 0:  # what the site signed, never its unsigned metrics
                self.result.privacy[update.site_id] = {"epsilon": claim.epsilon, "delta": claim.delta}
                metrics |= self.result.privacy[update.site_id]
            site_metrics[update.site_id] = metrics
        missing = max(0, len(node_ids) - len(replies))
        for rejection in rejected:
            logger.warning(
                "round %d: update from %s not used (%s): %s", server_round, rejection.site_id, rejection.code, rejection.reason
            )
        if missing:
            logger.warning("round %d: %d site(s) missed the %.0f s deadline", server_round, missing, self.config.federation.round_timeout_s)
        self.result.rejections.extend(rejected)
        if len(accepted) < self.config.federation.min_sites:
            raise RoundFailedError(
                f"round {server_round}: {len(accepted)} usable update(s), federation.min_sites is "
                f"{self.config.federation.min_sites}; rejected: "
                + "; ".join(f"{r.site_id}: {r.reason} ({r.code})" for r in rejected)
            )
        accepted.sort(key=lambda update: update.site_id)
        update_digests = {update.site_id: self.artifacts.put(record_bytes(update.record), kind="update") for update in accepted}
        self.result.aggregate = self.aggregator.aggregate(accepted)
        aggregate_digest = self.artifacts.put(record_bytes(self.result.aggregate), kind="aggregate")
        self.result.aggregate_digests.append(aggregate_digest)
        self.result.certificate = RoundCertificate(
            server_round=server_round,
            aggregate_sha256=aggregate_digest,
            claims=tuple((update.claim, update.signature) for update in accepted),
        )
        chain = self.close_round_on_chain(server_round, accepted, rejected, update_digests, aggregate_digest)
        self.on_record(
            {
                "round": server_round,
                "phase": "train",
                "participants": [update.site_id for update in accepted],
                "rejected": {rejection.site_id: f"{rejection.code}: {rejection.reason}" for rejection in rejected},
                "missed_deadline": missing,
                "update_sha256": update_digests,
                "aggregate_sha256": aggregate_digest,
                "chain": chain,
                "sites": dict(sorted(site_metrics.items())),
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
    ) -> tuple[VerifiedClaim, dict[str, float] | Rejection]:
        """An evaluation reply about `aggregate_sha256`, verified: its claim, then its metrics or its signed
        refusal. Raises `ReplyRejected` (or anything else) for a reply that must not count; stores nothing.
        """
        node_id = reply.metadata.src_node_id
        site_record = self._site_record(reply)
        metrics = dict(reply.content[METRICS].items()) if METRICS in reply.content else None
        verified = self.verifier.verify(
            site_record,
            node_id=node_id,
            kind="evaluate",
            server_round=server_round,
            payload_sha256=metrics_sha256(metrics) if metrics is not None else "",
            aggregate_sha256=aggregate_sha256,
        )
        claim = verified.claim
        if metrics is None:
            if claim.status == "evaluated":
                raise ReplyRejected("malformed_reply", "claims an evaluation but sent no metrics", site_id=claim.site_id)
            reason = safe_text(site_record.get("reason", ""), limit=300)  # type: ignore[attr-defined]
            return verified, Rejection(claim.site_id, node_id, reason, server_round, safe_code(claim.status or "no_metrics"))
        if claim.status != "evaluated":
            raise ReplyRejected("malformed_reply", f"an evaluation with status {claim.status!r:.40}", site_id=claim.site_id)
        return verified, evaluation_metrics(metrics, site_id=claim.site_id)

    def evaluate_round(self, server_round: int, node_ids: list[int]) -> None:
        started = time.monotonic()
        replies = self._send(node_ids, phase="evaluate", server_round=server_round)
        aggregate_sha256 = self.result.aggregate_digests[-1] if self.result.aggregate_digests else ""
        site_metrics: dict[str, dict[str, float]] = {}
        error_bounds: list[float] = []
        rejected: list[Rejection] = []
        for reply in replies:
            try:
                verified, metrics = self.read_evaluation(reply, server_round, aggregate_sha256)
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
        for rejection in rejected:
            logger.warning(
                "round %d: evaluation from %s dropped (%s): %s", server_round, rejection.site_id, rejection.code, rejection.reason
            )
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
                "rejected": {rejection.site_id: f"{rejection.code}: {rejection.reason}" for rejection in rejected},
                "he_error_bound": max(error_bounds, default=None),
                "time_s": time.monotonic() - started,
            }
        )
