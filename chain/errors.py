"""Errors of the chain package; each message names the chain, the call and how to fix it."""

from __future__ import annotations

from medtwin.core.errors import MedtwinError

__all__ = [
    "AnvilNotFoundError",
    "ChainConflictError",
    "ChainError",
    "ChainRevertError",
    "ChainSetupError",
    "ChainUnavailableError",
    "ContractBuildError",
    "DeploymentError",
    "OutboxError",
]


class ChainError(MedtwinError):
    """Base class of every chain error."""


class ChainUnavailableError(ChainError):
    """The node did not answer (connection refused, timeout); writes go to the outbox if enabled."""

    def __init__(self, chain: str, url: str, detail: str) -> None:
        self.chain, self.url = chain, url
        super().__init__(
            f"{chain} chain at {url} is unreachable ({detail}) — start it with `medtwin chain up` "
            "or check chain.auth_rpc_url / chain.data_rpc_url"
        )


class ChainRevertError(ChainError):
    """The contract refused the call; `reason` is the contract's assert message."""

    def __init__(self, chain: str, call: str, reason: str) -> None:
        self.chain, self.call, self.reason = chain, call, reason
        super().__init__(f"{chain} chain refused {call}: {reason}")


class ChainConflictError(ChainError):
    """A queued write collides with a different record already on chain (e.g. another anchor)."""


class ChainSetupError(ChainError):
    """A backend could not be set up (bad config, node failed to start, wrong chain id)."""


class AnvilNotFoundError(ChainSetupError):
    def __init__(self, searched: list[str]) -> None:
        self.searched = searched
        places = "\n".join(f"  - {place}" for place in searched)
        super().__init__(
            "anvil binary not found; looked in:\n"
            f"{places}\n"
            "run `npm install` (or `make install`) at the repository root (installs @foundry-rs/anvil into node_modules), "
            "or set MEDTWIN_ANVIL=/path/to/anvil or chain.anvil_binary"
        )


class DeploymentError(ChainError):
    """The deployment record (deployment.json) is missing, unreadable or points at no contract."""


class ContractBuildError(ChainError):
    """A Vyper contract failed to compile or its cached build is inconsistent."""


class OutboxError(ChainError):
    """The durable outbox file is unreadable or a queued write cannot be replayed."""
