"""Durable outbox: writes made while a chain is unreachable are kept on disk and replayed in order."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from web3 import Web3

from medtwin.chain import (
    AuthChain,
    ChainSession,
    Decision,
    Outbox,
    RoundStatus,
    RunRegistration,
    build_round_anchor,
    dev_account,
    open_session,
)
from medtwin.chain.backends import free_port
from medtwin.chain.auth_chain import decision_batch_args
from medtwin.chain.data_chain import anchor_call_args
from medtwin.chain.outbox import decode_args, encode_args
from medtwin.core.artifacts import ArtifactStore
from medtwin.core.config.chain import ChainConfig


def h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@contextmanager
def unreachable(session: ChainSession, chain: str = "data") -> Iterator[None]:
    """Point one chain's provider at a closed port: real connection errors, then restore."""
    w3 = getattr(session, chain).client.w3
    original = w3.provider
    w3.provider = Web3.HTTPProvider(f"http://127.0.0.1:{free_port()}", request_kwargs={"timeout": 1}, exception_retry_configuration=None)
    try:
        yield
    finally:
        w3.provider = original


@pytest.fixture()
def session(tmp_path: Path) -> ChainSession:
    opened = open_session(ChainConfig(name="embedded"), state_dir=tmp_path / "chain")
    opened.data.register_run(RunRegistration("run-o", "breast_cancer", h("c"), h("k"), h("dp"), h("he")))
    return opened


def make_anchor(store: ArtifactStore, round_index: int, *, salt: str = ""):
    update = store.put(f"update {round_index}{salt}".encode(), kind="update")
    aggregate = store.put(f"aggregate {round_index}{salt}".encode(), kind="aggregate")
    anchor, _ = build_round_anchor(
        store, run_id="run-o", round_index=round_index, update_digests={"hosp0": update},
        aggregate_digest=aggregate, epsilon_by_site={}, he_error_bound=0.0,
    )
    return anchor


def test_outbox_entries_survive_a_new_instance_and_keep_bytes(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox-data.jsonl", chain="data")
    with outbox.locked():
        first = outbox.append(method="anchor_round", args=[b"\x01" * 32, 1, [b"\x02" * 32]], sender="0xabc")
        second = outbox.append(method="anchor_round", args=[b"\x03" * 32, 2, []], sender="0xabc")
    reopened = Outbox(tmp_path / "outbox-data.jsonl", chain="data")
    assert [entry.seq for entry in reopened.pending()] == [first.seq, second.seq] == [1, 2]
    assert decode_args(reopened.pending()[0].args) == [b"\x01" * 32, 1, [b"\x02" * 32]]
    assert oct((tmp_path / "outbox-data.jsonl").stat().st_mode & 0o777) == "0o600"
    with reopened.locked():
        reopened.remove(1)
    assert [entry.seq for entry in Outbox(tmp_path / "outbox-data.jsonl", chain="data").pending()] == [2]
    assert encode_args([True, "x", b"\xff"]) == [True, "x", {"b": "ff"}]


def test_unreachable_chain_queues_in_order_and_flush_finalizes(session: ChainSession, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    anchors = [make_anchor(store, index) for index in (1, 2, 3)]
    with unreachable(session):
        receipts = [session.data.anchor_round(anchor) for anchor in anchors[:2]]
        assert [receipt.status for receipt in receipts] == ["queued", "queued"]
        assert session.data.round_status("run-o", 1) is RoundStatus.QUEUED, "queued is not finalized"
        lines = (session.state_dir / "outbox-data.jsonl").read_text().splitlines()
        assert [json.loads(line)["args"][1] for line in lines] == [1, 2]
    assert session.data.round_status("run-o", 1) is RoundStatus.QUEUED
    # The next write first replays the queue, then goes out itself: order is kept.
    third = session.data.anchor_round(anchors[2])
    assert third.mined
    rounds = {index: session.data.anchor("run-o", index) for index in (1, 2, 3)}
    assert all(rounds.values())
    assert rounds[1].update_root == anchors[0].update_root
    events = session.data.client.logs(session.data.contract.events.RoundAnchored, from_block=0)
    assert [event["args"]["round_index"] for event in events] == [1, 2, 3]
    assert session.data.round_status("run-o", 2) is RoundStatus.FINALIZED
    assert len(session.data.outbox) == 0


def test_explicit_flush_reports_what_was_mined(session: ChainSession, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    with unreachable(session):
        assert session.data.anchor_round(make_anchor(store, 1)).status == "queued"
        assert session.flush()["data"].remaining == 1, "flush while down keeps the entry"
    result = session.flush()["data"]
    assert [receipt.call for receipt in result.mined] == ["anchor_round"] and result.remaining == 0


def test_replay_skips_a_write_already_mined_before_a_crash(session: ChainSession, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    anchor = make_anchor(store, 1)
    assert session.data.anchor_round(anchor).mined
    # Simulate: the process queued it, crashed after mining, and restarts with the entry still there.
    with session.data.outbox.locked():
        session.data.outbox.append(method="anchor_round", args=anchor_call_args(anchor), sender=session.data.coordinator.address)
    result = session.flush()["data"]
    assert (result.already_applied, result.mined, result.remaining) == (1, (), 0)


def test_a_conflicting_queued_anchor_moves_to_failed_not_lost(session: ChainSession, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    assert session.data.anchor_round(make_anchor(store, 1)).mined
    other = make_anchor(store, 1, salt="-other")
    with session.data.outbox.locked():
        session.data.outbox.append(method="anchor_round", args=anchor_call_args(other), sender=session.data.coordinator.address)
    result = session.flush()["data"]
    assert len(result.failed) == 1 and "already anchored" in result.failed[0]
    failed = session.data.outbox.failed()
    assert len(failed) == 1 and decode_args(failed[0].args)[2] == bytes.fromhex(other.update_root)



def test_auth_decisions_queue_and_replay_exactly_once(session: ChainSession) -> None:
    decisions = [Decision("admit_update", True, "ok", site_id="hosp0"), Decision("reject_update", False, "replay", site_id="hosp1")]
    with unreachable(session, "auth"):
        assert session.auth.record_decisions(decisions, run_id="run-o", round_index=1).status == "queued"
    first = session.flush()["auth"]
    assert len(first.mined) == 1 and first.remaining == 0
    assert [(d.action, d.reason) for d in session.auth.decisions(run_id="run-o")] == [("admit_update", "ok"), ("reject_update", "replay")]
    with session.auth.outbox.locked():  # the same batch queued again (e.g. crash before removal)
        session.auth.outbox.append(method="record_decisions", args=decision_batch_args(decisions, run_id="run-o", round_index=1), sender=session.auth.coordinator.address)
    assert session.flush()["auth"].already_applied == 1
    assert len(session.auth.decisions(run_id="run-o")) == 2, "a replayed batch must not duplicate events"



def test_a_new_gateway_replays_a_queued_site_approval_with_the_sites_dev_key(session: ChainSession) -> None:
    site = session.site_account("hosp-late")
    session.auth.register_site(site_id="hosp-late", address=site.address, key_fingerprint=h("key"))
    with unreachable(session, "auth"):
        receipt = session.auth.approve_run(site=site, run_id="run-o", config_hash=h("c"), code_hash=h("k"))
        assert receipt.status == "queued"
    # A fresh gateway (as after a restart) has never seen the site's key: without a way to find it
    # the entry waits; with the dev-key resolver the outbox's signer label is enough.
    without_keys = AuthChain(session.auth.client, session.auth.contract, outbox=Outbox(session.auth.outbox.path, chain="auth"))
    assert without_keys.flush().remaining == 1
    assert not without_keys.is_admitted(site_id="hosp-late", run_id="run-o")
    fresh = AuthChain(
        session.auth.client, session.auth.contract, outbox=Outbox(session.auth.outbox.path, chain="auth"),
        admin=session.auth.admin, coordinator=session.auth.coordinator, signer_resolver=dev_account,
    )
    assert fresh.flush().remaining == 0
    assert fresh.is_admitted(site_id="hosp-late", run_id="run-o")


def test_round_status_is_unknown_not_missing_while_the_chain_is_down(session: ChainSession, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    assert session.data.anchor_round(make_anchor(store, 1)).mined
    with unreachable(session):
        assert session.data.round_status("run-o", 1) is RoundStatus.UNKNOWN
    assert session.data.round_status("run-o", 1) is RoundStatus.FINALIZED


def test_an_append_numbers_past_every_number_the_outbox_held_and_does_not_read_the_backlog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """seq = the highest number the outbox ever held + 1 (queued, failed, or removed since), from the outbox's first
    and last lines and the failed file (read again only when it changed): through removals, refusals, another
    instance's appends and a torn last line."""
    path = tmp_path / "outbox-data.jsonl"
    outbox, other = Outbox(path, chain="data"), Outbox(path, chain="data")
    rng = random.Random(12)
    highest = 0
    for step in range(120):
        pending = outbox.pending()
        action = rng.random()
        if pending and action < 0.25:
            outbox.remove(rng.choice(pending).seq)
        elif pending and action < 0.35:
            outbox.move_to_failed(rng.choice(pending).seq, error="refused")
        elif action < 0.4:
            with path.open("a") as handle:  # a crash mid-append: no newline, never returned to a caller
                handle.write('{"seq": 99999, "chain": "da')
            appended = (other if step % 2 else outbox).append(method="anchor_round", args=[step], sender="0xabc")
            assert appended.seq == highest + 1 and outbox.pending()[-1] == appended  # the torn line was cut, not joined
            highest = appended.seq
        else:
            highest += 1
            assert (other if step % 2 else outbox).append(method="anchor_round", args=[step], sender="0xabc").seq == highest

    def backlog_read() -> None:
        raise AssertionError("a hand-off read the whole outbox")

    monkeypatch.setattr(outbox, "pending", backlog_read)
    monkeypatch.setattr(outbox, "failed", backlog_read)
    assert outbox.append(method="anchor_round", args=[1], sender="0xabc").seq == highest + 1
