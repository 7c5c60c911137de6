"""Deploy the two contracts once and remember where they are (``<state_dir>/deployment.json``).

The record is written atomically. On restart it is reused for each chain whose contract is still
there (same chain id, code at the address); a chain whose state was lost gets a fresh contract.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .accounts import ChainAccount
from .client import ChainClient
from .compiler import load_contract
from .errors import DeploymentError
from .records import Role

__all__ = ["ChainDeployment", "Deployment", "deploy_chain", "deployment_path", "read_deployment", "write_deployment"]

DEPLOYMENT_FILE = "deployment.json"
SCHEMA = 1
CONTRACT_OF = {"auth": "FederationRegistry", "data": "ProvenanceLedger"}
DEV_FUNDING_WEI = 1000 * 10**18


@dataclass(frozen=True)
class ChainDeployment:
    role: str  # "auth" | "data"
    rpc_url: str
    chain_id: int
    contract: str
    address: str
    deploy_block: int
    source_sha256: str
    deployed_at: float


@dataclass(frozen=True)
class Deployment:
    backend: str
    auth: ChainDeployment
    data: ChainDeployment
    admin: str
    coordinator: str
    schema: int = SCHEMA

    def chain(self, role: str) -> ChainDeployment:
        return self.auth if role == "auth" else self.data

    def with_chain(self, chain: ChainDeployment) -> Deployment:
        return replace(self, **{chain.role: chain})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Deployment:
        record = json.loads(text)
        return cls(
            backend=record["backend"],
            auth=ChainDeployment(**record["auth"]),
            data=ChainDeployment(**record["data"]),
            admin=record["admin"],
            coordinator=record["coordinator"],
            schema=int(record.get("schema", SCHEMA)),
        )


def deployment_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / DEPLOYMENT_FILE


def read_deployment(state_dir: str | os.PathLike[str]) -> Deployment | None:
    path = deployment_path(state_dir)
    if not path.is_file():
        return None
    try:
        return Deployment.from_json(path.read_text(encoding="utf-8"))
    except (ValueError, KeyError, TypeError) as error:
        raise DeploymentError(
            f"{path} is not a valid deployment record ({error}); move it aside and run `medtwin chain up` to redeploy"
        ) from error


def write_deployment(state_dir: str | os.PathLike[str], deployment: Deployment) -> Path:
    path = deployment_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(deployment.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def is_live(chain: ChainDeployment, client: ChainClient) -> bool:
    """The recorded contract is still deployed on the chain `client` talks to."""
    return client.chain_id == chain.chain_id and client.has_code(chain.address)


def deploy_chain(
    role: str,
    client: ChainClient,
    *,
    admin: ChainAccount,
    coordinator: ChainAccount,
    fund_from_node: bool,
) -> ChainDeployment:
    """Deploy the contract of `role` with `admin`, then give `coordinator` its write right."""
    if fund_from_node:
        for account in (admin, coordinator):
            client.fund_from_node(account.address, wei=DEV_FUNDING_WEI)
    compiled = load_contract(CONTRACT_OF[role])
    address, receipt = client.deploy(admin, compiled)
    contract = client.contract(address, compiled.abi)
    if role == "auth":
        client.transact(admin, contract.functions.grant_role(coordinator.address, int(Role.COORDINATOR)), call="grant_role")
    else:
        client.transact(admin, contract.functions.set_writer(coordinator.address, True), call="set_writer")
    return ChainDeployment(
        role=role,
        rpc_url=client.url,
        chain_id=client.chain_id,
        contract=compiled.name,
        address=address,
        deploy_block=receipt.block_number,
        source_sha256=compiled.source_sha256,
        deployed_at=time.time(),
    )
