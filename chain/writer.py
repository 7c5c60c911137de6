"""Base of both gateways: send a contract write now, or queue it durably and replay it in order.

Rules: every write is first appended to the chain's journal (see journal.py); it is sent only when
nothing older is queued for that chain (order is kept); if the node is unreachable it is queued
(never dropped); on replay each entry is first checked against the chain (a write mined just before
a crash is not sent twice); a write the contract refuses on replay moves to the failed file and is
reported. Contract refusals of fresh writes raise at once. Before a write, a backlog in the outbox
or a node that no longer has the block of our last write (it restarted from an older state dump)
triggers a reconcile: journal entries the chain lost are sent again, in order, then the outbox.
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
from .errors import ChainConflictError, ChainRevertError, ChainSetupError, ChainUnavailableError
from .journal import Journal, Watermark
from .outbox import Outbox, decode_args
from .records import FlushResult, ReconcileResult, WriteReceipt

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
        self.deploy_block = deploy_block
        self.outbox = outbox
        self.journal = journal if outbox is not None else None
        # the highest block the node cannot lose any more; default: whatever it has mined
        self.durable_block = durable_block or client.block_number
        self._last_mined: tuple[int, str] | None = None  # (block, hash) of this process's last write
        self._signers = {account.address: account for account in signers}
        # label -> account, for queued writes of signers this process has not met yet (dev keys)
        self.signer_resolver = signer_resolver

    @property
    def address(self) -> str:
        return str(self.contract.address)

    def add_signer(self, account: ChainAccount) -> None:
        """Make `account` available to replay its queued writes (e.g. a site's approvals)."""
        self._signers[account.address] = account

    def call(self, method: str, *args: Any) -> Any:
        return self.client.call(getattr(self.contract.functions, method)(*args), what=method)

    # -- writes -------------------------------------------------------------------------------

    def _send(self, account: ChainAccount, method: str, args: list[Any]) -> WriteReceipt:
        receipt = self.client.transact(account, getattr(self.contract.functions, method)(*args), call=method)
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

    def write(self, account: ChainAccount | None, method: str, args: list[Any], *, role: str) -> WriteReceipt:
        if account is None:
            raise ChainSetupError(
                f"{self.client.name} chain: {method} needs the {role} account, but this gateway has none "
                "(opened read-only?) — open the session with the chain config that holds the key"
            )
        self.add_signer(account)
        if self.outbox is None:
            return self._send(account, method, args)
        with self.outbox.locked():
            if len(self.outbox) or self._node_lost_our_writes():
                self._reconcile_locked()
            journaled = self.journal.append(method=method, args=args, sender=account.address, signer_label=account.label) if self.journal else None
            if len(self.outbox):
                reason = "older writes are still queued"
            else:
                try:
                    return self._send(account, method, args)
                except ChainUnavailableError as error:
                    reason = str(error)
                except (ChainRevertError, ChainConflictError):
                    if self.journal is not None and journaled is not None:  # refused now: a reconcile must not re-send it
                        mark = self.journal.watermark()
                        self.journal.set_watermark(replace(mark, refused=(*mark.refused, journaled.seq)))
                    raise
            entry = self.outbox.append(
                method=method, args=args, sender=account.address, reason=reason, signer_label=account.label,
                journal_seq=journaled.seq if journaled else 0,
            )  # fmt: skip
        log.warning("%s chain: %s queued in %s (seq %d): %s", self.client.name, method, self.outbox.path, entry.seq, reason)
        return WriteReceipt(status="queued", chain=self.client.name, call=method, outbox_seq=entry.seq)

    def flush(self) -> FlushResult:
        """Replay queued writes in order; stops at the first one the chain cannot take yet."""
        if self.outbox is None:
            return FlushResult()
        with self.outbox.locked():
            return self._flush_locked()

    def _flush_locked(self) -> FlushResult:
        assert self.outbox is not None
        mined: list[WriteReceipt] = []
        failed: list[str] = []
        applied = 0
        for entry in self.outbox.pending():
            signer = self._signer_for(entry.sender, entry.signer_label)
            if signer is None:
                log.warning("%s chain: outbox seq %d waits for signer %s", self.client.name, entry.seq, entry.sender)
                break
            args = decode_args(entry.args)
            try:
                if self.is_applied(entry.method, args, entry.sender):
                    self.outbox.remove(entry.seq)
                    applied += 1
                    continue
                mined.append(self._send(signer, entry.method, args))
                self.outbox.remove(entry.seq)
            except ChainUnavailableError:
                break
            except (ChainRevertError, ChainConflictError) as error:
                self.outbox.move_to_failed(entry.seq, error=str(error))
                failed.append(f"seq {entry.seq} {entry.method}: {error}")
                log.error("%s chain: queued %s refused on replay: %s", self.client.name, entry.method, error)
        return FlushResult(mined=tuple(mined), already_applied=applied, failed=tuple(failed), remaining=len(self.outbox))

    # -- journal ------------------------------------------------------------------------------

    def reconcile(self) -> ReconcileResult:
        """Compare the journal with the chain: send again, in order, what the chain lost; then the outbox."""
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
                mark = self._promote(self.journal.watermark())
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
        except ChainUnavailableError:
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

    def _reconcile_locked(self) -> ReconcileResult:
        assert self.outbox is not None
        if self.journal is None:
            return ReconcileResult(flush=self._flush_locked())
        mark = self.journal.watermark()
        resent: list[WriteReceipt] = []
        refused: list[str] = []
        checked = unfinished = 0
        try:
            if not self._on_chain(mark.durable_block, mark.durable_hash):
                log.warning("%s chain: block %d (finalized writes up to journal entry %d) is gone; re-checking the whole journal",
                            self.client.name, mark.durable_block, mark.durable_seq)  # fmt: skip
                mark = Watermark(refused=mark.refused)
            # what waits in the outbox (or was refused from it) is sent by the flush below, after these
            in_outbox = {entry.journal_seq for entry in (*self.outbox.pending(), *self.outbox.failed())}
            skipped = set(mark.refused) | in_outbox
            entries = [entry for entry in self.journal.entries(after=mark.durable_seq) if entry.seq not in skipped]
            for index, entry in enumerate(entries):
                signer = self._signer_for(entry.sender, entry.signer_label)
                args = decode_args(entry.args)
                try:
                    checked += 1
                    if self.is_applied(entry.method, args, entry.sender):
                        continue
                    if signer is None:
                        log.warning("%s chain: journal entry %d waits for signer %s", self.client.name, entry.seq, entry.sender)
                        unfinished = len(entries) - index
                        break
                    resent.append(self._send(signer, entry.method, args))
                    log.warning("%s chain: journal entry %d (%s) was missing on chain; sent again", self.client.name, entry.seq, entry.method)
                except ChainUnavailableError:
                    unfinished = len(entries) - index
                    break
                except (ChainRevertError, ChainConflictError) as error:
                    refused.append(f"journal entry {entry.seq} {entry.method}: {error}")
                    mark = replace(mark, refused=(*mark.refused, entry.seq))
                    log.error("%s chain: journal entry %d (%s) is missing and was refused when sent again: %s",
                              self.client.name, entry.seq, entry.method, error)  # fmt: skip
        except ChainUnavailableError:
            unfinished = max(unfinished, 1)
        flushed = self._flush_locked()
        if not unfinished and not flushed.remaining:  # everything journaled is on chain now, at the head
            try:
                head = self.client.block_number()
                mark = replace(mark, verified_seq=self.journal.last_seq(), verified_block=head, verified_hash=self.client.block_hash(head) or "")
                mark = self._promote(mark)
            except ChainUnavailableError:
                unfinished = 1
        self.journal.set_watermark(mark)
        return ReconcileResult(
            checked=checked,
            resent=tuple(resent),
            refused=tuple(refused),
            unfinished=unfinished,
            journaled=self.journal.last_seq(),
            finalized=mark.durable_seq,
            flush=flushed,
        )

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
