"""The background sender: a round's writes return once durable (journal + outbox), one sender per chain puts
them on chain in order; a crash between the durable record and the send resends once, never twice; a site
waits a bounded time for a round's anchor before it refuses the aggregate as unanchored."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from medtwin.chain import ChainSession, DataChain, Decision, Outbox, RunRegistration, build_round_anchor, open_session
from medtwin.chain.journal import Journal
from medtwin.chain.data_chain import anchor_call_args
from medtwin.core.artifacts import ArtifactStore
from medtwin.core.config.chain import ChainConfig
from medtwin.experiments.chain_wiring import ChainApprovalCheck

from test_chain_outbox import unreachable  # tests/unit is on sys.path (rootdir-relative imports)

RUN = "run-bg"


def h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture()
def session(tmp_path: Path) -> ChainSession:
    opened = open_session(ChainConfig(name="embedded"), state_dir=tmp_path / "chain")
    opened.data.register_run(RunRegistration(RUN, "breast_cancer", h("c"), h("k"), h("dp"), h("he")))
    yield opened
    opened.stop_background_sending(drain_s=10.0)


def make_anchor(tmp_path: Path, round_index: int):
    store = ArtifactStore(tmp_path / "artifacts")
    built, _ = build_round_anchor(
        store, run_id=RUN, round_index=round_index, update_digests={"hosp0": store.put(f"u{round_index}".encode(), kind="update")},
        aggregate_digest=store.put(f"a{round_index}".encode(), kind="aggregate"), epsilon_by_site={}, he_error_bound=0.0,
    )  # fmt: skip
    return built


def nonce_of(session: ChainSession, tx_hash: str) -> int:
    return int(session.data.client.w3.eth.get_transaction(tx_hash)["nonce"])


def test_background_writes_return_durable_then_land_in_order_with_increasing_nonces(session: ChainSession, tmp_path: Path) -> None:
    session.start_background_sending()
    anchors = [make_anchor(tmp_path, round_index) for round_index in (1, 2, 3)]
    receipts = [session.data.anchor_round(anchor, background=True) for anchor in anchors]
    decisions = session.auth.record_decisions(
        [Decision(action="admit_update", granted=True, reason="ok", site_id="hosp0", subject=h("u"))], run_id=RUN, round_index=1,
        background=True,
    )  # fmt: skip
    assert {receipt.status for receipt in (*receipts, decisions)} == {"sending"}
    assert not any(receipt.mined for receipt in receipts)
    # durable before it returned: each write is in the journal (and was in the outbox) when the call came back
    journal = session.data.journal
    assert journal is not None and [entry.method for entry in journal.entries()][-3:] == ["anchor_round"] * 3

    assert session.stop_background_sending(drain_s=30.0) == {"auth": 0, "data": 0}
    assert [anchor.round_index for anchor in session.data.anchors(RUN)] == [1, 2, 3]
    assert len(session.data.outbox) == 0 and len(session.auth.outbox) == 0
    mined = [entry for entry in journal.entries() if entry.method == "anchor_round"]
    assert all(entry.tx_hash for entry in mined)  # each marked mined in the journal
    nonces = [nonce_of(session, entry.tx_hash) for entry in mined]
    assert nonces == sorted(nonces) and len(set(nonces)) == 3  # sent in the order handed over, one nonce each
    assert len(session.auth.decisions(run_id=RUN)) == 1


def test_without_a_sender_a_background_write_is_sent_at_once(session: ChainSession, tmp_path: Path) -> None:
    receipt = session.data.anchor_round(make_anchor(tmp_path, 1), background=True)
    assert receipt.mined and session.data.anchor(RUN, 1) is not None


def test_dataset_commitments_sent_in_the_background_are_not_committed_again(session: ChainSession) -> None:
    session.start_background_sending()
    first = session.data.commit_datasets(run_id=RUN, manifests={"hosp0": h("d0")}, background=True)
    assert first is not None and first.status == "sending"
    assert session.data.commit_datasets(run_id=RUN, manifests={"hosp0": h("d0")}, background=True) is None  # still queued: known
    session.data.sender.drain(timeout_s=30.0)
    assert session.data.commit_datasets(run_id=RUN, manifests={"hosp0": h("d0")}, background=True) is None  # mined: remembered
    changed = session.data.commit_datasets(run_id=RUN, manifests={"hosp0": h("d1")}, background=True)
    assert changed is not None and changed.status == "sending"


def test_an_outage_keeps_background_writes_queued_and_they_land_once_the_chain_is_back(session: ChainSession, tmp_path: Path) -> None:
    session.start_background_sending(retry_s=0.05)
    with unreachable(session, "data"):
        session.data.anchor_round(make_anchor(tmp_path, 1), background=True)
        assert session.data.sender.drain(timeout_s=10.0) == 1  # stalled: the write waits in the outbox
        assert session.data.sender.stalled
        assert session.data.anchor_round(make_anchor(tmp_path, 2), background=True).status == "queued"
        assert session.data.sender.drain(timeout_s=10.0) == 2
    assert session.data.sender.drain(timeout_s=30.0) == 0  # the chain is back: the retries send, in order
    assert [anchor.round_index for anchor in session.data.anchors(RUN)] == [1, 2]
    assert not session.data.outbox.failed()


def _restarted(session: ChainSession) -> DataChain:
    """A new coordinator process on the same state folder: a new gateway over the same journal and outbox files."""
    data = session.data
    assert data.outbox is not None and data.journal is not None
    return DataChain(
        data.client, data.contract, outbox=Outbox(data.outbox.path, chain="data"), journal=Journal(data.journal.path, chain="data"),
        admin=data.admin, coordinator=data.coordinator,
    )  # fmt: skip


def test_a_crash_after_the_durable_record_resends_on_the_next_start_and_only_once(session: ChainSession, tmp_path: Path) -> None:
    session.start_background_sending(retry_s=60.0)
    with unreachable(session, "data"):  # the process dies before its sender got the write out
        session.data.anchor_round(make_anchor(tmp_path, 1), background=True)
        session.data.sender.drain(timeout_s=10.0)
        session.stop_background_sending(drain_s=0.0)
    assert session.data.anchor(RUN, 1) is None and len(session.data.outbox) == 1

    restarted = _restarted(session)
    first = restarted.reconcile()  # what every coordinator start and `medtwin chain up|flush` run
    assert first.complete and [receipt.call for receipt in first.flush.mined] == ["anchor_round"]
    assert restarted.anchor(RUN, 1) is not None
    again = _restarted(session).reconcile()
    assert again.flush.mined == () and again.resent == () and again.complete


def test_a_crash_after_the_send_but_before_the_outbox_removal_never_anchors_twice(session: ChainSession, tmp_path: Path) -> None:
    anchor = make_anchor(tmp_path, 1)
    outbox, journal = session.data.outbox, session.data.journal
    assert outbox is not None and journal is not None
    # the durable record, as the hand-off writes it ...
    seq = journal.append(method="anchor_round", args=anchor_call_args(anchor), sender=session.data.coordinator.address, signer_label="coordinator").seq
    outbox.append(method="anchor_round", args=anchor_call_args(anchor), sender=session.data.coordinator.address,
                  reason="sent in the background", signer_label="coordinator", journal_seq=seq)  # fmt: skip
    # ... and the transaction mined, then the process died before marking it and emptying the outbox
    session.data.client.transact(session.data.coordinator, session.data.contract.functions.anchor_round(*anchor_call_args(anchor)), call="anchor_round")

    restarted = _restarted(session)
    result = restarted.reconcile()
    assert result.complete and result.flush.mined == () and result.flush.already_applied == 1
    assert not restarted.outbox.failed() and len(restarted.outbox) == 0
    assert [a.round_index for a in restarted.anchors(RUN)] == [1]


# -- the site's side: waiting for the anchor ----------------------------------------------------------------


class LandsLater:
    """The data chain as a site reads it (`DataChain.anchor`): the anchor appears after `reads_before` reads."""

    def __init__(self, anchor: object, *, reads_before: int) -> None:
        self.anchor_record, self.reads_before, self.reads = anchor, reads_before, 0

    def anchor(self, run_id: str, round_index: int) -> object:
        self.reads += 1
        return self.anchor_record if self.reads > self.reads_before else None


def _site_check(monkeypatch: pytest.MonkeyPatch, chain: LandsLater, *, wait_s: float) -> ChainApprovalCheck:
    monkeypatch.setattr("medtwin.experiments.chain_wiring.shared_readonly", lambda state_dir: SimpleNamespace(data=chain))
    return ChainApprovalCheck(state_dir="unused", anchor_wait_s=wait_s, anchor_poll_s=0.001)


def test_a_site_asked_before_the_anchor_lands_waits_then_accepts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    anchor = make_anchor(tmp_path, 1)
    chain = LandsLater(anchor, reads_before=3)
    check = _site_check(monkeypatch, chain, wait_s=30.0)
    assert check.aggregate_problem(run_id=RUN, server_round=1, aggregate_sha256=anchor.aggregate_hash) is None
    assert chain.reads == 4


def test_an_anchor_that_never_lands_is_refused_after_the_deadline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    anchor = make_anchor(tmp_path, 1)
    chain = LandsLater(anchor, reads_before=10**9)
    problem = _site_check(monkeypatch, chain, wait_s=0.05).aggregate_problem(run_id=RUN, server_round=1, aggregate_sha256=anchor.aggregate_hash)
    assert problem is not None and "not anchored" in problem and "chain.anchor_wait_s" in problem
    assert chain.reads > 1  # it did read again before giving up


def test_an_anchor_of_another_aggregate_is_refused_without_waiting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    anchor = make_anchor(tmp_path, 1)
    chain = LandsLater(anchor, reads_before=0)
    problem = _site_check(monkeypatch, chain, wait_s=30.0).aggregate_problem(run_id=RUN, server_round=1, aggregate_sha256=h("other"))
    assert problem is not None and "not the one anchored" in problem and chain.reads == 1
