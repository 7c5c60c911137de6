"""Schema of the `chain/` config group (authorization + data chains)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

CHAIN_BACKENDS = ("none", "embedded", "anvil", "rpc")


@dataclass
class ChainConfig:
    name: str = "none"  # none | embedded (in-process eth-tester) | anvil (local nodes) | rpc (any JSON-RPC URL)
    state_dir: str = ".medtwin/chain"  # pidfiles, anvil --state files, deployment.json, outboxes
    auth_chain_id: int = 31338  # authorization chain (FederationRegistry)
    data_chain_id: int = 31339  # data chain (ProvenanceLedger); must differ from auth_chain_id
    host: str = "127.0.0.1"  # anvil listens here
    auth_port: int = 8545  # anvil port of the auth chain; 0 = pick a free port at `chain up`
    data_port: int = 8546  # anvil port of the data chain; 0 = pick a free port at `chain up`
    auth_rpc_url: str = ""  # rpc backend: JSON-RPC URL of the auth chain
    data_rpc_url: str = ""  # rpc backend: JSON-RPC URL of the data chain
    anvil_binary: str = ""  # empty: $MEDTWIN_ANVIL, then <repo>/node_modules, then PATH
    state_interval_s: int = 1  # anvil also dumps its state every N seconds (not only at exit)
    startup_timeout_s: float = 30.0  # wait this long for a started node to answer JSON-RPC
    rpc_timeout_s: float = 10.0  # one JSON-RPC request
    tx_timeout_s: float = 60.0  # wait this long for a transaction to be mined
    admin_key_env: str = "MEDTWIN_CHAIN_ADMIN_KEY"  # rpc backend: env var holding the admin's hex key
    coordinator_key_env: str = "MEDTWIN_CHAIN_COORDINATOR_KEY"  # rpc backend: coordinator's hex key
    use_outbox: bool = True  # queue writes durably while a chain is unreachable, flush in order later
    outage_timeout_s: float = 600.0  # a run trains on through a chain outage this long (writes queued), then stops at a checkpoint
    confirmations: int = 0  # rpc: a write is finalized once this many blocks are mined on top of it


def validate_chain_config(chain: ChainConfig) -> None:
    """Cross-field checks of the chain group; each error names its config key."""
    if chain.name not in CHAIN_BACKENDS:
        raise ConfigError("chain.name", f"unknown chain backend {chain.name!r}", f"use one of {CHAIN_BACKENDS}")
    if chain.name == "none":
        return
    if chain.auth_chain_id == chain.data_chain_id:
        raise ConfigError(
            "chain.data_chain_id",
            f"equals chain.auth_chain_id ({chain.auth_chain_id}); the two chains need different ids",
            "set e.g. chain.auth_chain_id=31338 chain.data_chain_id=31339",
        )
    for key in ("auth_chain_id", "data_chain_id"):
        if getattr(chain, key) < 1:
            raise ConfigError(f"chain.{key}", f"must be >= 1, got {getattr(chain, key)}")
    for key in ("auth_port", "data_port"):
        if not 0 <= getattr(chain, key) <= 65535:
            raise ConfigError(f"chain.{key}", f"must be a TCP port (0 = any free port), got {getattr(chain, key)}")
    if chain.name == "anvil" and chain.auth_port and chain.auth_port == chain.data_port:
        raise ConfigError("chain.data_port", f"equals chain.auth_port ({chain.auth_port})", "give each node its own port")
    if chain.name == "rpc":
        for key in ("auth_rpc_url", "data_rpc_url"):
            if not getattr(chain, key).startswith(("http://", "https://")):
                raise ConfigError(f"chain.{key}", f"rpc backend needs an http(s) URL, got {getattr(chain, key)!r}")
    for key in ("startup_timeout_s", "rpc_timeout_s", "tx_timeout_s", "outage_timeout_s"):
        if getattr(chain, key) <= 0:
            raise ConfigError(f"chain.{key}", f"must be > 0, got {getattr(chain, key)}")
    if chain.confirmations < 0:
        raise ConfigError("chain.confirmations", f"must be >= 0, got {chain.confirmations}")
    if chain.state_interval_s < 1:
        raise ConfigError("chain.state_interval_s", f"must be >= 1 second, got {chain.state_interval_s}")
