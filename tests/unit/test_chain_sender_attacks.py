"""Hostile review of the background sender (commit 26a9db3): a write the chain refuses in the background must
stop the run and show in its summary; the checkpoint's anchor check must not miss an anchor that moves from
the outbox to the chain while it reads; a round's hand-off must not wait for a send under way; a site waiting
for an anchor that never lands reads the chain a bounded number of times."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from medtwin.chain import ChainSession, RunRegistration, build_round_anchor, open_session
from medtwin.core.artifacts import ArtifactStore
from medtwin.core.config.chain import ChainConfig
from medtwin.experiments.chain_wiring import ChainApprovalCheck, ChainProvenance

from test_chain_outbox import unreachable  # tests/unit is on sys.path (rootdir-relative imports)

RUN = "run-attack"


def h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture()
def session(tmp_path: Path) -> ChainSession:
    opened = open_session(ChainConfig(name="embedded"), state_dir=tmp_path / "chain")
    opened.data.register_run(RunRegistration(RUN, "breast_cancer", h("c"), h("k"), h("dp"), h("he")))
    yield opened
    opened.stop_background_sending(drain_s=10.0)


def make_anchor(tmp_path: Path, round_index: int, *, salt: str = ""):
    store = ArtifactStore(tmp_path / "artifacts")
    built, _ = build_round_anchor(
        store, run_id=RUN, round_index=round_index,
        update_digests={"hosp0": store.put(f"u{round_index}{salt}".encode(), kind="update")},
        aggregate_digest=store.put(f"a{round_index}{salt}".encode(), kind="aggregate"), epsilon_by_site={}, he_error_bound=0.0,
    )  # fmt: skip
    return built


def test_an_anchor_the_chain_refuses_in_the_background_stops_the_run_and_the_summary_says_so(session: ChainSession, tmp_path: Path) -> None:
    provenance = ChainProvenance(session=session, artifacts_root=tmp_path / "artifacts")
    session.start_background_sending(retry_s=0.05)
    assert session.data.anchor_round(make_anchor(tmp_path, 1), background=True).status == "sending"
    # round 1 again with other updates: the contract refuses it — synchronously this raised in close_round
    assert session.data.anchor_round(make_anchor(tmp_path, 1, salt="forged"), background=True).status == "sending"
    assert session.data.sender.drain(timeout_s=30.0) == 0
    assert len(session.data.outbox.failed()) == 1

    problem = provenance.outage_problem()  # the loop asks this after every round
    assert problem is not None and "refused" in problem and "anchor_round" in problem

    block = provenance.finish_run(run_id=RUN, final_aggregate_digest=h("final"), rounds_completed=1)
    assert block["finalized"] is False  # a refused write is not "every write durable"
    assert any("anchor_round" in refusal for refusal in block["refused"]["data"])


def test_the_last_anchor_is_seen_while_the_sender_moves_it_from_the_outbox_to_the_chain(session: ChainSession, tmp_path: Path) -> None:
    provenance = ChainProvenance(session=session, artifacts_root=tmp_path / "artifacts")
    assert session.data.anchor_round(make_anchor(tmp_path, 1)).mined
    session.start_background_sending(retry_s=60.0)
    second = make_anchor(tmp_path, 2)
    with unreachable(session, "data"):  # round 2's anchor waits in the outbox
        session.data.anchor_round(second, background=True)
        session.data.sender.drain(timeout_s=10.0)
        session.stop_background_sending(drain_s=0.0)
    assert len(session.data.outbox) == 1

    data = session.data
    read_chain = data.anchors

    def chain_read_then_sender_pass(run_id: str):  # the sender mines and removes the anchor just after the chain read
        anchors = read_chain(run_id)
        data.flush()
        return anchors

    data.anchors = chain_read_then_sender_pass  # type: ignore[method-assign]
    assert provenance.last_anchor(RUN) == (2, second.aggregate_hash.lower().removeprefix("0x"))


def test_a_hand_off_does_not_wait_for_a_send_under_way(session: ChainSession, tmp_path: Path) -> None:
    session.start_background_sending(retry_s=60.0)
    client = session.data.client
    real_transact = client.transact
    in_flight, release = threading.Event(), threading.Event()

    def slow_node(account, function, *, call):  # a node that takes its time to mine (a real chain: seconds)
        in_flight.set()
        release.wait(30.0)
        return real_transact(account, function, call=call)

    client.transact = slow_node  # type: ignore[method-assign]
    handed: dict[str, float] = {}
    try:
        session.data.anchor_round(make_anchor(tmp_path, 1), background=True)
        assert in_flight.wait(10.0)  # the sender is sending round 1

        def hand_off() -> None:
            started = time.monotonic()
            session.data.anchor_round(make_anchor(tmp_path, 2), background=True)
            handed["s"] = time.monotonic() - started

        worker = threading.Thread(target=hand_off)
        worker.start()
        worker.join(5.0)
        assert "s" in handed and handed["s"] < 2.0, "round 2's hand-off waited for round 1's send"
    finally:
        release.set()
    worker.join(30.0)
    assert session.data.sender.drain(timeout_s=30.0) == 0
    assert [anchor.round_index for anchor in session.data.anchors(RUN)] == [1, 2]
    journal = session.data.journal
    assert journal is not None and all(entry.tx_hash for entry in journal.entries() if entry.method == "anchor_round")


def test_a_sync_write_during_background_sends_keeps_the_outbox_order(session: ChainSession, tmp_path: Path) -> None:
    session.start_background_sending(retry_s=60.0)
    for round_index in (1, 2, 3):
        session.data.anchor_round(make_anchor(tmp_path, round_index), background=True)
    lineage = session.data.record_lineage(model_hash=h("m"), run_id=RUN, round_index=3)  # synchronous, the sender still busy
    assert lineage.mined
    assert [anchor.round_index for anchor in session.data.anchors(RUN)] == [1, 2, 3]
    journal = session.data.journal
    assert journal is not None
    w3 = session.data.client.w3
    anchor_blocks = [int(w3.eth.get_transaction(entry.tx_hash)["blockNumber"]) for entry in journal.entries() if entry.method == "anchor_round"]
    assert len(anchor_blocks) == 3 and max(anchor_blocks) < lineage.block_number  # queued first, then the lineage
    assert session.data.sender.drain(timeout_s=30.0) == 0 and not session.data.outbox.failed()


class NeverLands:
    def __init__(self) -> None:
        self.reads = 0

    def anchor(self, run_id: str, round_index: int) -> None:
        self.reads += 1


def test_a_hostile_coordinator_asking_about_an_unanchored_round_costs_the_site_few_chain_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    chain = NeverLands()
    monkeypatch.setattr("medtwin.experiments.chain_wiring.shared_readonly", lambda state_dir: SimpleNamespace(data=chain))
    check = ChainApprovalCheck(state_dir="unused", anchor_wait_s=1.0)  # the default poll interval
    started = time.monotonic()
    problem = check.aggregate_problem(run_id=RUN, server_round=7, aggregate_sha256=h("never"))
    assert problem is not None and "not anchored" in problem
    assert 0.9 <= time.monotonic() - started < 3.0  # bounded by the site's own chain.anchor_wait_s
    assert chain.reads <= 20, f"{chain.reads} chain reads in 1 s while waiting for an anchor that never lands"


def test_an_anchor_of_another_aggregate_over_the_same_updates_is_refused_not_taken_as_applied(session: ChainSession, tmp_path: Path) -> None:
    """Same round, same updates, another aggregate (a coordinator that re-aggregated): the chain refuses it, and the
    replay check must not call it "already applied" — that would drop it from the outbox with nobody told."""
    store = ArtifactStore(tmp_path / "artifacts")
    update = store.put(b"u1", kind="update")

    def anchor_of(aggregate: bytes):
        built, _ = build_round_anchor(
            store, run_id=RUN, round_index=1, update_digests={"hosp0": update},
            aggregate_digest=store.put(aggregate, kind="aggregate"), epsilon_by_site={}, he_error_bound=0.0,
        )  # fmt: skip
        return built

    assert session.data.anchor_round(anchor_of(b"a1")).mined
    session.start_background_sending(retry_s=0.05)
    session.data.anchor_round(anchor_of(b"a1 re-aggregated"), background=True)
    assert session.data.sender.drain(timeout_s=30.0) == 0
    assert len(session.data.outbox.failed()) == 1 and session.data.refused_in_background
