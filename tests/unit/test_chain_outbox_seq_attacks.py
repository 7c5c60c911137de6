"""A line written into a shared outbox or journal under a number this process used must never be signed
with a site's key. The outbox used to number from what its files hold (empty again once everything mined:
numbering restarted), and the gateway took "this process queued seq N" as "this process made the entry at
seq N"; a planted approval under a reused number was signed with the site's own key. Now numbers keep
growing, and an entry is this process's own only if it is the very entry it wrote (while it is queued)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from medtwin.chain import ChainAccount, ChainSession, Decision, Outbox, open_session, run_key
from medtwin.chain.outbox import decode_args, encode_args
from medtwin.core.config.chain import ChainConfig

from test_chain_outbox import unreachable  # tests/unit is on sys.path (rootdir-relative imports)


def h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture()
def session(tmp_path: Path) -> ChainSession:
    return open_session(ChainConfig(name="embedded"), state_dir=tmp_path / "chain")


@pytest.fixture()
def site(session: ChainSession) -> ChainAccount:
    """A site's own chain key (from its kit: not a dev key, not one of the session's roles), registered."""
    account = ChainAccount.from_key(hashlib.sha256(b"hosp0 kit key").digest(), label="site hosp0")
    session.auth.client.fund_from_node(account.address, wei=10**18)
    session.auth.register_site(site_id="hosp0", address=account.address, key_fingerprint=h("hosp0 key"))
    return account


def evil_approval(run_id: str = "evil-run") -> list[object]:
    return [run_key(run_id), bytes.fromhex(h("evil config")), bytes.fromhex(h("code"))]


def plant_outbox_line(path: Path, *, seq: int, site: ChainAccount, journal_seq: int = 0) -> None:
    line = {
        "seq": seq, "chain": "auth", "method": "approve_run", "args": encode_args(evil_approval()), "sender": site.address,
        "queued_at": time.time(), "reason": "", "signer_label": site.label, "journal_seq": journal_seq,
    }  # fmt: skip
    with path.open("a") as handle:
        handle.write(json.dumps(line, sort_keys=True) + "\n")


def approved(session: ChainSession, site: ChainAccount, run_id: str) -> bool:
    return int(session.auth.call("approvals", site.address, run_key(run_id))[2]) != 0


def test_a_line_planted_under_a_mined_entrys_seq_is_not_signed_with_the_sites_key(session: ChainSession, site: ChainAccount) -> None:
    auth = session.auth
    assert auth.outbox is not None
    with unreachable(session, "auth"):
        queued = auth.approve_run(site=site, run_id="real-run", config_hash=h("c"), code_hash=h("k"))
    assert queued.status == "queued"
    assert auth.flush().remaining == 0 and approved(session, site, "real-run")  # mined and removed: the outbox is empty
    plant_outbox_line(auth.outbox.path, seq=queued.outbox_seq, site=site)  # the number this process used
    result = auth.flush()
    assert not approved(session, site, "evil-run"), "a planted line was signed with the site's key"
    assert result.remaining == 1  # it waits for a signer this process does not hand out


def test_an_exact_copy_of_a_mined_entry_is_not_own_any_more(
    session: ChainSession, site: ChainAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone who read the outbox while the site's entry waited puts the same line back once it is mined. For a
    write a later one undid, the chain says "not applied": it must not be signed again with the site's key."""
    auth = session.auth
    assert auth.outbox is not None
    with unreachable(session, "auth"):
        assert auth.approve_run(site=site, run_id="real-run", config_hash=h("c"), code_hash=h("k")).status == "queued"
    copy = auth.outbox.path.read_text().splitlines()[-1]
    assert auth.flush().remaining == 0
    with auth.outbox.path.open("a") as handle:
        handle.write(copy + "\n")
    monkeypatch.setattr(auth, "is_applied", lambda method, args, sender: False)  # as if a later write had undone it
    result = auth.flush()
    assert (result.remaining, result.failed, auth.outbox.failed()) == (1, (), []), "the copy was signed and sent again"


def test_a_journal_line_planted_under_a_seq_this_process_wrote_is_not_signed_with_the_sites_key(
    session: ChainSession, site: ChainAccount
) -> None:
    auth = session.auth
    assert auth.journal is not None
    for run_id in ("real-run", "second-run"):
        assert auth.approve_run(site=site, run_id=run_id, config_hash=h("c"), code_hash=h("k")).mined
    own = auth.journal.entries()[-2]  # the first approval
    planted = {"seq": own.seq, "method": "approve_run", "args": encode_args(evil_approval()), "sender": site.address,
               "signer_label": site.label, "at": time.time()}  # fmt: skip
    with auth.journal.path.open("a") as handle:  # the later line of a number wins when the journal is read
        handle.write(json.dumps(planted, sort_keys=True) + "\n")
    auth.reconcile()
    assert not approved(session, site, "evil-run"), "a planted journal line was signed with the site's key"
    # the journal now ends with an old number: this process's next entry still gets a new one
    highest = own.seq + 1
    assert auth.approve_run(site=site, run_id="third-run", config_hash=h("c"), code_hash=h("k")).mined
    assert auth.journal.entries()[-1].seq == highest + 1 and auth.journal.entries()[-1].method == "approve_run"


def test_a_stale_fresh_seq_does_not_let_a_planted_line_skip_the_checks(session: ChainSession, site: ChainAccount) -> None:
    """The background sender sends entries this process handed off without asking the chain first, with any key
    it holds. An entry handed off, then removed by another process, leaves its number behind; a line planted
    under that number must go through the reconcile, not the fast path."""
    auth = session.auth
    assert auth.outbox is not None
    assert auth.approve_run(site=site, run_id="real-run", config_hash=h("c"), code_hash=h("k")).mined  # the key is now at hand
    auth.sender = SimpleNamespace(wake=lambda: None, stalled=False)  # a sender that has not run its pass yet
    decisions = [Decision(action="admit_update", granted=True, reason="ok", site_id="hosp0", subject=h("u"))]
    handed = auth.record_decisions(decisions, run_id="run-x", round_index=1, background=True)
    auth.sender = None
    Outbox(auth.outbox.path, chain="auth").remove(handed.outbox_seq)  # another process took the entry out
    plant_outbox_line(auth.outbox.path, seq=handed.outbox_seq, site=site)
    auth.send_queued()
    assert not approved(session, site, "evil-run"), "a planted line took the fast path with the site's key"
    batch = next(entry for entry in auth.journal.entries() if entry.method == "record_decisions")  # type: ignore[union-attr]
    assert auth.is_applied(batch.method, decode_args(batch.args), batch.sender)  # the real hand-off is still sent


def test_outbox_numbers_keep_growing_after_it_empties_and_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "outbox-auth.jsonl"
    outbox = Outbox(path, chain="auth")
    first = outbox.append(method="approve_run", args=[1], sender="0xabc")
    second = outbox.append(method="approve_run", args=[2], sender="0xabc")
    outbox.move_to_failed(first.seq, error="refused")
    outbox.remove(second.seq)
    assert outbox.pending() == [] and len(outbox) == 0
    assert outbox.append(method="approve_run", args=[3], sender="0xabc").seq == 3  # not the failed file's 1 + 1
    outbox.remove(3)
    restarted = Outbox(path, chain="auth")  # a new process
    assert restarted.append(method="approve_run", args=[4], sender="0xabc").seq == 4
    path.write_text("")  # emptied behind the process's back: it still never hands out one of its numbers again
    assert restarted.append(method="approve_run", args=[5], sender="0xabc").seq == 5


def test_an_outbox_written_before_numbers_were_kept_loads_and_replays(session: ChainSession) -> None:
    """Older files hold entries only (no record of the highest number); they load, number on, and replay."""
    auth = session.auth
    assert auth.outbox is not None
    site = session.site_account("hosp-old")  # a dev key: any process may replay it
    auth.register_site(site_id="hosp-old", address=site.address, key_fingerprint=h("key"))
    line = {
        "seq": 7, "chain": "auth", "method": "approve_run", "args": encode_args([run_key("old-run"), bytes(32), bytes(32)]),
        "sender": site.address, "queued_at": time.time(), "reason": "node down", "signer_label": site.label, "journal_seq": 0,
    }  # fmt: skip
    auth.outbox.path.write_text(json.dumps(line, sort_keys=True) + "\n")
    assert [entry.seq for entry in auth.outbox.pending()] == [7]
    assert auth.flush().remaining == 0 and approved(session, site, "old-run")
    assert auth.outbox.append(method="approve_run", args=[1], sender=site.address).seq == 8
