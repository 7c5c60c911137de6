"""ProvenanceLedger on the embedded EVM: writers, runs, one anchor per round, datasets, lineage."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from collections.abc import Iterator
from pathlib import Path

import pytest

from medtwin.chain import (
    ChainRevertError,
    ChainSession,
    DataChain,
    RoundStatus,
    RunRegistration,
    build_round_anchor,
    dev_account,
    open_session,
    run_key,
)
from medtwin.chain.accounts import ChainAccount
from medtwin.core.artifacts import ArtifactStore
from medtwin.core.config.chain import ChainConfig
from medtwin.core.merkle import merkle_root, update_leaves


def h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def session() -> Iterator[ChainSession]:
    yield open_session(ChainConfig(name="embedded"))


def registration(run_id: str) -> RunRegistration:
    return RunRegistration(run_id, "breast_cancer", h("config"), h("code"), h("dp"), h("he"))


def acting_as(session: ChainSession, account: ChainAccount) -> DataChain:
    session.data.client.fund_from_node(account.address, wei=10**18)
    return DataChain(session.data.client, session.data.contract, admin=account, coordinator=account)


def anchored_round(session: ChainSession, store: ArtifactStore, run_id: str, round_index: int, sites: int = 3):
    updates = {f"hosp{i}": store.put(f"{run_id}/{round_index}/{i}".encode(), kind="update") for i in range(sites)}
    aggregate = store.put(f"{run_id}/{round_index}/aggregate".encode(), kind="aggregate")
    epsilon = {site: 0.25 * round_index + 0.01 * i for i, site in enumerate(updates)}
    anchor, manifest = build_round_anchor(
        store, run_id=run_id, round_index=round_index, update_digests=updates, aggregate_digest=aggregate,
        epsilon_by_site=epsilon, he_error_bound=2e-8,
    )
    return anchor, manifest, session.data.anchor_round(anchor)


def test_run_registration_is_stored_and_unique(session: ChainSession) -> None:
    session.data.register_run(registration("run-reg"))
    record = session.data.run("run-reg")
    assert record is not None
    assert (record.run_id, record.task, record.config_hash, record.he_params_hash) == ("run-reg", "breast_cancer", h("config"), h("he"))
    assert record.run_key == run_key("run-reg").hex() and record.last_round == 0
    with pytest.raises(ChainRevertError, match="already registered"):
        session.data.register_run(registration("run-reg"))


def test_anchor_round_stores_every_field_and_a_second_anchor_reverts(session: ChainSession, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    session.data.register_run(registration("run-anchor"))
    anchor, manifest, receipt = anchored_round(session, store, "run-anchor", 1)
    assert receipt.mined and session.data.round_status("run-anchor", 1) is RoundStatus.FINALIZED
    on_chain = session.data.anchor("run-anchor", 1)
    assert on_chain is not None and on_chain.anchored_at > 0
    assert on_chain.update_root == merkle_root(update_leaves(dict(manifest.updates))).hex()
    assert on_chain.manifest_hash == hashlib.sha256(manifest.to_bytes()).hexdigest()
    assert (on_chain.participant_count, on_chain.max_epsilon_micro, on_chain.he_error_bound_pico) == (3, 270_000, 20_000)
    event = session.data.client.logs(session.data.contract.events.RoundAnchored, from_block=0, argument_filters={"run_id": run_key("run-anchor")})
    assert len(event) == 1 and event[0]["args"]["round_index"] == 1
    assert bytes(event[0]["args"]["update_root"]).hex() == on_chain.update_root
    with pytest.raises(ChainRevertError, match="round already anchored"):
        session.data.anchor_round(anchor)
    with pytest.raises(ChainRevertError, match="round already anchored"):
        session.data.anchor_round(replace(anchor, update_root=h("different")))
    assert session.data.round_status("run-anchor", 2) is RoundStatus.MISSING


def test_anchor_needs_a_registered_run(session: ChainSession, tmp_path: Path) -> None:
    with pytest.raises(ChainRevertError, match="run is not registered"):
        anchored_round(session, ArtifactStore(tmp_path), "run-unknown", 1)


def test_only_writers_write_and_only_the_admin_sets_writers(session: ChainSession, tmp_path: Path) -> None:
    session.data.register_run(registration("run-writers"))
    intruder = acting_as(session, dev_account("ledger-intruder"))
    store = ArtifactStore(tmp_path)
    anchor, _, _ = anchored_round(session, store, "run-writers", 1)
    forged = replace(anchor, round_index=2)
    with pytest.raises(ChainRevertError, match="not an authorized ledger writer"):
        intruder.anchor_round(forged)
    with pytest.raises(ChainRevertError, match="not an authorized ledger writer"):
        intruder.register_run(registration("run-forged"))
    with pytest.raises(ChainRevertError, match="not the ledger admin"):
        intruder.set_writer(dev_account("ledger-intruder").address)
    assert not session.data.is_writer(dev_account("ledger-intruder").address)
    session.data.set_writer(dev_account("ledger-intruder").address)
    assert intruder.anchor_round(forged).mined
    session.data.set_writer(dev_account("ledger-intruder").address, enabled=False)
    assert not session.data.is_writer(dev_account("ledger-intruder").address)


def test_dataset_commitments_batch_in_one_tx_and_skip_unchanged(session: ChainSession) -> None:
    session.data.register_run(registration("run-data"))
    manifests = {f"hosp{i}": h(f"manifest {i}") for i in range(8)}
    receipt = session.data.commit_datasets(run_id="run-data", manifests=manifests)
    assert receipt is not None and receipt.mined
    assert session.data.commit_datasets(run_id="run-data", manifests=manifests) is None, "unchanged -> no tx"
    changed = session.data.commit_datasets(run_id="run-data", manifests={**manifests, "hosp3": h("new data")})
    assert changed is not None and changed.mined
    commitments = session.data.dataset_commitments("run-data")
    assert len(commitments) == 9 and commitments[-1].manifest_hash == h("new data")
    assert {c.block_number for c in commitments[:8]} == {receipt.block_number}


def test_model_lineage_and_release(session: ChainSession) -> None:
    session.data.register_run(registration("run-models"))
    root, child = h("model round 1"), h("model round 2")
    session.data.record_lineage(model_hash=root, run_id="run-models", round_index=1)
    session.data.record_lineage(model_hash=child, parent_hash=root, run_id="run-models", round_index=2)
    chain = session.data.lineage(child)
    assert [(m.model_hash, m.parent_hash, m.round_index) for m in chain] == [(child, root, 2), (root, "", 1)]
    assert {m.model_hash for m in session.data.models_of_run("run-models")} == {root, child}
    with pytest.raises(ChainRevertError, match="already recorded"):
        session.data.record_lineage(model_hash=child, parent_hash=root, run_id="run-models", round_index=2)
    with pytest.raises(ChainRevertError, match="no recorded lineage"):
        session.data.release_model(model_hash=h("unknown"), run_id="run-models", site_id="hosp0")
    assert session.data.release_model(model_hash=child, run_id="run-models", site_id="hosp0").mined
    release = session.data.release(child)
    assert release is not None and release.run_key == run_key("run-models").hex()
    with pytest.raises(ChainRevertError, match="already released"):
        session.data.release_model(model_hash=child, run_id="run-models", site_id="hosp0")


def test_a_round_costs_at_most_two_data_transactions_regardless_of_sites(session: ChainSession, tmp_path: Path) -> None:
    session.data.register_run(registration("run-cost"))
    store = ArtifactStore(tmp_path)
    before = session.data.client.block_number()
    session.data.commit_datasets(run_id="run-cost", manifests={f"hosp{i}": h(f"m{i}") for i in range(32)})
    _, _, receipt = anchored_round(session, store, "run-cost", 1, sites=32)
    assert session.data.client.block_number() - before == 2  # embedded: one block per transaction
    assert receipt.gas_used < 400_000
