"""In-process chains (eth-tester + py-evm): ephemeral, no node, for unit tests and quick runs.

eth-tester fixes the chain id (131277322940537) for every instance; the two embedded chains are
still separate EVMs. Use the anvil backend when distinct chain ids matter.
"""

from __future__ import annotations

from eth_tester import EthereumTester, PyEVMBackend
from web3 import EthereumTesterProvider, Web3

from ..client import ChainClient

__all__ = ["embedded_client"]

EMBEDDED_TX_GAS = 10_000_000  # per-transaction gas limit (the block limit is ~30M)


def embedded_client(*, name: str, tx_timeout_s: float = 60.0) -> ChainClient:
    """A fresh in-process chain with funded, unlocked test accounts."""
    tester = EthereumTester(backend=PyEVMBackend())
    w3 = Web3(EthereumTesterProvider(tester))
    return ChainClient(w3, name=name, url=f"embedded://{name}", tx_timeout_s=tx_timeout_s, fixed_gas=EMBEDDED_TX_GAS)
