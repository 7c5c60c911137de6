"""The chains behind the roles' provenance protocols, and the simulation's governance steps.

`ChainProvenance` implements the coordinator's `ProvenanceRecorder`; `ChainApprovalCheck` a site's
`RunApprovalCheck` (it reconnects read-only from the chain state dir, so it works inside Ray actors).
`enrol_federation` plays the admin and every site before a simulated run: register each site with
its identity-key fingerprint, and let each site approve the run's config and code hashes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtwin.chain import (
    ChainAccount,
    ChainSession,
    ChainUnavailableError,
    Decision,
    RunRegistration,
    WriteReceipt,
    build_round_anchor,
    open_session,
    run_key,
    shared_readonly,
)
from medtwin.chain.encoding import site_key
from medtwin.chain.session import SITE_FUNDING_WEI
from medtwin.core.artifacts import ArtifactStore
from medtwin.core.config import ChainConfig
from medtwin.core.hashing import code_hash, config_hash
from medtwin.core.identity import FederationManifest, load_chain_account_key
from medtwin.client.site_file import DEFAULT_ANCHOR_WAIT_S
from medtwin.client.site_state import ChainVerifiedApprovals
from medtwin.core.provenance import AccessDecision, RunDescription

logger = logging.getLogger("medtwin.chain")


def _params_hash(parameters: Mapping[str, Any]) -> str:
    canonical = json.dumps(parameters, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def open_chains(config: ChainConfig) -> ChainSession:
    """The coordinator's session. Every start reconciles: writes a node lost since (it restarted from
    an older state dump) are sent again from the journal, then the outbox. With an outbox, each chain
    then gets its background sender: a round's writes return once durable (`ChainProvenance.close_round`)."""
    session = open_session(config, start_nodes=config.name == "anvil")
    for role, result in session.reconcile().items():
        if result.resent or result.refused:
            logger.warning("%s chain: %d lost write(s) sent again from the journal, %d refused", role, len(result.resent), len(result.refused))
        if not result.complete:
            logger.warning("%s chain: %d journaled and %d queued write(s) wait for the node", role, result.unfinished, result.flush.remaining)
    if session.state_dir is not None:  # the round's writes are durable in the outbox, then sent off the critical path
        session.start_background_sending()
    return session


def _fingerprint(value: str | bytes) -> str:
    return (value.hex() if isinstance(value, bytes) else value).removeprefix("0x").lower()


def site_chain_account(session: ChainSession, site_id: str, kit_dir: Path | str | None) -> ChainAccount:
    """The account a site approves runs with: its own key from its kit (`medtwin site init` makes it);
    kits made before sites had one fall back to the session's development account for the site."""
    key = load_chain_account_key(kit_dir) if kit_dir is not None else None
    if key is None:
        return session.site_account(site_id)
    account = ChainAccount.from_key(key, label=f"site {site_id}")
    if session.dev_accounts:  # local anvil: gas from the node; a real chain's site funds its own account
        try:
            session.auth.client.fund_from_node(account.address, wei=SITE_FUNDING_WEI)
        except ChainUnavailableError:
            pass  # its approval waits in the outbox until the node is back
    session.auth.add_signer(account)
    return account


def approve_run_on_chain(session: ChainSession, *, site_id: str, kit_dir: Path | str | None, run_id: str, proposal_text: str) -> bool:
    """A site approves (run id, config hash, code hash) with its own chain account; False if it already had."""
    if session.auth.approval(site_id=site_id, run_id=run_id) is not None:  # a resumed run is approved already
        return False
    account = site_chain_account(session, site_id, kit_dir)
    session.auth.approve_run(site=account, run_id=run_id, config_hash=config_hash(proposal_text), code_hash=code_hash())
    return True


def enrol_federation(
    session: ChainSession,
    manifest: FederationManifest,
    *,
    run_id: str,
    proposal_text: str,
    site_kits: Mapping[str, Path] | None = None,
) -> None:
    """Admin registers every new site (with the chain address in the manifest); every active site
    approves this run's config + code with its own account (`site_kits`: where the harness finds each
    hospital's kit — in a deployment each hospital runs `medtwin site approve` itself).

    A site registered earlier under another identity key is not silently re-used: the coordinator's
    admission check compares fingerprints and refuses it (`key_mismatch`). Revoked sites stay out.
    """
    kits = dict(site_kits or {})
    for entry in manifest.sites:
        record = session.auth.site(entry.site_id)
        if record is None:
            address = entry.chain_address or site_chain_account(session, entry.site_id, kits.get(entry.site_id)).address
            session.auth.register_site(site_id=entry.site_id, address=address, key_fingerprint=entry.signing_key_fingerprint)
        elif not record.active:
            logger.warning("site %s is revoked on the authorization chain; it will not be admitted", entry.site_id)
            continue
        approve_run_on_chain(session, site_id=entry.site_id, kit_dir=kits.get(entry.site_id), run_id=run_id, proposal_text=proposal_text)


@dataclass
class ChainProvenance:
    """The coordinator's writes and checks against both chains (at most 1 auth + 2 data tx per round)."""

    session: ChainSession
    artifacts_root: Path
    manifest: FederationManifest | None = None  # the sites' identity keys this coordinator verifies against
    anchors_written: int = 0
    finalize_wait_s: float = 5.0  # at the end of a run, how long to wait for the writes to be durable
    drain_wait_s: float = 60.0  # at the end of a run, how long the background senders get to send what they hold
    outage_timeout_s: float = 600.0  # chain.outage_timeout_s: train on through an outage this long, then stop
    _admitted: dict[tuple[str, str], tuple[str | None, float]] = field(default_factory=dict, init=False)  # answer, when verified
    _refusals_before: dict[str, int] = field(default_factory=dict, init=False)  # a reused session's refusals of earlier runs

    def __post_init__(self) -> None:
        self._refusals_before = {role: len(gateway.refused_in_background) for role, gateway in self._gateways()}

    def _refused_in_background(self, role: str, gateway: Any) -> list[str]:
        return gateway.refused_in_background[self._refusals_before.get(role, 0) :]

    def start_run(self, run: RunDescription) -> None:
        if self.session.data.run(run.run_id) is None:
            self.session.data.register_run(
                RunRegistration(
                    run_id=run.run_id,
                    task=run.task,
                    config_hash=config_hash(run.config_yaml),
                    code_hash=code_hash(),
                    dp_params_hash=_params_hash(run.dp_parameters),
                    he_params_hash=_params_hash(run.he_parameters),
                )
            )

    def outage_problem(self) -> str | None:
        """Why the run must stop now: a write the chain refused in the background (a synchronous refusal raised
        at once), or a write queued longer than chain.outage_timeout_s ago (else None). The outboxes are on
        disk, so the clock survives a coordinator restart and `--resume`."""
        refused = [(role, refusal) for role, gateway in self._gateways() for refusal in self._refused_in_background(role, gateway)]
        if refused:
            role, first = refused[0]
            return (
                f"the {role} chain refused {len(refused)} write(s) sent in the background (first: {first[:300]}): the run's "
                "provenance on chain is incomplete, so it stops — the writes are in the outbox's failed file "
                f"({'outbox-' + role + '.failed.jsonl'}); see `medtwin audit verify`"
            )
        oldest = [
            (entry.queued_at, role)
            for role, gateway in self._gateways() if gateway.outbox is not None
            for entry in gateway.outbox.pending()
        ]  # fmt: skip
        if not oldest:
            return None
        since, chain = min(oldest)
        down_s = time.time() - since
        if down_s <= self.outage_timeout_s:
            return None
        return (
            f"the {chain} chain has taken no write for {down_s:.1f} s, more than chain.outage_timeout_s={self.outage_timeout_s:g}: "
            "the run stops at its last checkpoint — bring the chain back (`medtwin chain up`), then resume the run"
        )

    def admission_problem(self, *, site_id: str, run_id: str) -> str | None:
        """The auth chain's answer; while it is unreachable, the answer last verified on it, for at most
        chain.outage_timeout_s — never for a site not verified, nor one whose revocation is queued."""
        return self.admission_problems(site_ids=[site_id], run_id=run_id)[site_id]

    def admission_problems(self, *, site_ids: Sequence[str], run_id: str) -> dict[str, str | None]:
        """`admission_problem` of every site in `site_ids`, their revocation and approval read in one
        JSON-RPC batch (a round's updates): fresh from the chain on every call, never kept between calls."""
        wanted = list(dict.fromkeys(site_ids))
        try:
            problems = self._admission_problems(site_ids=wanted, run_id=run_id)
        except ChainUnavailableError as error:
            unreachable = f"the authorization chain is unreachable ({str(error)[:160]})"
            return {site_id: self._last_verified_answer(site_id, run_id, unreachable=unreachable) for site_id in wanted}
        now = time.monotonic()
        for site_id, problem in problems.items():
            self._admitted[(site_id, run_id)] = (problem, now)
        return problems

    def _last_verified_answer(self, site_id: str, run_id: str, *, unreachable: str) -> str | None:
        answer, verified_at = self._admitted.get((site_id, run_id), ("", 0.0))
        if answer == "" or time.monotonic() - verified_at > self.outage_timeout_s:
            return f"{unreachable} and {site_id} was not verified on it for run {run_id} in the last {self.outage_timeout_s:g} s"
        if site_key(site_id) in {bytes(args[0]) for args in self.session.auth.queued("revoke_site")}:
            return f"{unreachable} and the revocation of {site_id} waits in this coordinator's outbox"
        logger.warning("auth chain unreachable: %s gets the admission answer last verified on chain", site_id)
        return answer

    def _admission_problems(self, *, site_ids: list[str], run_id: str) -> dict[str, str | None]:
        # the registration (address, key fingerprint) is read once per session: the registry never rewrites it;
        # revocation, approval and withdrawal are read on every admission (is_admitted: one eth_call per site,
        # all of them in one batch)
        fingerprints = {site_id: self.session.auth.key_fingerprint(site_id) for site_id in site_ids}
        registered = [site_id for site_id in site_ids if fingerprints[site_id]]
        admitted = self.session.auth.admissions(site_ids=registered, run_id=run_id) if registered else {}
        return {site_id: self._registry_problem(site_id, run_id, fingerprints[site_id], admitted.get(site_id, False)) for site_id in site_ids}

    def _registry_problem(self, site_id: str, run_id: str, fingerprint: str, admitted: bool) -> str | None:
        if not fingerprint:
            return f"{site_id} is not registered on the authorization chain"
        if not admitted:
            return f"{site_id} is revoked or has not approved run {run_id} on the authorization chain"
        if self.manifest is not None and site_id in self.manifest.site_ids:
            expected = _fingerprint(self.manifest.site(site_id).signing_key_fingerprint)
            if _fingerprint(fingerprint) != expected:
                return f"{site_id}'s identity key differs from the fingerprint registered on the authorization chain"
        return None

    def close_round(
        self,
        *,
        run_id: str,
        server_round: int,
        decisions: list[AccessDecision],
        update_digests: Mapping[str, str],
        aggregate_digest: str,
        dataset_manifests: Mapping[str, str],
        epsilon_by_site: Mapping[str, float],
        he_error_bound: float,
    ) -> dict[str, Any]:
        def record_decisions() -> WriteReceipt:
            return self.session.auth.record_decisions(
                [
                    Decision(
                        action="admit_update" if decision.granted else "reject_update",
                        granted=decision.granted,
                        reason=decision.code[:32],
                        site_id=decision.site_id,
                        subject=decision.subject_sha256,
                    )
                    for decision in decisions
                ],
                run_id=run_id,
                round_index=server_round,
                background=True,
            )

        # Both chains hand off to their senders (fsyncs, nothing sent): the decisions are made durable on a thread
        # while the data chain's side (dataset commitments, the round manifest) is; the anchor is handed off only
        # once the decisions are durable, as when done one after the other. Written synchronously, in order.
        overlap = self.session.auth.sender is not None and self.session.data.sender is not None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="medtwin-decisions-hand-off") as pool:
            decisions_handed_off = pool.submit(record_decisions) if overlap else None
            auth_receipt = record_decisions() if decisions_handed_off is None else None
            dataset_receipt = (
                self.session.data.commit_datasets(run_id=run_id, manifests=dict(dataset_manifests), background=True) if dataset_manifests else None
            )  # fmt: skip
            anchor, _ = build_round_anchor(
                ArtifactStore(self.artifacts_root),
                run_id=run_id,
                round_index=server_round,
                update_digests=dict(update_digests),
                aggregate_digest=aggregate_digest,
                epsilon_by_site=dict(epsilon_by_site),
                he_error_bound=he_error_bound,
            )
            if decisions_handed_off is not None:
                auth_receipt = decisions_handed_off.result()  # its error, if any, raised here: the anchor is not handed off
        assert auth_receipt is not None
        anchor_receipt = self.session.data.anchor_round(anchor, background=True)
        self.anchors_written += int(anchor_receipt.mined)
        return {
            # "sending": durable in the outbox, the chain's background sender puts it on chain (sites wait for the
            # anchor before they evaluate); "mined": sent synchronously (no sender); "queued": the chain is down.
            # Finalized (durable on chain) is in the summary.
            "auth_tx": auth_receipt.status,
            "dataset_tx": dataset_receipt.status if dataset_receipt else None,
            "anchor_tx": anchor_receipt.status,
            "gas": sum(r.gas_used for r in (auth_receipt, dataset_receipt, anchor_receipt) if r is not None),
        }

    def last_anchor(self, run_id: str) -> tuple[int, str] | None:
        """(round, aggregate digest) of the run's highest round anchored on the data chain or queued in the outbox.
        The outbox is read first: a background sender removes an anchor from it only once mined, so an anchor
        that moves from the outbox to the chain meanwhile is seen in one or the other (the chain's answer wins)."""
        key = run_key(run_id)
        anchors: dict[int, str] = {}
        for args in self.session.data.queued("anchor_round"):  # ABI order: run key, round, update root, aggregate, ...
            if bytes(args[0]) == key:
                anchors[int(args[1])] = bytes(args[3]).hex()
        anchors.update({anchor.round_index: anchor.aggregate_hash for anchor in self.session.data.anchors(run_id)})
        if not anchors:
            return None
        last_round = max(anchors)
        return last_round, anchors[last_round].lower().removeprefix("0x")

    def finish_run(self, *, run_id: str, final_aggregate_digest: str, rounds_completed: int, final: bool = True) -> dict[str, Any]:
        """The final lineage (queued if the data chain is down; none for a run that stopped early and will be
        resumed) and the summary's chain block. A chain that cannot be read now is reported, not raised: the
        run trained, its writes wait in the outbox for `medtwin chain flush` (or the next `medtwin chain up`)."""
        # the round writes still with the background senders go on chain first (or stay queued: the chain is down)
        self.session.stop_background_sending(drain_s=self.drain_wait_s)
        lineage = (
            self.session.data.record_lineage(model_hash=final_aggregate_digest, run_id=run_id, round_index=rounds_completed)
            if final else None
        )  # fmt: skip
        results = self.session.finalize(wait_s=self.finalize_wait_s)
        refused = {
            role: [*self._refused_in_background(role, gateway), *results[role].flush.failed, *results[role].refused] for role, gateway in self._gateways()
        }
        block = self.session.summary() | {
            "chain_ids": {"auth": self.session.deployment.auth.chain_id, "data": self.session.deployment.data.chain_id},
            "contracts": {"auth": self.session.deployment.auth.address, "data": self.session.deployment.data.address},
            "lineage_tx": lineage.status if lineage is not None else None,
            "writes_pending_in_outbox": sum(result.flush.remaining for result in results.values()),
            "queued": {role: [entry.method for entry in gateway.outbox.pending()] for role, gateway in self._gateways() if gateway.outbox},
            # finalized: every write this state folder journaled is durable (anvil: in the node's state dump)
            # writes the chains refused (in the background, or on this final replay): never "finalized"
            "refused": refused,
            "finalized": not any(refused.values())
            and all(result.complete and result.finalized >= result.journaled for result in results.values()),
            "journal": {
                role: {"writes": result.journaled, "finalized_through": result.finalized, "resent": [r.call for r in result.resent]}
                for role, result in results.items()
            },
        }
        try:
            block["anchors_written"] = len(self.session.data.anchors(run_id))
        except ChainUnavailableError as error:
            block["anchors_written"] = None
            block["unreachable"] = str(error)[:300]
        return block

    def _gateways(self) -> list[tuple[str, Any]]:
        return [("auth", self.session.auth), ("data", self.session.data)]


ANCHOR_POLL_MAX_S = 0.1  # a site waiting for a round's anchor reads the chain at least this often (one batched eth_call)
APPROVAL_OUTAGE_GRACE_S = 900.0  # a site trusts its own approval, last seen on chain this recently, through an outage


@dataclass(frozen=True)
class ChainApprovalCheck:
    """A site's checks against the chains: its approval of (config, code), and each aggregate's anchor.

    Every check reads the chain (approval, revocation and anchor are never cached); the connection is the
    process's one read-only session on `state_dir` (`shared_readonly`), not a new one per check.

    With `site_state_dir`, each approval seen on chain is remembered there; while the authorization
    chain is unreachable the site goes on with an approval it saw there within APPROVAL_OUTAGE_GRACE_S
    (its own approval of exactly this config and code), and refuses otherwise.

    The coordinator sends a round's anchor in the background (`ContractGateway.write(background=True)`), so an
    evaluation may arrive just before the anchor lands: `aggregate_problem` reads the chain again, first after
    `anchor_poll_s`, the pause doubling up to ANCHOR_POLL_MAX_S, for up to `anchor_wait_s` (the site's own file)
    and refuses only then — a coordinator asking about rounds it never anchors costs a site a few reads per
    second, not a hundred. An anchor of another aggregate is refused at once, and so is a chain the site cannot read."""

    state_dir: str
    site_state_dir: str | None = None
    anchor_wait_s: float = DEFAULT_ANCHOR_WAIT_S  # site file chain.anchor_wait_s: how long an aggregate's anchor may take to land
    anchor_poll_s: float = 0.005  # the first pause: an anchor usually lands within a few ms of the hand-off

    def problem(self, *, site_id: str, run_id: str, config_hash: str, code_hash: str) -> str | None:
        binding = dict(run_id=run_id, config_hash=config_hash, code_hash=code_hash)
        verified = ChainVerifiedApprovals(self.site_state_dir) if self.site_state_dir else None
        try:
            approval, admitted = shared_readonly(self.state_dir).auth.approval_and_admission(site_id=site_id, run_id=run_id)
        except ChainUnavailableError as error:  # the site cannot see its approval now
            age = verified.age_s(**binding) if verified is not None else None
            if age is not None and age <= APPROVAL_OUTAGE_GRACE_S:
                logger.warning("authorization chain unreachable: %s goes on with its approval of run %s seen there %.0f s ago", site_id, run_id, age)
                return None
            return f"cannot read the authorization chain to check this site's approval of run {run_id} ({str(error)[:200]})"
        problem = self._approval_problem(approval, admitted, site_id=site_id, **binding)
        if verified is not None:
            if problem is None:
                verified.remember(**binding)
            else:  # withdrawn, revoked or changed: an outage must not bring the old answer back
                verified.forget(run_id=run_id)
        return problem

    @staticmethod
    def _approval_problem(approval: Any, admitted: bool, *, site_id: str, run_id: str, config_hash: str, code_hash: str) -> str | None:
        if approval is None or not admitted:
            return f"run {run_id} is not approved by {site_id} on the authorization chain (or the site is revoked)"
        if approval.config_hash.removeprefix("0x") != config_hash:
            return f"the approved config hash of run {run_id} differs from the config this site was asked to run"
        if approval.code_hash.removeprefix("0x") != code_hash:
            return f"the approved code hash of run {run_id} differs from the code installed at {site_id}"
        return None

    def erased_ledger_problem(self, *, site_id: str, ledger_path: str) -> str | None:
        """Called when this site's ledger holds no spend at all: None if the data chain agrees (no earlier
        DP run of this site), else why the site must not train on a fresh ledger."""
        try:
            runs = shared_readonly(self.state_dir).data.private_runs_of_site(site_id)
        except ChainUnavailableError as error:
            return (
                f"this site's privacy ledger {ledger_path} holds no spend, and the data chain that would show earlier "
                f"DP runs of {site_id} cannot be read now ({str(error)[:160]}); the site trains once it can check"
            )
        if not runs:
            return None
        shown = ", ".join(runs[:5]) + (", …" if len(runs) > 5 else "")
        return (
            f"this site's privacy ledger {ledger_path} holds no spend, but the data chain records {site_id}'s datasets in "
            f"{len(runs)} earlier DP run(s) ({shown}): the ledger was deleted or replaced together with its mark in the kit. "
            "Restore both from backup (privacy-ledger.json in the site's state folder and the ledger mark in its kit); "
            "a site never starts over on a fresh ledger — its patients' earlier privacy loss still counts"
        )

    def aggregate_problem(self, *, run_id: str, server_round: int, aggregate_sha256: str) -> str | None:
        deadline = time.monotonic() + self.anchor_wait_s
        pause_s = self.anchor_poll_s
        while True:
            try:
                anchor = shared_readonly(self.state_dir).data.anchor(run_id, server_round)
            except ChainUnavailableError as error:  # an aggregate the site cannot see anchored is not evaluated
                return f"cannot read the data chain to check round {server_round}'s anchor ({str(error)[:200]})"
            if anchor is not None or time.monotonic() >= deadline:
                break
            time.sleep(min(pause_s, max(0.0, deadline - time.monotonic())))
            pause_s = min(2 * pause_s, ANCHOR_POLL_MAX_S)
        if anchor is None:
            return (
                f"round {server_round} of run {run_id} is not anchored on the data chain "
                f"(waited {self.anchor_wait_s:g} s, the site file's chain.anchor_wait_s)"
            )
        if anchor.aggregate_hash.removeprefix("0x").lower() != aggregate_sha256.lower():
            return f"the aggregate sent for round {server_round} is not the one anchored on the data chain"
        return None
