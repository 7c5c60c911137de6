"""The journal: every chain write is recorded before it is sent; a reconcile sends again, in order,
what the chain lost, and a write is finalized only once the node's durable block holds it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from medtwin.chain import ChainSession, RunRegistration, build_round_anchor, open_session
from medtwin.chain.records import Role
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


def anchor(tmp_path: Path, round_index: int, *, salt: str = ""):
    store = ArtifactStore(tmp_path / "artifacts")
    update = store.put(f"update {round_index}{salt}".encode(), kind="update")
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
    assert again.resent == () and again.checked == 0  # finalized entries are not checked again


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


def test_a_write_refused_when_first_sent_is_not_sent_again(session: ChainSession, tmp_path: Path) -> None:
    session.data.anchor_round(anchor(tmp_path, 1))
    with pytest.raises(ChainRevertError):  # the contract refuses an anchor with another update root for round 1
        session.data.anchor_round(anchor(tmp_path, 1, salt="other"))
    result = session.data.reconcile()
    assert result.resent == () and result.refused == () and result.complete
    assert journal_of(session).watermark().refused == (3,)  # register_run, anchor, the refused anchor
    journal_of(session).watermark_path.unlink()  # as after a node restored below the finalized point: re-check all
    result = session.data.reconcile()
    assert result.resent == () and len(result.refused) == 1 and "journal entry 3" in result.refused[0]  # named, not sent
    assert session.data.anchor("run-j", 1).update_root == anchor(tmp_path, 1).update_root


def test_a_write_a_later_one_undid_is_not_lost_and_not_sent_again(session: ChainSession) -> None:
    grantee = session.site_account("hosp0").address
    session.auth.issue_grant(grantee=grantee, scope="export", expires_at=2**40)
    session.auth.revoke_grant(grantee=grantee, scope="export")
    journal_of_auth = session.auth.journal
    assert journal_of_auth is not None
    journal_of_auth.watermark_path.unlink(missing_ok=True)  # re-check everything: the grant's state differs from its entry, on purpose
    result = session.auth.reconcile()
    assert result.resent == () and result.checked >= 2
    assert not session.auth.has_grant(grantee=grantee, scope="export")


def test_queued_and_lost_writes_go_out_in_journal_order(session: ChainSession, tmp_path: Path) -> None:
    """register_run queued while the node is down; then an anchor of that run journaled but never queued
    (the process died between the journal and the outbox): the registration must go first."""
    with unreachable(session):
        assert session.data.register_run(RunRegistration("run-k", "breast_cancer", h("c"), h("k"), h("dp"), h("he"))).status == "queued"
    store = ArtifactStore(tmp_path / "artifacts")
    update = store.put(b"update k", kind="update")
    late, _ = build_round_anchor(
        store, run_id="run-k", round_index=1, update_digests={"hosp0": update},
        aggregate_digest=store.put(b"aggregate k", kind="aggregate"), epsilon_by_site={}, he_error_bound=0.0,
    )  # fmt: skip
    journal_of(session).append(method="anchor_round", args=anchor_call_args(late), sender=session.data.coordinator.address, signer_label="coordinator")
    result = session.data.reconcile()
    assert [r.call for r in result.flush.mined] == ["register_run"] and [r.call for r in result.resent] == ["anchor_round"]
    assert result.refused == () and result.flush.failed == () and result.complete
    assert result.flush.mined[0].block_number < result.resent[0].block_number  # sent in journal order
    assert session.data.anchor("run-k", 1) is not None


def test_a_line_planted_in_a_shared_journal_is_never_signed_with_a_sites_key(session: ChainSession, tmp_path: Path) -> None:
    """A hostile coordinator writes an approval "by" the site into the journal of a chain folder the site
    also uses; the site's next write must not sign it with the site's own key."""
    from medtwin.chain import ChainAccount, run_key

    site = ChainAccount.from_key(hashlib.sha256(b"hosp0 kit key").digest(), label="site hosp0")
    session.auth.client.fund_from_node(site.address, wei=10**18)
    planted = [run_key("evil-run"), bytes.fromhex(h("evil config")), bytes.fromhex(h("code"))]
    session.auth.journal.append(method="approve_run", args=planted, sender=site.address, signer_label="site hosp0")  # type: ignore[union-attr]
    with unreachable(session, "auth"):  # an outbox backlog: the site's write reconciles first
        session.auth.grant_role(session.auth.coordinator.address, Role.RESEARCHER)
    session.auth.approve_run(site=site, run_id="real-run", config_hash=h("c"), code_hash=h("k"))
    session.auth.reconcile()
    assert session.auth.call("approvals", site.address, run_key("evil-run"))[2] == 0  # never approved
    assert session.auth.call("approvals", site.address, run_key("real-run"))[2] != 0 or len(session.auth.outbox) > 0


def test_a_finalized_point_advances_across_reconciles(session: ChainSession, tmp_path: Path) -> None:
    durable = {"block": 0}
    session.data.durable_block = lambda: durable["block"]
    session.data.anchor_round(anchor(tmp_path, 1))
    assert session.data.reconcile().finalized == 0
    durable["block"] = session.data.client.block_number()  # the dump caught up with the first check
    session.data.anchor_round(anchor(tmp_path, 2))  # ... and more was written since
    result = session.data.reconcile()
    assert result.finalized == 2 and result.checked == 1  # entries 1-2 finalized; only the new one checked


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


def test_a_torn_last_line_is_ignored_then_cut_and_a_damaged_one_is_named(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal-data.jsonl", chain="data")
    journal.append(method="set_writer", args=[b"\x01" * 20, True], sender="0xabc")
    with journal.path.open("a") as handle:
        handle.write('{"seq": 2, "meth')  # a crash during the append: never sent
    assert [entry.seq for entry in journal.entries()] == [1] and journal.last_seq() == 1
    journal.append(method="set_writer", args=[b"\x01" * 20, False], sender="0xabc")  # the next write after the crash
    assert [(entry.seq, entry.args[1]) for entry in journal.entries()] == [(1, True), (2, False)]
    with journal.path.open("a") as handle:
        handle.write(json.dumps({"seq": 3}) + "\n")
    with pytest.raises(OutboxError, match=r"journal-data\.jsonl line 3"):
        journal.entries()


def test_anvil_durability_reads_the_best_block_of_the_state_dump(tmp_path: Path) -> None:
    state = tmp_path / "data-state.json"
    assert anvil_durable_block(state) == -1  # not dumped yet: nothing is durable
    state.write_text(json.dumps({"best_block_number": 12, "blocks": []}))
    assert anvil_durable_block(state) == 12
    state.write_text('{"best_block_number": 1')  # caught mid-write
    assert anvil_durable_block(state) == -1


def test_the_data_chain_witnesses_a_sites_earlier_dp_runs(session: ChainSession, tmp_path: Path) -> None:
    """What a site whose ledger and mark were both deleted cannot erase: its dataset commitments in runs
    whose anchors record a privacy spend."""
    store = ArtifactStore(tmp_path / "witness")
    session.data.register_run(RunRegistration("plain-run", "breast_cancer", h("c2"), h("k"), h("dp"), h("he")))
    for run_id, epsilon in (("run-j", 0.5), ("plain-run", 0.0)):
        session.data.commit_datasets(run_id=run_id, manifests={"hosp0": h(f"data {run_id}")})
        built, _ = build_round_anchor(
            store, run_id=run_id, round_index=1, update_digests={"hosp0": store.put(run_id.encode(), kind="update")},
            aggregate_digest=store.put(b"agg " + run_id.encode(), kind="aggregate"),
            epsilon_by_site={"hosp0": epsilon} if epsilon else {}, he_error_bound=0.0,
        )  # fmt: skip
        session.data.anchor_round(built)
    assert session.data.private_runs_of_site("hosp0") == ["run-j"]  # the DP run, not the plain one
    assert session.data.private_runs_of_site("hosp1") == []

