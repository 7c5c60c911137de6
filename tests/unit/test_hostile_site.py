"""A hostile site against the coordinator's round loop: every bad reply is refused with its code, and the run goes on.

The loop runs over a scripted Grid: node 1 is an honest site ("alpha") that always replies properly;
node 2 plays "beta" and misbehaves in one way per test. Replies are real Flower `Message`s built with
`reply_to`, signed with real Ed25519 keys against a manifest built here (not by the provisioning
code). A recording provenance shows that each rejection code reaches the auth chain's decisions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from flwr.supercore.task_identity import TaskIdentity

from medtwin.core.artifacts import ArtifactStore
from medtwin.core.errors import ConfigError
from medtwin.core.identity import FederationManifest, ReplyClaim, SiteEntry, sign_claim, verify_claim
from medtwin.core.identity.keys import raw_public_bytes
from medtwin.core.plain_payload import PLAIN_PAYLOAD, pack_plain_update
from medtwin.core.protocol import (
    AGGREGATE,
    CERTIFICATE,
    INSTRUCTION,
    METRICS,
    ROUND_INPUTS,
    SCORE_HISTOGRAM,
    SITE,
    UPDATE,
    RoundCertificate,
    evaluation_sha256,
    metrics_sha256,
    payload_sha256,
    site_reply_record,
    unpack_payloads,
)
from medtwin.core.provenance import AccessDecision
from medtwin.server.aggregation import PlainAggregator
from medtwin.server.app import MANIFEST_KEY, CoordinatorSetup, make_aggregator
from medtwin.server.loop import RoundLoop

RUN_ID = "run-hostile"
SITES = ("alpha", "beta", "gamma")
NODES = {"alpha": 1, "beta": 2}
COUNTS = {"alpha": 40, "beta": 25, "gamma": 30}
EPSILON = {"alpha": 0.5, "beta": 0.7, "gamma": 0.9}
DELTA = 1e-5
NUM_WEIGHTS = 5
NUM_ROUNDS = 2
KEYS = {site: Ed25519PrivateKey.generate() for site in SITES}


def _manifest() -> FederationManifest:
    entries = tuple(
        SiteEntry(
            site_id=site,
            signing_public_key=raw_public_bytes(KEYS[site].public_key()).hex(),
            key_agreement_public_key=raw_public_bytes(X25519PrivateKey.generate().public_key()).hex(),
        )
        for site in SITES
    )
    return FederationManifest(
        federation_name="hostile-test",
        created_utc="2025-01-01T00:00:00Z",
        ca_certificate_pem="",
        coordinator_host="localhost",
        coordinator_tls_fingerprint="",
        sites=entries,
    )


MANIFEST = _manifest()


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower's ServerApp runtime sets before `Message(...)` can build instructions outside a run."""
    for name, value in {"_task_id": 1, "_run_id": 1, "_node_id": 0}.items():
        monkeypatch.setattr(TaskIdentity, name, value)


def _dataset_manifest(site: str) -> str:
    return f"{SITES.index(site) + 1:064x}"


# --- what an honest site sends --------------------------------------------------------------------------


def _order(message: Message) -> tuple[str, int]:
    order = message.content[INSTRUCTION]
    return str(order["run_id"]), int(order["round"])


def _weights(site: str, server_round: int, salt: int = 0) -> np.ndarray:
    return np.random.default_rng([SITES.index(site), server_round, salt]).uniform(-1, 1, NUM_WEIGHTS)


def _update(message: Message, site: str, *, salt: int = 0) -> tuple[ArrayRecord, ReplyClaim]:
    """A site's update for the round in `message` and the claim that describes it (not yet signed)."""
    run_id, server_round = _order(message)
    record = pack_plain_update(_weights(site, server_round, salt), num_examples=COUNTS[site])
    claim = ReplyClaim(
        kind="update",
        run_id=run_id,
        server_round=server_round,
        site_id=site,
        payload_sha256=payload_sha256(record),
        num_examples=COUNTS[site],
        epsilon=EPSILON[site],
        delta=DELTA,
        dataset_manifest=_dataset_manifest(site),
        status="trained",
    )
    return record, claim


def _signed(claim: ReplyClaim, *, signer: str | None = None) -> ConfigRecord:
    return site_reply_record(claim, sign_claim(KEYS[signer or claim.site_id], claim))


def _reply(message: Message, records: dict[str, Any]) -> Message:
    return Message(content=RecordDict(records), reply_to=message)


def _metrics(site: str) -> dict[str, float]:
    return {"accuracy": 0.5 + 0.1 * SITES.index(site), "n": 10.0 + SITES.index(site), "num_parameters": float(NUM_WEIGHTS)}


def _evaluation(message: Message, site: str, metrics: dict[str, float] | None = None) -> tuple[dict[str, float], ReplyClaim]:
    run_id, server_round = _order(message)
    metrics = _metrics(site) if metrics is None else metrics
    claim = ReplyClaim(
        kind="evaluate",
        run_id=run_id,
        server_round=server_round,
        site_id=site,
        payload_sha256=metrics_sha256(metrics),
        num_examples=max(0, int(metrics.get("n", 0))),
        status="evaluated",
        aggregate_sha256=payload_sha256(unpack_payloads(message.content, ROUND_INPUTS)[AGGREGATE]),
    )
    return metrics, claim


def honest(message: Message, site: str) -> list[Message]:
    if message.metadata.message_type == "train":
        record, claim = _update(message, site)
        # unsigned training metrics that lie about privacy: never recorded
        metrics = MetricRecord({"train_loss": 0.25, "epsilon": 0.0001, "delta": 0.0})
        return [_reply(message, {UPDATE: record, SITE: _signed(claim), METRICS: metrics})]
    metrics, claim = _evaluation(message, site)
    return [_reply(message, {SITE: _signed(claim), METRICS: MetricRecord(metrics)})]


# --- the scripted Grid and a provenance that records decisions ----------------------------------------

Behaviour = Callable[[Message, "Hostile"], list[Message]]


class ScriptedGrid:
    """Stands in for Flower's Grid: node 1 is honest alpha, node 2 answers with `hostile`."""

    def __init__(self, hostile: Behaviour) -> None:
        self.hostile = Hostile(hostile)
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return sorted(NODES.values())

    def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
        replies = []
        for message in messages:
            self.sent.append(message)
            if message.metadata.dst_node_id == NODES["alpha"]:
                replies += honest(message, "alpha")
            else:
                replies += self.hostile.answer(message)
        return replies


class Hostile:
    """Node 2's behaviour, with a memory of what it sent (for replays)."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.sent: dict[tuple[str, int], list[Message]] = {}

    def answer(self, message: Message) -> list[Message]:
        replies = self.behaviour(message, self)
        self.sent[(message.metadata.message_type, _order(message)[1])] = replies
        return replies


class RecordingProvenance:
    def __init__(self) -> None:
        self.rounds: list[dict[str, Any]] = []

    def admission_problem(self, *, site_id: str, run_id: str) -> str | None:
        return None

    def close_round(self, **values: Any) -> dict[str, Any]:
        self.rounds.append(values)
        return {"anchored_round": values["server_round"]}

    def denials(self) -> list[tuple[int, str, str]]:
        return [
            (values["server_round"], decision.site_id, decision.code)
            for values in self.rounds
            for decision in values["decisions"]
            if not decision.granted
        ]


@dataclass
class Run:
    loop: RoundLoop
    grid: ScriptedGrid
    provenance: RecordingProvenance
    records: list[dict]

    def train_record(self, server_round: int) -> dict:
        return next(r for r in self.records if r["phase"] == "train" and r["round"] == server_round)

    def evaluate_record(self, server_round: int) -> dict:
        return next(r for r in self.records if r["phase"] == "evaluate" and r["round"] == server_round)


def _run(behaviour: Behaviour, default_config, tmp_path: Path, *, task_kind: str | None = "binary") -> Run:
    config = replace(
        default_config,
        task=replace(default_config.task, num_sites=len(NODES)),
        federation=replace(default_config.federation, num_rounds=NUM_ROUNDS, min_sites=1, evaluate_every=1, round_timeout_s=1.0),
    )
    grid = ScriptedGrid(behaviour)
    provenance = RecordingProvenance()
    records: list[dict] = []
    loop = RoundLoop(
        grid=grid,  # type: ignore[arg-type]
        config=config,
        run_id=RUN_ID,
        aggregator=PlainAggregator(),
        manifest=MANIFEST,
        artifacts=ArtifactStore(tmp_path / "artifacts"),
        on_record=records.append,
        provenance=provenance,  # type: ignore[arg-type]
        task_kind=task_kind,  # the real coordinator passes its task's kind (num_sites=2 is no valid fed_heart_disease)
    )
    result = loop.run()
    assert result.rounds_completed == NUM_ROUNDS
    for server_round in range(1, NUM_ROUNDS + 1):
        record = next(r for r in records if r["phase"] == "train" and r["round"] == server_round)
        assert "alpha" in record["participants"]
    return Run(loop, grid, provenance, records)


# --- attacks on train replies ---------------------------------------------------------------------------


def _in_round(server_round: int, attack: Behaviour) -> Behaviour:
    """`attack` in train round `server_round`; beta is honest otherwise."""

    def behaviour(message: Message, hostile: Hostile) -> list[Message]:
        if message.metadata.message_type == "train" and _order(message)[1] == server_round:
            return attack(message, hostile)
        return honest(message, "beta")

    return behaviour


def impersonation(message: Message, hostile: Hostile) -> list[Message]:
    record, claim = _update(message, "alpha", salt=7)  # beta's key signs a claim naming alpha
    return [_reply(message, {UPDATE: record, SITE: _signed(claim, signer="beta")})]


def unsigned_update(message: Message, hostile: Hostile) -> list[Message]:
    record, _ = _update(message, "beta")
    return [_reply(message, {UPDATE: record, SITE: ConfigRecord({"site_id": "beta", "status": "trained"})})]


def tampered_epsilon(message: Message, hostile: Hostile) -> list[Message]:
    record, claim = _update(message, "beta")
    signature = sign_claim(KEYS["beta"], claim)
    return [_reply(message, {UPDATE: record, SITE: site_reply_record(replace(claim, epsilon=0.01), signature)})]


def tampered_dataset_manifest(message: Message, hostile: Hostile) -> list[Message]:
    record, claim = _update(message, "beta")
    signature = sign_claim(KEYS["beta"], claim)
    return [_reply(message, {UPDATE: record, SITE: site_reply_record(replace(claim, dataset_manifest="f" * 64), signature)})]


def duplicate(message: Message, hostile: Hostile) -> list[Message]:
    record, claim = _update(message, "beta", salt=3)  # a second, fresh and properly signed update
    return honest(message, "beta") + [_reply(message, {UPDATE: record, SITE: _signed(claim)})]


def replay_of_round_1(message: Message, hostile: Hostile) -> list[Message]:
    (earlier,) = hostile.sent[("train", 1)]
    return [_reply(message, {UPDATE: earlier.content[UPDATE], SITE: earlier.content[SITE]})]


def unknown_site(message: Message, hostile: Hostile) -> list[Message]:
    record, claim = _update(message, "beta")
    claim = replace(claim, site_id="mallory")
    return [_reply(message, {UPDATE: record, SITE: site_reply_record(claim, sign_claim(Ed25519PrivateKey.generate(), claim))})]


def digest_mismatch(message: Message, hostile: Hostile) -> list[Message]:
    _, claim = _update(message, "beta")
    other, _ = _update(message, "beta", salt=9)  # signs one update, sends another
    return [_reply(message, {UPDATE: other, SITE: _signed(claim)})]


def _payload(message: Message, record: ArrayRecord) -> list[Message]:
    """A correctly signed reply carrying `record` (its digest is signed: only its content is wrong)."""
    _, claim = _update(message, "beta")
    claim = replace(claim, payload_sha256=payload_sha256(record))
    return [_reply(message, {UPDATE: record, SITE: _signed(claim)})]


def float64_payload(message: Message, hostile: Hostile) -> list[Message]:
    """The float64 vector [n*w..., n] earlier versions sent (np.save format)."""
    legacy = np.append(_weights("beta", 1) * COUNTS["beta"], float(COUNTS["beta"]))
    return _payload(message, ArrayRecord({PLAIN_PAYLOAD: Array(legacy)}))


def int_payload(message: Message, hostile: Hostile) -> list[Message]:
    return _payload(message, ArrayRecord({PLAIN_PAYLOAD: Array(np.array([1, 2, 3, 4, 5, COUNTS["beta"]], dtype=np.int64))}))


def nan_payload(message: Message, hostile: Hostile) -> list[Message]:
    weights = _weights("beta", 1)
    weights[2] = np.nan
    return _payload(message, pack_plain_update(weights, num_examples=COUNTS["beta"]))


def wrong_count(message: Message, hostile: Hostile) -> list[Message]:
    return _payload(message, pack_plain_update(_weights("beta", 1), num_examples=10_000))  # claim says 25


def huge_count(message: Message, hostile: Hostile) -> list[Message]:
    """A consistent, signed update claiming 2**60 examples: it would own the weighted average."""
    run_id, server_round = _order(message)
    count = 2**60
    record = pack_plain_update(_weights("beta", server_round), num_examples=count)
    claim = ReplyClaim(
        kind="update", run_id=run_id, server_round=server_round, site_id="beta", payload_sha256=payload_sha256(record),
        num_examples=count, epsilon=EPSILON["beta"], delta=DELTA, dataset_manifest=_dataset_manifest("beta"), status="trained",
    )  # fmt: skip
    return [_reply(message, {UPDATE: record, SITE: _signed(claim)})]


def wrong_shape(message: Message, hostile: Hostile) -> list[Message]:
    return _payload(message, pack_plain_update(np.ones(NUM_WEIGHTS + 3), num_examples=COUNTS["beta"]))


def missing_site_record(message: Message, hostile: Hostile) -> list[Message]:
    record, _ = _update(message, "beta")
    return [_reply(message, {UPDATE: record})]


def _raw_claim(message: Message, **changes: Any) -> ConfigRecord:
    """A SITE record whose claim JSON carries `changes` (values a `ReplyClaim` would never sign)."""
    record, claim = _update(message, "beta")
    values = claim.to_dict() | changes
    return ConfigRecord({"claim": json.dumps(values), "signature": sign_claim(KEYS["beta"], claim), "site_id": "beta"})


def non_ascii_status(message: Message, hostile: Hostile) -> list[Message]:
    record, _ = _update(message, "beta")
    return [_reply(message, {UPDATE: record, SITE: _raw_claim(message, status="trainé")})]


def nan_epsilon(message: Message, hostile: Hostile) -> list[Message]:
    record, _ = _update(message, "beta")
    return [_reply(message, {UPDATE: record, SITE: _raw_claim(message, epsilon=float("nan"))})]


def negative_epsilon(message: Message, hostile: Hostile) -> list[Message]:
    record, _ = _update(message, "beta")
    return [_reply(message, {UPDATE: record, SITE: _raw_claim(message, epsilon=-1.0)})]


def _signature_of(value: Any) -> Behaviour:
    def attack(message: Message, hostile: Hostile) -> list[Message]:
        record, claim = _update(message, "beta")
        site = _signed(claim)
        site["signature"] = value
        return [_reply(message, {UPDATE: record, SITE: site})]

    return attack


def huge_reason_refusal(message: Message, hostile: Hostile) -> list[Message]:
    _, claim = _update(message, "beta")
    claim = replace(claim, payload_sha256="", status="refused:policy")
    site = _signed(claim)
    site["reason"] = "é" * 100_000
    return [_reply(message, {SITE: site})]


def wrong_round(message: Message, hostile: Hostile) -> list[Message]:
    record, claim = _update(message, "beta")
    return [_reply(message, {UPDATE: record, SITE: _signed(replace(claim, server_round=claim.server_round + 5))})]


def wrong_run(message: Message, hostile: Hostile) -> list[Message]:
    record, claim = _update(message, "beta")
    return [_reply(message, {UPDATE: record, SITE: _signed(replace(claim, run_id="another-run"))})]


def identity_change(message: Message, hostile: Hostile) -> list[Message]:
    record, claim = _update(message, "gamma")  # node 2 was beta in round 1; gamma's genuine signature now
    return [_reply(message, {UPDATE: record, SITE: _signed(claim)})]


def update_in_a_config_record(message: Message, hostile: Hostile) -> list[Message]:
    _, claim = _update(message, "beta")
    return [_reply(message, {UPDATE: ConfigRecord({"payload": b"\x00"}), SITE: _signed(claim)})]


def site_error(message: Message, hostile: Hostile) -> list[Message]:
    return [Message(Error(code=0, reason="Message: \x1b[31mboom\nTraceback ..."), reply_to=message)]


def empty_reply(message: Message, hostile: Hostile) -> list[Message]:
    return [_reply(message, {})]


# name -> (behaviour of node 2, round of the denial, label on the chain, code)
TRAIN_ATTACKS: dict[str, tuple[Behaviour, int, str, str]] = {
    "impersonation": (_in_round(1, impersonation), 1, "node-2", "bad_signature"),
    "unsigned-plain-update": (_in_round(1, unsigned_update), 1, "node-2", "unsigned"),
    "tampered-epsilon": (_in_round(1, tampered_epsilon), 1, "node-2", "bad_signature"),
    "tampered-dataset-manifest": (_in_round(1, tampered_dataset_manifest), 1, "node-2", "bad_signature"),
    "tampered-epsilon-known-node": (_in_round(2, tampered_epsilon), 2, "beta", "bad_signature"),
    "duplicate-in-round": (_in_round(1, duplicate), 1, "beta", "duplicate"),
    "replay-of-earlier-round": (_in_round(2, replay_of_round_1), 2, "beta", "replay"),
    "unknown-site": (_in_round(1, unknown_site), 1, "node-2", "unknown_site"),
    "digest-mismatch": (_in_round(1, digest_mismatch), 1, "beta", "digest_mismatch"),
    "float64-payload": (_in_round(1, float64_payload), 1, "beta", "malformed_update"),
    "int-payload": (_in_round(1, int_payload), 1, "beta", "malformed_update"),
    "nan-in-payload": (_in_round(1, nan_payload), 1, "beta", "malformed_update"),
    "count-not-the-claimed": (_in_round(1, wrong_count), 1, "beta", "malformed_update"),
    "huge-claimed-count": (_in_round(1, huge_count), 1, "beta", "implausible_count"),
    "shape-mismatch": (_in_round(1, wrong_shape), 1, "beta", "shape_mismatch"),
    "missing-site-record": (_in_round(1, missing_site_record), 1, "node-2", "malformed_reply"),
    "non-ascii-status": (_in_round(1, non_ascii_status), 1, "node-2", "malformed_claim"),
    "nan-epsilon": (_in_round(1, nan_epsilon), 1, "node-2", "malformed_claim"),
    "negative-epsilon": (_in_round(1, negative_epsilon), 1, "node-2", "malformed_claim"),
    "signature-is-str": (_in_round(1, _signature_of("ab" * 32)), 1, "node-2", "bad_signature"),
    "signature-is-int": (_in_round(1, _signature_of(12345)), 1, "node-2", "bad_signature"),
    "signature-too-short": (_in_round(1, _signature_of(b"\x01" * 10)), 1, "node-2", "bad_signature"),
    "wrong-round": (_in_round(1, wrong_round), 1, "node-2", "wrong_round"),
    "wrong-run": (_in_round(1, wrong_run), 1, "node-2", "wrong_run"),
    "identity-changed": (_in_round(2, identity_change), 2, "beta", "identity_changed"),
    "update-not-an-array-record": (_in_round(1, update_in_a_config_record), 1, "node-2", "malformed_reply"),
    "refusal-with-huge-reason": (_in_round(1, huge_reason_refusal), 1, "beta", "refused:policy"),
    "site-error": (_in_round(1, site_error), 1, "node-2", "site_error"),
    "site-error-known-node": (_in_round(2, site_error), 2, "beta", "site_error"),
    "empty-reply": (_in_round(1, empty_reply), 1, "node-2", "malformed_reply"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_ATTACKS))
def test_hostile_train_reply_is_rejected_with_its_code_and_the_run_finishes(case: str, default_config, tmp_path: Path) -> None:
    behaviour, server_round, label, code = TRAIN_ATTACKS[case]
    run = _run(behaviour, default_config, tmp_path)

    assert (server_round, label, code) in run.provenance.denials(), run.provenance.denials()
    assert all(len(code) <= 32 and code.isascii() for _, _, code in run.provenance.denials())
    record = run.train_record(server_round)
    assert record["rejected"][label].startswith(f"{code}: ")
    assert all(reason.isprintable() and len(reason) < 400 for reason in record["rejected"].values())
    if case != "duplicate-in-round":  # there beta's first, honest reply counts
        assert record["participants"] == ["alpha"]
    # what is recorded about privacy and data comes only from verified claims
    anchor = run.provenance.rounds[server_round - 1]
    assert anchor["epsilon_by_site"]["alpha"] == EPSILON["alpha"]
    assert anchor["dataset_manifests"]["alpha"] == _dataset_manifest("alpha")
    assert set(anchor["epsilon_by_site"]) == set(record["participants"])
    assert "mallory" not in run.loop.result.sites.values() and "gamma" not in run.loop.result.sites.values()
    assert run.loop.result.privacy["alpha"] == {"epsilon": EPSILON["alpha"], "delta": DELTA}


def test_an_honest_run_records_only_signed_numbers(default_config, tmp_path: Path) -> None:
    run = _run(lambda message, hostile: honest(message, "beta"), default_config, tmp_path)
    assert run.provenance.denials() == []
    for values in run.provenance.rounds:
        assert values["epsilon_by_site"] == {"alpha": EPSILON["alpha"], "beta": EPSILON["beta"]}  # not the metrics' 0.0001
        assert values["dataset_manifests"] == {site: _dataset_manifest(site) for site in ("alpha", "beta")}
        assert [decision.code for decision in values["decisions"]] == ["ok", "ok"]
    assert run.train_record(1)["sites"]["beta"]["epsilon"] == EPSILON["beta"]
    assert run.loop.result.sites == {1: "alpha", 2: "beta"}
    assert run.evaluate_record(NUM_ROUNDS)["rejected"] == {}
    pooled = run.loop.result.final_pooled_metrics
    assert pooled["n"] == 21.0 and pooled["accuracy"] == pytest.approx((0.5 * 10 + 0.6 * 11) / 21)


# --- attacks on evaluation replies -----------------------------------------------------------------------


def _evaluation_attack(attack: Behaviour) -> Behaviour:
    def behaviour(message: Message, hostile: Hostile) -> list[Message]:
        if message.metadata.message_type == "evaluate" and _order(message)[1] == 1:
            return attack(message, hostile)
        return honest(message, "beta")

    return behaviour


def evaluation_without_metrics(message: Message, hostile: Hostile) -> list[Message]:
    _, claim = _evaluation(message, "beta")
    return [_reply(message, {SITE: _signed(claim)})]


def evaluation_without_metrics_or_claim(message: Message, hostile: Hostile) -> list[Message]:
    return [_reply(message, {SITE: ConfigRecord({"site_id": "beta", "status": "evaluated"})})]


def evaluation_refused(message: Message, hostile: Hostile) -> list[Message]:
    run_id, server_round = _order(message)
    claim = ReplyClaim(
        kind="evaluate", run_id=run_id, server_round=server_round, site_id="beta", payload_sha256="",
        status="refused:already_evaluated",
    )
    return [_reply(message, {SITE: site_reply_record(claim, sign_claim(KEYS["beta"], claim), reason="seen it")})]


def evaluation_with_nan(message: Message, hostile: Hostile) -> list[Message]:
    metrics, claim = _evaluation(message, "beta", {"accuracy": float("nan"), "n": 11.0})
    return [_reply(message, {SITE: _signed(claim), METRICS: MetricRecord(metrics)})]


def evaluation_with_negative_count(message: Message, hostile: Hostile) -> list[Message]:
    metrics, claim = _evaluation(message, "beta", {"accuracy": 1.0, "n": -1000.0})
    return [_reply(message, {SITE: _signed(claim), METRICS: MetricRecord(metrics)})]


def evaluation_with_huge_count(message: Message, hostile: Hostile) -> list[Message]:
    """n weights every pooled figure: 2^60 test rows would make beta's numbers everyone's."""
    metrics, claim = _evaluation(message, "beta", {"accuracy": 1.0, "n": float(2**60)})
    return [_reply(message, {SITE: _signed(claim), METRICS: MetricRecord(metrics)})]


def evaluation_of_another_aggregate(message: Message, hostile: Hostile) -> list[Message]:
    metrics, claim = _evaluation(message, "beta")
    claim = replace(claim, aggregate_sha256="0" * 64)
    return [_reply(message, {SITE: _signed(claim), METRICS: MetricRecord(metrics)})]


def evaluation_metrics_swapped(message: Message, hostile: Hostile) -> list[Message]:
    _, claim = _evaluation(message, "beta")
    return [_reply(message, {SITE: _signed(claim), METRICS: MetricRecord({"accuracy": 1.0, "n": 11.0})})]


def evaluation_unsigned(message: Message, hostile: Hostile) -> list[Message]:
    return [_reply(message, {SITE: ConfigRecord({"site_id": "beta", "status": "evaluated"}), METRICS: MetricRecord(_metrics("beta"))})]


def _histogram(site: str, *, extra_negatives: int = 0) -> dict[str, list]:
    """A score histogram of `site`'s test rows (3 positives near 0.8, the rest near 0.1), as a site sends it."""
    rows = int(_metrics(site)["n"])
    negatives, positives, sums = [0] * 1000, [0] * 1000, [0.0] * 1000
    negatives[100], positives[800] = rows - 3 + extra_negatives, 3
    sums[100], sums[800] = 0.1005 * negatives[100], 0.8005 * 3
    return {"negatives": negatives, "positives": positives, "score_sums": sums}


def _with_histogram(message: Message, sent: dict[str, Any], *, signed: dict[str, list] | None = None) -> list[Message]:
    """beta's evaluation carrying `sent` as its histogram, its claim signing `signed` (default: what it sent)."""
    metrics, claim = _evaluation(message, "beta")
    claim = replace(claim, payload_sha256=evaluation_sha256(metrics, sent if signed is None else signed))
    return [_reply(message, {SITE: _signed(claim), METRICS: MetricRecord(metrics), SCORE_HISTOGRAM: MetricRecord(sent)})]


def _histogram_changed(change: Callable[[dict[str, list]], None]) -> Behaviour:
    def attack(message: Message, hostile: Hostile) -> list[Message]:
        histogram = _histogram("beta")
        change(histogram)
        return _with_histogram(message, histogram)

    return attack


def histogram_not_the_signed(message: Message, hostile: Hostile) -> list[Message]:
    return _with_histogram(message, _histogram("beta"), signed=_histogram("beta", extra_negatives=1))


def histogram_beside_metrics_signed_alone(message: Message, hostile: Hostile) -> list[Message]:
    metrics, claim = _evaluation(message, "beta")  # signs metrics_sha256(metrics) only
    return [_reply(message, {SITE: _signed(claim), METRICS: MetricRecord(metrics), SCORE_HISTOGRAM: MetricRecord(_histogram("beta"))})]


def histogram_of_bytes(message: Message, hostile: Hostile) -> list[Message]:
    metrics, claim = _evaluation(message, "beta")
    blob = ConfigRecord({"negatives": b"\x00" * 64})
    return [_reply(message, {SITE: _signed(claim), METRICS: MetricRecord(metrics), SCORE_HISTOGRAM: blob})]


EVALUATION_ATTACKS: dict[str, tuple[Behaviour, str]] = {
    "histogram-counts-past-n": (_histogram_changed(lambda h: h["negatives"].__setitem__(100, h["negatives"][100] + 5)), "malformed_histogram"),
    "histogram-negative-count": (_histogram_changed(lambda h: h["negatives"].__setitem__(5, -4)), "malformed_histogram"),
    "histogram-nan-sum": (_histogram_changed(lambda h: h["score_sums"].__setitem__(100, float("nan"))), "malformed_histogram"),
    "histogram-short": (_histogram_changed(lambda h: h["positives"].pop()), "malformed_histogram"),
    "histogram-sum-off-its-bin": (_histogram_changed(lambda h: h["score_sums"].__setitem__(100, 9.0)), "malformed_histogram"),
    "histogram-not-the-signed": (histogram_not_the_signed, "digest_mismatch"),
    "histogram-unsigned": (histogram_beside_metrics_signed_alone, "digest_mismatch"),
    "histogram-of-bytes": (histogram_of_bytes, "malformed_histogram"),
    "no-metrics": (evaluation_without_metrics, "digest_mismatch"),  # it signed metrics it did not send
    "no-metrics-unsigned": (evaluation_without_metrics_or_claim, "unsigned"),
    "signed-refusal": (evaluation_refused, "refused:already_evaluated"),
    "nan-metric": (evaluation_with_nan, "malformed_metrics"),
    "negative-count": (evaluation_with_negative_count, "malformed_metrics"),
    "count-over-max-site-examples": (evaluation_with_huge_count, "malformed_metrics"),
    "another-aggregate": (evaluation_of_another_aggregate, "wrong_aggregate"),
    "metrics-not-the-signed": (evaluation_metrics_swapped, "digest_mismatch"),
    "unsigned": (evaluation_unsigned, "unsigned"),
}


@pytest.mark.parametrize("case", sorted(EVALUATION_ATTACKS))
def test_hostile_evaluation_is_dropped_and_logged(case: str, default_config, tmp_path: Path) -> None:
    attack, code = EVALUATION_ATTACKS[case]
    run = _run(_evaluation_attack(attack), default_config, tmp_path)
    record = run.evaluate_record(1)
    assert record["rejected"]["beta"].startswith(f"{code}: ")  # node 2 proved to be beta in round 1's training
    assert set(record["sites"]) == {"alpha"}
    assert record["pooled"]["n"] == 10.0 and np.isfinite(record["pooled"]["accuracy"])
    assert set(run.evaluate_record(2)["sites"]) == {"alpha", "beta"}  # beta's later honest evaluation counts


def test_honest_histograms_are_pooled_into_union_figures(default_config, tmp_path: Path) -> None:
    def beta_sends_histograms(message: Message, hostile: Hostile) -> list[Message]:
        if message.metadata.message_type == "evaluate":
            return _with_histogram(message, _histogram("beta"))
        return honest(message, "beta")

    run = _run(beta_sends_histograms, default_config, tmp_path)
    pooled = run.evaluate_record(NUM_ROUNDS)["pooled"]
    assert run.evaluate_record(NUM_ROUNDS)["rejected"] == {}
    assert pooled["n"] == 21.0 and pooled["histogram_pooled_n"] == 11.0  # alpha sent none: the figures cover beta's rows
    assert pooled["histogram_pooled_auroc"] == 1.0 and pooled["histogram_pooled_auprc"] == 1.0
    assert pooled["histogram_pooled_ece"] == pytest.approx((8 * 0.1005 + 3 * (1 - 0.8005)) / 11)
    assert run.loop.result.final_score_histogram.to_values() == _histogram("beta")


# --- what the coordinator sends: certificates and min_sites ------------------------------------------------


def test_every_aggregate_travels_with_a_certificate_of_the_accepted_claims(default_config, tmp_path: Path) -> None:
    run = _run(_in_round(1, tampered_epsilon), default_config, tmp_path)
    by_phase: dict[tuple[str, int], list[Message]] = {}
    for message in run.grid.sent:
        by_phase.setdefault((message.metadata.message_type, _order(message)[1]), []).append(message)

    for message in by_phase[("train", 1)]:
        assert ROUND_INPUTS not in message.content and CERTIFICATE not in message.content
    for message in run.grid.sent:
        assert message.content[INSTRUCTION]["min_sites"] == 1
    digests = [r["aggregate_sha256"] for r in run.records if r["phase"] == "train"]
    for (phase, server_round), messages in by_phase.items():
        if (phase, server_round) == ("train", 1):
            continue
        closed = server_round if phase == "evaluate" else server_round - 1  # the round whose aggregate it is
        participants = run.train_record(closed)["participants"]
        for message in messages:
            certificate = RoundCertificate.from_record(message.content[CERTIFICATE])
            assert certificate.server_round == closed
            assert certificate.aggregate_sha256 == digests[closed - 1] == payload_sha256(unpack_payloads(message.content, ROUND_INPUTS)[AGGREGATE])
            assert [claim.site_id for claim, _ in certificate.claims] == participants
            for claim, signature in certificate.claims:
                verify_claim(MANIFEST.site(claim.site_id).signing_public_key, signature, claim)
                assert claim.server_round == closed and claim.run_id == RUN_ID and claim.kind == "update"
    first = RoundCertificate.from_record(by_phase[("train", 2)][0].content[CERTIFICATE])
    assert [claim.site_id for claim, _ in first.claims] == ["alpha"]  # beta's tampered claim is not in it
    assert sum(claim.num_examples for claim, _ in first.claims) == COUNTS["alpha"]


def test_the_coordinator_needs_the_manifest_for_every_scheme(default_config) -> None:
    with pytest.raises(ConfigError, match=MANIFEST_KEY):
        make_aggregator(default_config, CoordinatorSetup())
    assert isinstance(make_aggregator(default_config, CoordinatorSetup(manifest_path="federation.json")), PlainAggregator)


def test_decisions_reach_the_chain_as_access_decisions(default_config, tmp_path: Path) -> None:
    run = _run(_in_round(1, unknown_site), default_config, tmp_path)
    first = run.provenance.rounds[0]["decisions"]
    assert AccessDecision("alpha", True, "ok", run.train_record(1)["update_sha256"]["alpha"]) in first
    assert AccessDecision("node-2", False, "unknown_site") in first
    assert run.loop.result.rejections[0].code == "unknown_site"


def test_a_histogram_in_a_regression_run_is_refused(tmp_path: Path) -> None:
    """A regression task has no label-0/label-1 rows: a site sending a histogram anyway (well formed,
    signed) must not put an AUROC, AUPRC, ECE and reliability plot into a regression run's results."""
    from medtwin.core.config import compose_config

    def beta_sends_histograms(message: Message, hostile: Hostile) -> list[Message]:
        if message.metadata.message_type == "evaluate":
            return _with_histogram(message, _histogram("beta"))
        return honest(message, "beta")

    config = compose_config(["task=diabetes_progression"])
    run = _run(beta_sends_histograms, config, tmp_path, task_kind=None)  # the loop learns "regression" from config.task
    record = run.evaluate_record(NUM_ROUNDS)
    assert record["rejected"]["beta"].startswith("malformed_histogram: ")
    assert not any(name.startswith("histogram_pooled_") for name in record["pooled"])
    assert run.loop.result.final_score_histogram is None


def update_from_another_state(message: Message, hostile: Hostile) -> list[Message]:
    """Under a server optimiser a claim names the state it trained from (aggregate_sha256): beta names
    one no honest site has, which would make every honest site refuse to step the round."""
    if message.metadata.message_type != "train":
        return honest(message, "beta")
    record, claim = _update(message, "beta")
    return [_reply(message, {UPDATE: record, SITE: _signed(replace(claim, aggregate_sha256="f" * 64))})]


def test_under_a_server_optimiser_an_update_from_another_state_is_refused_not_certified(default_config, tmp_path: Path) -> None:
    adam = replace(default_config, strategy=replace(default_config.strategy, server_optimizer="adam"))
    run = _run(update_from_another_state, adam, tmp_path)
    record = run.train_record(1)
    assert record["participants"] == ["alpha"] and record["rejected"]["beta"].startswith("state_mismatch: ")
    assert [claim.site_id for claim, _ in run.loop.result.certificate.claims] == ["alpha"]  # the sites see alpha's only
    fedavg = _run(update_from_another_state, default_config, tmp_path / "fedavg")
    assert fedavg.train_record(1)["participants"] == ["alpha", "beta"]  # FedAvg: no state, nothing to disagree on


def test_the_largest_group_of_one_state_is_kept_whatever_the_arrival_order(default_config) -> None:
    from types import SimpleNamespace

    adam = replace(default_config, strategy=replace(default_config.strategy, server_optimizer="adam"))
    updates = [SimpleNamespace(claim=SimpleNamespace(aggregate_sha256=state)) for state in ("b", "a", "b", "c", "b")]
    off = RoundLoop.off_state_updates(SimpleNamespace(config=adam), updates)  # type: ignore[arg-type]
    assert [update.claim.aggregate_sha256 for update in off] == ["a", "c"]
    tie = [SimpleNamespace(claim=SimpleNamespace(aggregate_sha256=state)) for state in ("d", "c")]
    assert [u.claim.aggregate_sha256 for u in RoundLoop.off_state_updates(SimpleNamespace(config=adam), tie)] == ["d"]  # type: ignore[arg-type]
