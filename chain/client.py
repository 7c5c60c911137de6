"""One connection to one chain: locally signed transactions, calls, logs, and error mapping.

Connection failures become `ChainUnavailableError` (the gateway queues the write in its outbox);
contract refusals become `ChainRevertError` carrying the contract's assert message.

A write over HTTP is three JSON-RPC round trips, without web3's contract layer or middleware: one batch for
the preflight (gas estimate — or, with fixed gas, an eth_call — latest block for the fees, tip, and the nonce
unless remembered), the locally signed transaction sent together with the ask for its receipt (an automining
node such as anvil has mined it by then), and the receipt polled only if it was not there. A transaction
mined with status 0 (reverted, or out of gas) is a `ChainRevertError` like a refused preflight.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import requests
from eth_utils import keccak
from web3 import Web3
from web3.contract import Contract
from web3.contract.contract import ContractFunction
from web3.types import RPCEndpoint
from eth_tester.exceptions import TransactionFailed, ValidationError
from web3.exceptions import BlockNotFound, ContractLogicError, TransactionNotFound, ProviderConnectionError, Web3RPCError

from .accounts import ChainAccount
from .compiler import CompiledContract
from .errors import ChainError, ChainRevertError, ChainUnavailableError
from .views import ViewCall, WriteCall

__all__ = ["CONNECTION_ERRORS", "ChainClient", "TxReceipt"]

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    requests.exceptions.RequestException,
    ProviderConnectionError,
)
GAS_MARGIN = 1.2
RECEIPT_POLL_FIRST_S = 0.002  # a node that does not mine at once (not anvil): the receipt is asked again after this,
RECEIPT_POLL_MAX_S = 0.25  # the pause doubling up to this, for at most chain.tx_timeout_s
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

    def transact(self, account: ChainAccount, write: WriteCall | ContractFunction, *, call: str) -> TxReceipt:
        """Sign `write` (calldata built by `ViewFunctions.write`, or a web3 contract function, encoded here) from
        `account` and send it; return once mined. A contract refusal (at the preflight, or a transaction mined with
        status 0: reverted or out of gas) raises `ChainRevertError`, an unreachable node `ChainUnavailableError`."""
        if not isinstance(write, WriteCall):
            write = self._encoded(write)
        with self._lock:
            return self.guarded(lambda: self._send(account, write, call), what=call)

    def _encoded(self, function: ContractFunction) -> WriteCall:
        contract = self.w3.eth.contract(address=function.address, abi=function.contract_abi)
        return WriteCall(what=function.fn_name, to=str(function.address), data=contract.encode_abi(function.fn_name, args=list(function.args)))

    def _send(self, account: ChainAccount, write: WriteCall, call: str) -> TxReceipt:
        remembered = account.address in self._nonces
        try:
            return self._send_with_nonce(account, write, call)
        except BaseException as error:
            self._nonces.pop(account.address, None)
            # the node refused the remembered nonce (another process sent from this account): read it, send once more
            if remembered and isinstance(error, Exception) and not isinstance(error, ChainError) and "nonce" in str(error).lower():
                return self._send_with_nonce(account, write, call)
            raise

    def _send_with_nonce(self, account: ChainAccount, write: WriteCall, call: str) -> TxReceipt:
        request = {"from": account.address, "to": write.to, "data": write.data}
        nonce, gas, fees = self._preflight(request, nonce=self._nonces.get(account.address), call=call)
        transaction = {"to": write.to, "data": write.data, "value": 0, "chainId": self.chain_id, "nonce": nonce, "gas": gas, **fees}
        signed = account.sign_transaction(transaction)
        self._nonces.pop(account.address, None)  # until this nonce is known to be used
        receipt = self._submit_signed(signed, call, gas_limit=gas)
        self._nonces[account.address] = nonce + 1
        return receipt

    def _preflight(self, request: dict[str, Any], *, nonce: int | None, call: str) -> tuple[int, int, dict[str, int]]:
        """(nonce, gas limit, fee fields) for `request`; the gas estimate (with fixed gas: an eth_call) is also the
        preflight that surfaces a revert reason. Over HTTP one JSON-RPC batch: a single round trip to the node."""
        if not isinstance(self.w3.provider, Web3.HTTPProvider):  # in-process chains: through web3
            nonce = self.w3.eth.get_transaction_count(request["from"], "pending") if nonce is None else nonce
            if self.fixed_gas is not None:
                self.w3.eth.call(request)  # type: ignore[arg-type]
                gas = self.fixed_gas
            else:
                gas = int(self.w3.eth.estimate_gas(request) * GAS_MARGIN) + 10_000  # type: ignore[arg-type]
            base_fee = self.w3.eth.get_block("latest").get("baseFeePerGas")
            return nonce, gas, self._fees(base_fee, None)
        requests_ = [
            (RPCEndpoint("eth_call"), [request, "latest"]) if self.fixed_gas is not None else (RPCEndpoint("eth_estimateGas"), [request]),
            (RPCEndpoint("eth_getBlockByNumber"), ["latest", False]),
            (RPCEndpoint("eth_maxPriorityFeePerGas"), []),
        ]
        if nonce is None:
            requests_.append((RPCEndpoint("eth_getTransactionCount"), [request["from"], "pending"]))
        answers = self._rpc_batch(requests_, what=call)
        check, block, priority = answers[0], answers[1], answers[2]
        if "error" in check:
            message = str(check["error"].get("message", ""))[:300]
            if check["error"].get("code") == 3 or message.startswith("execution reverted"):
                raise ChainRevertError(self.name, call, _revert_reason_text(message))
            raise ChainRevertError(self.name, call, f"node rejected the request: {message}")
        gas = self.fixed_gas if self.fixed_gas is not None else int(self._quantity(check, what=call) * GAS_MARGIN) + 10_000
        latest = block.get("result")
        if not isinstance(latest, dict):
            raise ChainUnavailableError(self.name, self.url, f"{call}: the node answered no latest block")
        base_fee = self._quantity({"result": latest["baseFeePerGas"]}, what=call) if latest.get("baseFeePerGas") is not None else None
        suggested = self._quantity(priority, what=call) if "result" in priority else None  # a node without the method: web3's fallback
        if nonce is None:
            nonce = self._quantity(answers[3], what=call)
        return nonce, gas, self._fees(base_fee, suggested)

    def _quantity(self, answer: dict[str, Any], *, what: str) -> int:
        """A JSON-RPC quantity ("0x..."); a node that answers anything else has not answered."""
        try:
            return int(str(answer["result"]), 16)
        except (KeyError, ValueError) as error:
            raise ChainUnavailableError(self.name, self.url, f"{what}: the node answered {str(answer)[:120]} where a number was expected") from error

    def _fees(self, base_fee: int | None, priority_fee: int | None) -> dict[str, int]:
        """As web3 fills them: EIP-1559 (tip, plus twice the latest base fee) or, on a node without base fees, gas price."""
        if base_fee is None:
            return {"gasPrice": int(self.w3.eth.gas_price)}
        tip = int(self.w3.eth.max_priority_fee) if priority_fee is None else priority_fee
        return {"maxPriorityFeePerGas": tip, "maxFeePerGas": tip + 2 * int(base_fee)}

    def _rpc_batch(self, requests_: Sequence[tuple[RPCEndpoint, list[Any]]], *, what: str) -> list[dict[str, Any]]:
        """Raw JSON-RPC over HTTP (no web3 middleware): the node's answers, in order, each {"result": ...} or {"error": {...}}."""
        provider: Any = self.w3.provider
        try:
            responses: Any = [provider.make_request(*requests_[0])] if len(requests_) == 1 else provider.make_batch_request(list(requests_))
        except (ValueError, TypeError) as error:  # not JSON, or a batch whose ids do not sort
            raise ChainUnavailableError(self.name, self.url, f"{what}: unreadable answer ({type(error).__name__})") from error
        if not isinstance(responses, list) or len(responses) != len(requests_) or not all(isinstance(item, dict) for item in responses):
            raise ChainUnavailableError(self.name, self.url, f"{what}: {len(requests_)} requests got an answer of another shape")
        for response in responses:
            if "error" in response and not isinstance(response["error"], dict):
                raise ChainUnavailableError(self.name, self.url, f"{what}: malformed error answer")
        return list(responses)

    def _submit_signed(self, raw: bytes, call: str, *, gas_limit: int | None = None) -> TxReceipt:
        if isinstance(self.w3.provider, Web3.HTTPProvider):
            # the receipt is asked in the same batch (the hash is the signed bytes' keccak): an automining node that
            # answers a batch in order has it already; otherwise it is polled
            tx_hash = "0x" + keccak(raw).hex()
            sent, receipt = self._rpc_batch(
                [(RPCEndpoint("eth_sendRawTransaction"), ["0x" + raw.hex()]), (RPCEndpoint("eth_getTransactionReceipt"), [tx_hash])], what=call
            )  # fmt: skip
            if "error" in sent:  # e.g. "nonce too low": `_send` reads the nonce again and retries once
                raise Web3RPCError(f"{call}: {str(sent['error'].get('message', ''))[:300]}")
            if str(sent.get("result", "")).lower() != tx_hash:
                raise ChainUnavailableError(self.name, self.url, f"{call}: eth_sendRawTransaction answered {str(sent)[:120]}, not {tx_hash}")
            mined = self._receipt_of(receipt, tx_hash, call) if "error" not in receipt else None  # not indexed yet: polled
        else:
            tx_hash = "0x" + bytes(self.w3.eth.send_raw_transaction(raw)).hex().removeprefix("0x")
            mined = None
        status, block_number, gas_used, block_hash = mined or self._wait_for_receipt(tx_hash, call)
        if status != 1:
            spent = f"gas used {gas_used} of the limit {gas_limit}" if gas_limit else f"gas used {gas_used}"
            out_of_gas = ": out of gas" if gas_limit is not None and gas_used >= gas_limit else ""
            raise ChainRevertError(self.name, call, f"transaction {tx_hash} reverted when mined ({spent}{out_of_gas})")
        return TxReceipt(chain=self.name, call=call, tx_hash=tx_hash, block_number=block_number, gas_used=gas_used, block_hash=block_hash)

    def _wait_for_receipt(self, tx_hash: str, call: str) -> tuple[int, int, int, str]:
        """(status, block, gas used, block hash) once mined: at once on an automining node, else polled (the pause
        doubling from RECEIPT_POLL_FIRST_S to RECEIPT_POLL_MAX_S) for at most chain.tx_timeout_s."""
        deadline = time.monotonic() + self.tx_timeout_s
        pause_s = RECEIPT_POLL_FIRST_S
        while True:
            mined = self._receipt(tx_hash, call)
            if mined is not None:
                return mined
            if time.monotonic() >= deadline:
                raise ChainUnavailableError(self.name, self.url, f"{call}: not mined within chain.tx_timeout_s={self.tx_timeout_s}")
            time.sleep(min(pause_s, max(0.0, deadline - time.monotonic())))
            pause_s = min(2 * pause_s, RECEIPT_POLL_MAX_S)

    def _receipt(self, tx_hash: str, call: str) -> tuple[int, int, int, str] | None:
        if not isinstance(self.w3.provider, Web3.HTTPProvider):
            try:
                receipt = self.w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
            except TransactionNotFound:
                return None
            block_hash = bytes(receipt["blockHash"]).hex().removeprefix("0x")
            return int(receipt["status"]), int(receipt["blockNumber"]), int(receipt["gasUsed"]), block_hash
        (answer,) = self._rpc_batch([(RPCEndpoint("eth_getTransactionReceipt"), [tx_hash])], what=call)
        return self._receipt_of(answer, tx_hash, call)

    def _receipt_of(self, answer: dict[str, Any], tx_hash: str, call: str) -> tuple[int, int, int, str] | None:
        """A raw eth_getTransactionReceipt answer: None while not mined, else (status, block, gas used, block hash)."""
        receipt = answer.get("result")
        if receipt is None and "error" not in answer:
            return None
        if not isinstance(receipt, dict):
            raise ChainUnavailableError(self.name, self.url, f"{call}: unreadable receipt of {tx_hash}")
        try:
            numbers = [int(str(receipt[key]), 16) for key in ("status", "blockNumber", "gasUsed")]
            block_hash = str(receipt["blockHash"]).removeprefix("0x")
        except (KeyError, ValueError) as error:
            raise ChainUnavailableError(self.name, self.url, f"{call}: unreadable receipt of {tx_hash}") from error
        return numbers[0], numbers[1], numbers[2], block_hash

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
            if isinstance(self.w3.provider, Web3.HTTPProvider):  # raw JSON-RPC: asked before every background pass
                (answer,) = self._rpc_batch([(RPCEndpoint("eth_getBlockByNumber"), [hex(block_number), False])], what="eth_getBlockByNumber")
                block = answer.get("result")
                if block is None and "error" not in answer:
                    return None
                if not isinstance(block, dict) or not isinstance(block.get("hash"), str):
                    raise ChainUnavailableError(self.name, self.url, f"eth_getBlockByNumber: unreadable block {block_number}")
                return str(block["hash"]).removeprefix("0x")
            try:
                found = self.w3.eth.get_block(block_number)
            except BlockNotFound:
                return None
            return None if found is None else bytes(found["hash"]).hex().removeprefix("0x")

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
