"""Any JSON-RPC endpoint (geth, Besu, Hardhat, a remote anvil); checks the chain id it answers with."""

from __future__ import annotations

from ..client import ChainClient
from ..errors import ChainSetupError

__all__ = ["rpc_client"]


def rpc_client(url: str, *, name: str, expected_chain_id: int | None, rpc_timeout_s: float, tx_timeout_s: float) -> ChainClient:
    """Connect to `url`; if `expected_chain_id` is set and the node is up, it must match."""
    client = ChainClient.http(url, name=name, rpc_timeout_s=rpc_timeout_s, tx_timeout_s=tx_timeout_s)
    if expected_chain_id is not None and client.is_reachable() and client.chain_id != expected_chain_id:
        raise ChainSetupError(
            f"{name} chain at {url} has chain id {client.chain_id}, but chain.{name}_chain_id is {expected_chain_id} "
            "— point the URL at the right node or fix the config"
        )
    return client
