"""`medtwin chain up|down|status`: start/stop the two anvil nodes, deploy once, report health."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from medtwin.core.config.chain import ChainConfig, validate_chain_config

from .backends import AnvilNode, find_anvil, free_port, node_is_running, read_node, rpc_client, start_anvil, stop_anvil
from .client import ChainClient
from .deployment import read_deployment
from .errors import ChainSetupError, ChainUnavailableError
from .outbox import Outbox
from .session import ensure_deployed, signing_accounts

__all__ = ["ChainStatus", "NodeStatus", "chain_down", "chain_status", "chain_up"]

ROLES = ("auth", "data")


@dataclass(frozen=True)
class NodeStatus:
    role: str
    rpc_url: str
    pid: int | None  # anvil only
    process_alive: bool | None  # None: not a node we manage
    reachable: bool
    chain_id: int | None
    block_number: int | None
    contract: str
    contract_address: str
    contract_present: bool
    pending_writes: int
    failed_writes: int


@dataclass(frozen=True)
class ChainStatus:
    backend: str
    state_dir: str
    nodes: tuple[NodeStatus, ...]

    @property
    def healthy(self) -> bool:
        return bool(self.nodes) and all(node.reachable and node.contract_present for node in self.nodes)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "healthy": self.healthy}, indent=1, sort_keys=True)


def _role_config(config: ChainConfig, role: str) -> tuple[int, int]:
    return (config.auth_chain_id, config.auth_port) if role == "auth" else (config.data_chain_id, config.data_port)


def _start_or_reuse(config: ChainConfig, role: str, state_dir: Path) -> tuple[AnvilNode, bool]:
    chain_id, port = _role_config(config, role)
    previous = read_node(state_dir, role)
    if previous is not None and node_is_running(previous):
        if previous.chain_id != chain_id:
            raise ChainSetupError(
                f"{role} node (PID {previous.pid}) runs chain id {previous.chain_id} but chain.{role}_chain_id is {chain_id}; "
                "run `medtwin chain down` first"
            )
        return previous, False
    if port == 0:
        port = previous.port if previous is not None else free_port(config.host)
    node = start_anvil(
        role=role,
        binary=find_anvil(config.anvil_binary),
        host=config.host,
        port=port,
        chain_id=chain_id,
        state_dir=state_dir,
        state_interval_s=config.state_interval_s,
        startup_timeout_s=config.startup_timeout_s,
    )
    return node, True


def chain_up(config: ChainConfig, state_dir: str | os.PathLike[str] | None = None) -> ChainStatus:
    """anvil: start (or reuse) both nodes, deploy if needed; rpc: deploy if needed. Idempotent."""
    validate_chain_config(config)
    directory = Path(state_dir if state_dir is not None else config.state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    admin, coordinator, dev = signing_accounts(config)
    if config.name == "anvil":
        started: list[AnvilNode] = []
        try:
            nodes = {}
            for role in ROLES:
                nodes[role], fresh = _start_or_reuse(config, role, directory)
                if fresh:
                    started.append(nodes[role])
            clients = {
                role: ChainClient.http(node.url, name=role, rpc_timeout_s=config.rpc_timeout_s, tx_timeout_s=config.tx_timeout_s)
                for role, node in nodes.items()
            }
            ensure_deployed("anvil", clients, admin=admin, coordinator=coordinator, fund_from_node=True, state_dir=directory)
        except BaseException:
            for node in started:
                stop_anvil(node)
            raise
    elif config.name == "rpc":
        urls = {"auth": (config.auth_rpc_url, config.auth_chain_id), "data": (config.data_rpc_url, config.data_chain_id)}
        clients = {
            role: rpc_client(url, name=role, expected_chain_id=chain_id, rpc_timeout_s=config.rpc_timeout_s, tx_timeout_s=config.tx_timeout_s)
            for role, (url, chain_id) in urls.items()
        }
        ensure_deployed("rpc", clients, admin=admin, coordinator=coordinator, fund_from_node=dev, state_dir=directory)
    else:
        raise ChainSetupError(
            f"chain.name={config.name!r}: `chain up` manages anvil nodes or rpc deployments only "
            "(embedded chains live inside one process; none means no chain)"
        )
    return chain_status(directory)


def chain_down(state_dir: str | os.PathLike[str]) -> list[str]:
    """Stop the anvil nodes recorded in `state_dir` (by PID); their state files stay for the next `up`."""
    stopped = []
    for role in ROLES:
        node = read_node(Path(state_dir), role)
        if node is not None and stop_anvil(node):
            stopped.append(f"{role} (PID {node.pid})")
    return stopped


def _node_status(role: str, directory: Path, url: str, node: AnvilNode | None, contract: str, address: str) -> NodeStatus:
    client = ChainClient.http(url, name=role, rpc_timeout_s=2.0) if url else None
    reachable = client is not None and client.is_reachable()
    chain_id = block = None
    present = False
    if client is not None and reachable:
        try:
            chain_id, block = client.chain_id, client.block_number()
            present = bool(address) and client.has_code(address)
        except ChainUnavailableError:
            reachable = False
    outbox = Outbox(directory / f"outbox-{role}.jsonl", chain=role)
    return NodeStatus(
        role=role,
        rpc_url=url,
        pid=node.pid if node else None,
        process_alive=node_is_running(node) if node else None,
        reachable=reachable,
        chain_id=chain_id,
        block_number=block,
        contract=contract,
        contract_address=address,
        contract_present=present,
        pending_writes=len(outbox.pending()),
        failed_writes=len(outbox.failed()),
    )


def chain_status(state_dir: str | os.PathLike[str]) -> ChainStatus:
    """Health of both chains as recorded in `state_dir` (never starts anything)."""
    directory = Path(state_dir)
    deployment = read_deployment(directory) if directory.is_dir() else None
    nodes = []
    for role in ROLES:
        node = read_node(directory, role) if directory.is_dir() else None
        recorded = deployment.chain(role) if deployment else None
        url = recorded.rpc_url if recorded else (node.url if node else "")
        contract = recorded.contract if recorded else ""
        address = recorded.address if recorded else ""
        nodes.append(_node_status(role, directory, url, node, contract, address))
    return ChainStatus(deployment.backend if deployment else "unknown", str(directory), tuple(nodes))
