"""Typed values that cross the gateway: what callers write and what auditors read back.

Hashes in read records are lowercase hex without 0x (the same form as ArtifactStore ids);
write inputs accept raw 32 bytes or hex. Timestamps are block timestamps (seconds).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag, StrEnum

__all__ = [
    "AccessDecisionRecord",
    "ApprovalRecord",
    "DatasetCommitment",
    "Decision",
    "FlushResult",
    "GovernanceEvent",
    "ModelRecord",
    "ReconcileResult",
    "ReleaseRecord",
    "Role",
    "RoundAnchor",
    "RoundStatus",
    "RunRecord",
    "RunRegistration",
    "SiteRecord",
    "WriteReceipt",
]


class Role(IntFlag):
    """Role bits of FederationRegistry (same values as the contract constants)."""

    ADMIN = 1
    COORDINATOR = 2
    SITE = 4
    AUDITOR = 8
    RESEARCHER = 16


class RoundStatus(StrEnum):
    FINALIZED = "finalized"  # the anchor is on chain and durable (see chain/journal.py)
    MINED = "mined"  # the anchor is on chain, but the node may still lose it (not yet in its durable state)
    QUEUED = "queued"  # the anchor waits in the outbox (chain unreachable)
    MISSING = "missing"  # neither on chain nor queued
    UNKNOWN = "unknown"  # not queued, and the data chain cannot be asked right now


@dataclass(frozen=True)
class WriteReceipt:
    """Outcome of one gateway write. Only status "mined" means it is on chain."""

    status: str  # "mined" | "queued"
    chain: str
    call: str
    tx_hash: str = ""
    block_number: int = 0
    gas_used: int = 0
    outbox_seq: int = 0
    block_hash: str = ""

    @property
    def mined(self) -> bool:
        return self.status == "mined"


@dataclass(frozen=True)
class FlushResult:
    mined: tuple[WriteReceipt, ...] = ()
    already_applied: int = 0  # queued writes found on chain already (sent before a crash)
    failed: tuple[str, ...] = ()  # refused on replay, kept in the .failed.jsonl file
    remaining: int = 0  # still queued (chain unreachable, or signer unknown)


@dataclass(frozen=True)
class ReconcileResult:
    """One pass of the journal against the chain (`medtwin chain up|flush`, every coordinator start)."""

    checked: int = 0  # journal entries compared with the chain
    resent: tuple[WriteReceipt, ...] = ()  # written before, missing on chain (lost by the node), sent again
    refused: tuple[str, ...] = ()  # missing on chain and refused when sent again (reported, kept in the journal)
    unfinished: int = 0  # entries not checked yet (chain unreachable, or a signer this process lacks)
    journaled: int = 0  # entries in the journal
    finalized: int = 0  # entries 1..finalized are durable on chain
    flush: FlushResult = FlushResult()

    @property
    def complete(self) -> bool:
        return self.unfinished == 0 and self.flush.remaining == 0


@dataclass(frozen=True)
class Decision:
    """One access decision to record on the auth chain.

    `site_id` names the site concerned (its key is logged, so even an unknown site stays traceable);
    `actor` is the requesting address — leave it empty and the contract fills in the address
    registered for `site_id` (zero for an unknown site). `subject` is what the decision is about,
    e.g. the sha256 of the update (a Merkle leaf) or of the exported model; empty = zero.
    """

    action: str  # e.g. "admit_update", "reject_update", "export_model" (<= 32 ASCII bytes)
    granted: bool
    reason: str = ""  # e.g. "ok", "bad_signature", "revoked", "replay" (<= 32 ASCII bytes)
    site_id: str = ""
    actor: str = ""
    subject: str = ""  # 32-byte hex


@dataclass(frozen=True)
class SiteRecord:
    site_id: str
    address: str
    site_key: str
    key_fingerprint: str
    registered_at: int
    revoked_at: int

    @property
    def active(self) -> bool:
        return self.registered_at > 0 and self.revoked_at == 0


@dataclass(frozen=True)
class ApprovalRecord:
    site_id: str
    run_id: str
    config_hash: str
    code_hash: str
    approved_at: int
    withdrawn_at: int

    def valid_at(self, timestamp: int) -> bool:
        return 0 < self.approved_at <= timestamp and not (0 < self.withdrawn_at <= timestamp)


@dataclass(frozen=True)
class AccessDecisionRecord:
    actor: str
    site_id: str  # resolved from the registry ("" if the actor is not a registered site)
    site_key: str
    action: str
    granted: bool
    reason: str
    subject: str
    run_key: str
    round_index: int
    recorder: str
    timestamp: int
    block_number: int
    tx_hash: str


@dataclass(frozen=True)
class GovernanceEvent:
    kind: str  # RoleGranted, SiteRegistered, RunApproved, GrantIssued, ...
    account: str
    detail: str
    timestamp: int
    block_number: int
    tx_hash: str


@dataclass(frozen=True)
class RunRegistration:
    run_id: str
    task: str
    config_hash: str  # 32-byte hex (or bytes)
    code_hash: str
    dp_params_hash: str
    he_params_hash: str


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    run_key: str
    task: str
    config_hash: str
    code_hash: str
    dp_params_hash: str
    he_params_hash: str
    registered_at: int
    rounds_anchored: int
    last_round: int


@dataclass(frozen=True)
class RoundAnchor:
    """One round on the data chain. `update_root` = Merkle root of update digests ordered by site id."""

    run_id: str
    round_index: int
    update_root: str
    aggregate_hash: str
    manifest_hash: str
    participants_hash: str
    participant_count: int
    epsilon_hash: str
    max_epsilon_micro: int
    he_error_bound_pico: int
    anchored_at: int = 0  # block timestamp; 0 on input


@dataclass(frozen=True)
class DatasetCommitment:
    run_id: str
    site_key: str
    manifest_hash: str
    timestamp: int
    block_number: int


@dataclass(frozen=True)
class ModelRecord:
    model_hash: str
    parent_hash: str  # "" for a root model
    run_key: str
    round_index: int
    recorded_at: int


@dataclass(frozen=True)
class ReleaseRecord:
    model_hash: str
    run_key: str
    site_key: str
    released_at: int
