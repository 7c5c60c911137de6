"""Base of both gateways: send a contract write now, or queue it durably and replay it in order.

Rules: every write is first appended to the chain's journal (see journal.py); it is sent only when
nothing older is queued for that chain (order is kept); if the node is unreachable it is queued
(never dropped); on replay each entry is first checked against the chain (a write mined just before
a crash is not sent twice); a write the contract refuses on replay moves to the failed file and is
reported. Contract refusals of fresh writes raise at once. Before a write, a backlog in the outbox
or a node that no longer has the block of our last write (it restarted from an older state dump)
triggers a reconcile: journal entries the chain lost are sent again, in order, then the outbox.

`write(..., background=True)` with a running `BackgroundSender` (see sender.py) stops after the durable
part — journal and outbox appended and fsynced — and returns status "sending" ("queued" while the sender
is stalled by an outage); the sender puts the write on chain in outbox order (`send_queued`). The hand-off
takes only the outbox's file lock, never the sending lock the sender holds while a transaction mines; a
reconcile reads the journal and the outbox together (one snapshot under the file lock), so a write handed
off meanwhile is left whole to the next pass. What the chain refuses in the background is kept in
`refused_in_background` for the run to stop on and report (a fresh synchronous write raises instead).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from web3.contract import Contract

from .accounts import ChainAccount
from .client import ChainClient
from .errors import ChainConflictError, ChainError, ChainRevertError, ChainSetupError, ChainUnavailableError, OutboxError
from .journal import Journal, JournalEntry, Watermark
from .outbox import Outbox, PendingWrite, decode_args
from .records import FlushResult, ReconcileResult, WriteReceipt
from .sender import BackgroundSender
from .views import ViewFunctions

__all__ = ["ContractGateway"]

log = logging.getLogger(__name__)


class ContractGateway:
    """One deployed contract on one chain, with optional outbox."""

    def __init__(
        self,
        client: ChainClient,
        contract: Contract,
        *,
        deploy_block: int = 0,
        outbox: Outbox | None = None,
        signers: tuple[ChainAccount, ...] = (),
        signer_resolver: Callable[[str], ChainAccount | None] | None = None,
        journal: Journal | None = None,
        durable_block: Callable[[], int] | None = None,
    ) -> None:
        self.client = client
        self.contract = contract
        self.views = ViewFunctions(contract.address, contract.abi)  # reads and writes, ABI-resolved once
        self.deploy_block = deploy_block
        self.outbox = outbox
        self.journal = journal if outbox is not None else None
        if self.journal is not None and outbox is not None:
            self.journal.guard = outbox.files_locked  # the hand-off appends while a sender marks entries mined
        # the highest block the node cannot lose any more; default: whatever it has mined
        self.durable_block = durable_block or client.block_number
        self._last_mined: tuple[int, str] | None = None  # (block, hash) of this process's last write
        self._signers = {account.address: account for account in signers}
        self._trusted = frozenset(self._signers)  # this session's own role keys: they may sign any replay
        # the journal / outbox entries this process wrote, by seq: an entry is "own" only if it is the very entry
        # (same content) — a number is no proof, anyone who can write the files can reuse one. Outbox entries are
        # forgotten once this process takes them out (mined, applied or refused): a copy planted later is not own.
        self._own_journal: dict[int, JournalEntry] = {}
        self._own_outbox: dict[int, PendingWrite] = {}
        # label -> account, for queued writes of signers this process has not met yet (dev keys)
        self.signer_resolver = signer_resolver
        self.sender: BackgroundSender | None = None
        # seqs of outbox entries this process queued for its sender and nobody tried to send yet (each also in
        # `_own_outbox`): sent without first asking the chain whether they are applied (anything else queued goes
        # through the reconcile, which asks)
        self._fresh: set[int] = set()
        # "seq N method: error" for each write the chain refused while a background sender had it (kept after the sender stops)
        self.refused_in_background: list[str] = []

    @property
    def address(self) -> str:
        return str(self.contract.address)

    def add_signer(self, account: ChainAccount) -> None:
        """Make `account` available to replay its queued writes (e.g. a site's approvals)."""
        self._signers[account.address] = account

    def call(self, method: str, *args: Any) -> Any:
        return self.client.call(getattr(self.contract.functions, method)(*args), what=method)

    def read(self, method: str, *args: Any) -> Any:
        """What `call` answers, fresh from the node, without web3's per-call ABI work (`ViewFunctions`)."""
        return self.client.read([self.views.call(method, *args)], what=method)[0]

    # -- writes -------------------------------------------------------------------------------

    def _send(self, account: ChainAccount, method: str, args: list[Any]) -> WriteReceipt:
        # calldata from the ABI resolved once per contract (web3's contract layer re-resolves it for every write)
        receipt = self.client.transact(account, self.views.write(method, *args), call=method)
        if receipt.block_hash:
            self._last_mined = (receipt.block_number, receipt.block_hash)
        return WriteReceipt(
            status="mined",
            chain=self.client.name,
            call=method,
            tx_hash=receipt.tx_hash,
            block_number=receipt.block_number,
            gas_used=receipt.gas_used,
            block_hash=receipt.block_hash,
        )

    def write(self, account: ChainAccount | None, method: str, args: list[Any], *, role: str, background: bool = False) -> WriteReceipt:
        """Send now and return once mined (or queued, the chain being down); with `background` and a running
        sender, return once the write is durable in the journal and outbox and let the sender send it."""
        if account is None:
            raise ChainSetupError(
                f"{self.client.name} chain: {method} needs the {role} account, but this gateway has none "
                "(opened read-only?) — open the session with the chain config that holds the key"
            )
        self.add_signer(account)
        if self.outbox is None:
            return self._send(account, method, args)
        if background and self.sender is not None:
            return self._hand_to_sender(account, method, args)
        with self.outbox.locked():
            if len(self.outbox) or self._node_lost_our_writes():
                try:
                    self._reconcile_locked()
                except (ChainError, OutboxError, ValueError) as error:  # never lose this write over an older one
                    log.error("%s chain: reconcile before %s failed (%s); the write goes on", self.client.name, method, error)
            journaled = self._journal_append(account, method, args)
            if len(self.outbox):
                reason = "older writes are still queued"
            else:
                try:
                    receipt = self._send(account, method, args)
                except ChainUnavailableError as error:
                    reason = str(error)
                except (ChainRevertError, ChainConflictError):
                    if journaled:  # refused now: a reconcile must not send it again
                        mark = self.journal.watermark()  # type: ignore[union-attr]
                        self.journal.set_watermark(replace(mark, refused=(*mark.refused, journaled)))  # type: ignore[union-attr]
                    raise
                else:
                    if journaled:
                        self.journal.mark_mined(journaled, tx_hash=receipt.tx_hash, block=receipt.block_number)  # type: ignore[union-attr]
                    return receipt
            entry = self.outbox.append(
                method=method, args=args, sender=account.address, reason=reason, signer_label=account.label, journal_seq=journaled,
            )  # fmt: skip
            self._own_outbox[entry.seq] = entry
        log.warning("%s chain: %s queued in %s (seq %d): %s", self.client.name, method, self.outbox.path, entry.seq, reason)
        return WriteReceipt(status="queued", chain=self.client.name, call=method, outbox_seq=entry.seq)

    def _hand_to_sender(self, account: ChainAccount, method: str, args: list[Any]) -> WriteReceipt:
        assert self.outbox is not None and self.sender is not None
        with self.outbox.files_locked():  # not `locked()`: the sender holds that while a transaction mines
            journaled = self._journal_append(account, method, args)
            entry = self.outbox.append(
                method=method, args=args, sender=account.address, reason="sent in the background", signer_label=account.label,
                journal_seq=journaled,
            )  # fmt: skip
            self._own_outbox[entry.seq] = entry
            self._fresh.add(entry.seq)
        self.sender.wake()
        status = "queued" if self.sender.stalled else "sending"
        return WriteReceipt(status=status, chain=self.client.name, call=method, outbox_seq=entry.seq)

    def send_queued(self) -> FlushResult:
        """The background sender's pass: send the outbox in order. Entries this process queued and nobody tried
        yet are sent straight away; anything else (an outage's backlog, a send that failed, a node that lost our
        last block) goes through the reconcile, which checks each entry against the chain first."""
        assert self.outbox is not None
        with self.outbox.locked():
            pending = self.outbox.pending()
            if not all(self._fresh_here(entry) for entry in pending) or self._node_lost_our_writes():
                return self._reconcile_locked().flush
            mined: list[WriteReceipt] = []
            failed: list[str] = []
            for index, entry in enumerate(pending):
                if not self._fresh_here(entry):  # a second line under a number this pass took out: the next pass checks it
                    break
                self._fresh.discard(entry.seq)  # tried from now on: a retry asks the chain first
                args = decode_args(entry.args)
                signer = self._signer_for(entry.sender, entry.signer_label)
                if signer is None:  # never for this process's own writes; kept for the reconcile to report
                    self._fresh.difference_update(item.seq for item in pending)
                    break
                try:
                    receipt = self._send(signer, entry.method, args)
                except ChainUnavailableError as error:
                    self._fresh.difference_update(item.seq for item in pending[index:])
                    log.warning("%s chain: %s (outbox seq %d) waits for the node: %s", self.client.name, entry.method, entry.seq, error)
                    break
                except (ChainError, ValueError) as error:
                    if self._applied_after_all(entry, args):  # another process sent it (and crashed before removing it)
                        self._take_out(entry.seq)
                        continue
                    if entry.journal_seq and self.journal is not None:  # refused: a reconcile must not send it again
                        mark = self.journal.watermark()
                        self.journal.set_watermark(replace(mark, refused=(*mark.refused, entry.journal_seq)))
                    self._take_out(entry.seq, refused=str(error))
                    failed.append(f"seq {entry.seq} {entry.method}: {error}")
                    log.error("%s chain: %s (outbox seq %d) refused: %s", self.client.name, entry.method, entry.seq, error)
                    continue
                if entry.journal_seq and self.journal is not None:
                    self.journal.mark_mined(entry.journal_seq, tx_hash=receipt.tx_hash, block=receipt.block_number)
                self.on_mined(entry.method, args)
                self._take_out(entry.seq)
                mined.append(receipt)
            return FlushResult(mined=tuple(mined), failed=tuple(failed), remaining=len(self.outbox))

    def on_mined(self, method: str, args: list[Any]) -> None:
        """A write the sender put on chain; subclasses update what they remember (before it leaves the outbox)."""

    def queued_count(self) -> int:
        return len(self.outbox) if self.outbox is not None else 0

    def start_sender(self, *, retry_s: float = 2.0) -> BackgroundSender:
        """Start this chain's background sender (once; needs an outbox to keep the writes durable)."""
        if self.outbox is None:
            raise ChainSetupError(f"{self.client.name} chain: background sending needs the outbox (chain.use_outbox=true and a state dir)")
        if self.sender is None:
            self.sender = BackgroundSender(self, retry_s=retry_s)
            self.sender.wake()  # writes an earlier process left queued go first
        return self.sender

    def stop_sender(self, *, drain_s: float) -> int:
        """Wait up to `drain_s` for the queued writes, then stop the sender; the writes left in the outbox."""
        if self.sender is None:
            return self.queued_count()
        left = self.sender.drain(timeout_s=drain_s)
        self.sender.stop()
        self.sender = None
        return left

    def _journal_append(self, account: ChainAccount, method: str, args: list[Any]) -> int:
        if self.journal is None:
            return 0
        entry = self.journal.append(method=method, args=args, sender=account.address, signer_label=account.label)
        self._own_journal[entry.seq] = entry
        return entry.seq

    def flush(self) -> FlushResult:
        """Send the queued writes in order (with a journal: reconcile, which also sends what a node lost)."""
        if self.outbox is None:
            return FlushResult()
        with self.outbox.locked():
            if self.journal is not None:
                return self._reconcile_locked().flush
            return self._flush_locked()

    def _flush_locked(self, *, journaled_through: int | None = None) -> FlushResult:
        """Replay the outbox alone, in order (writes queued before journals existed, or no journal)."""
        assert self.outbox is not None
        self._fresh.clear()  # every entry is checked against the chain here
        mined: list[WriteReceipt] = []
        failed: list[str] = []
        applied = 0
        for entry in self.outbox.pending():
            if journaled_through is not None and entry.journal_seq > journaled_through:
                break  # handed off after the reconcile's snapshot: the next pass takes it, with its journal entry
            signer = self._replay_signer(entry.sender, entry.signer_label, own=self._queued_here(entry))
            if signer is None:
                log.warning("%s chain: outbox seq %d waits for signer %s", self.client.name, entry.seq, entry.sender)
                break
            args = decode_args(entry.args)
            try:
                if self.is_applied(entry.method, args, entry.sender):
                    self._take_out(entry.seq)
                    applied += 1
                    continue
                mined.append(self._send(signer, entry.method, args))
                self._take_out(entry.seq)
            except ChainUnavailableError:
                break
            except ChainError as error:
                self._take_out(entry.seq, refused=str(error))
                failed.append(f"seq {entry.seq} {entry.method}: {error}")
                log.error("%s chain: queued %s refused on replay: %s", self.client.name, entry.method, error)
        return FlushResult(mined=tuple(mined), already_applied=applied, failed=tuple(failed), remaining=len(self.outbox))

    def _replay_signer(self, address: str, label: str, *, own: bool) -> ChainAccount | None:
        """The key that signs a replayed write: this session's own roles (admin, coordinator) and public
        development keys sign any; any other key (a site's, from its kit) only writes this process made —
        never a line someone else put in a journal or outbox this process can read."""
        if address not in self._trusted and not own:
            resolved = self.signer_resolver(label) if label and self.signer_resolver is not None else None
            return resolved if resolved is not None and resolved.address == address else None
        return self._signer_for(address, label)

    def _queued_here(self, entry: PendingWrite) -> bool:
        """This process queued this very entry, and it has not taken it out since."""
        return self._own_outbox.get(entry.seq) == entry

    def _fresh_here(self, entry: PendingWrite) -> bool:
        return entry.seq in self._fresh and self._queued_here(entry)

    def _journaled_here(self, entry: JournalEntry) -> bool:
        """This process journaled this very entry (a "mined" line since only adds the transaction hash)."""
        return self._own_journal.get(entry.seq) == replace(entry, tx_hash="")

    def _take_out(self, seq: int, *, refused: str | None = None) -> None:
        """Remove a queued write (mined or applied), or move it to the failed file (`refused`: the chain's error);
        from then on its number is not this process's any more."""
        assert self.outbox is not None
        if refused is not None:
            self.outbox.move_to_failed(seq, error=refused)
        else:
            self.outbox.remove(seq)
        self._own_outbox.pop(seq, None)
        self._fresh.discard(seq)

    # -- journal ------------------------------------------------------------------------------

    def reconcile(self) -> ReconcileResult:
        """Compare the journal with the chain and send, in journal order, what the chain lost and what is queued."""
        if self.outbox is None:
            return ReconcileResult()
        with self.outbox.locked():
            return self._reconcile_locked()

    def finalize(self, *, wait_s: float) -> ReconcileResult:
        """Reconcile, then wait up to `wait_s` for every journaled write to become durable."""
        result = self.reconcile()
        if self.journal is None or not result.complete:
            return result
        deadline = time.monotonic() + wait_s
        while result.finalized < result.journaled and time.monotonic() < deadline:
            time.sleep(0.2)
            with self.outbox.locked():  # type: ignore[union-attr]
                try:
                    mark = self._promote(self.journal.watermark())
                except ChainError:
                    break
                self.journal.set_watermark(mark)
            result = replace(result, finalized=mark.durable_seq)
        return result

    def _node_lost_our_writes(self) -> bool:
        """Whether the node no longer has the block of this process's last write (restarted from an older dump)."""
        if self._last_mined is None:
            return False
        number, expected = self._last_mined
        try:
            lost = self.client.block_hash(number) != expected
        except ChainError:
            return False  # the write below will queue; the reconcile happens once the node is back
        if lost:
            log.warning("%s chain: block %d of our last write is gone (node restarted from an older state); reconciling", self.client.name, number)
        return lost

    def _on_chain(self, block: int, block_hash: str) -> bool:
        return block == 0 or self.client.block_hash(block) == block_hash

    def _promote(self, mark: Watermark) -> Watermark:
        """Verified becomes durable once the node's durable block reached it (same block hash)."""
        if mark.verified_seq > mark.durable_seq and self.durable_block() >= mark.verified_block and self._on_chain(mark.verified_block, mark.verified_hash):
            return replace(mark, durable_seq=mark.verified_seq, durable_block=mark.verified_block, durable_hash=mark.verified_hash)
        return mark

    def _lost(self, entry: JournalEntry, args: list[Any]) -> bool:
        """A journaled write is lost if its mined transaction is gone (or, never seen mined, it is not applied).
        By receipt, not by state: a write a later one undid (a grant, then its revocation) is not "lost"."""
        if entry.tx_hash:
            return not self.client.has_receipt(entry.tx_hash)
        return not self.is_applied(entry.method, args, entry.sender)

    def _reconcile_locked(self) -> ReconcileResult:
        assert self.outbox is not None
        self._fresh.clear()  # every queued entry is checked against the chain here
        if self.journal is None:
            return ReconcileResult(flush=self._flush_locked())
        journal = self.journal
        mark = journal.watermark()
        try:
            head = self.client.block_number()
            head_hash = self.client.block_hash(head) or ""
            if not self._on_chain(mark.durable_block, mark.durable_hash):
                log.warning("%s chain: block %d (finalized writes up to journal entry %d) is gone; re-checking the whole journal",
                            self.client.name, mark.durable_block, mark.durable_seq)  # fmt: skip
                mark = Watermark()  # refusals are re-checked too
            mark = self._promote(mark)  # an earlier verified point may be durable by now
        except ChainUnavailableError:
            return ReconcileResult(unfinished=1, journaled=journal.last_seq(), finalized=mark.durable_seq, flush=FlushResult(remaining=len(self.outbox)))
        with self.outbox.files_locked():  # one snapshot: a write handed off meanwhile is in both files or in neither
            snapshot = journal.last_seq()
            queued = {entry.journal_seq: entry for entry in self.outbox.pending() if entry.journal_seq}
            gave_up = {entry.journal_seq for entry in self.outbox.failed()}
            journaled = journal.entries(after=mark.durable_seq)
        entries = [
            entry for entry in journaled if entry.seq <= snapshot and entry.seq not in mark.refused and entry.seq not in gave_up
        ]  # fmt: skip
        resent: list[WriteReceipt] = []
        from_outbox: list[WriteReceipt] = []
        refused: list[str] = []
        failed: list[str] = []
        checked = applied = unfinished = 0
        for index, entry in enumerate(entries):  # one pass, in journal order: lost and queued writes alike
            pending = queued.get(entry.seq)
            args = decode_args(entry.args)
            try:
                checked += 1
                if pending is None and not self._lost(entry, args):
                    continue
                if pending is not None and self.is_applied(entry.method, args, entry.sender):  # mined just before a crash
                    self._take_out(pending.seq)
                    applied += 1
                    continue
                # what is sent is the journal entry: it must be this process's own (its queued twin is written with it)
                signer = self._replay_signer(entry.sender, entry.signer_label, own=self._journaled_here(entry))
                if signer is None:
                    log.warning("%s chain: journal entry %d waits for its signer %s", self.client.name, entry.seq, entry.sender)
                    unfinished = len(entries) - index
                    break
                receipt = self._send(signer, entry.method, args)
                journal.mark_mined(entry.seq, tx_hash=receipt.tx_hash, block=receipt.block_number)
                if pending is not None:
                    self._take_out(pending.seq)
                    from_outbox.append(receipt)
                else:
                    resent.append(receipt)
                    log.warning("%s chain: journal entry %d (%s) was lost by the node; sent again", self.client.name, entry.seq, entry.method)
            except ChainUnavailableError:
                unfinished = len(entries) - index
                break
            except (ChainError, ValueError) as error:  # refused, or a malformed entry
                if self._applied_after_all(entry, args):  # e.g. a send that timed out was mined after all
                    if pending is not None:
                        self._take_out(pending.seq)
                    continue
                if pending is not None:
                    self._take_out(pending.seq, refused=str(error))
                    failed.append(f"seq {pending.seq} {entry.method}: {error}")
                else:
                    refused.append(f"journal entry {entry.seq} {entry.method}: {error}")
                    mark = replace(mark, refused=(*mark.refused, entry.seq))
                log.error("%s chain: journal entry %d (%s) could not be sent again: %s", self.client.name, entry.seq, entry.method, error)
        legacy = (  # entries older than journals
            self._flush_locked(journaled_through=snapshot) if not unfinished else FlushResult(remaining=len(self.outbox))
        )  # fmt: skip
        if not unfinished and not legacy.remaining:
            try:
                if self.client.block_hash(head) == head_hash:  # the node was not restored while we checked
                    now = self.client.block_number()
                    mark = replace(mark, verified_seq=snapshot, verified_block=now, verified_hash=self.client.block_hash(now) or "")
                    mark = self._promote(mark)
            except ChainUnavailableError:
                unfinished = 1
        journal.set_watermark(mark)
        flush = FlushResult(
            mined=(*from_outbox, *legacy.mined),
            already_applied=applied + legacy.already_applied,
            failed=(*failed, *legacy.failed),
            remaining=len(self.outbox),
        )
        return ReconcileResult(
            checked=checked, resent=tuple(resent), refused=tuple(refused), unfinished=unfinished,
            journaled=journal.last_seq(), finalized=mark.durable_seq, flush=flush,
        )  # fmt: skip

    def _applied_after_all(self, entry: JournalEntry | PendingWrite, args: list[Any]) -> bool:
        try:
            return bool(self.is_applied(entry.method, args, entry.sender))
        except (ChainError, ValueError):
            return False

    def _signer_for(self, address: str, label: str) -> ChainAccount | None:
        if address not in self._signers and label and self.signer_resolver is not None:
            account = self.signer_resolver(label)
            if account is not None and account.address == address:
                self._signers[address] = account
        return self._signers.get(address)

    def queued(self, method: str) -> list[list[Any]]:
        """Decoded arguments of the queued writes calling `method`."""
        if self.outbox is None:
            return []
        return [decode_args(entry.args) for entry in self.outbox.pending() if entry.method == method]

    def is_applied(self, method: str, args: list[Any], sender: str) -> bool:
        """Whether a queued write is already on chain; subclasses know each method."""
        raise NotImplementedError
