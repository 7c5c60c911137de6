"""What `medtwin audit lineage|access|verify` computes, from the chains and the artifact store alone.

An auditor needs only ``deployment.json`` (chain URLs + contract addresses) and the artifact root;
nothing the coordinator says is trusted. `audit_verify` re-hashes every stored update, aggregate
and round manifest and recomputes each round's Merkle root (leaves = sha256 of the stored update
bytes ordered by site id, see `medtwin.chain.anchoring`), then compares with the on-chain anchor.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import yaml

from medtwin.core.artifacts import ArtifactError, ArtifactStore, read_file, sha256_hex
from medtwin.core.hashing import config_hash
from medtwin.core.merkle import merkle_root, update_leaves

from .anchoring import RoundManifest, epsilon_hash, participants_hash
from .encoding import from_micro, from_pico, site_key
from .errors import ChainError
from .records import AccessDecisionRecord, GovernanceEvent, ModelRecord, RoundAnchor, RunRecord
from .session import ChainSession

__all__ = [
    "AccessReport",
    "DatasetLineage",
    "LineageReport",
    "Mismatch",
    "ParticipantLineage",
    "RoundLineage",
    "VerifyReport",
    "audit_access",
    "audit_lineage",
    "audit_verify",
]


class _Json:
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)


@dataclass(frozen=True)
class ParticipantLineage(_Json):
    site_id: str
    update_sha256: str
    epsilon: float | None  # cumulative epsilon the site reported (None without DP)
    approved_at: int  # auth-chain time; 0 = never approved this run
    admitted_at: int  # auth-chain time of the "admit_update" decision for this round; 0 = none recorded
    approval_valid_then: bool  # approved, not withdrawn, not revoked at admission (auth-chain clock)


@dataclass(frozen=True)
class RoundLineage(_Json):
    round_index: int
    anchored_at: int
    update_root: str
    aggregate_hash: str
    manifest_hash: str
    participant_count: int
    max_epsilon: float
    he_error_bound: float
    participants: tuple[ParticipantLineage, ...]


@dataclass(frozen=True)
class DatasetLineage(_Json):
    site_id: str
    manifest_hash: str
    committed_at: int


@dataclass(frozen=True)
class LineageReport(_Json):
    target: str
    run: RunRecord | None
    models: tuple[ModelRecord, ...]
    datasets: tuple[DatasetLineage, ...]
    rounds: tuple[RoundLineage, ...]
    problems: tuple[str, ...]
    origins: tuple[str, ...] = ()  # for a model hash: every run that recorded it (a model may come out of several)


@dataclass(frozen=True)
class AccessReport(_Json):
    site_id: str
    run_id: str
    decisions: tuple[AccessDecisionRecord, ...]
    governance: tuple[GovernanceEvent, ...]


@dataclass(frozen=True)
class Mismatch(_Json):
    round_index: int  # 0 = run level
    kind: str  # run | round | manifest | update | merkle_root | aggregate | participants | epsilon | he_bound | model
    detail: str


@dataclass(frozen=True)
class VerifyReport(_Json):
    run_id: str
    rounds_checked: int
    artifacts_checked: int
    mismatches: tuple[Mismatch, ...]
    elapsed_s: float
    completeness: str = ""  # whether every planned round and the final lineage were required (see audit_verify)

    @property
    def ok(self) -> bool:
        return self.rounds_checked > 0 and not self.mismatches

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _load_manifest(store: ArtifactStore, digest: str) -> RoundManifest:
    return RoundManifest.from_bytes(store.get(digest, max_bytes=MAX_MANIFEST_BYTES))


def _site_names(session: ChainSession) -> dict[str, str]:
    return {record.site_key: record.site_id for record in session.auth.sites()}


def _run_and_models(session: ChainSession, target: str) -> tuple[RunRecord | None, tuple[ModelRecord, ...]]:
    candidate = target.lower().removeprefix("0x")
    if len(candidate) == 64 and all(char in "0123456789abcdef" for char in candidate):
        lineage = session.data.lineage(candidate)
        if lineage:
            return session.data.run_by_key(bytes.fromhex(lineage[0].run_key)), tuple(lineage)
    run = session.data.run(target)
    return run, tuple(session.data.models_of_run(target)) if run else ()


def audit_lineage(session: ChainSession, store: ArtifactStore, target: str) -> LineageReport:
    """Rounds, participants, their approvals at the time, epsilon, HE bound, datasets of a run or model."""
    run, models = _run_and_models(session, target)
    if run is None:
        return LineageReport(target, None, models, (), (), (f"{target!r} is neither a registered run id nor a recorded model hash",))
    problems: list[str] = []
    names = _site_names(session)
    admitted = {
        (record.site_key, record.round_index): record.timestamp
        for record in session.auth.decisions(run_id=run.run_id, action="admit_update")
        if record.granted
    }
    approvals: dict[str, Any] = {}
    sites: dict[str, Any] = {}
    rounds = []
    for anchor in session.data.anchors(run.run_id):
        try:
            manifest = _load_manifest(store, anchor.manifest_hash)
        except (ArtifactError, ChainError) as error:
            problems.append(f"round {anchor.round_index}: manifest unavailable ({error})")
            manifest = None
        epsilons = dict(manifest.epsilon_micro_by_site) if manifest else {}
        participants = []
        for site_id, digest in manifest.updates if manifest else ():
            if site_id not in approvals:
                approvals[site_id] = session.auth.approval(site_id=site_id, run_id=run.run_id)
                sites[site_id] = session.auth.site(site_id)
            approval, site = approvals[site_id], sites[site_id]
            admitted_at = admitted.get((site_key(site_id).hex(), anchor.round_index), 0)
            if not admitted_at:
                problems.append(f"round {anchor.round_index}: no admit_update decision for site {site_id!r} on the auth chain")
            # Compare times on ONE chain (auth): the two chains' clocks are independent.
            moment = admitted_at or int(time.time())
            revoked_before = site is not None and 0 < site.revoked_at <= moment
            valid = bool(approval and approval.valid_at(moment)) and not revoked_before
            if not valid:
                problems.append(f"round {anchor.round_index}: site {site_id!r} had no valid approval when its update was admitted")
            participants.append(
                ParticipantLineage(
                    site_id=site_id,
                    update_sha256=digest,
                    epsilon=from_micro(epsilons[site_id]) if site_id in epsilons else None,
                    approved_at=approval.approved_at if approval else 0,
                    admitted_at=admitted_at,
                    approval_valid_then=valid,
                )
            )
        rounds.append(
            RoundLineage(
                anchor.round_index, anchor.anchored_at, anchor.update_root, anchor.aggregate_hash, anchor.manifest_hash,
                anchor.participant_count, from_micro(anchor.max_epsilon_micro), from_pico(anchor.he_error_bound_pico),
                tuple(participants),
            )
        )
    datasets = tuple(
        DatasetLineage(names.get(item.site_key, item.site_key), item.manifest_hash, item.timestamp)
        for item in session.data.dataset_commitments(run.run_id)
    )
    return LineageReport(target, run, models, datasets, tuple(rounds), tuple(problems), _origins(session, target))


def _origins(session: ChainSession, target: str) -> tuple[str, ...]:
    candidate = target.lower().removeprefix("0x")
    if len(candidate) != 64 or any(char not in "0123456789abcdef" for char in candidate):
        return ()
    runs = (session.data.run_by_key(bytes.fromhex(origin.run_key)) for origin in session.data.origins_of(candidate))
    return tuple(run.run_id for run in runs if run is not None)


def audit_access(session: ChainSession, *, site_id: str = "", run_id: str = "") -> AccessReport:
    """Every access decision (optionally for one site / run) and every governance event."""
    decisions = tuple(session.auth.decisions(site_id=site_id, run_id=run_id))
    governance = tuple(session.auth.governance_events())
    if site_id:
        address = session.auth.site_address(site_id)
        governance = tuple(event for event in governance if address and event.account == address)
    return AccessReport(site_id, run_id, decisions, governance)


def _verify_round(
    anchor: RoundAnchor, store: ArtifactStore, run_id: str, found: list[Mismatch], updates: dict[int, tuple[tuple[str, str], ...]]
) -> int:
    """Check one anchored round against the store; returns how many artifacts were re-hashed. The
    manifest's (site, update digest) pairs go into `updates[round]` when it is readable."""
    index = anchor.round_index

    def report(kind: str, detail: str) -> None:
        found.append(Mismatch(index, kind, detail))

    try:
        raw = store.read_unverified(anchor.manifest_hash, max_bytes=MAX_MANIFEST_BYTES)
    except ArtifactError as error:
        report("manifest", str(error))
        return 0
    checked = 1
    if sha256_hex(raw) != anchor.manifest_hash:
        report("manifest", f"round manifest {anchor.manifest_hash} was altered: it hashes to {sha256_hex(raw)}")
    try:
        manifest = RoundManifest.from_bytes(raw)
    except ChainError as error:
        report("manifest", str(error))
        return checked
    if (manifest.run_id, manifest.round_index) != (run_id, index):
        report("manifest", f"manifest is for run {manifest.run_id!r} round {manifest.round_index}")
    updates[index] = tuple(manifest.updates)
    actual_leaves: dict[str, str] = {}
    for site_id, digest in manifest.updates:
        try:
            actual = store.hash_unverified(digest)
        except ArtifactError as error:
            report("update", f"site {site_id!r}: {error}")
            continue
        checked += 1
        actual_leaves[site_id] = actual
        if actual != digest:
            report("update", f"site {site_id!r}: stored update {digest} now hashes to {actual} (altered artifact)")
    if len(actual_leaves) == len(manifest.updates) and manifest.updates:
        recomputed = merkle_root(update_leaves(actual_leaves)).hex()
        if recomputed != anchor.update_root:
            report("merkle_root", f"root recomputed from stored updates is {recomputed}, on chain {anchor.update_root}")
    else:
        report("merkle_root", "cannot recompute the Merkle root: update artifacts are missing")
    try:
        aggregate = store.hash_unverified(anchor.aggregate_hash)
        checked += 1
        if aggregate != anchor.aggregate_hash:
            report("aggregate", f"stored aggregate now hashes to {aggregate}, on chain {anchor.aggregate_hash}")
    except ArtifactError as error:
        report("aggregate", str(error))
    if manifest.aggregate_sha256 != anchor.aggregate_hash:
        report("aggregate", f"manifest names aggregate {manifest.aggregate_sha256}, on chain {anchor.aggregate_hash}")
    if participants_hash(manifest.site_ids) != anchor.participants_hash or len(manifest.updates) != anchor.participant_count:
        report("participants", f"manifest lists {len(manifest.updates)} sites that do not match the anchored participants")
    epsilons = dict(manifest.epsilon_micro_by_site)
    if epsilon_hash(epsilons) != anchor.epsilon_hash or max(epsilons.values(), default=0) != anchor.max_epsilon_micro:
        report("epsilon", "per-site epsilon in the manifest does not match the anchored epsilon commitment")
    if manifest.he_error_bound_pico != anchor.he_error_bound_pico:
        report("he_bound", f"manifest HE error bound {manifest.he_error_bound_pico} != anchored {anchor.he_error_bound_pico} (pico)")
    return checked


MAX_PLANNED_ROUNDS = 1_000_000
MAX_CONFIG_BYTES = 4 << 20  # a run's config.yaml is a few KB: a larger "config" artifact is not read
MAX_MANIFEST_BYTES = 64 << 20  # a round manifest is ~150 bytes a site: anything near this is not one


def _registered_config(run: RunRecord, store: ArtifactStore) -> tuple[str, str] | None:
    """(where, text) of a config artifact in the store that hashes to the run's registered config hash."""
    registered = run.config_hash.lower().removeprefix("0x")
    for digest, kind in store.kinds().items():  # ArtifactError: the caller reports it
        if kind == "config":
            try:
                text = store.read_unverified(digest, max_bytes=MAX_CONFIG_BYTES).decode("utf-8")
            except (ArtifactError, UnicodeDecodeError):
                continue
            if config_hash(text) == registered:
                return f"config artifact {digest}", text
    return None


def _planned_rounds(run: RunRecord, store: ArtifactStore, found: list[Mismatch]) -> int | None:
    """`federation.num_rounds` of the run's config — config.yaml beside the artifact store, or the config
    artifact in the store (what an auditor with only the store has) — trusted only if it hashes to the
    config hash registered on the data chain; None when there is no config to check."""
    path = store.root.parent / "config.yaml"
    if path.exists() or path.is_symlink():
        try:
            where, text = str(path), read_file(path).decode("utf-8")
        except (ArtifactError, UnicodeDecodeError) as error:
            found.append(Mismatch(0, "run", f"{path} cannot be read as the run's config ({error}): completeness is not checked"))
            return None
        if config_hash(text) != run.config_hash.lower().removeprefix("0x"):
            found.append(Mismatch(0, "run", f"{path} does not hash to the config hash registered for the run: it is not the config that ran"))
            return None
    else:
        try:
            stored = _registered_config(run, store)
        except ArtifactError as error:
            found.append(Mismatch(0, "run", f"the run's config cannot be looked up in the artifact index: {error}"))
            return None
        if stored is None:
            return None
        where, text = stored
    try:
        planned = int(yaml.safe_load(text)["federation"]["num_rounds"])
    except (yaml.YAMLError, KeyError, TypeError, ValueError, ArithmeticError, RecursionError):
        found.append(Mismatch(0, "run", f"{where} names no usable federation.num_rounds"))
        return None
    if not 1 <= planned <= MAX_PLANNED_ROUNDS:
        found.append(Mismatch(0, "run", f"{where} plans {planned} rounds, outside 1..{MAX_PLANNED_ROUNDS}"))
        return None
    return planned


def _admitted_updates(session: ChainSession, run_id: str) -> dict[int, set[tuple[str, str]]]:
    """Round -> the (site key, update digest) pairs the authorization chain records as admitted."""
    admitted: dict[int, set[tuple[str, str]]] = {}
    for decision in session.auth.decisions(run_id=run_id, action="admit_update"):
        if decision.granted:
            admitted.setdefault(decision.round_index, set()).add((decision.site_key.lower(), decision.subject.lower()))
    return admitted


def _check_admissions(
    round_index: int,
    anchor: RoundAnchor,
    updates: tuple[tuple[str, str], ...] | None,
    admitted: set[tuple[str, str]],
    found: list[Mismatch],
) -> None:
    """Every update the round aggregated must be admitted, by name and digest, on the authorization chain."""
    if updates is None:  # no readable manifest (reported already): at least count
        if len(admitted) < anchor.participant_count:
            found.append(Mismatch(
                round_index, "decisions",
                f"round {round_index} aggregated {anchor.participant_count} update(s) but the authorization chain records "
                f"{len(admitted)} admission decision(s) for it (decision batch missing or incomplete)",
            ))  # fmt: skip
        return
    missing = [site for site, digest in updates if (site_key(site).hex(), digest.lower()) not in admitted]
    if missing:
        found.append(Mismatch(
            round_index, "decisions",
            f"round {round_index} aggregated {len(updates)} update(s) but the authorization chain records no admission "
            f"of {len(missing)} of them ({', '.join(missing[:5])}{', …' if len(missing) > 5 else ''}): decision batch missing "
            "or not about these updates",
        ))  # fmt: skip


def audit_verify(session: ChainSession, store: ArtifactStore, run_id: str) -> VerifyReport:
    """Recompute every Merkle root and artifact hash of `run_id`; report each mismatch, every anchored round
    whose admission decisions are missing from the authorization chain — and every planned round without
    an anchor and a missing final lineage, when the run's config.yaml (checked against the registered
    config hash) is beside the artifact store."""
    started = time.perf_counter()
    found: list[Mismatch] = []
    run = session.data.run(run_id)
    if run is None:
        found.append(Mismatch(0, "run", f"run {run_id!r} is not registered on the data chain"))
        return VerifyReport(run_id, 0, 0, tuple(found), time.perf_counter() - started)
    checked = rounds = 0
    admitted = _admitted_updates(session, run_id)
    updates: dict[int, tuple[tuple[str, str], ...]] = {}
    for round_index in range(1, run.last_round + 1):
        anchor = session.data.anchor(run_id, round_index)
        if anchor is None:
            found.append(Mismatch(round_index, "round", f"round {round_index} has no anchor (gap before round {run.last_round})"))
            continue
        checked += _verify_round(anchor, store, run_id, found, updates)
        _check_admissions(round_index, anchor, updates.get(round_index), admitted.get(round_index, set()), found)
        rounds += 1
    models = session.data.models_of_run(run_id)
    planned = _planned_rounds(run, store, found)
    if planned is not None:  # completeness: the registered plan, not only what happens to be on chain
        if planned > run.last_round:
            first = run.last_round + 1
            which = f"round {first}" if first == planned else f"rounds {first}..{planned}"
            found.append(Mismatch(
                first, "round",
                f"{which} of {planned} planned not anchored (the run stopped after round {run.last_round}, "
                "or its anchors are still queued: `medtwin chain flush`)",
            ))  # fmt: skip
        elif planned < run.last_round:
            found.append(Mismatch(planned + 1, "round", f"round {run.last_round} is anchored, but the registered plan has {planned} rounds"))
        if not models:
            found.append(Mismatch(run.last_round, "model", "no final model lineage is recorded (the run did not finish, or it is still queued)"))
    for model in models:
        if store.exists(model.model_hash):
            checked += 1
            try:
                actual = store.hash_unverified(model.model_hash)
            except ArtifactError as error:
                found.append(Mismatch(model.round_index, "model", str(error)))
                continue
            if actual != model.model_hash:
                found.append(Mismatch(model.round_index, "model", f"stored model {model.model_hash} now hashes to {actual}"))
    completeness = (
        f"checked against the registered plan ({planned} rounds)" if planned is not None
        else "not checked: no config matching the registered config hash beside or in the artifact store"
    )  # fmt: skip
    return VerifyReport(run_id, rounds, checked, tuple(found), time.perf_counter() - started, completeness)
