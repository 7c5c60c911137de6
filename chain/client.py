"""One connection to one chain: locally signed transactions, calls, logs, and error mapping.

Connection failures become `ChainUnavailableError` (the gateway queues the write in its outbox);
contract refusals become `ChainRevertError` carrying the contract's assert message.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import requests
from web3 import Web3
from web3.contract import Contract
from web3.types import RPCEndpoint
from eth_tester.exceptions import TransactionFailed, ValidationError
from web3.exceptions import BlockNotFound, ContractLogicError, TransactionNotFound, ProviderConnectionError, TimeExhausted, Web3RPCError

from .accounts import ChainAccount
from .compiler import CompiledContract
from .errors import ChainError, ChainRevertError, ChainUnavailableError
from .views import ViewCall

__all__ = ["CONNECTION_ERRORS", "ChainClient", "TxReceipt"]

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    requests.exceptions.RequestException,
    ProviderConnectionError,
)
GAS_MARGIN = 1.2
SESSION_CONSTANT_REQUESTS = {RPCEndpoint("eth_chainId")}  # the only JSON-RPC answers a session caches
T = TypeVar("T")


@dataclass(frozen=True)
class TxReceipt:
    chain: str
    call: str
    tx_hash: str
    block_number: int
    gas_used: int
    block_hash: str = ""


def _revert_reason(error: Exception) -> str:
    return _revert_reason_text(getattr(error, "message", None) or str(error))


def _revert_reason_text(message: str) -> str:
    for prefix in ("execution reverted: ", "execution reverted", "revert: "):
        if message.startswith(prefix):
            message = message[len(prefix) :]
    return message.strip() or "reverted without a reason"


class ChainClient:
    """web3 on one chain; `name` is "auth" or "data" and appears in every error."""

    def __init__(self, w3: Web3, *, name: str, url: str, tx_timeout_s: float = 60.0, fixed_gas: int | None = None) -> None:
        self.w3, self.name, self.url = w3, name, url
        self.tx_timeout_s = tx_timeout_s
        # In-process chains: skip gas estimation (a slow binary search in py-evm) and preflight
        # with eth_call instead, which still surfaces the revert reason.
        self.fixed_gas = fixed_gas
        self._chain_id: int | None = None
        self._lock = threading.Lock()
        # next nonce per sending account, kept here after one read of the node's pending count; dropped (read
        # again) after any failed send, and a node's "nonce too low" (another process used the account) retries once
        self._nonces: dict[str, int] = {}

    @classmethod
    def http(cls, url: str, *, name: str, rpc_timeout_s: float = 10.0, tx_timeout_s: float = 60.0) -> ChainClient:
        provider = Web3.HTTPProvider(
            url, request_kwargs={"timeout": rpc_timeout_s}, exception_retry_configuration=None,
            # web3's validation middleware asks eth_chainId before every eth_call / estimateGas / send; a node's
            # chain id does not change under one session (rpc: checked against chain.*_chain_id on open)
            cache_allowed_requests=True, cacheable_requests=SESSION_CONSTANT_REQUESTS,
        )  # fmt: skip
        return cls(Web3(provider), name=name, url=url, tx_timeout_s=tx_timeout_s)

    def guarded(self, action: Callable[[], T], *, what: str) -> T:
        """Run one JSON-RPC interaction, mapping transport failures to ChainUnavailableError."""
        try:
            return action()
        except (ContractLogicError, TransactionFailed) as error:
            raise ChainRevertError(self.name, what, _revert_reason(error)) from error
        except (Web3RPCError, ValidationError) as error:
            raise ChainRevertError(self.name, what, f"node rejected the request: {error}") from error
        except CONNECTION_ERRORS as error:
            raise ChainUnavailableError(self.name, self.url, f"{what}: {type(error).__name__}") from error

    @property
    def chain_id(self) -> int:
        if self._chain_id is None:
            self._chain_id = int(self.guarded(lambda: self.w3.eth.chain_id, what="eth_chainId"))
        return self._chain_id

    def is_reachable(self) -> bool:
        try:
            self.guarded(lambda: self.w3.eth.block_number, what="eth_blockNumber")
        except ChainUnavailableError:
            return False
        return True

    def block_number(self) -> int:
        return int(self.guarded(lambda: self.w3.eth.block_number, what="eth_blockNumber"))

    def has_code(self, address: str) -> bool:
        code = self.guarded(lambda: self.w3.eth.get_code(Web3.to_checksum_address(address)), what="eth_getCode")
        return len(code) > 0

    def contract(self, address: str, abi: list[dict[str, Any]]) -> Contract:
        return self.w3.eth.contract(address=Web3.to_checksum_address(address), abi=abi)

    def call(self, function: Any, *, what: str) -> Any:
        return self.guarded(lambda: function.call(), what=what)

    def read(self, calls: Sequence[ViewCall], *, what: str) -> list[Any]:
        """Prepared view calls (`ViewFunctions.call`), answered fresh by the node and decoded, in order; over HTTP
        in one JSON-RPC batch (one round trip, no web3 middleware). An answer that is not a well-formed result of
        the call is an unreadable chain (`ChainUnavailableError`), as is a node that cannot be reached."""
        if not calls:
            return []

        def send() -> list[Any]:
            if isinstance(self.w3.provider, Web3.HTTPProvider):
                answers = self._eth_call_batch(calls, what=what)
            else:  # in-process chains: through web3, still without re-encoding
                answers = [bytes(self.w3.eth.call({"to": call.to, "data": call.data})) for call in calls]
            decoded = []
            for call, answer in zip(calls, answers, strict=True):
                try:
                    decoded.append(call.decode(answer))
                except Exception as error:  # eth_abi's decoding errors: the node's answer is not this function's
                    raise ChainUnavailableError(self.name, self.url, f"{what}: {call.what} answered {len(answer)} bytes that do not decode") from error
            return decoded

        return self.guarded(send, what=what)

    def _eth_call_batch(self, calls: Sequence[ViewCall], *, what: str) -> list[bytes]:
        provider = self.w3.provider
        requests_ = [(RPCEndpoint("eth_call"), [{"to": call.to, "data": call.data}, "latest"]) for call in calls]
        try:
            responses: Any = [provider.make_request(*requests_[0])] if len(calls) == 1 else provider.make_batch_request(requests_)
        except (ValueError, TypeError) as error:  # not JSON, or a batch whose ids do not sort
            raise ChainUnavailableError(self.name, self.url, f"{what}: unreadable answer ({type(error).__name__})") from error
        if not isinstance(responses, list) or len(responses) != len(calls):
            raise ChainUnavailableError(self.name, self.url, f"{what}: {len(calls)} calls got an answer of another shape")
        answers = []
        for call, response in zip(calls, responses, strict=True):
            result = response.get("result") if isinstance(response, dict) else None
            if isinstance(response, dict) and isinstance(response.get("error"), dict):
                error = response["error"]
                raise ChainRevertError(self.name, f"{what}: {call.what}", _revert_reason_text(str(error.get("message", ""))[:300]))
            if not isinstance(result, str) or not result.startswith("0x"):
                raise ChainUnavailableError(self.name, self.url, f"{what}: {call.what} got no result")
            try:
                answers.append(bytes.fromhex(result[2:]))
            except ValueError as error:
                raise ChainUnavailableError(self.name, self.url, f"{what}: {call.what} answered non-hex") from error
        return answers

    def transact(self, account: ChainAccount, function: Any, *, call: str) -> TxReceipt:
        """Sign and send `function` from `account`; return once mined. Raises on revert/outage."""
        with self._lock:
            return self.guarded(lambda: self._send(account, function, call), what=call)

    def _send(self, account: ChainAccount, function: Any, call: str) -> TxReceipt:
        remembered = account.address in self._nonces
        try:
            return self._send_with_nonce(account, function, call)
        except BaseException as error:
            self._nonces.pop(account.address, None)
            # the node refused the remembered nonce (another process sent from this account): read it, send once more
            if remembered and isinstance(error, Exception) and not isinstance(error, ChainError) and "nonce" in str(error).lower():
                return self._send_with_nonce(account, function, call)
            raise

    def _send_with_nonce(self, account: ChainAccount, function: Any, call: str) -> TxReceipt:
        nonce = self._nonces.get(account.address)
        if nonce is None:
            nonce = self.w3.eth.get_transaction_count(account.address, "pending")
        # ABI-encoded once (web3 re-encodes for every estimate/call/build: the slow part of a write); the
        # placeholder gas keeps build_transaction from estimating, the real limit comes from the preflight
        transaction = function.build_transaction({"from": account.address, "chainId": self.chain_id, "nonce": nonce, "gas": 0})
        transaction["gas"] = self._gas_for(transaction)
        signed = account.sign_transaction(transaction)
        self._nonces.pop(account.address, None)  # until this nonce is known to be used
        receipt = self._submit_signed(signed, call)
        self._nonces[account.address] = nonce + 1
        return receipt

    def _gas_for(self, transaction: dict[str, Any]) -> int:
        """The gas limit; the estimate (or, with fixed gas, an eth_call) is also the preflight that surfaces a revert reason."""
        preflight = {key: transaction[key] for key in ("from", "to", "data", "value") if key in transaction}
        if self.fixed_gas is not None:
            self.w3.eth.call(preflight)
            return self.fixed_gas
        return int(self.w3.eth.estimate_gas(preflight) * GAS_MARGIN) + 10_000

    def _submit_signed(self, raw: bytes, call: str) -> TxReceipt:
        tx_hash = self.w3.eth.send_raw_transaction(raw)
        try:
            receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=self.tx_timeout_s, poll_latency=0.05)
        except TimeExhausted as error:
            raise ChainUnavailableError(
                self.name, self.url, f"{call}: not mined within chain.tx_timeout_s={self.tx_timeout_s}"
            ) from error
        if receipt["status"] != 1:
            raise ChainRevertError(self.name, call, f"transaction {tx_hash.hex()} reverted when mined")
        return TxReceipt(
            chain=self.name,
            call=call,
            tx_hash="0x" + bytes(tx_hash).hex().removeprefix("0x"),
            block_number=int(receipt["blockNumber"]),
            gas_used=int(receipt["gasUsed"]),
            block_hash=bytes(receipt["blockHash"]).hex().removeprefix("0x"),
        )

    def deploy(self, account: ChainAccount, compiled: CompiledContract) -> tuple[str, TxReceipt]:
        factory = self.w3.eth.contract(abi=compiled.abi, bytecode=compiled.bytecode)

        def send() -> tuple[str, TxReceipt]:
            constructor = factory.constructor()
            params = {"from": account.address, "chainId": self.chain_id}
            params["nonce"] = self.w3.eth.get_transaction_count(account.address, "pending")
            params["gas"] = self.fixed_gas or int(constructor.estimate_gas({"from": account.address}) * GAS_MARGIN) + 10_000
            raw = account.sign_transaction(constructor.build_transaction(params))
            receipt = self._submit_signed(raw, f"deploy {compiled.name}")
            mined = self.w3.eth.get_transaction_receipt(receipt.tx_hash)
            return str(mined["contractAddress"]), receipt

        with self._lock:
            self._nonces.pop(account.address, None)
            return self.guarded(send, what=f"deploy {compiled.name}")

    def balance(self, address: str) -> int:
        return int(self.guarded(lambda: self.w3.eth.get_balance(Web3.to_checksum_address(address)), what="eth_getBalance"))

    def fund_from_node(self, address: str, *, wei: int) -> None:
        """Top `address` up to `wei` from the node's first unlocked account (dev backends only)."""

        def send() -> None:
            missing = wei - self.w3.eth.get_balance(Web3.to_checksum_address(address))
            if missing <= 0:
                return
            node_accounts = self.w3.eth.accounts
            if not node_accounts:
                raise ChainUnavailableError(self.name, self.url, "node has no unlocked account to fund from")
            tx_hash = self.w3.eth.send_transaction(
                {"from": node_accounts[0], "to": Web3.to_checksum_address(address), "value": missing}
            )
            self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=self.tx_timeout_s, poll_latency=0.05)

        with self._lock:
            self.guarded(send, what=f"fund {address}")

    def logs(self, event: Any, *, from_block: int, argument_filters: dict[str, Any] | None = None) -> list[Any]:
        return list(
            self.guarded(
                lambda: event.get_logs(from_block=from_block, to_block="latest", argument_filters=argument_filters or {}),
                what=f"eth_getLogs {event.event_name}",
            )
        )

    def block_hash(self, block_number: int) -> str | None:
        """The hash of block `block_number` (hex, no 0x), or None if the chain has no such block."""

        def read() -> str | None:
            try:
                block = self.w3.eth.get_block(block_number)
            except BlockNotFound:
                return None
            return None if block is None else bytes(block["hash"]).hex().removeprefix("0x")

        return self.guarded(read, what="eth_getBlockByNumber")

    def has_receipt(self, tx_hash: str) -> bool:
        """Whether the chain holds the mined transaction `tx_hash` (False after a node lost it)."""

        def read() -> bool:
            try:
                return self.w3.eth.get_transaction_receipt(tx_hash) is not None
            except TransactionNotFound:
                return False

        return self.guarded(read, what="eth_getTransactionReceipt")

    def block_timestamp(self, block_number: int) -> int:
        return int(self.guarded(lambda: self.w3.eth.get_block(block_number)["timestamp"], what="eth_getBlockByNumber"))
