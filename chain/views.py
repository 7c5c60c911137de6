"""A contract's functions, ABI-resolved once: what web3 redoes on every `functions.x(...).call()` or write.

web3 builds a `ContractFunction` per call (copies and searches the ABI, validates the arguments), encodes,
runs its middleware and decodes with its normalizers: 5-7 ms of a 7-9 ms read against a local node. Here
each function's selector, argument types and output decoder are built once per contract, and calldata
once per argument tuple (a round asks the same questions every round: is this site admitted to this run?).
Answers are never kept: every `ViewCall` goes to the node again (`ChainClient.read`), so a revocation or
withdrawal is seen on the next read.

A write's calldata is built the same way (`ViewFunctions.write`: selector + eth_abi encoding, never cached, a
write's arguments are new every time); `ChainClient.transact` signs and sends it without web3's contract layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from eth_abi import decode, encode
from eth_utils import function_abi_to_4byte_selector, to_checksum_address

from .errors import ChainError

__all__ = ["MAX_CACHED_CALLDATA", "ViewCall", "ViewFunctions", "WriteCall"]

MAX_CACHED_CALLDATA = 4096  # argument tuples kept per contract; beyond that the cache starts over


@dataclass(frozen=True)
class ViewCall:
    """One eth_call, encoded: `decode` turns the node's raw answer into what web3's `.call()` would return."""

    what: str  # the function's name, for errors
    to: str
    data: str  # 0x-prefixed calldata
    decode: Callable[[bytes], Any]


@dataclass(frozen=True)
class WriteCall:
    """One contract write, encoded: the transaction's `to` and `data` (signed and sent by `ChainClient.transact`)."""

    what: str  # the function's name, for errors and receipts
    to: str
    data: str  # 0x-prefixed calldata


def _abi_type(entry: Mapping[str, Any]) -> str:
    """The canonical type of one ABI input/output: tuples spelled out as `(t1,t2,...)[...]`."""
    kind = str(entry["type"])
    if not kind.startswith("tuple"):
        return kind
    return "(" + ",".join(_abi_type(component) for component in entry["components"]) + ")" + kind[len("tuple") :]


def _normalized(value: Any, entry: Mapping[str, Any]) -> Any:
    """As web3 returns it: addresses checksummed, inside tuples too (eth_abi gives them in lower case)."""
    kind = str(entry["type"])
    if kind == "address":
        return to_checksum_address(value)
    if kind == "tuple":
        return tuple(_normalized(item, component) for item, component in zip(value, entry["components"], strict=True))
    return value


@dataclass(frozen=True)
class _ViewFunction:
    name: str
    selector: bytes
    input_types: tuple[str, ...]
    output_types: tuple[str, ...]
    outputs: tuple[Mapping[str, Any], ...]

    def decode(self, raw: bytes) -> Any:
        values = tuple(_normalized(value, entry) for value, entry in zip(decode(self.output_types, raw), self.outputs, strict=True))
        return values[0] if len(values) == 1 else values


class ViewFunctions:
    """The view functions of one deployed contract (`address`, `abi`), each resolved on first use."""

    def __init__(self, address: str, abi: Sequence[Mapping[str, Any]], *, max_cached_calldata: int = MAX_CACHED_CALLDATA) -> None:
        self.address = to_checksum_address(address)
        self._abi = [entry for entry in abi if entry.get("type") == "function"]
        self._functions: dict[str, _ViewFunction] = {}
        self._calldata: dict[tuple[str, tuple[Any, ...]], str] = {}
        self._max_cached_calldata = max_cached_calldata

    def call(self, method: str, *args: Any) -> ViewCall:
        """The eth_call of `method(*args)` (arguments as web3 takes them: checksummed or lower-case addresses,
        bytes32 as bytes, ints); raises `ChainError` for an unknown method or arguments that do not encode."""
        function = self._function(method, len(args))
        key = (method, args)
        data = self._calldata.get(key)
        if data is None:
            try:
                data = "0x" + (function.selector + encode(function.input_types, args)).hex()
            except Exception as error:  # eth_abi raises several types, all meaning "these are not the ABI's types"
                raise ChainError(f"{method}{function.input_types}: arguments {args!r:.200} do not encode: {error}") from error
            if len(self._calldata) >= self._max_cached_calldata:
                self._calldata.clear()
            self._calldata[key] = data
        return ViewCall(what=method, to=self.address, data=data, decode=function.decode)

    def write(self, method: str, *args: Any) -> WriteCall:
        """The calldata of the write `method(*args)` (arguments as web3 takes them; lists for arrays); raises
        `ChainError` for an unknown method or arguments that do not encode. Not cached."""
        function = self._function(method, len(args))
        try:
            data = "0x" + (function.selector + encode(function.input_types, args)).hex()
        except Exception as error:  # eth_abi raises several types, all meaning "these are not the ABI's types"
            raise ChainError(f"{method}{function.input_types}: arguments {args!r:.200} do not encode: {error}") from error
        return WriteCall(what=method, to=self.address, data=data)

    def _function(self, method: str, arity: int) -> _ViewFunction:
        known = self._functions.get(method)
        if known is not None and len(known.input_types) == arity:
            return known
        matches = [entry for entry in self._abi if entry.get("name") == method and len(entry.get("inputs", ())) == arity]
        if len(matches) != 1:
            raise ChainError(
                f"contract {self.address}: {len(matches)} view functions named {method!r} take {arity} argument(s); "
                "expected exactly one (is the deployment's ABI the contract's?)"
            )
        entry = matches[0]
        function = _ViewFunction(
            name=method,
            selector=function_abi_to_4byte_selector(entry),
            input_types=tuple(_abi_type(item) for item in entry["inputs"]),
            output_types=tuple(_abi_type(item) for item in entry["outputs"]),
            outputs=tuple(entry["outputs"]),
        )
        self._functions[method] = function
        return function
