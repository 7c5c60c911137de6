"""`AuthChain`: the typed facade of FederationRegistry (the authorization chain).

Admin: roles, site registration/revocation, grants. Site: approve/withdraw its own runs.
Coordinator: `record_decisions` — all access decisions of one round in ONE transaction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from web3 import Web3

from .accounts import ChainAccount
from .encoding import ZERO32, as_bytes32, label32, label_text, run_key, site_key
from .errors import ChainError
from .records import (
    AccessDecisionRecord,
    ApprovalRecord,
    Decision,
    GovernanceEvent,
    Role,
    SiteRecord,
    WriteReceipt,
)
from .writer import ContractGateway

__all__ = ["MAX_DECISIONS_PER_TX", "AuthChain", "decision_batch_args"]

MAX_DECISIONS_PER_TX = 1024  # DynArray bound in FederationRegistry.record_decisions
ZERO_ADDRESS = "0x" + "00" * 20
GOVERNANCE_EVENTS = (
    "RoleGranted",
    "RoleRevoked",
    "SiteRegistered",
    "SiteRevoked",
    "RunApproved",
    "ApprovalWithdrawn",
    "GrantIssued",
    "GrantRevoked",
)


def _hex(value: bytes) -> str:
    return bytes(value).hex()


def decision_batch_args(decisions: Sequence[Decision], *, run_id: str, round_index: int, batch_label: str = "") -> list[Any]:
    """FederationRegistry.record_decisions arguments; the batch id hashes the whole content."""
    if not decisions:
        raise ChainError("record_decisions got an empty list; there is nothing to record")
    if len(decisions) > MAX_DECISIONS_PER_TX:
        raise ChainError(
            f"{len(decisions)} decisions exceed one transaction's limit of {MAX_DECISIONS_PER_TX}; "
            "call record_decisions per slice with distinct batch_label values"
        )
    actors, keys, subjects, actions, granted, reasons = [], [], [], [], [], []
    for decision in decisions:
        actors.append(Web3.to_checksum_address(decision.actor or ZERO_ADDRESS))
        keys.append(site_key(decision.site_id) if decision.site_id else ZERO32)
        subjects.append(as_bytes32(decision.subject, what="decision subject") if decision.subject else ZERO32)
        actions.append(label32(decision.action))
        granted.append(bool(decision.granted))
        reasons.append(label32(decision.reason))
    run = run_key(run_id)
    digest = hashlib.sha256(b"medtwin.decisions:" + batch_label.encode() + run + round_index.to_bytes(32, "big"))
    for row in zip(actors, keys, subjects, actions, granted, reasons, strict=True):
        digest.update(bytes.fromhex(row[0][2:]) + row[1] + row[2] + row[3] + bytes([row[4]]) + row[5])
    return [digest.digest(), run, int(round_index), actors, keys, subjects, actions, granted, reasons]


def _approval_record(fields: Sequence[Any], *, site_id: str, run_id: str) -> ApprovalRecord | None:
    config_hash, code_hash, approved_at, withdrawn_at = fields
    if approved_at == 0:
        return None
    return ApprovalRecord(site_id, run_id, _hex(config_hash), _hex(code_hash), approved_at, withdrawn_at)


class AuthChain(ContractGateway):
    """FederationRegistry on the auth chain. `admin`/`coordinator` may be None (read-only use)."""

    def __init__(self, *args: Any, admin: ChainAccount | None = None, coordinator: ChainAccount | None = None, **kwargs: Any) -> None:
        signers = tuple(account for account in (admin, coordinator) if account is not None)
        super().__init__(*args, signers=signers, **kwargs)
        self.admin, self.coordinator = admin, coordinator
        self._site_names: dict[str, str] = {}
        # What the registry never changes once written (register_site refuses a known key or address; nothing
        # rewrites them): a registered site's address and its identity-key fingerprint. Revocation, approvals
        # and withdrawals are read from the chain every time.
        self._addresses: dict[str, str] = {}
        self._fingerprints: dict[str, str] = {}

    # -- admin ---------------------------------------------------------------------------------

    def grant_role(self, account: str, role: Role) -> WriteReceipt:
        return self.write(self.admin, "grant_role", [Web3.to_checksum_address(account), int(role)], role="admin")

    def revoke_role(self, account: str, role: Role) -> WriteReceipt:
        return self.write(self.admin, "revoke_role", [Web3.to_checksum_address(account), int(role)], role="admin")

    def register_site(self, *, site_id: str, address: str, key_fingerprint: str | bytes) -> WriteReceipt:
        if len(site_id.encode()) > 64:
            raise ChainError(f"site id {site_id!r} is longer than 64 bytes; shorten it in the federation config")
        fingerprint = as_bytes32(key_fingerprint, what=f"key fingerprint of site {site_id!r}")
        args = [Web3.to_checksum_address(address), site_key(site_id), site_id, fingerprint]
        return self.write(self.admin, "register_site", args, role="admin")

    def revoke_site(self, *, site_id: str, reason: str) -> WriteReceipt:
        return self.write(self.admin, "revoke_site", [site_key(site_id), label32(reason)], role="admin")

    def issue_grant(self, *, grantee: str, scope: str, expires_at: int) -> WriteReceipt:
        args = [Web3.to_checksum_address(grantee), label32(scope), int(expires_at)]
        return self.write(self.admin, "issue_grant", args, role="admin")

    def revoke_grant(self, *, grantee: str, scope: str) -> WriteReceipt:
        return self.write(self.admin, "revoke_grant", [Web3.to_checksum_address(grantee), label32(scope)], role="admin")

    # -- site ------------------------------------------------------------------------------------

    def approve_run(self, *, site: ChainAccount, run_id: str, config_hash: str | bytes, code_hash: str | bytes) -> WriteReceipt:
        args = [run_key(run_id), as_bytes32(config_hash, what="config hash"), as_bytes32(code_hash, what="code hash")]
        return self.write(site, "approve_run", args, role="site")

    def withdraw_approval(self, *, site: ChainAccount, run_id: str) -> WriteReceipt:
        return self.write(site, "withdraw_approval", [run_key(run_id)], role="site")

    # -- coordinator -----------------------------------------------------------------------------

    def record_decisions(
        self, decisions: Sequence[Decision], *, run_id: str, round_index: int, batch_label: str = "", background: bool = False
    ) -> WriteReceipt:
        """All decisions of one round in one transaction (at most MAX_DECISIONS_PER_TX); `background`: see `write`."""
        args = decision_batch_args(decisions, run_id=run_id, round_index=round_index, batch_label=batch_label)
        return self.write(self.coordinator, "record_decisions", args, role="coordinator", background=background)

    # -- reads -----------------------------------------------------------------------------------

    def site_address(self, site_id: str) -> str:
        """Address registered for `site_id`, or "" if unknown (a registered address is read once: it never changes)."""
        if site_id not in self._addresses:
            address = str(self.call("site_address", site_key(site_id)))
            if int(address, 16) == 0:
                return ""
            self._addresses[site_id] = address
        return self._addresses[site_id]

    def key_fingerprint(self, site_id: str) -> str:
        """The identity-key fingerprint registered for `site_id` (hex), or "" if unknown; read once, it never changes."""
        if site_id not in self._fingerprints:
            record = self.site(site_id)
            if record is None:
                return ""
            self._fingerprints[site_id] = record.key_fingerprint
        return self._fingerprints[site_id]

    def site(self, site_id: str) -> SiteRecord | None:
        address = self.site_address(site_id)
        return self.site_by_address(address) if address else None

    def site_by_address(self, address: str) -> SiteRecord | None:
        key, name, fingerprint, registered_at, revoked_at = self.call("sites", Web3.to_checksum_address(address))
        if registered_at == 0:
            return None
        return SiteRecord(name, Web3.to_checksum_address(address), _hex(key), _hex(fingerprint), registered_at, revoked_at)

    def site_name(self, address: str) -> str:
        if address not in self._site_names:
            record = self.site_by_address(address) if int(address, 16) else None
            self._site_names[address] = record.site_id if record else ""
        return self._site_names[address]

    def sites(self) -> list[SiteRecord]:
        events = self.client.logs(self.contract.events.SiteRegistered, from_block=self.deploy_block)
        records = [self.site_by_address(event["args"]["site"]) for event in events]
        return [record for record in records if record is not None]

    def is_admitted(self, *, site_id: str, run_id: str) -> bool:
        """Registered, not revoked, and this site approved this run (and did not withdraw)."""
        address = self.site_address(site_id)
        return bool(address) and bool(self.read("is_admitted", address, run_key(run_id)))

    def admissions(self, *, site_ids: Sequence[str], run_id: str) -> dict[str, bool]:
        """`is_admitted(...)` of every site in `site_ids`, read in one JSON-RPC batch (a round's updates)."""
        addresses = {site_id: self.site_address(site_id) for site_id in dict.fromkeys(site_ids)}
        registered = [site_id for site_id, address in addresses.items() if address]
        key = run_key(run_id)
        answers = self.client.read([self.views.call("is_admitted", addresses[site_id], key) for site_id in registered], what="is_admitted")
        admitted = dict(zip(registered, (bool(answer) for answer in answers), strict=True))
        return {site_id: admitted.get(site_id, False) for site_id in addresses}

    def approval(self, *, site_id: str, run_id: str) -> ApprovalRecord | None:
        address = self.site_address(site_id)
        if not address:
            return None
        return _approval_record(self.read("approvals", address, run_key(run_id)), site_id=site_id, run_id=run_id)

    def approval_and_admission(self, *, site_id: str, run_id: str) -> tuple[ApprovalRecord | None, bool]:
        """`approval(...)` and `is_admitted(...)` read together, in one JSON-RPC batch (a site's check per phase)."""
        address = self.site_address(site_id)
        if not address:
            return None, False
        key = run_key(run_id)
        fields, admitted = self.client.read(
            [self.views.call("approvals", address, key), self.views.call("is_admitted", address, key)], what="approvals + is_admitted"
        )
        return _approval_record(fields, site_id=site_id, run_id=run_id), bool(admitted)

    def has_role(self, account: str, role: Role) -> bool:
        return bool(self.call("has_role", Web3.to_checksum_address(account), int(role)))

    def has_grant(self, *, grantee: str, scope: str) -> bool:
        return bool(self.call("has_grant", Web3.to_checksum_address(grantee), label32(scope)))

    def decisions(self, *, site_id: str = "", run_id: str = "", action: str = "") -> list[AccessDecisionRecord]:
        """AccessDecision events, oldest first, filtered by site (actor or subject), run, action."""
        filters: dict[str, Any] = {}
        if run_id:
            filters["run_id"] = run_key(run_id)
        if action:
            filters["action"] = label32(action)
        events = self.client.logs(self.contract.events.AccessDecision, from_block=self.deploy_block, argument_filters=filters)
        wanted_address = self.site_address(site_id) if site_id else ""
        wanted_key = site_key(site_id) if site_id else b""
        records = []
        for event in events:
            args = event["args"]
            if site_id and args["actor"] != wanted_address and bytes(args["site_key"]) != wanted_key:
                continue
            records.append(
                AccessDecisionRecord(
                    actor=args["actor"],
                    site_id=self.site_name(args["actor"]),
                    site_key=_hex(args["site_key"]),
                    action=label_text(args["action"]),
                    granted=bool(args["granted"]),
                    reason=label_text(args["reason"]),
                    subject=_hex(args["subject"]),
                    run_key=_hex(args["run_id"]),
                    round_index=int(args["round_index"]),
                    recorder=args["recorder"],
                    timestamp=int(args["timestamp"]),
                    block_number=int(event["blockNumber"]),
                    tx_hash=_hex(event["transactionHash"]),
                )
            )
        return records

    def governance_events(self) -> list[GovernanceEvent]:
        """Role, site, approval and grant events, oldest first."""
        found: list[GovernanceEvent] = []
        for kind in GOVERNANCE_EVENTS:
            for event in self.client.logs(getattr(self.contract.events, kind), from_block=self.deploy_block):
                args = dict(event["args"])
                account = str(args.pop("account", None) or args.pop("site", None) or args.pop("grantee", ""))
                timestamp = int(args.pop("timestamp", 0)) or self.client.block_timestamp(int(event["blockNumber"]))
                detail = ", ".join(
                    f"{key}={_hex(value) if isinstance(value, bytes) else value}" for key, value in sorted(args.items())
                )
                found.append(GovernanceEvent(kind, account, detail, timestamp, int(event["blockNumber"]), _hex(event["transactionHash"])))
        return sorted(found, key=lambda item: (item.block_number, item.kind))

    # -- outbox replay -------------------------------------------------------------------------

    def is_applied(self, method: str, args: list[Any], sender: str) -> bool:
        if method == "record_decisions":
            return int(self.call("batches", args[0])) != 0
        if method == "register_site":
            return int(self.call("sites", args[0])[3]) != 0
        if method == "revoke_site":
            address = str(self.call("site_address", args[0]))
            return int(address, 16) != 0 and int(self.call("sites", address)[4]) != 0
        if method == "approve_run":
            return int(self.call("approvals", sender, args[0])[2]) != 0
        if method == "withdraw_approval":
            return int(self.call("approvals", sender, args[0])[3]) != 0
        if method == "grant_role":
            return int(self.call("roles", args[0])) & args[1] == args[1]
        if method == "revoke_role":
            return int(self.call("roles", args[0])) & args[1] == 0
        if method == "issue_grant":
            expires_at, _, revoked_at, _ = self.call("grants", args[0], args[1])
            return int(expires_at) == args[2] and int(revoked_at) == 0
        if method == "revoke_grant":
            return int(self.call("grants", args[0], args[1])[2]) != 0
        raise ChainError(f"auth chain: no replay check for queued method {method!r}")
