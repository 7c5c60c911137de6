"""Whoever can write the outbox or journal files can put any JSON there. A line the code does not write (a
number that is not an integer, a forged ``{"last_seq": N}`` first line) must never crash a flush, an append
or a removal with a TypeError or OverflowError: it is an `OutboxError` naming the file and the line, as for
any other damaged line. Since 731e781 a removal compares every number the file holds (``max``) and an append
reads the first line's ``last_seq``: a string ``"seq"`` (which a removal used to pass over) or a
``last_seq`` of ``1e999`` turned every later removal or append into a crash."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from medtwin.chain import ChainSession, Outbox, OutboxError, open_session
from medtwin.chain.outbox import encode_args
from medtwin.core.config.chain import ChainConfig

from test_chain_outbox import unreachable  # tests/unit is on sys.path (rootdir-relative imports)


def h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def outbox_line(**changes: object) -> str:
    record = {
        "seq": 1, "chain": "auth", "method": "approve_run", "args": encode_args([b"\x01" * 32]), "sender": "0x" + "ab" * 20,
        "queued_at": time.time(), "reason": "", "signer_label": "", "journal_seq": 0,
    }  # fmt: skip
    return json.dumps({**record, **changes}, sort_keys=True)


@pytest.fixture()
def session(tmp_path: Path) -> ChainSession:
    return open_session(ChainConfig(name="embedded"), state_dir=tmp_path / "chain")


@pytest.mark.parametrize("number", ['"2"', "null", "1e999", "[2]", "true", "2.5"])
def test_an_outbox_line_whose_seq_is_not_an_integer_is_named_by_every_operation(tmp_path: Path, number: str) -> None:
    path = tmp_path / "outbox-auth.jsonl"
    path.write_text(outbox_line(seq=1) + "\n" + outbox_line(seq=2).replace('"seq": 2', f'"seq": {number}') + "\n")
    outbox = Outbox(path, chain="auth")
    named = rf"{path} line 2 is not a valid outbox entry"
    with pytest.raises(OutboxError, match=named):
        outbox.pending()
    with pytest.raises(OutboxError, match=named):
        outbox.remove(1)
    with pytest.raises(OutboxError, match=named):
        outbox.append(method="approve_run", args=[1], sender="0xabc")  # the last line names no number: the full read names it


@pytest.mark.parametrize("field,value", [("journal_seq", '"3"'), ("args", "5"), ("queued_at", '"now"'), ("sender", "7")])
def test_an_outbox_line_with_a_field_of_the_wrong_type_is_named(tmp_path: Path, field: str, value: str) -> None:
    path = tmp_path / "outbox-auth.jsonl"
    record = json.loads(outbox_line())
    record[field] = json.loads(value)
    path.write_text(json.dumps(record, sort_keys=True) + "\n")
    with pytest.raises(OutboxError, match=rf"{path} line 1 is not a valid outbox entry .*{field}"):
        Outbox(path, chain="auth").pending()


@pytest.mark.parametrize("value", ["1e999", "Infinity", "NaN", '"7"', "null", "true", "[3]", '{"n": 3}'])
def test_a_forged_last_seq_first_line_is_named_not_a_crash(tmp_path: Path, value: str) -> None:
    """The first line of a rewritten outbox is {"last_seq": <integer>}; anything else there is a damaged line."""
    path = tmp_path / "outbox-auth.jsonl"
    path.write_text(f'{{"last_seq": {value}}}\n')
    outbox = Outbox(path, chain="auth")
    named = rf"{path} line 1 is not a valid outbox entry"
    with pytest.raises(OutboxError, match=named):
        outbox.pending()
    with pytest.raises(OutboxError, match=named):
        outbox.append(method="approve_run", args=[1], sender="0xabc")
    path.write_text(f'{{"last_seq": {value}}}\n' + outbox_line(seq=4) + "\n")
    assert outbox.append(method="approve_run", args=[1], sender="0xabc").seq == 5  # an append reads the last line only
    with pytest.raises(OutboxError, match=named):
        outbox.remove(4)


def test_a_first_line_that_only_starts_like_last_seq_does_not_hide_an_entry(tmp_path: Path) -> None:
    path = tmp_path / "outbox-auth.jsonl"
    path.write_text('{"last_seq": 3, ' + outbox_line(seq=4)[1:] + "\n")
    with pytest.raises(OutboxError, match=rf"{path} line 1 is not a valid outbox entry"):
        Outbox(path, chain="auth").pending()


def test_a_flush_after_a_string_seq_was_planted_names_the_line_instead_of_crashing(session: ChainSession) -> None:
    """Before 731e781 a removal passed over a line numbered "2"; since then it compared it with integers: the flush
    that mined this process's own queued write died with a TypeError (and again on every retry)."""
    auth = session.auth
    assert auth.outbox is not None
    site = session.site_account("hosp0")
    with unreachable(session, "auth"):
        assert auth.register_site(site_id="hosp0", address=site.address, key_fingerprint=h("key")).status == "queued"
    with auth.outbox.path.open("a") as handle:
        handle.write(outbox_line(seq=2).replace('"seq": 2', '"seq": "2"') + "\n")
    with pytest.raises(OutboxError, match=rf"{auth.outbox.path} line 2 is not a valid outbox entry"):
        auth.flush()
