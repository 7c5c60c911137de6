"""Writes built by hand (selector + eth_abi calldata, signed locally, sent as raw JSON-RPC batches): the same
transaction input, effect and events as web3's contract layer; a write that reverts or runs out of gas when
mined is a refusal (at once when sent synchronously, `refused_in_background` from the sender); a write made
durable and never sent is sent once by the next process. Against a real anvil node (the HTTP path) and the
embedded chain (the in-process path)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from medtwin.chain import ChainSession, RunRegistration, build_round_anchor, open_session
from medtwin.chain.backends import find_anvil
from medtwin.chain.data_chain import anchor_call_args
from medtwin.chain.errors import AnvilNotFoundError, ChainRevertError
from medtwin.chain.lifecycle import chain_down, chain_up
from medtwin.chain.outbox import decode_args
from medtwin.chain.backends.anvil import free_port
from medtwin.core.artifacts import ArtifactStore
from medtwin.core.config.chain import ChainConfig

RUN = "run-raw-writes"


def h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def make_anchor(store: ArtifactStore, round_index: int, *, run_id: str = RUN, aggregate: str = "a"):
    built, _ = build_round_anchor(
        store, run_id=run_id, round_index=round_index,
        update_digests={"hosp0": store.put(f"u{round_index}".encode(), kind="update")},
        aggregate_digest=store.put(f"{aggregate}{round_index}".encode(), kind="aggregate"), epsilon_by_site={}, he_error_bound=0.0,
    )  # fmt: skip
    return built


@pytest.fixture(scope="module")
def anvil_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ChainConfig, Path]]:
    """Two anvil nodes with the contracts deployed; stopped by PID (chain_down) on the way out."""
    try:
        find_anvil()
    except AnvilNotFoundError as error:
        pytest.fail(f"these tests need the anvil binary: {error}")
    state_dir = tmp_path_factory.mktemp("anvil-raw-writes") / "chain"
    config = ChainConfig(name="anvil", auth_port=free_port(), data_port=free_port())
    chain_up(config, state_dir)
    try:
        yield config, state_dir
    finally:
        chain_down(state_dir)


@pytest.fixture()
def anvil(anvil_config: tuple[ChainConfig, Path], request: pytest.FixtureRequest) -> Iterator[tuple[ChainSession, str]]:
    """A coordinator session on the nodes, with a run of its own (each test anchors its own rounds)."""
    config, state_dir = anvil_config
    session = open_session(config, state_dir=state_dir)
    run_id = f"{RUN}-{request.node.name}"[:120]
    session.data.register_run(RunRegistration(run_id, "vitals", h("c"), h("k"), h("dp"), h("he")))
    yield session, run_id
    session.stop_background_sending(drain_s=10.0)


def test_every_write_gets_the_calldata_web3_encodes(tmp_path: Path) -> None:
    session = open_session(ChainConfig(name="embedded"), state_dir=tmp_path / "chain")
    session.data.register_run(RunRegistration(RUN, "vitals", h("c"), h("k"), h("dp"), h("he")))
    session.data.commit_datasets(run_id=RUN, manifests={"hosp0": h("d0"), "hosp1": h("d1")})
    session.data.anchor_round(make_anchor(ArtifactStore(tmp_path / "artifacts"), 1))
    session.data.record_lineage(model_hash=h("model"), run_id=RUN, round_index=1)
    session.auth.register_site(site_id="hosp0", address=session.site_account("hosp0").address, key_fingerprint=h("key"))
    session.auth.approve_run(site=session.site_account("hosp0"), run_id=RUN, config_hash=h("c"), code_hash=h("k"))
    session.auth.revoke_site(site_id="hosp0", reason="lost key")
    checked = set()
    for gateway in (session.auth, session.data):
        assert gateway.journal is not None
        for entry in gateway.journal.entries():
            args = decode_args(entry.args)
            assert gateway.views.write(entry.method, *args).data == gateway.contract.encode_abi(entry.method, args=args), entry.method
            checked.add(entry.method)
    assert {"register_run", "commit_datasets", "anchor_round", "record_lineage", "register_site", "approve_run", "revoke_site"} <= checked


def test_a_hand_built_write_mines_with_the_effect_and_events_of_a_web3_built_one(anvil: tuple[ChainSession, str], tmp_path: Path) -> None:
    session, run_id = anvil
    data, store = session.data, ArtifactStore(tmp_path / "artifacts")
    by_hand = data.anchor_round(make_anchor(store, 1, run_id=run_id))  # selector + eth_abi, one JSON-RPC batch per step
    assert by_hand.mined

    # the same write of round 2 the way web3 builds it: contract function -> build_transaction -> sign -> send
    args = anchor_call_args(make_anchor(store, 2, run_id=run_id))
    w3, coordinator = data.client.w3, data.coordinator
    assert coordinator is not None
    built = data.contract.functions.anchor_round(*args).build_transaction({"from": coordinator.address, "nonce": w3.eth.get_transaction_count(coordinator.address, "pending")})
    by_web3 = w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(coordinator.sign_transaction(built)), timeout=30)
    assert by_web3["status"] == 1

    first = anchor_call_args(make_anchor(store, 1, run_id=run_id))
    mined = w3.eth.get_transaction_receipt(by_hand.tx_hash)
    sent = w3.eth.get_transaction(by_hand.tx_hash)
    assert bytes(sent["input"]) == bytes.fromhex(data.contract.encode_abi("anchor_round", args=first)[2:])
    assert sent["type"] == 2 and "maxFeePerGas" in built  # EIP-1559 fees, as web3 fills them
    assert mined["blockNumber"] == by_hand.block_number and mined["gasUsed"] == by_hand.gas_used
    assert bytes(mined["blockHash"]).hex().removeprefix("0x") == by_hand.block_hash

    events = [data.contract.events.RoundAnchored().process_receipt(receipt) for receipt in (mined, by_web3)]
    assert [len(found) for found in events] == [1, 1]
    fields = ("run_id", "round_index", "update_root", "aggregate_hash", "manifest_hash", "participants_hash", "participant_count",
              "epsilon_hash", "max_epsilon_micro", "he_error_bound_pico")  # fmt: skip
    for found, expected in zip(events, (first, args), strict=True):  # each event carries exactly its write's arguments
        assert [found[0]["args"][name] for name in fields] == expected
    assert set(events[0][0]["args"]) == set(events[1][0]["args"])
    assert [data.anchor(run_id, index).aggregate_hash for index in (1, 2)] == [first[3].hex(), args[3].hex()]


def test_a_write_the_contract_refuses_raises_its_reason_and_in_the_background_is_refused(anvil: tuple[ChainSession, str], tmp_path: Path) -> None:
    session, run_id = anvil
    store = ArtifactStore(tmp_path / "artifacts")
    assert session.data.anchor_round(make_anchor(store, 1, run_id=run_id)).mined
    with pytest.raises(ChainRevertError, match="round already anchored"):  # the preflight's revert reason, raw JSON-RPC
        session.data.anchor_round(make_anchor(store, 1, run_id=run_id))

    failed_before = len(session.data.outbox.failed())
    session.start_background_sending(retry_s=0.05)
    conflicting = make_anchor(store, 1, run_id=run_id, aggregate="re-aggregated")  # not "already applied": refused
    assert session.data.anchor_round(conflicting, background=True).status == "sending"
    assert session.data.sender.drain(timeout_s=30.0) == 0
    assert len(session.data.outbox.failed()) == failed_before + 1
    assert any("round already anchored" in refusal for refusal in session.data.refused_in_background)
    assert session.data.anchor_round(make_anchor(store, 2, run_id=run_id), background=True).status == "sending"
    assert session.data.sender.drain(timeout_s=30.0) == 0  # the nonce the refusal did not use is the next write's
    assert session.data.anchor(run_id, 2) is not None


def test_a_write_that_runs_out_of_gas_when_mined_is_a_refusal(anvil: tuple[ChainSession, str], tmp_path: Path) -> None:
    session, run_id = anvil
    store = ArtifactStore(tmp_path / "artifacts")
    client = session.data.client
    client.fixed_gas = 60_000  # above the intrinsic gas, far below an anchor's storage writes: the preflight passes
    try:
        with pytest.raises(ChainRevertError, match="out of gas"):
            session.data.anchor_round(make_anchor(store, 1, run_id=run_id))
        assert session.data.anchor(run_id, 1) is None

        failed_before = len(session.data.outbox.failed())
        session.start_background_sending(retry_s=0.05)
        assert session.data.anchor_round(make_anchor(store, 1, run_id=run_id), background=True).status == "sending"
        assert session.data.sender.drain(timeout_s=30.0) == 0
        assert len(session.data.outbox.failed()) == failed_before + 1 and session.data.anchor(run_id, 1) is None
        assert any("out of gas" in refusal for refusal in session.data.refused_in_background)
        journal = session.data.journal
        assert journal is not None and journal.entries()[-1].seq in journal.watermark().refused  # never re-sent by a reconcile
    finally:
        client.fixed_gas = None
    assert session.data.anchor_round(make_anchor(store, 1, run_id=run_id)).mined  # nonces consumed by the failures are accounted for


def test_a_write_made_durable_and_never_sent_is_sent_once_by_the_next_process(
    anvil: tuple[ChainSession, str], anvil_config: tuple[ChainConfig, Path], tmp_path: Path
) -> None:
    session, run_id = anvil
    data = session.data
    assert data.outbox is not None and data.journal is not None and data.coordinator is not None
    args = anchor_call_args(make_anchor(ArtifactStore(tmp_path / "artifacts"), 1, run_id=run_id))
    # the hand-off's durable record (journal, then outbox), then the process dies before its sender sends
    seq = data.journal.append(method="anchor_round", args=args, sender=data.coordinator.address, signer_label="coordinator").seq
    failed_before = len(data.outbox.failed())
    data.outbox.append(method="anchor_round", args=args, sender=data.coordinator.address, reason="sent in the background",
                       signer_label="coordinator", journal_seq=seq)  # fmt: skip

    config, state_dir = anvil_config
    restarted = open_session(config, state_dir=state_dir)
    first = restarted.data.reconcile()
    assert first.complete and len(first.flush.mined) == 1 and restarted.data.anchor(run_id, 1) is not None
    again = open_session(config, state_dir=state_dir).data.reconcile()
    assert again.complete and again.flush.mined == () and again.resent == ()
    assert len(restarted.data.outbox) == 0 and len(restarted.data.outbox.failed()) == failed_before
