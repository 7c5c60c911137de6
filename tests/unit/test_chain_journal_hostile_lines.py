"""Found while reviewing 731e781 (older than it): whoever can write a chain's journal can put a line there whose
number is not an integer ("5", null, 1e999) or whose fields have other types. Every read of the journal (each
reconcile, so each synchronous write with a backlog) then died with a TypeError or OverflowError, and a 1e999 at
the tail killed every append; such a line must be an `OutboxError` naming the file and line, like any damaged
line, and appends must go on past it."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from medtwin.chain import ChainSession, OutboxError, open_session
from medtwin.chain.journal import Journal
from medtwin.core.config.chain import ChainConfig


def h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def journal_line(**changes: object) -> str:
    record = {"seq": 1, "method": "approve_run", "args": [], "sender": "0x" + "ab" * 20, "signer_label": "", "at": time.time()}
    return json.dumps({**record, **changes}, sort_keys=True)


@pytest.fixture()
def session(tmp_path: Path) -> ChainSession:
    return open_session(ChainConfig(name="embedded"), state_dir=tmp_path / "chain")


@pytest.mark.parametrize(
    "line",
    [
        journal_line(seq="5"),
        journal_line(seq=None),
        journal_line(method=3),
        journal_line(args="x"),
        journal_line(seq=2).replace('"seq": 2', '"seq": 1e999'),
        '{"mined": 1e999, "tx_hash": "0xab", "block": 1}',
        '{"mined": "1", "tx_hash": "0xab", "block": 1}',
        '{"mined": 1, "tx_hash": 5, "block": 1}',
    ],
)
def test_a_journal_line_with_a_field_of_the_wrong_type_is_named_and_appends_go_on(tmp_path: Path, line: str) -> None:
    path = tmp_path / "journal-auth.jsonl"
    path.write_text(journal_line(seq=1) + "\n" + line + "\n")
    journal = Journal(path, chain="auth")
    with pytest.raises(OutboxError, match=rf"{path} line 2 is not a valid journal entry"):
        journal.entries()
    assert journal.last_seq() == 1  # the last line with a number this code writes
    assert journal.append(method="approve_run", args=[1], sender="0xabc").seq == 2


def test_a_reconcile_after_a_planted_journal_line_names_it_instead_of_crashing(session: ChainSession) -> None:
    auth = session.auth
    assert auth.journal is not None
    site = session.site_account("hosp0")
    assert auth.register_site(site_id="hosp0", address=site.address, key_fingerprint=h("key")).mined
    with auth.journal.path.open("a") as handle:
        handle.write(journal_line(seq="9") + "\n")
    with pytest.raises(OutboxError, match=rf"{auth.journal.path} line \d+ is not a valid journal entry"):
        auth.reconcile()
