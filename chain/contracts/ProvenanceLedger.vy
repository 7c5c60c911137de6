# pragma version 0.4.3
"""
@title ProvenanceLedger (medtwin data chain)
@notice Dataset manifest commitments, run registrations, one anchor per (run, round), model
        lineage per (model, run) — a model two runs produced has two origins — and releases. Only hashes and numbers are written, never data.
        A round anchor's `update_root` is the Merkle root (medtwin.core.merkle) over the sha256
        digests of the accepted update artifacts, ordered by site id; `manifest_hash` is the
        sha256 of the round manifest artifact that lists those digests.
        Scaled numbers: `max_epsilon_micro` = epsilon * 1e6, `he_error_bound_pico` = bound * 1e12.
"""

MAX_BATCH: constant(uint256) = 1024


struct Run:
    name: String[128]
    task: String[64]
    config_hash: bytes32
    code_hash: bytes32
    dp_params_hash: bytes32
    he_params_hash: bytes32
    registered_at: uint256
    rounds_anchored: uint256
    last_round: uint256


struct Anchor:
    update_root: bytes32
    aggregate_hash: bytes32
    manifest_hash: bytes32
    participants_hash: bytes32
    participant_count: uint256
    epsilon_hash: bytes32
    max_epsilon_micro: uint256
    he_error_bound_pico: uint256
    anchored_at: uint256


struct Model:
    parent: bytes32
    run_id: bytes32
    round_index: uint256
    recorded_at: uint256


struct Release:
    site_key: bytes32
    run_id: bytes32
    released_at: uint256


event WriterSet:
    account: indexed(address)
    enabled: bool
    by: indexed(address)

event DatasetCommitted:
    run_id: indexed(bytes32)
    site_key: indexed(bytes32)
    manifest_hash: bytes32
    timestamp: uint256

event RunRegistered:
    run_id: indexed(bytes32)
    name: String[128]
    task: String[64]
    config_hash: bytes32
    code_hash: bytes32
    dp_params_hash: bytes32
    he_params_hash: bytes32
    timestamp: uint256

event RoundAnchored:
    run_id: indexed(bytes32)
    round_index: indexed(uint256)
    update_root: bytes32
    aggregate_hash: bytes32
    manifest_hash: bytes32
    participants_hash: bytes32
    participant_count: uint256
    epsilon_hash: bytes32
    max_epsilon_micro: uint256
    he_error_bound_pico: uint256
    timestamp: uint256

event LineageRecorded:
    model_hash: indexed(bytes32)
    parent_hash: indexed(bytes32)
    run_id: indexed(bytes32)
    round_index: uint256
    timestamp: uint256

event ModelReleased:
    model_hash: indexed(bytes32)
    run_id: indexed(bytes32)
    site_key: indexed(bytes32)
    timestamp: uint256


admin: public(address)
writers: public(HashMap[address, bool])
runs: public(HashMap[bytes32, Run])
run_count: public(uint256)
anchors: public(HashMap[bytes32, HashMap[uint256, Anchor]])
datasets: public(HashMap[bytes32, HashMap[bytes32, bytes32]])
models: public(HashMap[bytes32, Model])
origins: public(HashMap[bytes32, HashMap[bytes32, Model]])
releases: public(HashMap[bytes32, Release])


@deploy
def __init__():
    self.admin = msg.sender


@internal
@view
def _require_writer():
    assert self.writers[msg.sender], "caller is not an authorized ledger writer"


@internal
@view
def _require_run(run_id: bytes32):
    assert self.runs[run_id].registered_at != 0, "run is not registered"


@external
def set_writer(account: address, enabled: bool):
    assert msg.sender == self.admin, "caller is not the ledger admin"
    assert account != empty(address), "account is the zero address"
    self.writers[account] = enabled
    log WriterSet(account=account, enabled=enabled, by=msg.sender)


@external
def register_run(
    run_id: bytes32,
    name: String[128],
    task: String[64],
    config_hash: bytes32,
    code_hash: bytes32,
    dp_params_hash: bytes32,
    he_params_hash: bytes32,
):
    self._require_writer()
    assert run_id != empty(bytes32), "run id is empty"
    assert self.runs[run_id].registered_at == 0, "run already registered"
    self.runs[run_id] = Run(
        name=name, task=task, config_hash=config_hash, code_hash=code_hash,
        dp_params_hash=dp_params_hash, he_params_hash=he_params_hash,
        registered_at=block.timestamp, rounds_anchored=0, last_round=0,
    )
    self.run_count += 1
    log RunRegistered(
        run_id=run_id, name=name, task=task, config_hash=config_hash, code_hash=code_hash,
        dp_params_hash=dp_params_hash, he_params_hash=he_params_hash, timestamp=block.timestamp,
    )


@external
def commit_datasets(run_id: bytes32, site_keys: DynArray[bytes32, MAX_BATCH], manifest_hashes: DynArray[bytes32, MAX_BATCH]):
    self._require_writer()
    self._require_run(run_id)
    assert len(site_keys) == len(manifest_hashes), "batch arrays differ in length"
    assert len(site_keys) > 0, "empty dataset batch"
    for i: uint256 in range(len(site_keys), bound=MAX_BATCH):
        assert site_keys[i] != empty(bytes32), "site key is empty"
        assert manifest_hashes[i] != empty(bytes32), "manifest hash is empty"
        self.datasets[run_id][site_keys[i]] = manifest_hashes[i]
        log DatasetCommitted(run_id=run_id, site_key=site_keys[i], manifest_hash=manifest_hashes[i], timestamp=block.timestamp)


@external
def anchor_round(
    run_id: bytes32,
    round_index: uint256,
    update_root: bytes32,
    aggregate_hash: bytes32,
    manifest_hash: bytes32,
    participants_hash: bytes32,
    participant_count: uint256,
    epsilon_hash: bytes32,
    max_epsilon_micro: uint256,
    he_error_bound_pico: uint256,
):
    self._require_writer()
    self._require_run(run_id)
    assert round_index > 0, "rounds count from 1"
    assert self.anchors[run_id][round_index].anchored_at == 0, "round already anchored"
    assert update_root != empty(bytes32), "update root is empty"
    assert participant_count > 0, "a round needs at least one participant"
    self.anchors[run_id][round_index] = Anchor(
        update_root=update_root, aggregate_hash=aggregate_hash, manifest_hash=manifest_hash,
        participants_hash=participants_hash, participant_count=participant_count,
        epsilon_hash=epsilon_hash, max_epsilon_micro=max_epsilon_micro,
        he_error_bound_pico=he_error_bound_pico, anchored_at=block.timestamp,
    )
    self.runs[run_id].rounds_anchored += 1
    if round_index > self.runs[run_id].last_round:
        self.runs[run_id].last_round = round_index
    log RoundAnchored(
        run_id=run_id, round_index=round_index, update_root=update_root, aggregate_hash=aggregate_hash,
        manifest_hash=manifest_hash, participants_hash=participants_hash,
        participant_count=participant_count, epsilon_hash=epsilon_hash,
        max_epsilon_micro=max_epsilon_micro, he_error_bound_pico=he_error_bound_pico,
        timestamp=block.timestamp,
    )


@external
def record_lineage(model_hash: bytes32, parent_hash: bytes32, run_id: bytes32, round_index: uint256):
    self._require_writer()
    assert model_hash != empty(bytes32), "model hash is empty"
    assert model_hash != parent_hash, "a model cannot be its own parent"
    self._require_run(run_id)
    assert self.origins[model_hash][run_id].recorded_at == 0, "model lineage already recorded for this run"
    origin: Model = Model(parent=parent_hash, run_id=run_id, round_index=round_index, recorded_at=block.timestamp)
    self.origins[model_hash][run_id] = origin
    if self.models[model_hash].recorded_at == 0:
        self.models[model_hash] = origin  # a model's first origin; every run that produced it is in `origins`
    log LineageRecorded(model_hash=model_hash, parent_hash=parent_hash, run_id=run_id, round_index=round_index, timestamp=block.timestamp)


@external
def release_model(model_hash: bytes32, run_id: bytes32, site_key: bytes32):
    self._require_writer()
    assert self.origins[model_hash][run_id].recorded_at != 0, "model has no recorded lineage in this run"
    assert self.releases[model_hash].released_at == 0, "model already released"
    self.releases[model_hash] = Release(site_key=site_key, run_id=run_id, released_at=block.timestamp)
    log ModelReleased(model_hash=model_hash, run_id=run_id, site_key=site_key, timestamp=block.timestamp)
