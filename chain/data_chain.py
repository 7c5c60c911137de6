"""`DataChain`: the typed facade of ProvenanceLedger (the data chain).

Per round at most two transactions: `commit_datasets` (only when a site's manifest is new or
changed) and `anchor_round`. A round's anchor is `mined` once in a block and `finalized` once that
block is durable (anvil: in the node's state dump; rpc: chain.confirmations deep).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from web3 import Web3

from .accounts import ChainAccount
from .encoding import ZERO32, as_bytes32, run_key, site_key
from .errors import ChainConflictError, ChainError, ChainUnavailableError
from .records import (
    DatasetCommitment,
    ModelRecord,
    ReleaseRecord,
    RoundAnchor,
    RoundStatus,
    RunRecord,
    RunRegistration,
    WriteReceipt,
)
from .writer import ContractGateway

__all__ = ["MAX_DATASETS_PER_TX", "DataChain", "anchor_call_args"]

MAX_DATASETS_PER_TX = 1024


def _hex(value: bytes) -> str:
    return bytes(value).hex()


def anchor_call_args(anchor: RoundAnchor) -> list[Any]:
    """ProvenanceLedger.anchor_round arguments for `anchor`, in ABI order."""
    return [
        run_key(anchor.run_id),
        int(anchor.round_index),
        as_bytes32(anchor.update_root, what="update root"),
        as_bytes32(anchor.aggregate_hash, what="aggregate hash"),
        as_bytes32(anchor.manifest_hash, what="round manifest hash"),
        as_bytes32(anchor.participants_hash, what="participants hash"),
        int(anchor.participant_count),
        as_bytes32(anchor.epsilon_hash, what="epsilon hash"),
        int(anchor.max_epsilon_micro),
        int(anchor.he_error_bound_pico),
    ]


class DataChain(ContractGateway):
    """ProvenanceLedger on the data chain. `admin`/`coordinator` may be None (read-only use)."""

    def __init__(self, *args: Any, admin: ChainAccount | None = None, coordinator: ChainAccount | None = None, **kwargs: Any) -> None:
        signers = tuple(account for account in (admin, coordinator) if account is not None)
        super().__init__(*args, signers=signers, **kwargs)
        self.admin, self.coordinator = admin, coordinator
        # (run key, site key) -> manifest hash this session read on chain or mined there itself: a run's dataset
        # commitments are written by its one coordinator (this session), so a commit is skipped without a read
        self._datasets: dict[tuple[bytes, bytes], bytes] = {}

    # -- admin ---------------------------------------------------------------------------------

    def set_writer(self, account: str, *, enabled: bool = True) -> WriteReceipt:
        return self.write(self.admin, "set_writer", [Web3.to_checksum_address(account), enabled], role="admin")

    # -- coordinator (ledger writer) -------------------------------------------------------------

    def register_run(self, registration: RunRegistration) -> WriteReceipt:
        if len(registration.run_id.encode()) > 128 or len(registration.task.encode()) > 64:
            raise ChainError("run id must be <= 128 bytes and task name <= 64 bytes to be registered on chain")
        args = [
            run_key(registration.run_id),
            registration.run_id,
            registration.task,
            as_bytes32(registration.config_hash, what="config hash"),
            as_bytes32(registration.code_hash, what="code hash"),
            as_bytes32(registration.dp_params_hash, what="DP parameters hash"),
            as_bytes32(registration.he_params_hash, what="HE parameters hash"),
        ]
        return self.write(self.coordinator, "register_run", args, role="coordinator")

    def commit_datasets(self, *, run_id: str, manifests: Mapping[str, str | bytes], background: bool = False) -> WriteReceipt | None:
        """Commit dataset-manifest hashes (site id -> sha256); skips unchanged ones, None if all were.
        `background`: see `ContractGateway.write`."""
        if len(manifests) > MAX_DATASETS_PER_TX:
            raise ChainError(f"{len(manifests)} dataset commitments exceed {MAX_DATASETS_PER_TX} per transaction")
        key = run_key(run_id)
        changed: dict[bytes, bytes] = {}
        for site_id in sorted(manifests):
            manifest = as_bytes32(manifests[site_id], what=f"dataset manifest hash of site {site_id!r}")
            if self._known_dataset(key, site_key(site_id)) != manifest:
                changed[site_key(site_id)] = manifest
        if not changed:
            return None
        args = [key, list(changed), list(changed.values())]
        receipt = self.write(self.coordinator, "commit_datasets", args, role="coordinator", background=background)
        if receipt.mined:
            self.on_mined("commit_datasets", args)
        return receipt

    def on_mined(self, method: str, args: list[Any]) -> None:
        if method == "commit_datasets":  # (run key, site keys, manifest hashes)
            self._datasets.update({(bytes(args[0]), bytes(site)): bytes(manifest) for site, manifest in zip(args[1], args[2], strict=True)})

    def _known_dataset(self, key: bytes, site: bytes) -> bytes | None:
        for queued in reversed(self.queued("commit_datasets")):
            if queued[0] == key and site in queued[1]:
                return queued[2][queued[1].index(site)]
        if (key, site) in self._datasets:
            return self._datasets[(key, site)]
        try:
            known = bytes(self.call("datasets", key, site))
        except ChainError:
            return None  # unreachable: commit again, the write will be queued
        if known != ZERO32:
            self._datasets[(key, site)] = known
        return known

    def anchor_round(self, anchor: RoundAnchor, *, background: bool = False) -> WriteReceipt:
        """Anchor one round (reverts on chain if this (run, round) is already anchored); `background`: see
        `ContractGateway.write` — the anchor counts as queued (`round_status`, `last_anchor`) until mined."""
        return self.write(self.coordinator, "anchor_round", anchor_call_args(anchor), role="coordinator", background=background)

    def record_lineage(self, *, model_hash: str | bytes, parent_hash: str | bytes = "", run_id: str, round_index: int) -> WriteReceipt:
        parent = as_bytes32(parent_hash, what="parent model hash") if parent_hash else ZERO32
        args = [as_bytes32(model_hash, what="model hash"), parent, run_key(run_id), int(round_index)]
        return self.write(self.coordinator, "record_lineage", args, role="coordinator")

    def release_model(self, *, model_hash: str | bytes, run_id: str, site_id: str) -> WriteReceipt:
        args = [as_bytes32(model_hash, what="model hash"), run_key(run_id), site_key(site_id)]
        return self.write(self.coordinator, "release_model", args, role="coordinator")

    # -- reads -----------------------------------------------------------------------------------

    def is_writer(self, account: str) -> bool:
        return bool(self.call("writers", Web3.to_checksum_address(account)))

    def run(self, run_id: str) -> RunRecord | None:
        return self.run_by_key(run_key(run_id))

    def run_by_key(self, key: bytes) -> RunRecord | None:
        name, task, config, code, dp, he, registered_at, rounds_anchored, last_round = self.call("runs", key)
        if registered_at == 0:
            return None
        return RunRecord(name, _hex(key), task, _hex(config), _hex(code), _hex(dp), _hex(he), registered_at, rounds_anchored, last_round)

    def anchor(self, run_id: str, round_index: int) -> RoundAnchor | None:
        fields = self.read("anchors", run_key(run_id), int(round_index))
        root, aggregate, manifest, participants, count, epsilon, max_eps, he_bound, anchored_at = fields
        if anchored_at == 0:
            return None
        return RoundAnchor(
            run_id, int(round_index), _hex(root), _hex(aggregate), _hex(manifest), _hex(participants),
            int(count), _hex(epsilon), int(max_eps), int(he_bound), int(anchored_at),
        )

    def anchors(self, run_id: str) -> list[RoundAnchor]:
        record = self.run(run_id)
        if record is None:
            return []
        found = (self.anchor(run_id, round_index) for round_index in range(1, record.last_round + 1))
        return [anchor for anchor in found if anchor is not None]

    def round_status(self, run_id: str, round_index: int) -> RoundStatus:
        """finalized = anchor durable; mined = on chain, the node could still lose it; queued = waiting in the
        outbox; missing = none of these; unknown = chain down."""
        key = run_key(run_id)
        if any(args[0] == key and args[1] == round_index for args in self.queued("anchor_round")):
            return RoundStatus.QUEUED
        try:
            if self.anchor(run_id, round_index) is None:
                return RoundStatus.MISSING
            # conservative: every block up to the head is durable (the anchor's own block is not looked up)
            return RoundStatus.FINALIZED if self.durable_block() >= self.client.block_number() else RoundStatus.MINED
        except ChainUnavailableError:
            return RoundStatus.UNKNOWN

    def dataset_commitments(self, run_id: str) -> list[DatasetCommitment]:
        events = self.client.logs(
            self.contract.events.DatasetCommitted, from_block=self.deploy_block, argument_filters={"run_id": run_key(run_id)}
        )
        return [
            DatasetCommitment(run_id, _hex(e["args"]["site_key"]), _hex(e["args"]["manifest_hash"]), int(e["args"]["timestamp"]), int(e["blockNumber"]))
            for e in events
        ]

    def private_runs_of_site(self, site_id: str) -> list[str]:
        """Runs this site contributed to (its dataset commitments) whose anchors record a privacy spend
        (epsilon > 0): the data chain's witness of a site's budget history, which deleting the site's
        ledger cannot erase."""
        events = self.client.logs(
            self.contract.events.DatasetCommitted, from_block=self.deploy_block, argument_filters={"site_key": site_key(site_id)}
        )
        runs = []
        for key in dict.fromkeys(bytes(event["args"]["run_id"]) for event in events):
            record = self.run_by_key(key)
            if record is None or record.last_round == 0:
                continue
            if int(self.call("anchors", key, record.last_round)[6]) > 0:  # max_epsilon_micro
                runs.append(record.run_id)
        return runs

    def model(self, model_hash: str | bytes) -> ModelRecord | None:
        key = as_bytes32(model_hash, what="model hash")
        parent, run, round_index, recorded_at = self.call("models", key)
        if recorded_at == 0:
            return None
        parent_hex = "" if bytes(parent) == ZERO32 else _hex(parent)
        return ModelRecord(_hex(key), parent_hex, _hex(run), int(round_index), int(recorded_at))

    def lineage(self, model_hash: str | bytes) -> list[ModelRecord]:
        """The model and its ancestors, newest first (stops at a root or an unrecorded parent)."""
        chain: list[ModelRecord] = []
        record = self.model(model_hash)
        while record is not None and len(chain) < 10_000:
            chain.append(record)
            record = self.model(record.parent_hash) if record.parent_hash else None
        return chain

    def origin(self, model_hash: str | bytes, run_id: str) -> ModelRecord | None:
        """The model's lineage record in run `run_id` (a model may come out of several runs)."""
        key = as_bytes32(model_hash, what="model hash")
        parent, run, round_index, recorded_at = self.call("origins", key, run_key(run_id))
        if recorded_at == 0:
            return None
        parent_hex = "" if bytes(parent) == ZERO32 else _hex(parent)
        return ModelRecord(_hex(key), parent_hex, _hex(run), int(round_index), int(recorded_at))

    def origins_of(self, model_hash: str | bytes) -> list[ModelRecord]:
        """Every run that recorded this model, oldest first."""
        key = as_bytes32(model_hash, what="model hash")
        events = self.client.logs(self.contract.events.LineageRecorded, from_block=self.deploy_block, argument_filters={"model_hash": key})
        return [
            ModelRecord(_hex(key), "" if bytes(e["args"]["parent_hash"]) == ZERO32 else _hex(e["args"]["parent_hash"]),
                        _hex(e["args"]["run_id"]), int(e["args"]["round_index"]), int(e["args"]["timestamp"]))
            for e in events
        ]  # fmt: skip

    def models_of_run(self, run_id: str) -> list[ModelRecord]:
        events = self.client.logs(
            self.contract.events.LineageRecorded, from_block=self.deploy_block, argument_filters={"run_id": run_key(run_id)}
        )
        records = (self.origin(bytes(event["args"]["model_hash"]), run_id) for event in events)
        return [record for record in records if record is not None]

    def release(self, model_hash: str | bytes) -> ReleaseRecord | None:
        key = as_bytes32(model_hash, what="model hash")
        site, run, released_at = self.call("releases", key)
        if released_at == 0:
            return None
        return ReleaseRecord(_hex(key), _hex(run), _hex(site), int(released_at))

    # -- outbox replay -------------------------------------------------------------------------

    def is_applied(self, method: str, args: list[Any], sender: str) -> bool:
        if method == "anchor_round":
            on_chain = self.call("anchors", args[0], args[1])
            if int(on_chain[8]) == 0:
                return False
            # applied only if every field is the queued one: same updates with another aggregate (or manifest,
            # epsilon, ...) is a conflicting anchor, never "already applied" (it would leave the outbox unreported)
            anchored = [bytes(value) if isinstance(value, bytes) else int(value) for value in list(on_chain)[:8]]
            queued = [bytes(value) if isinstance(value, bytes | bytearray) else int(value) for value in args[2:10]]
            if anchored != queued:
                raise ChainConflictError(
                    f"data chain: round {args[1]} of run key {args[0].hex()} is already anchored with update root "
                    f"{bytes(on_chain[0]).hex()} and aggregate {bytes(on_chain[1]).hex()}, the queued anchor has "
                    f"{args[2].hex()} and {args[3].hex()} (or differs in another field); the queued one is kept in the "
                    "failed outbox file for investigation"
                )
            return True
        if method == "register_run":
            return int(self.call("runs", args[0])[6]) != 0
        if method == "commit_datasets":
            return all(bytes(self.call("datasets", args[0], site)) == manifest for site, manifest in zip(args[1], args[2], strict=True))
        if method == "record_lineage":  # (model, parent, run key, round)
            return int(self.call("origins", args[0], args[2])[3]) != 0
        if method == "release_model":
            return int(self.call("releases", args[0])[2]) != 0
        if method == "set_writer":
            return bool(self.call("writers", args[0])) == args[1]
        raise ChainError(f"data chain: no replay check for queued method {method!r}")
