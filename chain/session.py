"""`ChainSession`: both gateways wired to the configured backend, plus the accounts that sign.

- embedded: two fresh in-process chains, contracts deployed on open (nothing persists);
- anvil: reads ``<state_dir>/deployment.json`` written by `chain_up` (or starts the nodes first
  with ``start_nodes=True``); opens even when a node is down — writes then go to the outbox;
- rpc: connects to the configured URLs and deploys once (recorded in deployment.json).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from medtwin.core.config.chain import ChainConfig, validate_chain_config

from .accounts import ChainAccount, account_from_env, dev_account
from .auth_chain import AuthChain
from .backends import embedded_client, read_node, rpc_client
from .client import ChainClient
from .compiler import load_contract
from .data_chain import DataChain
from .deployment import CONTRACT_OF, ChainDeployment, Deployment, deploy_chain, is_live, read_deployment, write_deployment
from .errors import ChainSetupError, ChainUnavailableError, DeploymentError
from .journal import Journal, anvil_durable_block
from .outbox import Outbox
from .records import FlushResult, ReconcileResult

__all__ = [
    "ChainSession",
    "ensure_deployed",
    "open_readonly",
    "open_session",
    "open_signed_readonly",
    "shared_readonly",
    "signing_accounts",
]

SITE_FUNDING_WEI = 10 * 10**18
DEV_BACKENDS = ("embedded", "anvil")


@dataclass
class ChainSession:
    backend: str
    auth: AuthChain
    data: DataChain
    deployment: Deployment
    state_dir: Path | None = None
    dev_accounts: bool = False
    _sites: dict[str, ChainAccount] = field(default_factory=dict)

    def site_account(self, site_id: str) -> ChainAccount:
        """The account a site signs its approvals with (dev backends: derived and funded)."""
        if site_id not in self._sites:
            if self.dev_accounts:
                account = dev_account(f"site:{site_id}")
                try:
                    self.auth.client.fund_from_node(account.address, wei=SITE_FUNDING_WEI)
                except ChainUnavailableError:
                    pass  # funded later; its writes wait in the outbox meanwhile
            else:
                variable = "MEDTWIN_CHAIN_SITE_KEY_" + re.sub(r"[^A-Z0-9]", "_", site_id.upper())
                account = account_from_env(variable, label=f"site {site_id}")
            self._sites[site_id] = account
            self.auth.add_signer(account)
        return self._sites[site_id]

    def start_background_sending(self, *, retry_s: float = 2.0) -> None:
        """One background sender per chain (sender.py): writes made with `background=True` return once durable."""
        self.auth.start_sender(retry_s=retry_s)
        self.data.start_sender(retry_s=retry_s)

    def stop_background_sending(self, *, drain_s: float) -> dict[str, int]:
        """Wait up to `drain_s` for the senders to put the queued writes on chain, stop them; what is left per chain."""
        deadline = time.monotonic() + drain_s  # both senders work meanwhile: one deadline for the two
        return {role: gateway.stop_sender(drain_s=max(0.0, deadline - time.monotonic())) for role, gateway in (("auth", self.auth), ("data", self.data))}

    def flush(self) -> dict[str, FlushResult]:
        """Replay both outboxes in order; see FlushResult.remaining for what still waits."""
        return {"auth": self.auth.flush(), "data": self.data.flush()}

    def reconcile(self) -> dict[str, ReconcileResult]:
        """Compare both journals with their chains; send again what a node lost, then the outboxes."""
        return {"auth": self.auth.reconcile(), "data": self.data.reconcile()}

    def finalize(self, *, wait_s: float) -> dict[str, ReconcileResult]:
        """Reconcile, then wait up to `wait_s` for every journaled write to be durable on its chain."""
        return {"auth": self.auth.finalize(wait_s=wait_s), "data": self.data.finalize(wait_s=wait_s)}

    def summary(self) -> dict[str, Any]:
        """The `chain` block of a run's summary.json."""
        return {
            "backend": self.backend,
            "auth": {"chain_id": self.deployment.auth.chain_id, "contract": self.deployment.auth.address, "rpc_url": self.deployment.auth.rpc_url},
            "data": {"chain_id": self.deployment.data.chain_id, "contract": self.deployment.data.address, "rpc_url": self.deployment.data.rpc_url},
        }


def signing_accounts(config: ChainConfig) -> tuple[ChainAccount, ChainAccount, bool]:
    """(admin, coordinator, are_dev_accounts): env keys on rpc if set, deterministic dev keys otherwise."""
    if config.name in DEV_BACKENDS:
        return dev_account("admin"), dev_account("coordinator"), True
    if os.environ.get(config.admin_key_env) or os.environ.get(config.coordinator_key_env):
        admin = account_from_env(config.admin_key_env, label="admin")
        coordinator = account_from_env(config.coordinator_key_env, label="coordinator")
        return admin, coordinator, False
    return dev_account("admin"), dev_account("coordinator"), True  # dev node with unlocked accounts


def ensure_deployed(
    backend: str,
    clients: dict[str, ChainClient],
    *,
    admin: ChainAccount,
    coordinator: ChainAccount,
    fund_from_node: bool,
    state_dir: Path | None,
) -> Deployment:
    """Reuse the recorded contracts that are still live; deploy the rest; record the result."""
    previous = read_deployment(state_dir) if state_dir is not None else None
    chains = {}
    for role, client in clients.items():
        recorded = previous.chain(role) if previous is not None and previous.backend == backend else None
        if recorded is not None and is_live(recorded, client):
            source = load_contract(CONTRACT_OF[role]).source_sha256
            if recorded.source_sha256 != source:  # another contract version: its ABI is not this code's
                raise ChainSetupError(
                    f"the {role} chain's {recorded.contract} at {recorded.address} (recorded in {state_dir}/deployment.json) was "
                    f"deployed from another version of {recorded.contract}.vy (source {recorded.source_sha256[:12]}…, this "
                    f"medtwin has {source[:12]}…); its records stay readable there — give this version a new chain.state_dir "
                    "(or, for a throw-away local chain, `medtwin chain down` and delete that folder)"
                )
            chains[role] = replace(recorded, rpc_url=client.url)
        else:
            chains[role] = deploy_chain(role, client, admin=admin, coordinator=coordinator, fund_from_node=fund_from_node)
    deployment = Deployment(backend, chains["auth"], chains["data"], admin.address, coordinator.address)
    if state_dir is not None and deployment != previous:
        write_deployment(state_dir, deployment)
    return deployment


def _gateways(
    clients: dict[str, ChainClient],
    deployment: Deployment,
    *,
    admin: ChainAccount | None,
    coordinator: ChainAccount | None,
    outbox_dir: Path | None,
    dev: bool = False,
    durable_blocks: dict[str, Callable[[], int]] | None = None,
) -> tuple[AuthChain, DataChain]:
    built: dict[str, Any] = {}
    for role, gateway_type in (("auth", AuthChain), ("data", DataChain)):
        record = deployment.chain(role)
        contract = clients[role].contract(record.address, load_contract(CONTRACT_OF[role]).abi)
        outbox = Outbox(outbox_dir / f"outbox-{role}.jsonl", chain=role) if outbox_dir is not None else None
        journal = Journal(outbox_dir / f"journal-{role}.jsonl", chain=role) if outbox_dir is not None else None
        built[role] = gateway_type(
            clients[role], contract, deploy_block=record.deploy_block, outbox=outbox, admin=admin, coordinator=coordinator,
            signer_resolver=dev_account if dev else None, journal=journal, durable_block=(durable_blocks or {}).get(role),
        )  # fmt: skip
    return built["auth"], built["data"]


def open_session(config: ChainConfig, *, state_dir: str | os.PathLike[str] | None = None, start_nodes: bool = False) -> ChainSession:
    """Connect both chains per `config` (see the module docstring for each backend)."""
    validate_chain_config(config)
    durable_blocks: dict[str, Callable[[], int]] = {}
    if config.name == "none":
        raise ChainSetupError("chain.name is 'none': no chain to open — pick chain=embedded|anvil|rpc")
    directory = Path(state_dir if state_dir is not None else config.state_dir)
    admin, coordinator, dev = signing_accounts(config)
    if config.name == "embedded":
        clients = {role: embedded_client(name=role, tx_timeout_s=config.tx_timeout_s) for role in ("auth", "data")}
        deployment = ensure_deployed("embedded", clients, admin=admin, coordinator=coordinator, fund_from_node=True, state_dir=None)
        outbox_dir = directory if state_dir is not None and config.use_outbox else None
    elif config.name == "anvil":
        if start_nodes:
            from .lifecycle import chain_up

            chain_up(config, directory)
        deployment = read_deployment(directory)
        if deployment is None:
            raise DeploymentError(f"no {directory / 'deployment.json'}: start the chains first with `medtwin chain up`")
        clients = {
            role: ChainClient.http(deployment.chain(role).rpc_url, name=role, rpc_timeout_s=config.rpc_timeout_s, tx_timeout_s=config.tx_timeout_s)
            for role in ("auth", "data")
        }
        outbox_dir = directory if config.use_outbox else None
        durable_blocks = {role: _anvil_durability(directory, role) for role in ("auth", "data")}
    else:
        urls = {"auth": (config.auth_rpc_url, config.auth_chain_id), "data": (config.data_rpc_url, config.data_chain_id)}
        clients = {
            role: rpc_client(url, name=role, expected_chain_id=chain_id, rpc_timeout_s=config.rpc_timeout_s, tx_timeout_s=config.tx_timeout_s)
            for role, (url, chain_id) in urls.items()
        }
        deployment = read_deployment(directory)
        if deployment is None or all(client.is_reachable() for client in clients.values()):
            deployment = ensure_deployed("rpc", clients, admin=admin, coordinator=coordinator, fund_from_node=dev, state_dir=directory)
        outbox_dir = directory if config.use_outbox else None
        durable_blocks = {role: _confirmed(client, config.confirmations) for role, client in clients.items()}
    auth, data = _gateways(clients, deployment, admin=admin, coordinator=coordinator, outbox_dir=outbox_dir, dev=dev, durable_blocks=durable_blocks)
    return ChainSession(config.name, auth, data, deployment, directory if outbox_dir else None, dev_accounts=dev)


def _anvil_durability(directory: Path, role: str) -> Callable[[], int]:
    """anvil: a block is durable once the node's state file holds it (dumped every chain.state_interval_s)."""
    node = read_node(directory, role)
    state_file = Path(node.state_file) if node is not None else directory / "nodes" / f"{role}-state.json"
    return lambda: anvil_durable_block(state_file)


def _confirmed(client: ChainClient, confirmations: int) -> Callable[[], int]:
    """rpc: a block is durable once `chain.confirmations` blocks are mined on top of it."""
    return lambda: client.block_number() - confirmations


def open_readonly(state_dir: str | os.PathLike[str], *, rpc_timeout_s: float = 10.0) -> ChainSession:
    """Read-only session for auditors, from deployment.json alone (no keys, no outbox)."""
    deployment = read_deployment(state_dir)
    if deployment is None:
        raise DeploymentError(f"no deployment record in {state_dir}; pass the coordinator's chain state dir")
    if deployment.backend == "embedded":
        raise DeploymentError("an embedded chain lives only inside the process that created it; it cannot be audited later")
    clients = {role: ChainClient.http(deployment.chain(role).rpc_url, name=role, rpc_timeout_s=rpc_timeout_s) for role in ("auth", "data")}
    auth, data = _gateways(clients, deployment, admin=None, coordinator=None, outbox_dir=None)
    return ChainSession(deployment.backend, auth, data, deployment, Path(state_dir))


_shared_sessions: dict[Path, tuple[tuple[int, int, int], ChainSession]] = {}
_shared_sessions_lock = threading.Lock()


def shared_readonly(state_dir: str | os.PathLike[str]) -> ChainSession:
    """The read-only session this process opened on `state_dir` before, while its deployment.json is the same
    file unchanged (else a new one, kept for the next caller): a site's checks reuse one connection, its cached
    chain ids and the registrations it read, instead of reconnecting per check. It holds no answer that can
    change: approvals, revocations and anchors are read from the chain on every call."""
    path = Path(state_dir).resolve()
    try:
        stat = os.stat(path / "deployment.json")
    except FileNotFoundError:
        return open_readonly(path)  # raises the usual "no deployment record" error
    version = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
    with _shared_sessions_lock:
        known = _shared_sessions.get(path)
        if known is not None and known[0] == version:
            return known[1]
        session = open_readonly(path)
        _shared_sessions[path] = (version, session)
        return session


def open_signed_readonly(chains: dict[str, dict[str, Any]], *, rpc_timeout_s: float = 10.0) -> ChainSession:
    """Read-only session from the chain record the federation admin signed (chain ids, addresses,
    URLs) — what an auditor uses instead of the coordinator's deployment.json. Each node must report
    the signed chain id."""
    records = {}
    for role in ("auth", "data"):
        entry = chains[role]
        records[role] = ChainDeployment(
            role=role, rpc_url=str(entry["rpc_url"]), chain_id=int(entry["chain_id"]), contract=str(entry["contract"]),
            address=str(entry["address"]), deploy_block=int(entry["deploy_block"]), source_sha256=str(entry["source_sha256"]),
            deployed_at=0.0,
        )  # fmt: skip
    deployment = Deployment(backend="rpc", auth=records["auth"], data=records["data"], admin="", coordinator="")
    clients = {role: ChainClient.http(records[role].rpc_url, name=role, rpc_timeout_s=rpc_timeout_s) for role in ("auth", "data")}
    for role, client in clients.items():
        if client.chain_id != records[role].chain_id:
            raise DeploymentError(
                f"the {role} node at {records[role].rpc_url} reports chain id {client.chain_id}, the admin signed "
                f"{records[role].chain_id}: not the federation's chain"
            )
    auth, data = _gateways(clients, deployment, admin=None, coordinator=None, outbox_dir=None)
    return ChainSession("rpc", auth, data, deployment, None)
