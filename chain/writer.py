"""Base of both gateways: send a contract write now, or queue it durably and replay it in order.

Rules: a write is sent only when nothing older is queued for that chain (order is kept); if the
node is unreachable it is queued (never dropped); on replay each entry is first checked against
the chain (a write mined just before a crash is not sent twice); a write the contract refuses on
replay moves to the failed file and is reported. Contract refusals of fresh writes raise at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from web3.contract import Contract

from .accounts import ChainAccount
from .client import ChainClient
from .errors import ChainConflictError, ChainRevertError, ChainSetupError, ChainUnavailableError
from .outbox import Outbox, decode_args
from .records import FlushResult, WriteReceipt

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
    ) -> None:
        self.client = client
        self.contract = contract
        self.deploy_block = deploy_block
        self.outbox = outbox
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
        return WriteReceipt(
            status="mined",
            chain=self.client.name,
            call=method,
            tx_hash=receipt.tx_hash,
            block_number=receipt.block_number,
            gas_used=receipt.gas_used,
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
            self._flush_locked()
            if len(self.outbox):
                reason = "older writes are still queued"
            else:
                try:
                    return self._send(account, method, args)
                except ChainUnavailableError as error:
                    reason = str(error)
            entry = self.outbox.append(method=method, args=args, sender=account.address, reason=reason, signer_label=account.label)
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
