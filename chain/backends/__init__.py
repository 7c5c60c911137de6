"""Chain backends: `embedded` (in-process eth-tester), `anvil` (local nodes), `rpc` (any URL)."""

from .anvil import AnvilNode, find_anvil, free_port, node_is_running, read_node, start_anvil, stop_anvil, wait_for_rpc
from .embedded import embedded_client
from .rpc import rpc_client

__all__ = [
    "AnvilNode",
    "embedded_client",
    "find_anvil",
    "free_port",
    "node_is_running",
    "read_node",
    "rpc_client",
    "start_anvil",
    "stop_anvil",
    "wait_for_rpc",
]
