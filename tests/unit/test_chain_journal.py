"""The journal: every chain write is recorded before it is sent; a reconcile sends again, in order,
what the chain lost, and a write is finalized only once the node's durable block holds it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from medtwin.chain import ChainSession, RunRegistration, build_round_anchor, open_session
from medtwin.chain.data_chain import anchor_call_args
from medtwin.chain.errors import ChainRevertError, OutboxError
from medtwin.chain.journal import Journal, anvil_durable_block
from medtwin.core.artifacts import ArtifactStore
from medtwin.core.config.chain import ChainConfig

from test_chain_outbox import unreachable  # tests/unit is on sys.path (rootdir-relative imports)


def h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture()
def session(tmp_path: Path) -> ChainSession:
    opened = open_session(ChainConfig(name="embedded"), state_dir=tmp_path / "chain")
    opened.data.register_run(RunRegistration("run-j", "breast_cancer", h("c"), h("k"), h("dp"), h("he")))
    return opened


def anchor(tmp_path: Path, round_index: int):
    store = ArtifactStore(tmp_path / "artifacts")
    update = store.put(f"update {round_index}".encode(), kind="update")
    aggregate = store.put(f"aggregate {round_index}".encode(), kind="aggregate")
    built, _ = build_round_anchor(
        store, run_id="run-j", round_index=round_index, update_digests={"hosp0": update},
        aggregate_digest=aggregate, epsilon_by_site={}, he_error_bound=0.0,
    )  # fmt: skip
    return built


def journal_of(session: ChainSession) -> Journal:
    assert session.data.journal is not None
    return session.data.journal


def test_every_write_is_journaled_in_order_whether_mined_or_queued(session: ChainSession, tmp_path: Path) -> None:
    session.data.anchor_round(anchor(tmp_path, 1))
    with unreachable(session):
        assert session.data.anchor_round(anchor(tmp_path, 2)).status == "queued"
    entries = journal_of(session).entries()
    assert [entry.method for entry in entries] == ["register_run", "anchor_round", "anchor_round"]
    assert [entry.seq for entry in entries] == [1, 2, 3] and journal_of(session).last_seq() == 3
    assert oct(journal_of(session).path.stat().st_mode & 0o777) == "0o600"


def test_a_write_the_chain_lost_is_sent_again_in_order_and_only_once(session: ChainSession, tmp_path: Path) -> None:
    session.data.anchor_round(anchor(tmp_path, 1))
    journal = journal_of(session)
    # A write that reached the node but not its durable state: in the journal, not on chain.
    lost = anchor(tmp_path, 2)
    journal.append(method="anchor_round", args=anchor_call_args(lost), sender=session.data.coordinator.address, signer_label="coordinator")
    assert session.data.anchor("run-j", 2) is None

    result = session.data.reconcile()
    assert [receipt.call for receipt in result.resent] == ["anchor_round"] and result.complete
    assert session.data.anchor("run-j", 2).update_root == lost.update_root
    again = session.data.reconcile()
    assert again.resent == () and again.checked <= 1  # finalized entries are not checked again


def test_a_write_is_finalized_only_once_the_durable_block_holds_it(session: ChainSession, tmp_path: Path) -> None:
    durable = {"block": 0}
    session.data.durable_block = lambda: durable["block"]  # stands in for the node's state dump
    session.data.anchor_round(anchor(tmp_path, 1))
    result = session.data.reconcile()
    assert result.journaled == 2 and result.finalized == 0
    assert session.data.round_status("run-j", 1).value == "mined"

    durable["block"] = session.data.client.block_number()
    assert session.data.finalize(wait_s=1.0).finalized == 2
    assert session.data.round_status("run-j", 1).value == "finalized"


def test_a_node_restored_below_the_finalized_point_makes_the_reconcile_recheck_everything(session: ChainSession, tmp_path: Path) -> None:
    journal = journal_of(session)
    lost = anchor(tmp_path, 1)
    journal.append(method="anchor_round", args=anchor_call_args(lost), sender=session.data.coordinator.address, signer_label="coordinator")
    # The watermark claims entries 1..2 are durable, at a block the chain no longer has (another history).
    mark = json.loads(journal.watermark_path.read_text()) if journal.watermark_path.exists() else {}
    journal.watermark_path.write_text(json.dumps({**mark, "durable_seq": 2, "durable_block": 1, "durable_hash": "00" * 32}))
    result = session.data.reconcile()
    assert [receipt.call for receipt in result.resent] == ["anchor_round"]
    assert session.data.anchor("run-j", 1) is not None


def test_a_write_refused_when_first_sent_is_not_sent_again(session: ChainSession) -> None:
    with pytest.raises(ChainRevertError):
        session.data.register_run(RunRegistration("run-j", "breast_cancer", h("c"), h("k"), h("dp"), h("he")))  # registered already
    result = session.data.reconcile()
    assert result.resent == () and result.refused == () and result.complete
    assert journal_of(session).watermark().refused == (2,)


def test_the_outbox_backlog_is_sent_after_the_lost_writes_in_journal_order(session: ChainSession, tmp_path: Path) -> None:
    journal = journal_of(session)
    lost = anchor(tmp_path, 1)
    journal.append(method="anchor_round", args=anchor_call_args(lost), sender=session.data.coordinator.address, signer_label="coordinator")
    with unreachable(session):
        assert session.data.anchor_round(anchor(tmp_path, 2)).status == "queued"
    receipt = session.data.anchor_round(anchor(tmp_path, 3))  # the node is back: reconcile first, then this write
    assert receipt.mined
    assert [a.round_index for a in session.data.anchors("run-j")] == [1, 2, 3]
    assert len(session.data.outbox) == 0


def test_a_torn_last_line_is_ignored_and_a_damaged_one_is_named(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal-data.jsonl", chain="data")
    journal.append(method="set_writer", args=[b"\x01" * 20, True], sender="0xabc")
    with journal.path.open("a") as handle:
        handle.write('{"seq": 2, "meth')  # a crash during the append: never sent
    assert [entry.seq for entry in journal.entries()] == [1] and journal.last_seq() == 1
    with journal.path.open("a") as handle:
        handle.write("\n" + json.dumps({"seq": 3}) + "\n")
    with pytest.raises(OutboxError, match=r"journal-data\.jsonl line 2"):
        journal.entries()


def test_anvil_durability_reads_the_best_block_of_the_state_dump(tmp_path: Path) -> None:
    state = tmp_path / "data-state.json"
    assert anvil_durable_block(state) == -1  # not dumped yet: nothing is durable
    state.write_text(json.dumps({"best_block_number": 12, "blocks": []}))
    assert anvil_durable_block(state) == 12
    state.write_text('{"best_block_number": 1')  # caught mid-write
    assert anvil_durable_block(state) == -1
