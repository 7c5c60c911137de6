"""medtwin.chain: the authorization chain (FederationRegistry) and the data chain (ProvenanceLedger).

Contracts are Vyper (contracts/*.vy, compiled output cached in contracts/build/). Backends:
embedded (eth-tester, in-process), anvil (local nodes with persistent state), rpc (any URL).
See chain/README.md for the on-chain data model and the round-anchor leaf definition.
"""

import sys as _sys

from .accounts import ChainAccount, dev_account
from .anchoring import RoundManifest, build_round_anchor, epsilon_hash, participants_hash
from .audit import (
    AccessReport,
    LineageReport,
    Mismatch,
    VerifyReport,
    audit_access,
    audit_lineage,
    audit_verify,
)
from .auth_chain import MAX_DECISIONS_PER_TX, AuthChain
from .compiler import CompiledContract, load_contract
from .data_chain import DataChain
from .deployment import Deployment, read_deployment
from .encoding import run_key, site_key
from .errors import (
    AnvilNotFoundError,
    ChainConflictError,
    ChainError,
    ChainRevertError,
    ChainSetupError,
    ChainUnavailableError,
    ContractBuildError,
    DeploymentError,
    OutboxError,
)
from .lifecycle import ChainStatus, NodeStatus, chain_down, chain_status, chain_up
from .outbox import Outbox, PendingWrite
from .records import (
    AccessDecisionRecord,
    ApprovalRecord,
    Decision,
    FlushResult,
    ModelRecord,
    Role,
    RoundAnchor,
    RoundStatus,
    RunRecord,
    RunRegistration,
    SiteRecord,
    WriteReceipt,
)
from .render import access_table, lineage_table, status_table, verify_table
from .session import ChainSession, open_readonly, open_session, open_signed_readonly, shared_readonly

# web3 imports py_ecc, which raises the interpreter's recursion limit to 100000 for its pairing maths (medtwin does
# none). At that limit a deeply nested input — JSON, YAML — overflows the C stack and the process dies with SIGSEGV
# before Python can raise RecursionError: a peer's message would crash a coordinator or site that talks to a
# chain. py-evm (the embedded chain) asks for 1024 * 12 to reach the EVM's call depth; that much stays.
_EVM_RECURSION_LIMIT = 1024 * 12
_sys.setrecursionlimit(_EVM_RECURSION_LIMIT)

__all__ = [
    "MAX_DECISIONS_PER_TX",
    "AccessDecisionRecord",
    "AccessReport",
    "AnvilNotFoundError",
    "ApprovalRecord",
    "AuthChain",
    "ChainAccount",
    "ChainConflictError",
    "ChainError",
    "ChainRevertError",
    "ChainSession",
    "ChainSetupError",
    "ChainStatus",
    "ChainUnavailableError",
    "CompiledContract",
    "ContractBuildError",
    "DataChain",
    "Decision",
    "Deployment",
    "DeploymentError",
    "FlushResult",
    "LineageReport",
    "Mismatch",
    "ModelRecord",
    "NodeStatus",
    "Outbox",
    "OutboxError",
    "PendingWrite",
    "Role",
    "RoundAnchor",
    "RoundManifest",
    "RoundStatus",
    "RunRecord",
    "RunRegistration",
    "SiteRecord",
    "VerifyReport",
    "WriteReceipt",
    "access_table",
    "audit_access",
    "audit_lineage",
    "audit_verify",
    "build_round_anchor",
    "chain_down",
    "chain_status",
    "chain_up",
    "dev_account",
    "epsilon_hash",
    "lineage_table",
    "load_contract",
    "open_readonly",
    "open_session",
    "open_signed_readonly",
    "participants_hash",
    "read_deployment",
    "run_key",
    "shared_readonly",
    "site_key",
    "status_table",
    "verify_table",
]
